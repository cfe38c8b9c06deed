"""KV-cache decode attention in Triton: split-KV ("flash-decoding") with a combine step.

``decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None)``: q ``(B, H, Tq, D)`` holds
the few new tokens (Tq small, e.g. 1), the caches ``(B, H, Tmax, D)`` hold every row's keys/values with
the new ones already written, ``cache_seqlens (B,)`` is the valid length of each row including the new
tokens. New token t of row b sits at position ``L_b - Tq + t`` and sees cache positions ``<= L_b - Tq + t``
(causal among the new tokens). No autograd: this is the inference path.

Out-of-range lengths (both paths, no host sync): ``L_b`` is clamped to ``[0, Tmax]``, so a length past
the cache means a full cache, and a negative one an empty row. A query whose position is negative
(``L_b < Tq``) sees no key and outputs zeros. Cache slots at or past ``L_b`` are never read: NaN or inf
left there (a cache from ``torch.empty``) cannot reach the output.

Why split-KV: at batch 1 with 12 heads a program per (batch, head) would occupy 12 of 132 SMs. The key
range is cut into ``num_splits`` chunks, each program reduces one chunk to a partial output and its
log-sum-exp, and a second kernel merges the partials (the log-sum-exp trick). ``num_splits`` depends
only on the static shapes (never on ``cache_seqlens``, which lives on the device), so a decode step
launches without a host sync and can be captured in a CUDA graph; chunks past a row's length exit early.
"""

from __future__ import annotations

import torch

from . import reference as ref
from ._blocks import _dot, _load_tile, _online_softmax_step, _scores
from ._utils import (
    INTERPRETED,
    LOG2E,
    check_same_device,
    check_tensor,
    kernel_op,
    launch,
    needs_int64,
    next_power_of_2,
    sm_count,
    tl,
    triton,
)
from .attention import _check_heads, _check_options, check_head_dim

#: Most new tokens per call (the query tile is padded to at least 16 rows for ``tl.dot``).
MAX_DECODE_QUERIES = 64


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

