"""gpt.decoder.Decoder: chunked prefill at any offset equals the uncached forward and the book's
reference model; decoding continues identically; the batched prefill is one packed call; the CUDA
graph's fallback."""

import pytest
import torch

import gpt.model as model_module
from gpt import decoder as decoder_module
from gpt import generate, generate_batch
from gpt.config import GPTConfig
from gpt.decoder import Decoder
from gpt.model import GPTModel
from gpt.reference import GPTModel as RefModel

CTX = 24
CFG = GPTConfig(vocab_size=128, context_length=CTX, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


def _models():
    torch.manual_seed(0)
    ref = RefModel(CFG).eval()
    fused = GPTModel(CFG).eval()
    fused.load_state_dict(ref.state_dict())
    return fused, ref


def _prompt(n, seed=1, batch=1):
    return torch.randint(0, CFG.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_prompt_in_three_chunks_equals_uncached_and_reference(kernel_path):
    """A prompt fed in chunks of 5, 1 and 7 tokens through the cache: every position's logits equal the
    uncached forward of the whole prompt and the reference model's; then greedy decoding continues as
    the reference model does, step by step (logits of the sequence so far)."""
    fused, ref = _models()
    idx = _prompt(13, batch=2)  # (2, 13)
    dec = Decoder(fused, 2)
    chunks, start = [], 0
    for n in (5, 1, 7):
        chunks.append(dec.prefill(idx[:, start:start + n], start, all_logits=True))  # (2, n, V)
        start += n
    got = torch.cat(chunks, dim=1)  # (2, 13, V)
    torch.testing.assert_close(got, fused(idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref(idx), rtol=1e-5, atol=1e-5)

    seq, logits = idx, got[:, -1]
    for _ in range(6):  # decode past nothing: 13 + 6 < CTX
        token = logits.argmax(-1, keepdim=True)  # (2, 1)
        positions = torch.full((2, 1), seq.shape[1])  # (2, 1)
        seq = torch.cat((seq, token), dim=1)
        logits = dec.decode(token, positions)  # (2, V)
        torch.testing.assert_close(logits, ref(seq)[:, -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(seq, generate(ref, idx, 6, use_cache=False))


@torch.no_grad()
def test_chunk_without_the_cached_prefix_would_differ(fallback_path):
    """The test above can fail: the last chunk's logits attending only over its own keys (the old
    behaviour) are far from the full forward's."""
    fused, _ = _models()
    idx = _prompt(13)
    dec = Decoder(fused, 1)
    dec.prefill(idx[:, :6])
    alone = Decoder(fused, 1).prefill(idx[:, 6:], 0, all_logits=True)  # no prefix (and positions 0..)
    assert not torch.allclose(alone, fused(idx)[:, 6:], atol=1e-3)
    torch.testing.assert_close(dec.prefill(idx[:, 6:], 6, all_logits=True), fused(idx)[:, 6:],
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_prefill_past_the_context_is_a_clear_error(fallback_path):
    fused, _ = _models()
    dec = Decoder(fused, 1)
    dec.prefill(_prompt(20))
    with pytest.raises(ValueError, match="context_length"):
        dec.prefill(_prompt(5), 20)  # positions 20..24 > 23
    with pytest.raises(ValueError, match="context_length"):
        dec.prefill_rows([[1] * 5], [0], [20])
    with pytest.raises(ValueError, match="context_length"):  # the model's own check, at the cache path
        fused(_prompt(5), cache=Decoder(fused, 1, max_len=64).cache, positions=torch.arange(20, 25))
    with pytest.raises(ValueError, match="start"):
        dec.prefill(_prompt(2), -1)


@torch.no_grad()
def test_packed_prefill_equals_one_at_a_time(kernel_path):
    """Prompts of lengths 1..CTX prefilled together into chosen rows (packed, varlen): each one's last
    logits equal its own prefill alone, and its cache rows hold what its lone prefill writes."""
    fused, _ = _models()
    lengths, rows = [7, 1, CTX, 3], [2, 0, 3, 1]
    prompts = [_prompt(n, seed=n)[0].tolist() for n in lengths]
    dec = Decoder(fused, 4)
    got = dec.prefill_rows(prompts, rows)  # (4, V)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        alone = Decoder(fused, 1)
        want = alone.prefill(torch.tensor([p]))  # (1, V)
        torch.testing.assert_close(got[i], want[0], rtol=1e-5, atol=1e-5)
        n = len(p)
        for k_dec, k_alone in zip(dec.cache.k, alone.cache.k):
            torch.testing.assert_close(k_dec[r, :, :n], k_alone[0, :, :n], rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_packed_prefill_at_offsets(fallback_path):
    """Rows continued at different offsets in one packed call equal the full forward of each row."""
    fused, _ = _models()
    a, b = _prompt(9, seed=3)[0].tolist(), _prompt(4, seed=4)[0].tolist()
    dec = Decoder(fused, 2)
    dec.prefill_rows([a[:5], b[:1]], [0, 1])
    got = dec.prefill_rows([a[5:], b[1:]], [0, 1], starts=[5, 1])  # (2, V)
    torch.testing.assert_close(got[0], fused(torch.tensor([a]))[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], fused(torch.tensor([b]))[0, -1], rtol=1e-5, atol=1e-5)


def test_batch_generate_equals_one_at_a_time(kernel_path):
    """Greedy tokens of generate_batch equal generate on each prompt alone (lengths 1 to past the
    context, refill with batch 2), and equal the reference model's uncached generation."""
    fused, ref = _models()
    prompts = [_prompt(n, seed=n)[0] for n in (1, 5, 13, CTX + 3)]
    want = [generate(fused, p.view(1, -1), 4)[0, p.numel():].tolist() for p in prompts]
    want_ref = [generate(ref, p.view(1, -1), 4, use_cache=False)[0, p.numel():].tolist() for p in prompts]
    assert want == want_ref
    assert generate_batch(fused, prompts, 4) == want
    assert generate_batch(fused, prompts, 4, batch_size=2) == want


def test_batched_prefill_is_one_model_call_and_one_varlen_call_per_layer(fallback_path, monkeypatch):
    """All prompts entering together: one model call for the prefill, one flash_attention_varlen per
    layer and no dense flash attention; then one model call per decode step."""
    fused, _ = _models()
    calls = {"model": 0, "varlen": 0, "dense": 0}
    real_forward, real_varlen, real_dense = fused.forward, model_module.flash_attention_varlen, \
        model_module.flash_attention

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(fused, "forward", count("model", real_forward))
    monkeypatch.setattr(model_module, "flash_attention_varlen", count("varlen", real_varlen))
    monkeypatch.setattr(model_module, "flash_attention", count("dense", real_dense))
    prompts = [_prompt(n, seed=n)[0] for n in (1, 9, 4, 16)]
    out = generate_batch(fused, prompts, 3)
    assert calls == {"model": 1 + 2, "varlen": CFG.n_layers, "dense": 0}
    monkeypatch.undo()
    assert out == [generate(fused, p.view(1, -1), 3)[0, p.numel():].tolist() for p in prompts]


def test_graph_capture_fallback(fallback_path, monkeypatch):
    """A failed CUDA-graph capture: strict (asked for) raises; automatic warns once and decodes eagerly."""
    fused, _ = _models()

    def fail(*args, **kwargs):
        raise RuntimeError("no capture here")

    monkeypatch.setattr(decoder_module, "_GraphedDecode", fail)
    tokens, positions = torch.tensor([[3]]), torch.tensor([[4]])
    strict = Decoder(fused, 1, cuda_graph=True, strict=True)
    strict.prefill(_prompt(4))
    with pytest.raises(RuntimeError, match="no capture"):
        strict.decode(tokens, positions)
    auto = Decoder(fused, 1, cuda_graph=True, strict=False)
    auto.prefill(_prompt(4))
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        got = auto.decode(tokens, positions)
    assert not auto.cuda_graph
    seq = torch.cat((_prompt(4), tokens), dim=1)
    torch.testing.assert_close(got, fused(seq)[:, -1], rtol=1e-5, atol=1e-5)
