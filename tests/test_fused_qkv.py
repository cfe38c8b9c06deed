"""kernels.CausalSelfAttention's one fused QKV weight (``wqkv``): parameters, the q/k/v it computes (fp64
oracle with three separate weights), the book's state_dict keys both ways (round trips bit-identical,
the book's ``mask`` key, strict errors named with the book's keys, assign/meta loading), no weight
concatenation in any forward, and LoRA on the real fused GPTModel against the reference model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gpt.attention import MultiHeadAttention
from gpt.checkpoint import load_checkpoint, save_checkpoint, trainable_state_dict
from gpt.config import GPTConfig
from gpt.lora import LinearWithLoRA, merge_lora, replace_linear_with_lora
from gpt.model import GPTModel
from gpt.reference import GPTModel as RefModel
from kernels import CausalSelfAttention

CFG = GPTConfig(vocab_size=97, context_length=24, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
D_IN, D_OUT, CTX, HEADS = 24, 32, 16, 2  # head_dim 16


def _pair(bias=True, seed=0):
    torch.manual_seed(seed)
    mha = MultiHeadAttention(D_IN, D_OUT, CTX, 0.0, HEADS, qkv_bias=bias).eval()
    fused = CausalSelfAttention(D_IN, D_OUT, CTX, 0.0, HEADS, qkv_bias=bias).eval()
    fused.load_state_dict(mha.state_dict(), strict=True)
    return mha, fused


def _models(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    ref = RefModel(cfg).eval()
    fused = GPTModel(cfg).eval()
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


@pytest.mark.parametrize("bias", [False, True])
def test_one_fused_parameter_and_the_books_state_dict_keys(bias):
    mha, fused = _pair(bias)
    names = [n for n, _ in fused.named_parameters()]
    assert names == ["wqkv.weight", *(["wqkv.bias"] if bias else []), "out_proj.weight", "out_proj.bias"]
    assert fused.wqkv.weight.shape == (3 * D_OUT, D_IN) and not hasattr(fused, "W_query")
    assert list(fused.state_dict()) == list(mha.state_dict())  # same keys, same order


def test_qkv_equals_three_separate_fp64_projections():
    mha, fused = _pair(bias=True)
    x = torch.randn(3, 11, D_IN)
    q, k, v = fused.qkv(x)
    for got, lin in zip((q, k, v), (mha.W_query, mha.W_key, mha.W_value)):
        want = F.linear(x.double(), lin.weight.double(), lin.bias.double())  # (3, 11, d_out)
        want = want.view(3, 11, HEADS, D_OUT // HEADS).transpose(1, 2)  # (3, H, 11, D)
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # strided views of one (b, T, 3 d_out) buffer: no copy
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert (k.data_ptr() - q.data_ptr()) == D_OUT * q.element_size()


def test_state_dict_round_trip_is_bit_identical_and_aliases_wqkv():
    ref, fused = _models()
    with torch.no_grad():  # non-trivial biases
        for n, p in ref.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref_sd, sd = ref.state_dict(), fused.state_dict()
    assert list(sd) == list(ref_sd)
    for k, v in ref_sd.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    w = fused.trf_blocks[0].att.wqkv.weight
    assert sd["trf_blocks.0.att.W_key.weight"].data_ptr() == w.data_ptr() + CFG.emb_dim ** 2 * w.element_size()
    RefModel(CFG).load_state_dict(sd, strict=True)
    again = GPTModel(CFG)
    again.load_state_dict(sd, strict=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ref_sd.items())


def test_torch_save_load_and_deepcopy_keep_the_books_keys(tmp_path):
    _, fused = _models()
    torch.save(fused.state_dict(), tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    copy_model = copy.deepcopy(fused)
    assert list(copy_model.state_dict()) == list(loaded)
    m = GPTModel(CFG)
    m.load_state_dict(loaded, strict=True)
    idx = torch.randint(0, CFG.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), fused(idx), atol=0, rtol=0)


def test_book_checkpoint_with_mask_loads_and_fused_keys_load_too():
    mha, _ = _pair()
    book_sd = {**mha.state_dict(), "mask": torch.triu(torch.ones(CTX, CTX), diagonal=1)}
    fused = CausalSelfAttention(D_IN, D_OUT, CTX, 0.0, HEADS, qkv_bias=True).eval()
    assert fused.load_state_dict(book_sd, strict=True) == ([], [])
    x = torch.randn(2, CTX, D_IN)
    torch.testing.assert_close(fused(x), mha(x), atol=1e-5, rtol=1e-5)
    # the fused names are accepted too
    other = CausalSelfAttention(D_IN, D_OUT, CTX, 0.0, HEADS, qkv_bias=True).eval()
    fused_form = {"wqkv.weight": fused.wqkv.weight.detach().clone(), "wqkv.bias": fused.wqkv.bias.detach().clone(),
                  **{k: v for k, v in fused.state_dict().items() if k.startswith("out_proj.")}}
    other.load_state_dict(fused_form, strict=True)
    torch.testing.assert_close(other(x), fused(x), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="both fused and"):
        other.load_state_dict({**fused_form, **fused.state_dict()}, strict=True)


def test_strict_errors_name_the_books_keys():
    mha, fused = _pair()
    sd = mha.state_dict()
    no_key = {k: v for k, v in sd.items() if k != "W_key.weight"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "W_key.weight"\.'):
        CausalSelfAttention(D_IN, D_OUT, CTX, 0.0, HEADS, qkv_bias=True).load_state_dict(no_key, strict=True)
    # non-strict: the given thirds load, the missing one keeps its values
    m = CausalSelfAttention(D_IN, D_OUT, CTX, 0.0, HEADS, qkv_bias=True)
    before = m.wqkv.weight.detach().clone()
    res = m.load_state_dict(no_key, strict=False)
    assert res.missing_keys == ["W_key.weight"] and res.unexpected_keys == []
    w = m.wqkv.weight.detach()
    assert torch.equal(w[:D_OUT], sd["W_query.weight"]) and torch.equal(w[2 * D_OUT:], sd["W_value.weight"])
    assert torch.equal(w[D_OUT:2 * D_OUT], before[D_OUT:2 * D_OUT])
    # nothing given: all three reported by the book's names
    res = CausalSelfAttention(D_IN, D_OUT, CTX, 0.0, HEADS).load_state_dict({}, strict=False)
    assert res.missing_keys == ["W_query.weight", "W_key.weight", "W_value.weight", "out_proj.weight",
                                "out_proj.bias"]
    # biases for a model without them, an unknown key: unexpected, by the book's names
    res = CausalSelfAttention(D_IN, D_OUT, CTX, 0.0, HEADS).load_state_dict({**sd, "W_query.extra": sd["W_query.bias"]},
                                                                           strict=False)
    assert res.missing_keys == []
    assert sorted(res.unexpected_keys) == sorted(["W_query.bias", "W_key.bias", "W_value.bias", "W_query.extra"])
    # a wrong shape: a size mismatch naming its key
    bad = {**sd, "W_key.weight": torch.zeros(D_OUT, D_IN + 1)}
    with pytest.raises(RuntimeError, match="size mismatch for W_key.weight"):
        fused.load_state_dict(bad, strict=True)


def test_gpt_model_strict_load_reports_a_missing_w_key():
    ref, _ = _models()
    sd = ref.state_dict()
    del sd["trf_blocks.1.att.W_key.weight"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "trf_blocks\.1\.att\.W_key\.weight"'):
        GPTModel(CFG).load_state_dict(sd, strict=True)
    book = {**ref.state_dict(), "trf_blocks.0.att.mask": torch.ones(CFG.context_length, CFG.context_length)}
    assert GPTModel(CFG).load_state_dict(book, strict=True) == ([], [])


def test_meta_device_init_then_assign_loads():
    ref, fused = _models()
    with torch.device("meta"):
        meta = GPTModel(CFG)
    meta.load_state_dict(ref.state_dict(), strict=True, assign=True)
    meta.eval()
    assert meta.trf_blocks[0].att.wqkv.weight.device.type == "cpu"
    assert isinstance(meta.trf_blocks[0].att.wqkv.weight, torch.nn.Parameter)
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(meta(idx), ref(idx), atol=1e-4, rtol=1e-4)


class _CatAndLinearSpy(TorchFunctionMode):
    """Counts torch.cat calls given a Parameter (a weight concatenation) and records the weights of
    every linear."""

    def __init__(self):
        super().__init__()
        self.param_cats, self.linear_weights = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.cat, torch.concat, torch.concatenate):
            tensors = args[0] if args else kwargs.get("tensors", ())
            self.param_cats += any(isinstance(t, torch.nn.Parameter) for t in tensors)
        if func is F.linear:
            self.linear_weights.append(args[1] if len(args) > 1 else kwargs["weight"])
        return func(*args, **kwargs)


def test_no_forward_concatenates_weights(fallback_path):
    from gpt import generate

    _, model = _models()
    wqkv = {id(b.att.wqkv.weight) for b in model.trf_blocks}
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    with _CatAndLinearSpy() as spy:
        model(idx)
        model.loss(idx, idx)
        model.train()
        model.loss(idx, idx).backward()
        model.eval()
        with torch.no_grad():
            generate(model, idx[:1, :4], 3, use_cache=True)  # prefill + cached decode steps
    assert spy.param_cats == 0
    used = {id(w) for w in spy.linear_weights}
    assert wqkv <= used  # the QKV GEMM reads the parameter itself
    assert all(isinstance(w, torch.nn.Parameter) for w in spy.linear_weights)


# --------------------------------------------------------------------------------------- LoRA
RANK, ALPHA = 2, 3.0


def _lora(model, seed=1):
    for p in model.parameters():
        p.requires_grad_(False)
    replace_linear_with_lora(model, RANK, ALPHA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_lora_on_the_fused_model_adapts_q_k_v_and_matches_the_reference(fallback_path):
    ref, fused = _models()
    idx = torch.randint(0, CFG.vocab_size, (2, 13))
    with torch.no_grad():
        before = fused(idx)
    for p in fused.parameters():
        p.requires_grad_(False)
    replace_linear_with_lora(fused, RANK, ALPHA)
    att = fused.trf_blocks[0].att
    assert isinstance(att.wqkv, LinearWithLoRA) and att.wqkv.parts == 3
    with torch.no_grad():
        torch.testing.assert_close(fused(idx), before, atol=0, rtol=0)  # B = 0: unchanged at init
    fused = _lora(fused)  # (already wrapped: only B randomized)
    ref = _lora(ref)
    # the fused LoRA model's state_dict is the reference LoRA model's: it loads there, same logits
    sd = fused.state_dict()
    assert list(sd) == list(ref.state_dict())
    assert "trf_blocks.0.att.W_key.lora.A" in sd and "trf_blocks.0.att.W_key.linear.weight" in sd
    ref.load_state_dict(sd, strict=True)
    with torch.no_grad():
        lora_logits = fused(idx)
        torch.testing.assert_close(lora_logits, ref(idx), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(lora_logits, before, atol=1e-3)
        # and back: the reference's LoRA state_dict fills the fused model's per-part adapters
        fresh = _lora(_models(seed=5)[1], seed=7)
        fresh.load_state_dict(ref.state_dict(), strict=True)
        torch.testing.assert_close(fresh(idx), lora_logits, atol=0, rtol=0)
        merge_lora(fused)
        assert not any(isinstance(m, LinearWithLoRA) for m in fused.modules())
        torch.testing.assert_close(fused(idx), lora_logits, atol=1e-4, rtol=1e-4)
        plain = RefModel(CFG).eval()
        plain.load_state_dict(fused.state_dict(), strict=True)
        torch.testing.assert_close(plain(idx), lora_logits, atol=1e-4, rtol=1e-4)


def test_lora_training_changes_each_of_q_k_v_by_rank_at_most_r(fallback_path):
    _, fused = _models()
    base = {k: v.clone() for k, v in fused.state_dict().items()}
    model = _lora(fused)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    idx = torch.randint(0, CFG.vocab_size, (4, 16))
    for _ in range(3):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    merge_lora(model)
    after = model.state_dict()
    for i in range(CFG.n_layers):
        for n in ("W_query", "W_key", "W_value"):
            k = f"trf_blocks.{i}.att.{n}.weight"
            rank = torch.linalg.matrix_rank((after[k] - base[k]).double(), rtol=1e-4).item()
            assert 1 <= rank <= RANK, f"{k}: rank {rank}"
            assert torch.equal(after[f"trf_blocks.{i}.att.{n}.bias"], base[f"trf_blocks.{i}.att.{n}.bias"])


def test_lora_checkpoint_holds_the_books_adapter_keys(tmp_path):
    _, fused = _models()
    model = _lora(fused)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, only_trainable=True, rng=False)
    ckpt = torch.load(path, weights_only=True)
    keys = set(ckpt["model"])
    assert "trf_blocks.1.att.W_value.lora.B" in keys and not any("wqkv" in k for k in keys)
    assert keys == set(trainable_state_dict(_lora(_models()[0])))  # the reference LoRA model's
    other = _lora(_models(seed=3)[1], seed=9)
    load_checkpoint(path, other, only_trainable=True)
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), n


def test_trainable_state_dict_names_trainable_thirds_by_the_books_keys():
    ref, fused = _models()
    for m in (ref, fused):
        for p in m.parameters():
            p.requires_grad_(False)
        m.trf_blocks[1].requires_grad_(True)  # as make_classifier: the last block trains
    with torch.no_grad():  # (the views of wqkv are still recognized)
        got = trainable_state_dict(fused)
    assert list(got) == list(trainable_state_dict(ref))
    assert "trf_blocks.1.att.W_value.weight" in got and "trf_blocks.0.att.W_value.weight" not in got
    assert all(not v.requires_grad for v in got.values())
    for k, v in trainable_state_dict(ref).items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("case", ["missing-key", "extra-key", "bias-into-no-bias", "lora-into-plain",
                                  "plain-into-lora"])
def test_incompatible_keys_are_the_reference_modules(case):
    """Non-strict loads report exactly the missing/unexpected keys the book's MultiHeadAttention reports."""
    def pair(bias=False, lora=False):
        torch.manual_seed(0)
        ms = [MultiHeadAttention(D_IN, D_OUT, CTX, 0.0, HEADS, qkv_bias=bias),
              CausalSelfAttention(D_IN, D_OUT, CTX, 0.0, HEADS, qkv_bias=bias)]
        return [replace_linear_with_lora(m, RANK, ALPHA) if lora else m for m in ms]

    src = pair(bias=case == "bias-into-no-bias", lora=case == "lora-into-plain")[0].state_dict()
    if case == "missing-key":
        del src["W_value.weight"]
    if case == "extra-key":
        src["W_key.scale"] = torch.ones(D_OUT)
    ref, fused = pair(lora=case == "plain-into-lora")
    want, got = ref.load_state_dict(dict(src), strict=False), fused.load_state_dict(dict(src), strict=False)
    assert sorted(got.missing_keys) == sorted(want.missing_keys)
    assert sorted(got.unexpected_keys) == sorted(want.unexpected_keys)
    assert got.missing_keys or got.unexpected_keys
