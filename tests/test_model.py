"""The fused GPTModel against the book's reference: state_dict, logits, loss, gradients, optimizer steps,
and generation (cached vs uncached, fused vs reference). Run on both kernel paths: the Triton
interpreter and the pure-PyTorch fallback."""

import pytest
import torch

from gpt import generate
from gpt.config import GPTConfig
from gpt.model import GPTModel
from gpt.reference import GPTModel as RefModel
from tests.utils import book_named

CFG = GPTConfig(vocab_size=97, context_length=24, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)


def _pair(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    ref = RefModel(cfg)
    with torch.no_grad():  # non-trivial norms so a wrong scale/shift wiring shows
        for name, p in ref.named_parameters():
            if name.endswith(("scale", "shift")):
                p.add_(0.3 * torch.randn_like(p))
    fused = GPTModel(cfg)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


def test_state_dicts_are_identical_both_ways():
    ref, fused = _pair()
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in fused.state_dict().items()}
    RefModel(CFG).load_state_dict(fused.state_dict(), strict=True)


def test_logits_loss_and_gradients_match(kernel_path):
    ref, fused = _pair()
    idx = torch.randint(0, CFG.vocab_size, (2, 19))
    tgt = torch.randint(0, CFG.vocab_size, (2, 19))
    out_r, out_f = ref(idx), fused(idx)
    torch.testing.assert_close(out_f, out_r, atol=1e-4, rtol=1e-4)
    loss_r = torch.nn.functional.cross_entropy(out_r.flatten(0, 1), tgt.flatten())
    loss_f = torch.nn.functional.cross_entropy(out_f.flatten(0, 1), tgt.flatten())
    torch.testing.assert_close(loss_f, loss_r, atol=1e-5, rtol=1e-5)
    loss_r.backward()
    loss_f.backward()
    grads_f = book_named((n, p.grad) for n, p in fused.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads_f[name], p.grad, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_adamw_steps_stay_matched(kernel_path):
    # No qkv bias here: the key bias gets an exactly-zero gradient in theory (softmax ignores a per-row
    # shift), so Adam would normalize rounding noise into full-size, implementation-specific updates.
    ref, fused = _pair(CFG.replace(qkv_bias=False), seed=1)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, fused)]
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    for _ in range(3):
        for m, opt in zip((ref, fused), opts):
            loss = torch.nn.functional.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    sd_f = fused.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd_f[k], v, atol=1e-4, rtol=1e-3, msg=lambda m, k=k: f"{k}: {m}")


def test_greedy_generation_identical_everywhere(kernel_path):
    ref, fused = _pair(seed=2)
    prompt = torch.randint(0, CFG.vocab_size, (2, 5))
    want = generate(ref, prompt, 30, use_cache=False)  # 35 tokens > context 24: sliding window
    assert torch.equal(generate(fused, prompt, 30, use_cache=False), want)
    assert torch.equal(generate(fused, prompt, 30, use_cache=True), want)
    assert torch.equal(generate(fused, prompt, 30, use_cache=True), want)  # again: no stale cache


def test_sampling_cached_equals_uncached_with_the_same_seed(kernel_path):
    _, fused = _pair(seed=3)
    prompt = torch.randint(0, CFG.vocab_size, (1, 4))
    kw = dict(temperature=1.0, top_k=10, top_p=0.9)
    a = generate(fused, prompt, 12, use_cache=True, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(fused, prompt, 12, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b)
    assert torch.equal(generate(fused, prompt, 12, temperature=1.0, top_k=1), generate(fused, prompt, 12))


def test_dropout_on_in_train_off_in_eval(kernel_path):
    torch.manual_seed(0)
    model = GPTModel(CFG.replace(drop_rate=0.3))
    idx = torch.randint(0, CFG.vocab_size, (1, 12))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_from_pretrained_same_as_reference(tmp_path):
    from gpt.checkpoint import save_checkpoint

    ref, _ = _pair(seed=4)
    save_checkpoint(tmp_path / "ckpt-last.pt", ref)
    fused = GPTModel.from_pretrained(tmp_path)
    idx = torch.randint(0, CFG.vocab_size, (1, 10))
    torch.testing.assert_close(fused(idx), ref.eval()(idx), atol=1e-4, rtol=1e-4)


def test_tied_weights():
    model = GPTModel(CFG, tie_weights=True)
    assert model.out_head.weight is model.tok_emb.weight
    assert set(model.state_dict()) == set(RefModel(CFG).state_dict())


def test_cuda_graph_needs_cuda():
    _, fused = _pair()
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        generate(fused, torch.zeros(1, 3, dtype=torch.long), 2, cuda_graph=True)


def _assert_greedy_under(ref, seq, n_prompt: int, tol: float = 1e-4) -> None:
    """Every generated token of ``seq`` is the reference model's greedy choice for the window before it
    (uncached, sliding past the context as ``generate`` does), up to a logit tie within ``tol``: a
    divergence at any step fails, a late one included, while fp32 rounding at an exact tie does not."""
    ctx = ref.cfg.context_length
    with torch.no_grad():
        for t in range(n_prompt, seq.shape[1]):
            logits = ref(seq[:, max(0, t - ctx):t])[:, -1].double()  # (B, V)
            chosen = logits.gather(1, seq[:, t:t + 1]).squeeze(1)
            gap = logits.max(-1).values - chosen
            assert (gap <= tol).all(), f"step {t - n_prompt}: token {seq[:, t].tolist()} is {gap.max():.3g} " \
                                       "below the reference's greedy choice"


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_cuda_graph_decode_gives_the_eager_tokens(batch):
    """The graphed decode step replays exactly the eager step: same tokens, past the context too,
    and twice in a row (a fresh cache and graph per call)."""
    ref, fused = _pair(CFG.replace(emb_dim=128, n_heads=2), seed=4)  # head_dim 64
    ref, fused = ref.cuda(), fused.cuda()
    prompt = torch.randint(0, CFG.vocab_size, (batch, 5), device="cuda")
    want = generate(ref, prompt, 40, use_cache=False)  # 45 tokens > context 24
    eager = generate(fused, prompt, 40, cuda_graph=False)
    graphed = generate(fused, prompt, 40, cuda_graph=True)
    assert torch.equal(graphed, eager)
    assert torch.equal(generate(fused, prompt, 40, cuda_graph=True), graphed)
    assert eager.shape == want.shape
    _assert_greedy_under(ref, eager, prompt.shape[1])  # every step, not 90% of the tokens
    g = [torch.Generator(device="cuda").manual_seed(7) for _ in range(2)]
    a = generate(fused, prompt, 20, temperature=1.0, top_k=20, generator=g[0], cuda_graph=True)
    b = generate(fused, prompt, 20, temperature=1.0, top_k=20, generator=g[1], cuda_graph=False)
    assert torch.equal(a, b)
