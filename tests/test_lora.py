"""LoRA (gpt.lora, the book's Appendix E): outputs unchanged at init, exactly the adapters trainable,
merged == unmerged, rank(W_after - W_before) <= R after training; on the reference and the fused model
(both kernel paths), and on a fused QKV linear. Oracles are computed here from the formula
``W + alpha * (A @ B)^T`` in fp64, never with gpt.lora's own merge."""

import math

import pytest
import torch
from torch import nn

from gpt.checkpoint import trainable_state_dict
from gpt.config import GPTConfig
from gpt.lora import (
    LinearWithLoRA,
    LoRALayer,
    count_parameters,
    merge_adapters,
    merge_lora,
    replace_linear_with_lora,
    state_dict_fingerprint,
)
from gpt.model import GPTModel
from gpt.reference import GPTModel as RefModel
from tests.utils import book_named

CFG = GPTConfig(vocab_size=97, context_length=24, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
RANK, ALPHA = 2, 3.0


def _model(cls, seed=0):
    torch.manual_seed(seed)
    m = RefModel(CFG)
    if cls is GPTModel:
        f = GPTModel(CFG)
        f.load_state_dict(m.state_dict())
        m = f
    return m


def _adapt(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return replace_linear_with_lora(model, RANK, ALPHA)


def _randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _oracle_state_dict(lora_model, base_sd):
    """Plain state dict from the formula, fp64, independent of gpt.lora's merge code."""
    sd = {k: v.double().clone() for k, v in base_sd.items()}
    params = book_named(lora_model.named_parameters())  # the fused wqkv's adapters as the book's q/k/v ones
    for name in list(params):
        if name.endswith(".lora.A"):
            prefix = name[: -len(".lora.A")]
            A, B = params[name].detach().double(), params[prefix + ".lora.B"].detach().double()
            sd[prefix + ".weight"] += ALPHA * (A @ B).T
    return {k: v.float() for k, v in sd.items()}


def test_lora_layer_is_the_books():
    torch.manual_seed(0)
    layer = LoRALayer(16, 12, rank=4, alpha=2.5)
    assert layer.A.shape == (16, 4) and layer.B.shape == (4, 12)
    assert torch.count_nonzero(layer.B) == 0
    bound = 1 / math.sqrt(4)  # kaiming_uniform(a=sqrt(5)) on (in, rank): fan_in = rank
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.5 * bound
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), 2.5 * (x.double() @ layer.A.double() @ layer.B.double()).float(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank, alpha", [(0, 1.0), (-2, 1.0), (1.5, 1.0), (True, 1.0), (2, float("nan")),
                                         (2, "8")])
def test_bad_rank_or_alpha_is_a_clear_error(rank, alpha):
    with pytest.raises(ValueError, match="rank|alpha"):
        replace_linear_with_lora(nn.Sequential(nn.Linear(4, 4)), rank, alpha)


def test_fused_outputs_unchanged_at_init_and_only_adapters_train(kernel_path):
    base = _model(GPTModel)
    idx = torch.randint(0, CFG.vocab_size, (2, 11))
    with torch.no_grad():
        before = base(idx)
    model = _adapt(base)
    n_linear = 4 * CFG.n_layers + 2 * CFG.n_layers + 1  # q, k, v, out_proj; two ff; out_head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * n_linear and all(n.endswith((".A", ".B")) and ".lora." in n for n in trainable)
    assert sum(".wqkv.lora." in n for n in trainable) == 6 * CFG.n_layers  # A, B for each of q, k, v
    saved = trainable_state_dict(model)  # what a LoRA checkpoint holds: the book's adapter keys
    assert len(saved) == 2 * n_linear and all(k.endswith((".lora.A", ".lora.B")) for k in saved)
    assert set(saved) == set(trainable_state_dict(_adapt(_model(RefModel))))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, atol=0, rtol=0)


def test_reference_outputs_unchanged_at_init_and_parameter_counts():
    base = _model(RefModel)
    idx = torch.randint(0, CFG.vocab_size, (2, 11))
    with torch.no_grad():
        before = base(idx)
    n_total = sum(p.numel() for p in base.parameters())
    model = _adapt(base)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, atol=0, rtol=0)
    expected = sum(RANK * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LinearWithLoRA))
    assert count_parameters(model) == (expected, n_total + expected)