# Split kernel, program (split s, batch·head bh), keys [base + s·CHUNK, min(base + (s+1)·CHUNK, L)) in the
# log2 domain (base = 0; with a window W, base = max(L - Tq - W + 1, 0), the first key any new token
# sees, so only the last W + Tq - 1 cached keys are read and the splits cover just them):
#   s_tj = q_t k_jᵀ · scale · log2 e  (softcap c: c · log2 e · tanh(q_t k_jᵀ · scale / c)),
#   m = max_j s_tj,  l = Σ_j exp2(s_tj - m),  o_part = Σ_j exp2(s_tj - m) v_j / l,  lse_part = m + log2 l
# (lse_part = -inf and o_part = 0 for an empty chunk or a query that sees none of its keys).
@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sl, H, GROUP, TQ, TMAX, CHUNK, NUM_SPLITS, qk_scale, cap2, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    LARGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = off_bh % H
    off_hk = (off_h // GROUP).to(tl.int64)  # GQA: the cache head of this query head, no copy
    off_h = off_h.to(tl.int64)
    # Lengths are clamped to [0, Tmax] (in their own int32/int64 type, before narrowing): a length past
    # the cache never reads past it, and no host sync is needed to check it (CUDA-graph safe).
    L = tl.load(SEQLENS + off_b * stride_sl)
    L = tl.minimum(tl.maximum(L, 0), TMAX).to(tl.int32)
    rows = tl.arange(0, BLOCK_M)  # new-token index t
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm
                   + offs_d[None, :] * stride_qd, rows, TQ, offs_d, HEAD_DIM, False, EVEN_D)
    K_ptr = K + off_b * stride_kb + off_hk * stride_kh
    V_ptr = V + off_b * stride_vb + off_hk * stride_vh
    last_visible = L - TQ + rows  # position of new token t; it sees keys <= that
    if WINDOW:  # ... and > that - window: keys before the first token's window are never read
        start = tl.maximum(L - TQ - window + 1, 0) + split * CHUNK
    else:
        start = split * CHUNK
    end = tl.minimum(start + CHUNK, L)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        cols_o = cols.to(tl.int64) if LARGE else cols
        kT = _load_tile(K_ptr + offs_d[:, None] * stride_kd + cols_o[None, :] * stride_kn,
                        offs_d, HEAD_DIM, cols, end, EVEN_D, False)  # (BLOCK_D, BLOCK_N)
        s, _t = _scores(q, kT, qk_scale, cap2, SOFTCAP, IEEE)
        visible = (cols[None, :] < end) & (cols[None, :] <= last_visible[:, None])
        if WINDOW:
            visible = visible & (cols[None, :] > last_visible[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        p, alpha, l_i, m_new = _online_softmax_step(s, m_i, l_i)
        v = _load_tile(V_ptr + cols_o[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols, end, offs_d, HEAD_DIM, False, EVEN_D)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    # partials: O_PART (B·H, NUM_SPLITS, BLOCK_M, BLOCK_D) and LSE_PART (B·H, NUM_SPLITS, BLOCK_M), fp32
    part = off_bh.to(tl.int64) * NUM_SPLITS + split
    tl.store(O_PART + part * BLOCK_M * BLOCK_D + rows[:, None] * BLOCK_D + offs_d[None, :], acc)
    tl.store(LSE_PART + part * BLOCK_M + rows, lse)


# Combine, program per batch·head: lse = log2 Σ_s exp2(lse_s),  o = Σ_s exp2(lse_s - lse) o_s
# (zeros for a query that saw no key at all).
@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, OUT,
    stride_ob, stride_oh, stride_om, stride_od,
    H, TQ, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    off_bh = tl.program_id(0)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    base = off_bh.to(tl.int64) * NUM_SPLITS
    for t in range(0, TQ):
        lse = tl.load(LSE_PART + (base + offs_s) * BLOCK_M + t, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.math.exp2(lse - m_safe)  # (BLOCK_S,)
        denom = tl.sum(w, 0)
        o = tl.load(O_PART + ((base + offs_s[:, None]) * BLOCK_M + t) * BLOCK_D + offs_d[None, :],
                    mask=s_mask[:, None], other=0.0)  # (BLOCK_S, BLOCK_D)
        out = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
        tl.store(OUT + off_b * stride_ob + off_h * stride_oh + t * stride_om + offs_d * stride_od,
                 out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------

_BLOCK_N_CUDA = 64  # keys per inner step: 64 x D tiles of K and V per iteration (memory-bound loop)
_BLOCK_N_INTERPRET = 16
_MAX_SPLITS = 128


def num_splits_for(batch_heads: int, tmax: int, device: torch.device, block_n: int) -> int:
    """Splits so that ~2 programs per SM are live; a split never holds less than one key block."""
    max_useful = max(1, triton.cdiv(tmax, block_n))
    if device.type == "cuda":
        target = 2 * sm_count(device)
    else:
        target = 4  # the interpreter: still exercise the combine step
    return max(1, min(triton.cdiv(target, batch_heads), max_useful, _MAX_SPLITS))


def _decode_calls(q, k_cache, v_cache, cache_seqlens, out, softmax_scale, window_size=0, softcap=0.0):
    """The split and combine launches into ``out`` as (kernel, grid, args, meta, interpret) tuples: the
    launcher's one source of its arguments (the GPU compile gate binds the same)."""
    B, H, Tq, D = q.shape
    Hk = k_cache.shape[1]
    Tmax = k_cache.shape[2]
    BLOCK_N = _BLOCK_N_INTERPRET if INTERPRETED else _BLOCK_N_CUDA
    BLOCK_M = max(16, next_power_of_2(Tq))
    BLOCK_D = max(16, next_power_of_2(D))
    # keys a row can need: all Tmax, or with a window the W + Tq - 1 from its first token's window start
    span = min(Tmax, window_size + Tq - 1) if window_size > 0 else Tmax
    splits = num_splits_for(B * H, span, q.device, BLOCK_N)
    chunk = triton.cdiv(triton.cdiv(span, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(span, chunk)
    qk_scale, cap2 = (softmax_scale / softcap, softcap * LOG2E) if softcap > 0.0 else (softmax_scale * LOG2E, 1.0)
    o_part = torch.empty((B * H, splits, BLOCK_M, BLOCK_D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B * H, splits, BLOCK_M), dtype=torch.float32, device=q.device)
    split = (_decode_split_kernel, (splits, B * H),
             (q, k_cache, v_cache, cache_seqlens, o_part, lse_part,
              *q.stride(), *k_cache.stride(), *v_cache.stride(),
              cache_seqlens.stride(0), H, H // Hk, Tq, Tmax, chunk, splits, qk_scale, cap2, window_size),
             dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, EVEN_D=BLOCK_D == D, IEEE=q.dtype == torch.float32,
                  WINDOW=window_size > 0, SOFTCAP=softcap > 0.0,
                  LARGE=needs_int64(k_cache, v_cache, start_dim=2), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                  **({"num_warps": 1} if INTERPRETED else {"num_warps": 4, "num_stages": 3})), None)
    combine = (_decode_combine_kernel, (B * H,), (o_part, lse_part, out, *out.stride(), H, Tq, splits),
               dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_S=max(2, next_power_of_2(splits)),
                    num_warps=4), {"num_warps": 1})
    return [split, combine]


def _decode_launch(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_size=0, softcap=0.0):
    B, H, Tq, D = q.shape
    out = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Tq, D)
    if out.numel() == 0:
        return out
    if k_cache.shape[2] == 0:
        return out.zero_()
    for kernel, grid, args, meta, interpret in _decode_calls(q, k_cache, v_cache, cache_seqlens, out, softmax_scale,
                                                             window_size, softcap):
        launch(kernel, grid, args, meta, interpret=interpret)
    return out


# ---------------------------------------------------------------------------------------------------
# Op registration (no autograd: inference only)
# ---------------------------------------------------------------------------------------------------

def _decode_ref_layout(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_size=0, softcap=0.0):
    B, H, Tq, D = q.shape
    out = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    out.copy_(ref.decode_attention_ref(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_size, softcap))
    return out


@kernel_op("gpt_kernels::decode_attention", launch=_decode_launch, fallback=_decode_ref_layout)
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cache_seqlens: torch.Tensor, softmax_scale: float, window_size: int = 0,
                      softcap: float = 0.0) -> torch.Tensor:
    """(B, H, Tq, D) in q's dtype, stored as (B, Tq, H, D). Caches (B, Hk, Tmax, D), H % Hk == 0;
    window_size 0 = unlimited; softcap 0 = off."""


# ---------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------

def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, *, softmax_scale: float | None = None,
                     window_size: int | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Attention of the new tokens ``q (B, H, Tq, D)`` over each row's valid KV-cache prefix.

    ``k_cache``/``v_cache`` ``(B, Hk, Tmax, D)`` (any strides; ``H % Hk == 0``, GQA/MQA: query head h
    reads cache head ``h // (H // Hk)``), ``cache_seqlens (B,)`` int32 (or int64):
    row b's valid length including the ``Tq`` new tokens, which must already be written at positions
    ``L_b - Tq .. L_b - 1``. Returns ``(B, H, Tq, D)`` in q's dtype (stored as ``(B, Tq, H, D)``).
    Not differentiable.

    Lengths are not checked on the host (that would sync): each ``L_b`` is clamped to ``[0, Tmax]``
    (past the cache = a full cache; negative = an empty row); new token t sits at ``L_b - Tq + t`` and a
    token at a negative position sees no key and outputs zeros. Slots past ``L_b`` are never read, so
    NaN/inf there (an uninitialized cache) cannot leak into the output. ``window_size=W``: token t at
    position p sees only keys ``p - W < j <= p`` (only those are read); ``softcap=c`` > 0 caps the
    scores to ``c · tanh(s / c)`` (as :func:`kernels.flash_attention`).
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k_cache", k_cache, ndim=4)
    check_tensor("v_cache", v_cache, ndim=4)
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    B, H, Tq, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must be (B, Hk, Tmax, D) = ({B}, Hk, Tmax, {D}) to match q, "
                         f"got {tuple(k_cache.shape)}")
    if H > 0 or k_cache.shape[1] > 0:
        _check_heads(H, k_cache.shape[1])
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    check_head_dim("q", D)
    if Tq > MAX_DECODE_QUERIES:
        raise ValueError(f"q holds {Tq} new tokens; decode_attention takes at most {MAX_DECODE_QUERIES} "
                         "(use flash_attention for a prefill)")
    if Tq > k_cache.shape[2]:
        raise ValueError(f"q has {Tq} new tokens but the cache holds only {k_cache.shape[2]} positions")
    _check_options(True, softmax_scale, 0.0, window_size, softcap)
    scale = float(D ** -0.5 if softmax_scale is None else softmax_scale)
    with torch.no_grad():
        if k_cache.shape[1] == H and window_size is None and softcap == 0.0:
            return torch.ops.gpt_kernels.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)
        return torch.ops.gpt_kernels.decode_attention(q, k_cache, v_cache, cache_seqlens, scale,
                                                      int(window_size or 0), float(softcap))
