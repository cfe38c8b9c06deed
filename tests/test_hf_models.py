"""kernels.register_hf_attention inside today's model families (issue 24, item 4): tiny random Llama,
Qwen2, Qwen3 (MQA), Mistral (sliding window shorter than the sequence) and Gemma2 (softcap and sliding
window) with ``fallback=False`` — so every attention call ran our kernels or the test raised — against
the same model with ``attn_implementation="eager"``: logits and every parameter's gradient on a batch
with left and right padding, and greedy ``generate`` tokens with transformers' dynamic cache. Then
``hf_flash_attention`` called directly against an independent float64 reference, its mask function, and
the calls it refuses (NotImplementedError naming why) or hands to SDPA, on both CPU kernel paths."""

from __future__ import annotations

import copy
import math
from unittest import mock

import pytest
import torch
from torch import nn

import kernels
import kernels.integrations as integ

transformers = pytest.importorskip("transformers")
masking = pytest.importorskip("transformers.masking_utils")

STRICT = kernels.register_hf_attention("triton_attention_strict", fallback=False)
LOOSE = kernels.register_hf_attention("triton_attention_loose")
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2"]


def _model(family: str):
    """A tiny random model of ``family`` (2 layers, hidden 64, GQA 4:2 — Qwen3 MQA 4:1 — head_dim 16),
    eager, with weights big enough that scores leave the near-uniform regime and the softcap bites."""
    common = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
                  attn_implementation="eager")
    config, cls = {
        "llama": (lambda: transformers.LlamaConfig(**common), transformers.LlamaForCausalLM),
        "qwen2": (lambda: transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM),
        "qwen3": (lambda: transformers.Qwen3Config(**{**common, "num_key_value_heads": 1}, head_dim=16),
                  transformers.Qwen3ForCausalLM),
        "mistral": (lambda: transformers.MistralConfig(**common, sliding_window=4), transformers.MistralForCausalLM),
        "gemma2": (lambda: transformers.Gemma2Config(**common, head_dim=16, sliding_window=4,
                                                     attn_logit_softcapping=2.0, query_pre_attn_scalar=16),
                   transformers.Gemma2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    return cls(config())


def _cases(interpreted: tuple[str, ...]):
    """(family, kernel path) for every family on both paths; the interpreter (about 1 s per attention call
    on CPU) runs by default only for ``interpreted``, the rest under ``-m slow``."""
    slow = pytest.mark.slow
    return [pytest.param(f, path, id=f"{f}-{path}",
                         marks=[slow] if path == "interpreter" and f not in interpreted else [])
            for f in FAMILIES for path in ("interpreter", "fallback")]


@pytest.fixture(scope="module")
def pair(request):
    eager = _model(request.param)
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(STRICT)
    assert ours.config._attn_implementation == STRICT and eager.config._attn_implementation == "eager"
    return request.param, eager, ours


@pytest.fixture
def calls():
    """Counts the kernel entry points the integration called: 'dense' and 'varlen'."""
    counts = {"dense": 0, "varlen": 0}
    real_dense, real_varlen = integ.flash_attention, integ.flash_attention_varlen

    def dense(*a, **k):
        counts["dense"] += 1
        return real_dense(*a, **k)

    def varlen(*a, **k):
        counts["varlen"] += 1
        return real_varlen(*a, **k)

    with mock.patch.object(integ, "flash_attention", dense), mock.patch.object(integ, "flash_attention_varlen", varlen):
        yield counts


def _padded_batch(T=12):
    idx = torch.randint(1, 64, (3, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(idx)
    mask[0, :5] = 0  # left padding
    mask[1, 8:] = 0  # right padding
    before = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1)
    # A padding position's output is meaningless (eager averages masked scores, the kernels write zeros):
    # no label may be predicted from one (so the first token after left padding has none either).
    labels = idx.masked_fill((mask == 0) | (before == 0), -100)
    return idx, mask, labels


@pytest.mark.parametrize("pair, kernel_path", _cases(("llama", "qwen3", "mistral", "gemma2")),
                         indirect=True)
def test_padded_training_step_equals_eager(pair, kernel_path, calls):
    family, eager, ours = pair
    eager.train(), ours.train()  # training mode (attention dropout is 0 in these configs)
    idx, mask, labels = _padded_batch()
    out_e = eager(idx, attention_mask=mask, labels=labels)
    out_o = ours(idx, attention_mask=mask, labels=labels)
    assert calls["varlen"] == 2 and calls["dense"] == 0, calls  # both layers unpadded to varlen
    valid = mask.bool()
    torch.testing.assert_close(out_o.logits[valid], out_e.logits[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_o.loss, out_e.loss, atol=1e-5, rtol=1e-5)
    ge = torch.autograd.grad(out_e.loss, list(eager.parameters()))
    go = torch.autograd.grad(out_o.loss, list(ours.parameters()))
    for (name, _), a, b in zip(eager.named_parameters(), go, ge):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=f"{family}: {name}")
    eager.eval(), ours.eval()


@pytest.mark.parametrize("pair, kernel_path", _cases(("gemma2",)), indirect=True)
def test_greedy_generate_equals_eager(pair, kernel_path, calls):
    family, eager, ours = pair
    idx, _, _ = _padded_batch(T=8)
    prompt, mask = idx[:2], torch.ones_like(idx[:2])
    mask[0, :3] = 0  # left padding, as generation wants it
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert ours.generate(prompt, **kw).tolist() == eager.generate(prompt, **kw).tolist(), family
    # 2 layers x (prefill + 3 cached steps); the padding unpadded to varlen, except in a sliding layer once
    # row 0's padding has left its window (W = 4): then the dense kernel, one query against cached keys
    sliding = family in ("mistral", "gemma2")
    assert calls["varlen"] + calls["dense"] == 8 and (calls["dense"] > 0) == sliding, calls


def test_packed_position_ids_refused_strict_and_sdpa_when_loose():
    """transformers turns position_ids that restart (packed documents, no mask) into an overlay on the
    causal mask: not a pattern the integration recognizes, so strict raises and loose uses SDPA."""
    eager = _model("llama").eval()
    ours = copy.deepcopy(eager)
    idx = torch.randint(1, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    ours.set_attn_implementation(STRICT)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="packed sequences"):
        ours(idx, position_ids=pos, use_cache=False)
    ours.set_attn_implementation(LOOSE)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, position_ids=pos, use_cache=False).logits,
                                   eager(idx, position_ids=pos, use_cache=False).logits,
                                   atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# hf_flash_attention called directly, against float64 references built here
# ---------------------------------------------------------------------------------------------------

def _reference(q, k, v, keys_mask, scale, window=None, softcap=0.0):
    """float64 attention: query i of row b at position i + Tk - Tq sees key j iff j <= that position,
    within ``window``, and ``keys_mask[b, j]``; ``(B, Tq, H, D)``; rows with no key give 0."""
    q, k, v = q.double(), k.double(), v.double()
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    Tq, Tk = q.shape[2], k.shape[2]
    pos = torch.arange(Tq)[:, None] + Tk - Tq
    j = torch.arange(Tk)[None]
    allowed = (j <= pos) & ((j > pos - window) if window else True)
    allowed = allowed[None, None] & keys_mask[:, None, None, :]
    p = s.masked_fill(~allowed, -math.inf).softmax(-1)
    p = torch.where(allowed.any(-1, keepdim=True), p, 0.0)  # a query with no key: 0
    return (p @ v).transpose(1, 2)


def _qkv(B=3, H=4, Hk=2, Tq=9, Tk=9, D=16, seed=0, poison=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hk, Tk, D, generator=g)
    v = torch.randn(B, Hk, Tk, D, generator=g)
    if poison is not None:  # NaN in every padding position: unpadding must never read them
        q = q.masked_fill(~poison[:, -Tq:][:, None, :, None], math.nan)
        k = k.masked_fill(~poison[:, None, :, None], math.nan)
        v = v.masked_fill(~poison[:, None, :, None], math.nan)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def _masks(Tk):
    m = torch.ones(3, Tk, dtype=torch.bool)
    m[0, :4] = False  # left
    m[1, Tk - 3:] = False  # right
    m[2, :] = False  # a row with no token at all
    return m


@pytest.mark.parametrize("Hk, Tq, window, softcap", [
    (2, 9, None, 0.0), (1, 9, 3, 1.5), (4, 3, 2, 0.0), (2, 1, None, 2.5), (4, 9, 1, 0.0)],
    ids=["gqa", "mqa-window-softcap", "chunk-window", "decode-softcap", "window1"])
def test_padding_mask_unpads_to_varlen(Hk, Tq, window, softcap, kernel_path):
    Tk, scale = 9, 0.4
    keys = _masks(Tk)
    q, k, v = _qkv(Hk=Hk, Tq=Tq, Tk=Tk, poison=keys)
    module = nn.Module().eval()
    out, w = integ.hf_flash_attention(module, q, k, v, keys, scaling=scale, sliding_window=window,
                                      softcap=softcap or None, fallback=False)
    assert w is None and out.shape == (3, Tq, 4, 16)
    valid = keys[:, -Tq:]
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))  # padding queries: zeros, not NaN
    clean = [t.detach().nan_to_num(0.0).double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*clean, keys, scale, window, softcap)
    torch.testing.assert_close(out[valid].double(), ref[valid], atol=2e-5, rtol=2e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)) * valid[:, :, None, None]
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g.double()).sum(), clean)
    for name, a, b, m in zip("qkv", got, want, (valid[:, None, :, None], keys[:, None, :, None],
                                                 keys[:, None, :, None])):
        assert torch.equal(a.masked_fill(m, 0), torch.zeros_like(a)), f"d{name} at padding"
        torch.testing.assert_close(a.masked_fill(~m, 0).double(), b.masked_fill(~m, 0), atol=5e-5, rtol=5e-5,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def test_no_mask_runs_the_dense_kernel_with_gqa_window_and_softcap(kernel_path, calls):
    q, k, v = _qkv(B=2, Hk=1, Tq=5, Tk=11)  # a dynamic cache: 6 cached keys, 5 new queries
    out, _ = integ.hf_flash_attention(nn.Module().eval(), q, k, v, None, scaling=None, sliding_window=4,
                                      softcap=3.0, fallback=False)
    ref = _reference(q, k, v, torch.ones(2, 11, dtype=torch.bool), 16 ** -0.5, 4, 3.0)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    assert calls == {"dense": 1, "varlen": 0}


def _causal4d(Tq, Tk, window=None):
    pos = torch.arange(Tq)[:, None] + Tk - Tq
    j = torch.arange(Tk)[None]
    return ((j <= pos) & ((j > pos - window) if window else True))[None, None]


UNSERVED = {  # name -> (call changes, reason the error names)
    "head_dim": (dict(D=8), "head_dim 8"),
    "not_causal": (dict(is_causal=False), "not causal"),
    "custom_4d": (dict(mask4d="custom"), "not the causal"),
    "position_bias": (dict(position_bias=True), "position_bias"),
    "output_attentions": (dict(output_attentions=True), "output_attentions"),
    "window_gap": (dict(gap=True, sliding_window=3), "padding between tokens"),
    "float64": (dict(dtype=torch.float64), "dtype"),
}


def _unserved_call(case):
    change, _ = UNSERVED[case]
    B, Tk, D = 3, 9, change.get("D", 16)
    keys = _masks(Tk)
    keys[2] = True
    if change.get("gap"):
        keys[1] = True
        keys[1, 3:6] = False  # right padding, then generated tokens: the row has a hole
    g = torch.Generator().manual_seed(4)
    dtype = change.get("dtype", torch.float32)
    q, k, v = (torch.randn(B, h, Tk, D, generator=g, dtype=dtype) for h in (4, 2, 2))
    mask = keys
    if change.get("mask4d") == "custom":
        mask = _causal4d(Tk, Tk).clone().expand(B, 1, Tk, Tk).clone()
        mask[..., -1] = True  # every query sees the last key: not causal
    kwargs = {"sliding_window": change.get("sliding_window")}
    if change.get("position_bias"):
        kwargs["position_bias"] = torch.zeros(B, 4, Tk, Tk, dtype=dtype)
    if change.get("output_attentions"):
        kwargs["output_attentions"] = True
    return q, k, v, mask, change.get("is_causal", True), kwargs


@pytest.mark.parametrize("case", list(UNSERVED))
def test_unserved_calls_raise_strict_and_match_reference_loose(case, fallback_path):
    q, k, v, mask, is_causal, kwargs = _unserved_call(case)
    module = nn.Module().eval()
    with pytest.raises(NotImplementedError, match=UNSERVED[case][1]):
        integ.hf_flash_attention(module, q, k, v, mask, is_causal=is_causal, fallback=False, **kwargs)
    out, _ = integ.hf_flash_attention(module, q, k, v, mask, is_causal=is_causal, **kwargs)
    Tq = q.shape[2]
    scale = q.shape[-1] ** -0.5
    if mask.dim() == 4:
        n_rep = 2
        s = q.double() @ k.double().repeat_interleave(n_rep, 1).transpose(-1, -2) * scale
        ref = (s.masked_fill(~mask, -math.inf).softmax(-1) @ v.double().repeat_interleave(n_rep, 1)).transpose(1, 2)
        valid = torch.ones(3, Tq, dtype=torch.bool)
    elif not is_causal:
        s = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * scale
        s = s.masked_fill(~mask[:, None, None, :], -math.inf)
        ref = torch.nan_to_num(s.softmax(-1) @ v.double().repeat_interleave(2, 1)).transpose(1, 2)
        valid = mask.any(-1, keepdim=True).expand(3, Tq)
    else:
        ref = _reference(q, k, v, mask, scale, kwargs.get("sliding_window"))
        valid = mask[:, -Tq:]
    torch.testing.assert_close(out[valid].double(), ref[valid], atol=2e-5, rtol=2e-5)


def test_loose_softcap_fallback_is_eager_math(fallback_path):
    """SDPA has no softcap: a call the kernels cannot serve with softcap set runs plain PyTorch."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 7, 8, generator=g) for h in (4, 1, 1))  # head_dim 8: unserved
    keys = torch.ones(2, 7, dtype=torch.bool)
    keys[0, :2] = False
    out, _ = integ.hf_flash_attention(nn.Module().eval(), q, k, v, keys, scaling=0.7, softcap=1.0, sliding_window=3)
    ref = _reference(q, k, v, keys, 0.7, 3, 1.0)
    torch.testing.assert_close(out[keys].double(), ref[keys], atol=2e-5, rtol=2e-5)


def test_mask_function_hands_over_what_the_kernels_need():
    causal, sliding = masking.causal_mask_function, masking.sliding_window_causal_mask_function(4)
    pad = torch.ones(2, 10, dtype=torch.bool)
    base = dict(batch_size=2, q_length=3, kv_length=10, q_offset=7, kv_offset=0, local_size=None)
    assert integ.hf_attention_mask(**base, mask_function=causal, attention_mask=pad) is None  # no padding
    assert integ.hf_attention_mask(**base, mask_function=causal, attention_mask=None) is None
    pad[0, :2] = False
    got = integ.hf_attention_mask(**base, mask_function=causal, attention_mask=pad)
    assert torch.equal(got, pad)
    # a sliding layer's cache keeps the last W-1 tokens: the keys are the mask's last kv_length columns
    win = dict(base, kv_length=6, kv_offset=4, local_size=4)
    assert integ.hf_attention_mask(**win, mask_function=sliding, attention_mask=pad) is None  # padding left behind
    pad[1, 6] = False
    assert torch.equal(integ.hf_attention_mask(**win, mask_function=sliding, attention_mask=pad), pad[:, 4:])
    # a window other than local_size, an overlay, or a static cache (more keys than tokens): SDPA's 4-D mask
    other = masking.sliding_window_causal_mask_function(5)
    overlay = masking.or_masks(causal, lambda b, h, q, kv: kv == 0)
    for fn, kw, m2d in ((other, win, pad), (overlay, base, pad), (causal, dict(base, kv_length=16), pad),
                        (causal, dict(base, kv_length=16), None)):
        m = integ.hf_attention_mask(**kw, mask_function=fn, attention_mask=m2d, allow_is_causal_skip=False)
        assert m.dim() == 4 and m.dtype == torch.bool


def test_register_fallback_must_be_bool():
    with pytest.raises(TypeError, match="fallback"):
        kernels.register_hf_attention("ours_x", fallback="no")
    assert transformers.AttentionMaskInterface._global_mapping[STRICT] is integ.hf_attention_mask


def test_static_cache_refused_strict_and_sdpa_when_loose(fallback_path):
    """A static cache's keys run past the tokens into empty slots: SDPA's 4-D mask (never None, whose
    top-left is_causal the kernels would read bottom-right), so strict raises and loose equals eager."""
    eager = _model("llama").eval()
    ours = copy.deepcopy(eager)
    prompt = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        want = eager.generate(prompt, **kw).tolist()
        ours.set_attn_implementation(STRICT)
        with pytest.raises(NotImplementedError, match="static cache"):
            ours.generate(prompt, **kw)
        ours.set_attn_implementation(LOOSE)
        assert ours.generate(prompt, **kw).tolist() == want