@pytest.mark.parametrize("cls", [RefModel, GPTModel], ids=["reference", "fused"])
def test_merged_equals_unmerged_and_the_formula(cls, fallback_path):
    model = _adapt(_model(cls))
    base_sd = _model(cls).state_dict()
    _randomize_B(model)
    idx = torch.randint(0, CFG.vocab_size, (2, 13))
    tgt = torch.randint(0, CFG.vocab_size, (2, 13))
    with torch.no_grad():
        logits, loss = model(idx), model.loss(idx, tgt)  # (the fused loss reads out_head.weight directly)
        oracle = RefModel(CFG)
        oracle.load_state_dict(_oracle_state_dict(model, base_sd))
        torch.testing.assert_close(logits, oracle(idx), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loss, oracle.loss(idx, tgt), atol=1e-5, rtol=1e-5)
        trained = {k: v for k, v in model.state_dict().items() if k.endswith((".A", ".B"))}
        merged_sd = merge_adapters(base_sd, trained, ALPHA)
        merge_lora(model)
        assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
        assert set(model.state_dict()) == set(base_sd)
        torch.testing.assert_close(model(idx), logits, atol=1e-4, rtol=1e-4)
        for k, v in merged_sd.items():
            torch.testing.assert_close(v, model.state_dict()[k], atol=1e-6, rtol=1e-6, msg=k)


def test_fused_lora_gradients_match_reference(kernel_path):
    ref, fused = _adapt(_model(RefModel)), _adapt(_model(GPTModel))
    fused.load_state_dict(ref.state_dict())
    _randomize_B(ref)
    _randomize_B(fused)
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    tgt = torch.randint(0, CFG.vocab_size, (2, 9))
    ref.loss(idx, tgt).backward()
    fused.loss(idx, tgt).backward()
    gf = book_named((n, p.grad) for n, p in fused.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(gf[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)
        else:
            assert gf[n] is None and p.grad is None


@pytest.mark.parametrize("cls", [RefModel, GPTModel], ids=["reference", "fused"])
def test_training_changes_each_weight_by_rank_at_most_r(cls, fallback_path):
    base_sd = {k: v.clone() for k, v in _model(cls).state_dict().items()}
    model = _adapt(_model(cls))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    idx = torch.randint(0, CFG.vocab_size, (4, 16))
    losses = []
    for _ in range(3):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merge_lora(model)
    after = model.state_dict()
    changed = 0
    for k, w0 in base_sd.items():
        diff = (after[k] - w0).double()
        if k.endswith(".weight") and diff.dim() == 2 and "emb" not in k:
            rank = torch.linalg.matrix_rank(diff, rtol=1e-4).item()
            assert rank <= RANK, f"{k}: rank {rank}"
            changed += rank > 0
        else:  # biases, norms, embeddings: frozen
            assert torch.equal(after[k], w0), k
    assert changed == 4 * CFG.n_layers + 2 * CFG.n_layers + 1


class FusedQKV(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.wqkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


def test_fused_qkv_linear_gets_one_adapter_per_part():
    torch.manual_seed(0)
    m = replace_linear_with_lora(FusedQKV(), RANK, ALPHA)
    assert m.wqkv.parts == 3 and len(m.wqkv.lora) == 3 and m.proj.parts == 1
    _randomize_B(m)
    x = torch.randn(5, 8)
    out = m.wqkv(x)
    # each third of the output equals a book LinearWithLoRA on that third of W
    W, b = m.wqkv.linear.weight.double(), m.wqkv.linear.bias.double()
    for i, ad in enumerate(m.wqkv.lora):
        sl = slice(8 * i, 8 * (i + 1))
        expect = x.double() @ W[sl].T + b[sl] + ALPHA * (x.double() @ ad.A.double() @ ad.B.double())
        torch.testing.assert_close(out[:, sl], expect.float(), atol=1e-5, rtol=1e-5)
        assert torch.linalg.matrix_rank((m.wqkv.weight - m.wqkv.linear.weight)[sl].double(), rtol=1e-4).item() <= RANK
    torch.testing.assert_close(nn.functional.linear(x, m.wqkv.weight, m.wqkv.bias), out, atol=1e-5, rtol=1e-5)
    trained = {k: v for k, v in m.state_dict().items() if ".lora." in k}
    base = {k.replace(".linear.", "."): v for k, v in m.state_dict().items() if ".lora." not in k}
    merged_sd = merge_adapters(base, trained, ALPHA)
    merge_lora(m)
    torch.testing.assert_close(m.wqkv(x), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_sd["wqkv.weight"], m.wqkv.weight, atol=1e-6, rtol=1e-6)


def test_replace_twice_does_not_nest_and_fingerprint_sees_changes():
    m = replace_linear_with_lora(nn.Sequential(nn.Linear(4, 4)), 1, 1.0)
    replace_linear_with_lora(m, 1, 1.0)
    assert isinstance(m[0].linear, nn.Linear) and not isinstance(m[0].linear, LinearWithLoRA)
    sd = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    f0 = state_dict_fingerprint(sd)
    sd["b"][0, 1] = 1.0000001
    assert state_dict_fingerprint(sd) != f0
    assert state_dict_fingerprint({"a": torch.zeros(3), "b": torch.ones(2, 2)}) == f0
