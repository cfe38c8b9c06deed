"""kernels.decode_attention: split-KV decode over ragged KV caches, checked against attention over each
row's valid prefix (kernels.flash_attention, itself checked against an fp64 oracle).

CPU runs both paths: the Triton kernels through the interpreter and the pure-PyTorch fallback.
"""

from __future__ import annotations

import pytest
import torch

from kernels import decode_attention, flash_attention
from kernels.reference import attention_ref
from tests.utils import assert_verbose_allclose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _cache(B, H, Tmax, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, H, Tmax, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    return k, v


def _prefix_attention(q, k, v, lens):
    """Row by row: the Tq new queries attend the row's first L keys, causal bottom-right (fp64)."""
    outs = []
    for b, L in enumerate(lens):
        qb = q[b:b + 1].double()  # (1, H, Tq, D)
        kb, vb = k[b:b + 1, :, :L].double(), v[b:b + 1, :, :L].double()  # (1, H, L, D)
        outs.append(attention_ref(qb, kb, vb, causal=True))
    return torch.cat(outs)  # (B, H, Tq, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Tq", [1, 3])
def test_ragged_rows_match_attention_over_the_valid_prefix(kernel_path, dtype, Tq):
    B, H, Tmax, D = 4, 2, 150, 64
    lens = [Tq, 37, 150, 90]  # one row at its first tokens, one full, others ragged
    k, v = _cache(B, H, Tmax, D, dtype)
    q = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k, v, seqlens)
    assert out.shape == (B, H, Tq, D) and out.dtype == dtype and not out.requires_grad
    want = _prefix_attention(q, k, v, lens)
    assert_verbose_allclose(out, want, atol=TOL[dtype], rtol=TOL[dtype], name=f"decode [{kernel_path}]")


def test_agrees_with_flash_attention_on_a_full_cache(kernel_path):
    """With every row full, decode equals a bottom-right causal flash_attention of Tq over Tmax keys."""
    B, H, Tmax, D, Tq = 2, 3, 77, 80, 2
    k, v = _cache(B, H, Tmax, D, torch.float32, seed=3)
    q = torch.randn(B, H, Tq, D, device=DEVICE)
    out = decode_attention(q, k, v, torch.full((B,), Tmax, dtype=torch.int32, device=DEVICE))
    assert_verbose_allclose(out, flash_attention(q, k, v, causal=True), atol=2e-5, rtol=2e-5)


def test_strided_cache_expanded_lengths_and_int64(kernel_path):
    """A cache that is a view of a (B, Tmax, H, D) buffer, and one length broadcast to every row."""
    B, H, Tmax, D = 3, 2, 64, 32
    buf_k, buf_v = (torch.randn(B, Tmax, H, D, device=DEVICE) for _ in range(2))
    k, v = buf_k.transpose(1, 2), buf_v.transpose(1, 2)  # (B, H, Tmax, D), non-contiguous
    q = torch.randn(B, H, 1, D, device=DEVICE)
    for seqlens in (torch.tensor(41, device=DEVICE).expand(B),  # stride 0
                    torch.full((B,), 41, dtype=torch.int64, device=DEVICE)):
        out = decode_attention(q, k, v, seqlens)
        assert_verbose_allclose(out, _prefix_attention(q, k, v, [41] * B), atol=2e-5, rtol=2e-5)


def test_softmax_scale_and_empty_rows(kernel_path):
    B, H, Tmax, D = 2, 2, 40, 16
    k, v = _cache(B, H, Tmax, D, torch.float32)
    q = torch.randn(B, H, 1, D, device=DEVICE)
    out = decode_attention(q, k, v, torch.tensor([0, 40], dtype=torch.int32, device=DEVICE), softmax_scale=0.5)
    assert torch.isfinite(out).all() and (out[0] == 0).all()  # a row with no valid key: zeros, not NaN
    want = attention_ref(q[1:].double(), k[1:].double(), v[1:].double(), causal=True, softmax_scale=0.5)
    assert_verbose_allclose(out[1:], want, atol=2e-5, rtol=2e-5)


def test_decode_steps_reproduce_a_full_forward(kernel_path):
    """Generating token by token with the cache gives the rows of one causal attention over the sequence."""
    B, H, T, D = 2, 2, 24, 32
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE) for _ in range(3))
    k_cache, v_cache = torch.zeros(B, H, 32, D, device=DEVICE), torch.zeros(B, H, 32, D, device=DEVICE)
    k_cache[:, :, :8], v_cache[:, :, :8] = k[:, :, :8], v[:, :, :8]  # "prefill" of 8 tokens
    steps = []
    for t in range(8, T):
        k_cache[:, :, t], v_cache[:, :, t] = k[:, :, t], v[:, :, t]
        lens = torch.full((B,), t + 1, dtype=torch.int32, device=DEVICE)
        steps.append(decode_attention(q[:, :, t:t + 1], k_cache, v_cache, lens))
    full = flash_attention(q, k, v, causal=True)[:, :, 8:]
    assert_verbose_allclose(torch.cat(steps, dim=2), full, atol=2e-5, rtol=2e-5)


def test_bad_inputs_are_clear_errors():
    k = torch.randn(2, 2, 16, 32)
    q = torch.randn(2, 2, 1, 32)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="share one dtype"):
        decode_attention(q.half(), k, k, lens)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype"):
        decode_attention(q, k, k, lens.float())
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        decode_attention(q, k, k, lens[:1])
    with pytest.raises(ValueError, match="k_cache must be"):
        decode_attention(q, k[:1], k[:1], lens)
    with pytest.raises(ValueError, match="same shape"):
        decode_attention(q, k, k[:, :, :8], lens)
    with pytest.raises(ValueError, match="head_dim"):
        kk = torch.randn(2, 2, 16, 8)
        decode_attention(torch.randn(2, 2, 1, 8), kk, kk, lens)
    with pytest.raises(ValueError, match="at most 64"):
        big = torch.randn(2, 2, 100, 32)
        decode_attention(torch.randn(2, 2, 65, 32), big, big, lens)
    with pytest.raises(ValueError, match="same device"):
        decode_attention(q, k, k, lens.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 16])
def test_gpu_long_ragged_cache(dtype, B):
    H, Tmax, D = 12, 8192, 64
    k, v = _cache(B, H, Tmax, D, dtype)
    q = torch.randn(B, H, 1, D, device=DEVICE, dtype=dtype)
    lens = torch.randint(1, Tmax + 1, (B,), generator=torch.Generator().manual_seed(0)).tolist()
    lens[0] = Tmax
    out = decode_attention(q, k, v, torch.tensor(lens, dtype=torch.int32, device=DEVICE))
    want = _prefix_attention(q, k, v, lens)
    rel = ((out.double() - want).norm() / want.norm()).item()
    assert rel < 1e-2, f"relative error {rel:.3g}"


def test_opcheck():
    k, v = _cache(2, 2, 40, 16, torch.float32)
    q = torch.randn(2, 2, 3, 16)
    lens = torch.tensor([5, 40], dtype=torch.int32)
    torch.library.opcheck(torch.ops.gpt_kernels.decode_attention.default, (q, k, v, lens, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
