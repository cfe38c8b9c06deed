"""Fused causal flash attention, forward and backward, in Triton (FlashAttention-2 algorithm).

``flash_attention(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0, deterministic=False,
window_size=None, softcap=0.0)``: q ``(B, H, Tq, D)``, k/v ``(B, Hk, Tk, D)`` (``H % Hk == 0``), any strides (q, k, v may be transposed views of one fused
QKV projection: no copy), any lengths (masked tails; the fast path skips masks where the lengths divide
the block), head_dim 16..128 including 80 and 96 (padded to a power of two in registers), fp32 (IEEE
dot products, no TF32), fp16 and bf16 with fp32 accumulation and statistics.

* Causal masks are aligned bottom-right (flash-attention's convention): query i sees keys
  ``j <= i + Tk - Tq``, so a chunk of new queries at the end of a longer key sequence is causal among
  itself. A query that sees no key (only possible when Tq > Tk) outputs zeros, never NaN.
* The forward keeps only the fp32 log-sum-exp per query (no T×T matrix), in the log2 domain of its
  scores (``s · log2 e``, as the Triton tutorial: no conversion to natural log and back); the backward
  recomputes the probabilities ``exp2(s · log2 e - lse)`` block by block.
* Dropout on the attention weights uses an in-kernel counter-based RNG (Philox, ``tl.rand``) keyed on
  (seed + batch·head, query·Tk + key); the backward regenerates exactly the same mask from the seed.
* The backward is two passes that each own their output tile (dK/dV per key block, dQ per query block):
  no atomics, so gradients are bit-identical run to run whatever ``deterministic`` says.
* GQA/MQA: query head h reads K/V head ``h // (H // Hk)`` by pointer arithmetic (no repeated copy).
  The dK/dV pass runs one program per (key block, K/V head) that walks the query blocks of every query
  head of its group in turn, accumulating in registers: dK/dV in k/v's shape, deterministic, no atomics.
* Sliding window ``W`` (causal): each query block computes the key-block range its rows' windows
  cover, and each key block of the dK/dV pass the query-block range that sees it; blocks outside are
  never visited (O(T·W) work). Forward and dQ mask only the blocks cut by the window edge; the dK/dV
  pass masks every block it visits (one loop: fewer registers at D=128).
* Softcap ``c``: scores ``c · tanh(s / c)`` before masking/softmax; the backward recomputes tanh and
  multiplies dS by ``1 - tanh²``.
* ``flash_attention_varlen``: packed ``(total, H, D)`` sequences; the same kernels with ``VARLEN``:
  grid (max_seqlen blocks, sequences × heads), each program loads its sequence's offsets from the
  int32 ``cu_seqlens`` (no host sync) and exits when its block lies past the sequence's length.
* Element offsets of each (batch, head) slice are int64; row offsets inside a slice switch to int64
  (``LARGE``) when a slice spans more than 2**31 elements.

File order: ``@triton.jit`` kernels -> launchers -> op registration / autograd -> functional API
(the module: ``self_attention.py``). Registration, dispatch and launches are the shared plumbing of ``kernels/_utils.py``
(``kernel_op``, ``launch``): a ``triton_op`` in the ``gpt_kernels`` namespace (CUDA: ``wrap_triton``
launches, visible to ``torch.compile``), a ``"cpu"`` kernel that runs the same Triton code under the
interpreter when ``TRITON_INTERPRET=1`` and the PyTorch fallback of ``kernels/reference.py`` otherwise,
``register_autograd`` for the backward. Device building blocks come from ``kernels/_blocks.py``.
"""

from __future__ import annotations

import math

import torch

from . import _eager_cpu
from . import reference as ref
from ._blocks import _dot, _load_tile, _online_softmax_step, _scores, _store_tile, _visible
from ._utils import (
    INTERPRETED,
    LOG2E,
    check_same_device,
    check_tensor,
    kernel_op,
    launch,
    needs_int64,
    next_power_of_2,
    tl,
    triton,
)

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _dropout_keep(seed, rng_offsets, dropout_p):
    # Philox uniform in [0, 1) per (seed, offset); keep with probability 1 - p. The offsets are
    # query * Tk + key (int32; they wrap only past 2**32 scores per head, harmless for a mask).
    return tl.rand(seed, rng_offsets) >= dropout_p


@triton.jit
def _seq_bounds(CU_Q, CU_K, off_b, TQ, TK, VARLEN: tl.constexpr):
    # (q_start, seqlen_q, k_start, seqlen_k) of batch entry / packed sequence `off_b`. Varlen: from the
    # int32 prefix sums in device memory (no host sync), starts in int64; dense: (0, TQ, 0, TK).
    if VARLEN:
        q0 = tl.load(CU_Q + off_b)
        k0 = tl.load(CU_K + off_b)
        return q0.to(tl.int64), tl.load(CU_Q + off_b + 1) - q0, k0.to(tl.int64), tl.load(CU_K + off_b + 1) - k0
    else:
        return 0, TQ, 0, TK


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
               rows, offs_n, offs_d, lo, hi, TK, causal_shift, window, qk_scale, cap2, seed, dropout_p,
               HEAD_DIM: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
               LARGE: tl.constexpr, BLOCK_N: tl.constexpr):
    # Online softmax over key blocks [lo, hi). MASK=False blocks are entirely visible to every query
    # of the tile (no causal cut, no window edge, no tail), so the mask arithmetic is skipped there.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        cols_o = cols.to(tl.int64) if LARGE else cols
        kT = _load_tile(K_ptr + offs_d[:, None] * stride_kd + cols_o[None, :] * stride_kn,
                        offs_d, HEAD_DIM, cols, TK, EVEN_D, not MASK)  # (BLOCK_D, BLOCK_N)
        s, _t = _scores(q, kT, qk_scale, cap2, SOFTCAP, IEEE)  # (BLOCK_M, BLOCK_N), log2 domain
        if MASK:
            s = tl.where(_visible(rows, cols, TK, causal_shift, window, CAUSAL, WINDOW), s, float("-inf"))
        p, alpha, l_i, m_new = _online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        v = _load_tile(V_ptr + cols_o[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols, TK, offs_d, HEAD_DIM, not MASK, EVEN_D)  # (BLOCK_N, BLOCK_D)
        if DROPOUT:
            keep = _dropout_keep(seed, rows[:, None] * TK + cols[None, :], dropout_p)
            p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        acc = acc + _dot(p.to(v.dtype), v, IEEE)  # p in the value dtype, never a hard-coded one
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_ranges(start_m, seqlen_k, causal_shift, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Key blocks a query tile [start_m, start_m + BLOCK_M) visits, as (w_lo, w_full, lo, hi):
    #   [w_lo, w_full) masked (the window's left edge), [w_full, lo) unmasked (every row sees every key),
    #   [lo, hi) masked (the causal diagonal and the tail). Keys < w_lo are outside every row's window
    #   and never visited: O(T·W) work with a window. Without a window w_lo = w_full = 0.
    if CAUSAL:
        lo = (tl.maximum(start_m + causal_shift + 1, 0) // BLOCK_N) * BLOCK_N
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + causal_shift, seqlen_k), 0)
    else:
        lo = (seqlen_k // BLOCK_N) * BLOCK_N
        hi = seqlen_k
    if WINDOW:
        # row i (position p = i + shift) sees keys j > p - window: the first row needs j >= w_lo, the
        # last row of the tile sees every key >= start_m + BLOCK_M + shift - window
        w_full = tl.minimum(tl.cdiv(tl.maximum(start_m + BLOCK_M + causal_shift - window, 0), BLOCK_N) * BLOCK_N, lo)
        w_lo = tl.minimum((tl.maximum(start_m + causal_shift - window + 1, 0) // BLOCK_N) * BLOCK_N, w_full)
    else:
        w_full = 0
        w_lo = 0
    return w_lo, w_full, lo, hi


# Forward (per query tile of BLOCK_M rows, all in fp32 registers):
#   s_j = q k_jᵀ · scale · log2(e)  (softcap c: s_j = c · log2(e) · tanh(q k_jᵀ · scale / c));
#   m = running max;  l = Σ exp2(s - m);  acc = Σ exp2(s - m) v
#   o = acc / l;  lse = m + log2 l  (log2 domain, the domain of s: saved as is for the backward, which
#   recomputes p = exp2(s - lse); +inf if l == 0).
# Causal tiles run the unmasked loop over keys every row of the tile sees, then the diagonal band; a
# sliding window adds a masked loop over its left edge and starts there (see _key_ranges).
# GQA: query head h reads K/V head h // GROUP (pointer math, no copy). Varlen: one program per
# (query block, head, sequence); the sequence's offsets come from cu_seqlens; blocks past its length exit.
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SEED, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    H, GROUP, TQ, TK, qk_scale, cap2, window, dropout_p,
    T_BUCKET,  # autotune key only (sequence-length bucket)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    IEEE: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    LARGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, off_b, TQ, TK, VARLEN)
    if start_m >= seqlen_q:  # varlen: past this sequence's queries (grid sized by max_seqlen_q)
        return
    off_b = off_b.to(tl.int64)
    off_hk = (off_h // GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    Q_ptr = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm
    K_ptr = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    V_ptr = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    O_ptr = O + off_b * stride_ob + off_h * stride_oh + q_start * stride_om

    rows = start_m + tl.arange(0, BLOCK_M)
    rows_o = rows.to(tl.int64) if LARGE else rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q_ptr + rows_o[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   rows, seqlen_q, offs_d, HEAD_DIM, EVEN_M, EVEN_D)  # (BLOCK_M, BLOCK_D)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED) + off_bh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    causal_shift = seqlen_k - seqlen_q  # bottom-right alignment: row i sees keys <= i + shift
    w_lo, w_full, lo, hi = _key_ranges(start_m, seqlen_k, causal_shift, window, CAUSAL, WINDOW,
                                       BLOCK_M, BLOCK_N)
    if WINDOW:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn,
                                   stride_vd, rows, offs_n, offs_d, w_lo, w_full, seqlen_k, causal_shift,
                                   window, qk_scale, cap2, seed, dropout_p, HEAD_DIM, True, CAUSAL, WINDOW,
                                   SOFTCAP, DROPOUT, IEEE, EVEN_D, LARGE, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                               rows, offs_n, offs_d, w_full, lo, seqlen_k, causal_shift, window, qk_scale,
                               cap2, seed, dropout_p, HEAD_DIM, False, CAUSAL, WINDOW, SOFTCAP, DROPOUT,
                               IEEE, EVEN_D, LARGE, BLOCK_N)
    if (not EVEN_N) or CAUSAL:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn,
                                   stride_vd, rows, offs_n, offs_d, lo, hi, seqlen_k, causal_shift, window,
                                   qk_scale, cap2, seed, dropout_p, HEAD_DIM, True, CAUSAL, WINDOW, SOFTCAP,
                                   DROPOUT, IEEE, EVEN_D, LARGE, BLOCK_N)

    empty = l_i == 0.0  # no visible key: output 0, lse +inf (so the backward's p = exp(s - lse) = 0)
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    _store_tile(O_ptr + rows_o[:, None] * stride_om + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty),
                rows, seqlen_q, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    lse_ptrs = LSE + off_b * stride_lb + off_h * stride_lh + q_start + rows
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=rows < seqlen_q)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, TQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, LARGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta_i = Σ_d o_id · do_id  (= Σ_j p_ij dp_ij, also with dropout), fp32, (B·H, Tq)
    # (varlen: the packed (total_q, H, D) tensors are seen as B = 1, Tq = total_q: delta (H, total_q))
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_o = rows.to(tl.int64) if LARGE else rows
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh + rows_o[:, None] * stride_om
                   + offs_d[None, :] * stride_od, rows, TQ, offs_d, HEAD_DIM, False, EVEN_D)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + rows_o[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, rows, TQ, offs_d, HEAD_DIM, False, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + off_bh.to(tl.int64) * TQ + rows, delta, mask=rows < TQ)


# Backward math, with S₀ = q kᵀ · scale, S = S₀ (or c·tanh(S₀/c) with a softcap c),
# P = exp(S - lse) = exp2(S·log2(e) - lse2) (recomputed from the saved log2-domain lse2),
# Z = keep / (1 - p_drop) (all ones without dropout) and O = (P∘Z) V:
#   dV = (P∘Z)ᵀ dO
#   dP = (dO Vᵀ) ∘ Z
#   dS = P ∘ (dP − delta),   delta_i = Σ_d O_id dO_id
#   dS₀ = dS ∘ (1 − tanh²(S₀/c))   (softcap: d/dx c·tanh(x/c) = 1 − tanh²(x/c); else dS₀ = dS)
#   dQ = scale · dS₀ K,       dK = scale · dS₀ᵀ Q
# GQA: dK/dV of K/V head hk are Σ over its GROUP query heads h = hk·GROUP + g of the above.
# Pass 1 (_attn_bwd_dkdv_kernel): one program per (key block, K/V head) keeps K, V, dK, dV in registers
# and walks, for each query head of the group in turn, the query blocks that can see it (a window
# bounds them on both sides). Pass 2 (_attn_bwd_dq_kernel): one program per query block walks the key
# blocks, like the forward. Each output tile has one owner and a fixed summation order:
# deterministic without atomics.
@triton.jit
def _dkdv_inner(dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr,
                stride_qm, stride_qd, stride_dom, stride_dod,
                cols, offs_m, offs_d, lo, hi, TQ, TK, causal_shift, window, qk_scale, cap2, seed, dropout_p,
                HEAD_DIM: tl.constexpr, MASK: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, LARGE: tl.constexpr, BLOCK_M: tl.constexpr):
    # Transposed tiles: sT/pT are (BLOCK_N keys, BLOCK_M queries). Rows past Tq load lse = +inf -> p = 0.
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        rows_o = rows.to(tl.int64) if LARGE else rows
        qT = _load_tile(Q_ptr + offs_d[:, None] * stride_qd + rows_o[None, :] * stride_qm,
                        offs_d, HEAD_DIM, rows, TQ, EVEN_D, EVEN_M)  # (BLOCK_D, BLOCK_M)
        if EVEN_M:
            lse = tl.load(LSE_ptr + rows)
            delta = tl.load(DELTA_ptr + rows)
        else:
            lse = tl.load(LSE_ptr + rows, mask=rows < TQ, other=float("inf"))
            delta = tl.load(DELTA_ptr + rows, mask=rows < TQ, other=0.0)
        sT, tT = _scores(k, qT, qk_scale, cap2, SOFTCAP, IEEE)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASK:
            vis = cols[:, None] <= rows[None, :] + causal_shift
            if WINDOW:
                vis = vis & (cols[:, None] > rows[None, :] + (causal_shift - window))
            pT = tl.where(vis, pT, 0.0)
        do = _load_tile(DO_ptr + rows_o[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                        rows, TQ, offs_d, HEAD_DIM, EVEN_M, EVEN_D)  # (BLOCK_M, BLOCK_D)
        dpT = _dot(v, tl.trans(do), IEEE)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            keep = _dropout_keep(seed, rows[None, :] * TK + cols[:, None], dropout_p)
            z = 1.0 / (1.0 - dropout_p)
            dv += _dot(tl.where(keep, pT * z, 0.0).to(do.dtype), do, IEEE)
            dpT = tl.where(keep, dpT * z, 0.0)
        else:
            dv += _dot(pT.to(do.dtype), do, IEEE)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SEED, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh,
    H, GROUP, TQ, TK, qk_scale, cap2, window, sm_scale, dropout_p,
    T_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    IEEE: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    LARGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1)  # (batch or sequence) · Hk + K/V head
    HK = H // GROUP
    off_b = off_bhk // HK
    off_hk = off_bhk % HK
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, off_b, TQ, TK, VARLEN)
    if start_n >= seqlen_k:  # varlen: past this sequence's keys
        return
    off_b = off_b.to(tl.int64)
    off_hk = off_hk.to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    cols_o = cols.to(tl.int64) if LARGE else cols
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn + cols_o[:, None] * stride_kn
                   + offs_d[None, :] * stride_kd, cols, seqlen_k, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    v = _load_tile(V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn + cols_o[:, None] * stride_vn
                   + offs_d[None, :] * stride_vd, cols, seqlen_k, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    causal_shift = seqlen_k - seqlen_q
    # Query blocks, as for every head of the group: [lo, mid) masked (causal diagonal), [mid, hi)
    # unmasked (rows that see every key of the block). Rows < lo see none of these keys (causal). With a
    # window, rows >= hi see none either (they are never visited) and [lo, hi) runs as one masked loop:
    # a third loop instance (the window's far edge) made ptxas spill at D=128 (sm_90, 32x128 tile).
    if CAUSAL:
        lo = (tl.maximum(start_n - causal_shift, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(mid, seqlen_q)
    else:
        lo = 0
        mid = 0
    if WINDOW:
        # key j is seen by row i iff i < j - shift + window; the last key of the block bounds hi
        hi = tl.maximum(tl.minimum(start_n + BLOCK_N - 1 + window - causal_shift, seqlen_q), lo)
    else:
        hi = seqlen_q
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        Q_ptr = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm
        DO_ptr = DO + off_b * stride_dob + off_h * stride_doh + q_start * stride_dom
        LSE_ptr = LSE + off_b * stride_lb + off_h * stride_lh + q_start
        DELTA_ptr = DELTA + off_b * stride_lb + off_h * stride_lh + q_start
        if DROPOUT:
            seed_g = tl.load(SEED) + (off_b * H + off_h).to(tl.int32)
        else:
            seed_g = 0
        if WINDOW:
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr,
                                 stride_qm, stride_qd, stride_dom, stride_dod, cols, offs_m, offs_d,
                                 lo, hi, seqlen_q, seqlen_k, causal_shift, window, qk_scale, cap2, seed_g,
                                 dropout_p, HEAD_DIM, True, WINDOW, SOFTCAP, DROPOUT, IEEE, EVEN_M, EVEN_D,
                                 LARGE, BLOCK_M)
        else:
            if CAUSAL:
                dk, dv = _dkdv_inner(dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr,
                                     stride_qm, stride_qd, stride_dom, stride_dod, cols, offs_m, offs_d,
                                     lo, mid, seqlen_q, seqlen_k, causal_shift, window, qk_scale, cap2, seed_g,
                                     dropout_p, HEAD_DIM, True, WINDOW, SOFTCAP, DROPOUT, IEEE, EVEN_M, EVEN_D,
                                     LARGE, BLOCK_M)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr,
                                 stride_qm, stride_qd, stride_dom, stride_dod, cols, offs_m, offs_d,
                                 mid, hi, seqlen_q, seqlen_k, causal_shift, window, qk_scale, cap2, seed_g,
                                 dropout_p, HEAD_DIM, False, WINDOW, SOFTCAP, DROPOUT, IEEE, EVEN_M, EVEN_D,
                                 LARGE, BLOCK_M)
    dk = dk * sm_scale
    _store_tile(DK + off_b * stride_dkb + off_hk * stride_dkh + k_start * stride_dkn + cols_o[:, None] * stride_dkn
                + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), cols, seqlen_k, offs_d, HEAD_DIM,
                EVEN_N, EVEN_D)
    _store_tile(DV + off_b * stride_dvb + off_hk * stride_dvh + k_start * stride_dvn + cols_o[:, None] * stride_dvn
                + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), cols, seqlen_k, offs_d, HEAD_DIM,
                EVEN_N, EVEN_D)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
              rows, offs_n, offs_d, lo, hi, TK, causal_shift, window, qk_scale, cap2, seed, dropout_p,
              HEAD_DIM: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
              LARGE: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        cols_o = cols.to(tl.int64) if LARGE else cols
        kT = _load_tile(K_ptr + offs_d[:, None] * stride_kd + cols_o[None, :] * stride_kn,
                        offs_d, HEAD_DIM, cols, TK, EVEN_D, not MASK)  # (BLOCK_D, BLOCK_N)
        vT = _load_tile(V_ptr + offs_d[:, None] * stride_vd + cols_o[None, :] * stride_vn,
                        offs_d, HEAD_DIM, cols, TK, EVEN_D, not MASK)
        s, t = _scores(q, kT, qk_scale, cap2, SOFTCAP, IEEE)
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            p = tl.where(_visible(rows, cols, TK, causal_shift, window, CAUSAL, WINDOW), p, 0.0)
        dp = _dot(do, vT, IEEE)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = _dropout_keep(seed, rows[:, None] * TK + cols[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), IEEE)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SEED, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh,
    H, GROUP, TQ, TK, qk_scale, cap2, window, sm_scale, dropout_p,
    T_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    IEEE: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    LARGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, off_b, TQ, TK, VARLEN)
    if start_m >= seqlen_q:
        return
    off_b = off_b.to(tl.int64)
    off_hk = (off_h // GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    rows_o = rows.to(tl.int64) if LARGE else rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm + rows_o[:, None] * stride_qm
                   + offs_d[None, :] * stride_qd, rows, seqlen_q, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + q_start * stride_dom
                    + rows_o[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    rows, seqlen_q, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    LSE_ptr = LSE + off_b * stride_lb + off_h * stride_lh + q_start
    DELTA_ptr = DELTA + off_b * stride_lb + off_h * stride_lh + q_start
    if EVEN_M:
        lse = tl.load(LSE_ptr + rows)
        delta = tl.load(DELTA_ptr + rows)
    else:
        lse = tl.load(LSE_ptr + rows, mask=rows < seqlen_q, other=float("inf"))
        delta = tl.load(DELTA_ptr + rows, mask=rows < seqlen_q, other=0.0)
    K_ptr = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    V_ptr = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED) + off_bh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    causal_shift = seqlen_k - seqlen_q
    w_lo, w_full, lo, hi = _key_ranges(start_m, seqlen_k, causal_shift, window, CAUSAL, WINDOW,
                                       BLOCK_M, BLOCK_N)
    if WINDOW:
        dq = _dq_inner(dq, q, do, lse, delta, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                       rows, offs_n, offs_d, w_lo, w_full, seqlen_k, causal_shift, window, qk_scale, cap2,
                       seed, dropout_p, HEAD_DIM, True, CAUSAL, WINDOW, SOFTCAP, DROPOUT, IEEE, EVEN_D,
                       LARGE, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                   rows, offs_n, offs_d, w_full, lo, seqlen_k, causal_shift, window, qk_scale, cap2, seed,
                   dropout_p, HEAD_DIM, False, CAUSAL, WINDOW, SOFTCAP, DROPOUT, IEEE, EVEN_D, LARGE, BLOCK_N)
    if (not EVEN_N) or CAUSAL:
        dq = _dq_inner(dq, q, do, lse, delta, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                       rows, offs_n, offs_d, lo, hi, seqlen_k, causal_shift, window, qk_scale, cap2, seed,
                       dropout_p, HEAD_DIM, True, CAUSAL, WINDOW, SOFTCAP, DROPOUT, IEEE, EVEN_D, LARGE,
                       BLOCK_N)
    dq = dq * sm_scale
    _store_tile(DQ + off_b * stride_dqb + off_h * stride_dqh + q_start * stride_dqm + rows_o[:, None] * stride_dqm
                + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), rows, seqlen_q, offs_d, HEAD_DIM,
                EVEN_M, EVEN_D)


# ---------------------------------------------------------------------------------------------------
# Launch settings
# ---------------------------------------------------------------------------------------------------
# Autotune lists (CUDA). The key: head_dim, causal, dropout, a sequence-length bucket, the layout (row
# strides of q and k: the model's packed q/k/v views and a contiguous (B, H, T, D) tensor tune apart) and
# the EVEN_M/EVEN_N/LARGE flags (the dtype is part of Triton's key). Every block size divides _EVEN_BLOCK,
# so EVEN_M/EVEN_N (decided by the launcher, before the config is known) hold for whichever config wins.
_EVEN_BLOCK = 128


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Which calls a candidate is tuned for, from (BLOCK_D, DROPOUT): a candidate that spills registers or
# needs more than 227 KB of shared memory for some calls is left out of those calls' autotuning.
def _always(block_d, dropout):
    return True


def _d64_or_no_dropout(block_d, dropout):
    return block_d <= 64 or not dropout


def _d64_no_dropout(block_d, dropout):
    return block_d <= 64 and not dropout


# Facts from the as-launched compile for sm_90 (tests/gpu_ready.py: bf16, causal, GPT-2's packed q/k/v,
# T=1024, triton 3.9; registers per thread, spill bytes stores/loads, shared memory). Every bf16/fp16
# candidate issues wgmma (HGMMA); tests/test_gpu_ready.py fails on a spill or on > 227 KB. GPU timings
# decide among the candidates at run time.
_FWD_TABLE = [] if not hasattr(triton, "Config") else [
    # D=64: 116 regs, 0 spills, 64 KB (dropout: 255 regs, 0 spills); D=128: 170 regs, 128 KB, but 24/24 B
    # of spills with dropout
    (_cfg(128, 64, 8, 3), _d64_or_no_dropout),
    # D=64 long T, wider key blocks: 203 regs, 112 KB, 0 spills; with dropout 255 regs and 40/60 B of
    # spills; D=128 needs 224 KB and spills 176/180 B with dropout
    (_cfg(128, 128, 8, 3), _d64_no_dropout),
    # the 128-row tile for D=80-128: D=64 99 regs (dropout 168), 48 KB; D=128 127 regs (dropout 243),
    # 96 KB; 0 spills
    (_cfg(128, 32, 8, 4), _always),
    # short T or few heads (twice the programs): D=64 with dropout 255 regs, 72 KB, 0 spills; D=128
    # 167 regs, 144 KB, 0 spills, but with dropout 255 regs and 12/12 B of spills
    (_cfg(64, 64, 4, 4), _d64_or_no_dropout),
    # smallest: D=64 89 regs (dropout 128), 32 KB; D=128 128 regs (dropout 238), 64 KB; 0 spills
    (_cfg(64, 32, 4, 3), _always),
]
_DKDV_TABLE = [] if not hasattr(triton, "Config") else [
    # 128 resident keys: D=64 160 regs, 57 KB; D=128 231 regs (dropout 254), 113 KB; 0 spills
    (_cfg(32, 128, 8, 3), _always),
    # D=64 with dropout 254 regs, 69 KB; D=128 239 regs, 129 KB, 0 spills, but 168/172 B of spills
    # with dropout
    (_cfg(64, 64, 8, 3), _d64_or_no_dropout),
    # D=64 long T: 223 regs, 81 KB, 0 spills; with dropout 124/124 B of spills; D=128 255 regs and
    # 76/96 B of spills (161 KB): D=64 without dropout only
    (_cfg(64, 128, 8, 3), _d64_no_dropout),
    # D=128: 202 regs (dropout 244), 56 KB, 0 spills
    (_cfg(16, 64, 4, 3), _always),
    # D=128 long T, 128 resident keys: 202 regs (dropout 244), 88 KB, 0 spills
    (_cfg(16, 128, 8, 3), _always),
]
_DQ_TABLE = [] if not hasattr(triton, "Config") else [
    # 128 resident queries: D=64 132 regs, 80 KB; D=128 176 regs, 160 KB; 0 spills (also with dropout)
    (_cfg(128, 64, 8, 3), _always),
    # D=64 106 regs, 56 KB; D=128 130 regs, 112 KB
    (_cfg(128, 32, 8, 3), _always),
    # D=128 with dropout 255 regs, 132 KB, 0 spills
    (_cfg(64, 64, 8, 3), _always),
    # D=64 92 regs, 40 KB; D=128 with dropout 224 regs, 80 KB
    (_cfg(64, 32, 4, 3), _always),
]
# fp32 (IEEE dots, 4-byte tiles, no wgmma): the bf16 tiles at D=128 need up to 240-384 KB of shared memory
# (over the 227 KB a block may use) or spill heavily (fwd 128x64: 225 KB and 5,596/13,480 B of spills),
# so fp32 tunes its own smaller tiles, sized to fit 227 KB at D=128 (K/V/Q stages x 4-byte rows).
_FWD_TABLE_FP32 = [] if not hasattr(triton, "Config") else [
    (_cfg(64, 32, 4, 3), _always), (_cfg(128, 32, 8, 2), _always), (_cfg(64, 64, 4, 2), _always)]
_DKDV_TABLE_FP32 = [] if not hasattr(triton, "Config") else [
    (_cfg(16, 64, 4, 2), _always), (_cfg(32, 64, 4, 2), _always)]
_DQ_TABLE_FP32 = [] if not hasattr(triton, "Config") else [
    (_cfg(64, 32, 4, 2), _always), (_cfg(32, 64, 4, 2), _always)]

_FWD_CONFIGS = [c for c, _ in _FWD_TABLE]
_DKDV_CONFIGS = [c for c, _ in _DKDV_TABLE]
_DQ_CONFIGS = [c for c, _ in _DQ_TABLE]
_KEY = ["HEAD_DIM", "CAUSAL", "DROPOUT", "T_BUCKET", "stride_qm", "stride_kn", "EVEN_M", "EVEN_N", "LARGE",
        "WINDOW", "SOFTCAP", "VARLEN"]


def _candidates(table, table_fp32):
    """``early_config_prune``: the candidates of the call's dtype (IEEE: fp32) tuned for its BLOCK_D/DROPOUT."""
    def prune(configs, named_args, **meta):
        rows = table_fp32 if meta.get("IEEE") else table
        keep = [c for c, ok in rows if ok(meta.get("BLOCK_D", 128), meta.get("DROPOUT", False))]
        return keep or [rows[-1][0]]
    return prune


if hasattr(triton, "autotune"):
    def _tuned(kernel, table, table_fp32):
        return triton.autotune(configs=[c for c, _ in table + table_fp32], key=_KEY,
                               prune_configs_by={"early_config_prune": _candidates(table, table_fp32)})(kernel)

    _attn_fwd_tuned = _tuned(_attn_fwd_kernel, _FWD_TABLE, _FWD_TABLE_FP32)
    _attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv_kernel, _DKDV_TABLE, _DKDV_TABLE_FP32)
    _attn_bwd_dq_tuned = _tuned(_attn_bwd_dq_kernel, _DQ_TABLE, _DQ_TABLE_FP32)

# The interpreter runs programs one after another in Python: one fixed small config that still
# exercises every path (BLOCK_M != BLOCK_N, unmasked + diagonal loops, masked tails).
_INTERPRET_FWD = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 1}
_INTERPRET_DKDV = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 1}
_INTERPRET_DQ = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 1}
_INTERPRET_PRE = {"BLOCK_M": 32, "num_warps": 1}


def _t_bucket(t: int) -> int:
    """Sequence-length bucket for the autotune key: powers of two from 256 to 16k."""
    return min(max(next_power_of_2(t), 256), 16384)


def _meta(D, dtype, causal, dropout_p, window, softcap, varlen):
    BLOCK_D = max(16, next_power_of_2(D))
    return dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, CAUSAL=bool(causal), DROPOUT=dropout_p > 0.0,
                WINDOW=window > 0, SOFTCAP=softcap > 0.0, VARLEN=varlen,
                IEEE=dtype == torch.float32, EVEN_D=BLOCK_D == D)


def _score_scales(softmax_scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap2) of the kernels' ``_scores``: log2-domain scores, or the softcap's two factors."""
    if softcap > 0.0:
        return softmax_scale / softcap, softcap * LOG2E
    return softmax_scale * LOG2E, 1.0


def _even(Tq, Tk, blocks):
    if blocks is None:  # autotuned: every candidate block divides _EVEN_BLOCK
        return Tq % _EVEN_BLOCK == 0, Tk % _EVEN_BLOCK == 0
    return Tq % blocks["BLOCK_M"] == 0, Tk % blocks["BLOCK_N"] == 0


def _bhmd(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """Strides as the kernels index them, (batch, head, row, dim): a packed (total, H, D) tensor has
    no batch stride (its sequences are offsets along the rows)."""
    return (0, t.stride(1), t.stride(0), t.stride(2)) if varlen else tuple(t.stride())


def _fwd_call(q, k, v, o, lse, seed, cu_q, cu_k, nb, Tq, Tk, causal, softmax_scale, dropout_p, window, softcap):
    """(grid, args, meta) of the forward kernel: the launcher's one source of its arguments (the GPU
    compile gate binds the same). Dense: nb = B, Tq/Tk the lengths; varlen: nb = sequences, Tq/Tk the
    max_seqlens (grid size; each program reads its sequence's bounds from cu_q/cu_k)."""
    varlen = cu_q is not None
    H, Hk, D = q.shape[1], k.shape[1], q.shape[-1]
    meta = _meta(D, q.dtype, causal, dropout_p, window, softcap, varlen)
    if varlen:
        even_m = even_n = False
        large = needs_int64(q, k, v, o)
        lse_strides = (0, lse.stride(0))
    else:
        even_m, even_n = _even(Tq, Tk, _INTERPRET_FWD if INTERPRETED else None)
        large = needs_int64(q, k, v, o, start_dim=2)
        lse_strides = (lse.stride(0), lse.stride(1))
    meta.update(EVEN_M=even_m, EVEN_N=even_n, LARGE=large)
    qk_scale, cap2 = _score_scales(softmax_scale, softcap)
    args = (q, k, v, o, lse, lse if seed is None else seed, lse if cu_q is None else cu_q,
            lse if cu_k is None else cu_k,
            *_bhmd(q, varlen), *_bhmd(k, varlen), *_bhmd(v, varlen), *_bhmd(o, varlen), *lse_strides,
            H, H // Hk, Tq, Tk, qk_scale, cap2, window, dropout_p, _t_bucket(max(Tq, Tk)))
    return (lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), nb * H)), args, meta


def _fwd(*call):
    grid, args, meta = _fwd_call(*call)
    launch(_attn_fwd_kernel, grid, args, meta, tuned=_attn_fwd_tuned, interpret=_INTERPRET_FWD)


def _bwd_calls(do, q, k, v, o, lse, seed, dq, dk, dv, cu_q, cu_k, nb, Tq, Tk, causal, softmax_scale, dropout_p,
               window, softcap):
    """The three backward launches (delta, dK/dV, dQ) into dq, dk, dv as (kernel, tuned, grid, args,
    meta, interpret) tuples, in order; nb/Tq/Tk as in _fwd_call."""
    varlen = cu_q is not None
    H, Hk, D = q.shape[1], k.shape[1], q.shape[-1]
    meta = _meta(D, q.dtype, causal, dropout_p, window, softcap, varlen)
    if varlen:
        large = needs_int64(q, k, v, o, do)
        o4, do4 = o.permute(1, 0, 2).unsqueeze(0), do.permute(1, 0, 2).unsqueeze(0)  # (1, H, total_q, D)
        lse_strides = (0, lse.stride(0))
    else:
        large = needs_int64(q, k, v, o, do, start_dim=2)
        o4, do4 = o, do
        lse_strides = (lse.stride(0), lse.stride(1))
    nb4, _, T4, _ = o4.shape
    delta = torch.empty((nb4, H, T4), dtype=torch.float32, device=q.device)
    pre = (_bwd_preprocess_kernel, None, lambda m: (triton.cdiv(T4, m["BLOCK_M"]), nb4 * H),
           (o4, do4, delta, *o4.stride(), *do4.stride(), H, T4),
           dict(HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], EVEN_D=meta["EVEN_D"], LARGE=large, BLOCK_M=64, num_warps=4),
           _INTERPRET_PRE)
    qk_scale, cap2 = _score_scales(softmax_scale, softcap)
    seed_arg = lse if seed is None else seed
    cu_args = (lse if cu_q is None else cu_q, lse if cu_k is None else cu_k)
    common = (*lse_strides, H, H // Hk, Tq, Tk, qk_scale, cap2, window, softmax_scale, dropout_p,
              _t_bucket(max(Tq, Tk)))
    strides = (*_bhmd(q, varlen), *_bhmd(k, varlen), *_bhmd(v, varlen), *_bhmd(do, varlen))

    even_m, even_n = (False, False) if varlen else _even(Tq, Tk, _INTERPRET_DKDV if INTERPRETED else None)
    dkdv = (_attn_bwd_dkdv_kernel, _attn_bwd_dkdv_tuned, lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), nb * Hk),
            (q, k, v, do, lse, delta, dk, dv, seed_arg, *cu_args, *strides, *_bhmd(dk, varlen),
             *_bhmd(dv, varlen), *common), dict(meta, EVEN_M=even_m, EVEN_N=even_n, LARGE=large), _INTERPRET_DKDV)
    even_m, even_n = (False, False) if varlen else _even(Tq, Tk, _INTERPRET_DQ if INTERPRETED else None)
    dq_call = (_attn_bwd_dq_kernel, _attn_bwd_dq_tuned, lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), nb * H),
               (q, k, v, do, lse, delta, dq, seed_arg, *cu_args, *strides, *_bhmd(dq, varlen), *common),
               dict(meta, EVEN_M=even_m, EVEN_N=even_n, LARGE=large), _INTERPRET_DQ)
    return [pre, dkdv, dq_call]


def _bwd(*call):
    for kernel, tuned, grid, args, meta, interpret in _bwd_calls(*call):
        launch(kernel, grid, args, meta, tuned=tuned, interpret=interpret)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------

def _attn_fwd_launch(q, k, v, seed, causal, softmax_scale, dropout_p, window_size=0, softcap=0.0):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    # (B, Tq, H, D) storage: merging heads afterwards ((B, H, T, D) -> (B, T, H*D)) is a free view.
    o = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if Tk == 0:  # nothing to attend to
        return o.zero_(), lse.fill_(float("inf"))
    _fwd(q, k, v, o, lse, seed, None, None, B, Tq, Tk, causal, softmax_scale, dropout_p, window_size, softcap)
    return o, lse


def _attn_bwd_launch(do, q, k, v, o, lse, seed, causal, softmax_scale, dropout_p, window_size=0, softcap=0.0):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _bwd(do, q, k, v, o, lse, seed, dq, dk, dv, None, None, B, Tq, Tk, causal, softmax_scale, dropout_p,
         window_size, softcap)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# Op registration and autograd
# ---------------------------------------------------------------------------------------------------

@kernel_op("gpt_kernels::flash_attention_bwd", launch=_attn_bwd_launch, fallback=ref.flash_attention_bwd_ref,
           dispatch_arg=1)
def _flash_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         o: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor | None, causal: bool,
                         softmax_scale: float, dropout_p: float, window_size: int = 0, softcap: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the dtypes and shapes of q, k, v (dK/dV summed over each K/V head's group)."""


def _setup_context(ctx, inputs, output):
    q, k, v, seed, causal, softmax_scale, dropout_p, *opts = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.softmax_scale, ctx.dropout_p = causal, softmax_scale, dropout_p
    ctx.opts = tuple(opts)  # (window_size, softcap) when given
    ctx.save_for_backward(q, k, v, o, lse, seed)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.gpt_kernels.flash_attention_bwd(
        do, q, k, v, o, lse, seed, ctx.causal, ctx.softmax_scale, ctx.dropout_p, *ctx.opts)
    return (dq, dk, dv, None, None, None, None) + (None,) * len(ctx.opts)


@kernel_op("gpt_kernels::flash_attention_fwd", launch=_attn_fwd_launch, fallback=ref.flash_attention_fwd_ref,
           backward=_backward, setup_context=_setup_context)
def _flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor | None,
                         causal: bool, softmax_scale: float, dropout_p: float, window_size: int = 0,
                         softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o (B, H, Tq, D) stored as (B, Tq, H, D); lse (B, H, Tq) fp32 log-sum-exp of the scaled
    scores in the log2 domain (log2 Σ_j exp2(s_j · log2 e), +inf for a query that sees no key).
    k/v (B, Hk, Tk, D) with H % Hk == 0 (GQA); window_size 0 = unlimited; softcap 0 = off."""


# Varlen (packed sequences): q (total_q, H, D), k/v (total_k, Hk, D), cu_seqlens int32 (n+1,).
def _varlen_fwd_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal,
                       softmax_scale, dropout_p, window_size=0, softcap=0.0):
    total_q, H, D = q.shape
    n = cu_seqlens_q.shape[0] - 1
    o = torch.zeros((total_q, H, D), dtype=q.dtype, device=q.device)  # rows outside every sequence: 0
    lse = torch.full((H, total_q), float("inf"), dtype=torch.float32, device=q.device)
    if o.numel() == 0 or n == 0 or max_seqlen_q == 0 or k.shape[0] == 0 or max_seqlen_k == 0:
        return o, lse
    _fwd(q, k, v, o, lse, seed, cu_seqlens_q, cu_seqlens_k, n, max_seqlen_q, max_seqlen_k, causal,
         softmax_scale, dropout_p, window_size, softcap)
    return o, lse


def _varlen_bwd_launch(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed,
                       causal, softmax_scale, dropout_p, window_size=0, softcap=0.0):
    n = cu_seqlens_q.shape[0] - 1
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # rows outside every sequence: 0
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0 or n == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return dq, dk, dv
    _bwd(do, q, k, v, o, lse, seed, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, n, max_seqlen_q, max_seqlen_k,
         causal, softmax_scale, dropout_p, window_size, softcap)
    return dq, dk, dv


def _varlen_fwd_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal,
                    softmax_scale, dropout_p, window_size=0, softcap=0.0):
    return ref.flash_attention_varlen_fwd_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, seed, causal, softmax_scale,
                                              dropout_p, window_size, softcap)


def _varlen_bwd_ref(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed,
                    causal, softmax_scale, dropout_p, window_size=0, softcap=0.0):
    return ref.flash_attention_varlen_bwd_ref(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, seed, causal,
                                              softmax_scale, dropout_p, window_size, softcap)


@kernel_op("gpt_kernels::flash_attention_varlen_bwd", launch=_varlen_bwd_launch, fallback=_varlen_bwd_ref,
           dispatch_arg=1)
def _flash_attention_varlen_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                o: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                seed: torch.Tensor | None, causal: bool, softmax_scale: float,
                                dropout_p: float, window_size: int, softcap: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the packed layouts of q, k, v."""


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, seed, causal, softmax_scale, dropout_p, window_size, softcap = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (max_q, max_k, causal, softmax_scale, dropout_p, window_size, softcap)
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k, seed)


def _varlen_backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, causal, softmax_scale, dropout_p, window_size, softcap = ctx.args
    dq, dk, dv = torch.ops.gpt_kernels.flash_attention_varlen_bwd(
        do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, seed, causal, softmax_scale, dropout_p, window_size,
        softcap)
    return (dq, dk, dv) + (None,) * 10


@kernel_op("gpt_kernels::flash_attention_varlen_fwd", launch=_varlen_fwd_launch, fallback=_varlen_fwd_ref,
           backward=_varlen_backward, setup_context=_varlen_setup_context)
def _flash_attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                seed: torch.Tensor | None, causal: bool, softmax_scale: float,
                                dropout_p: float, window_size: int, softcap: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o (total_q, H, D) in q's dtype; lse (H, total_q) fp32, log2 domain (+inf: no key)."""


# ---------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------

def check_head_dim(name: str, d: int) -> None:
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")


def _check_options(causal, softmax_scale, dropout_p, window_size, softcap):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if window_size is not None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be an int >= 1 or None, got {window_size!r}")
        if not causal:
            raise ValueError("window_size needs causal=True (the sliding window is causal: query i sees keys "
                             "p_i - W < j <= p_i)")
    if isinstance(softcap, bool) or not (isinstance(softcap, (int, float)) and math.isfinite(softcap)
                                         and softcap >= 0.0):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")


def _check_heads(H: int, Hk: int) -> None:
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"k/v heads must divide q's heads (GQA/MQA: H % Hk == 0), got H={H}, Hk={Hk}")


def _check_attention_args(q, k, v, causal, softmax_scale, dropout_p, deterministic, window_size=None,
                          softcap=0.0):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    B, H, _Tq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k and v must have batch {B} like q (B, H, T, D), got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hk, Tk, D), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if (H > 0 or k.shape[1] > 0) and (k.shape[1] == 0 or H % k.shape[1] != 0):
        raise ValueError(f"k and v must have batch and heads compatible with q: batch {B} and Hk dividing H "
                         f"(GQA/MQA: H % Hk == 0), got H={H}, Hk={k.shape[1]}")
    if k.shape[-1] != D:
        raise ValueError(f"q and k must have the same head_dim, got {D} and {k.shape[-1]}")
    check_head_dim("q", D)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    _check_options(causal, softmax_scale, dropout_p, window_size, softcap)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    softmax_scale: float | None = None, dropout_p: float = 0.0,
                    deterministic: bool = False, window_size: int | None = None,
                    softcap: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention without materializing the T×T matrix.

    q ``(B, H, Tq, D)``, k/v ``(B, Hk, Tk, D)`` with ``H % Hk == 0`` (GQA/MQA: query head h reads K/V
    head ``h // (H // Hk)``, no copy of K/V; their gradients come back in k/v's shape, summed over the
    group); returns ``(B, H, Tq, D)`` in q's dtype (stored as ``(B, Tq, H, D)``, so
    ``out.transpose(1, 2).reshape(B, Tq, H * D)`` is free). ``causal`` masks are bottom-right aligned
    (query i sees keys ``<= p_i = i + Tk - Tq``). ``window_size=W`` (causal only) restricts query i to
    the W keys ``p_i - W < j <= p_i``; the kernels skip key blocks outside it (O(T·W)). ``softcap=c``
    > 0 caps the scores to ``c · tanh(s / c)`` before masking and softmax (Gemma 2). ``softmax_scale``
    defaults to ``D ** -0.5``. ``dropout_p`` drops attention weights (seeded from torch's RNG, so
    ``torch.manual_seed`` reproduces a mask; the backward uses the same mask). Gradients are always
    deterministic (no atomics); ``deterministic`` is accepted for API compatibility.
    """
    _check_attention_args(q, k, v, causal, softmax_scale, dropout_p, deterministic, window_size, softcap)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    window, cap = int(window_size or 0), float(softcap)
    plain = k.shape[1] == q.shape[1] and window == 0 and cap == 0.0
    if plain and _eager_cpu.attention_applies(q, k, v, causal, scale, dropout_p):  # fp32 eager CPU: ATen's flash kernel
        return _eager_cpu.attention(q, k, v, causal, scale)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    if plain:  # the original op call (its schema's defaults cover the new options)
        o, _lse = torch.ops.gpt_kernels.flash_attention_fwd(q, k, v, seed, causal, scale, float(dropout_p))
    else:
        o, _lse = torch.ops.gpt_kernels.flash_attention_fwd(q, k, v, seed, causal, scale, float(dropout_p),
                                                            window, cap)
    return o


def _check_cu_seqlens(name: str, cu: torch.Tensor, device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 prefix sums (n+1,), got dtype {str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D (n+1,) prefix sums starting at 0, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}; all inputs must be on the same device")


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           causal: bool = True, softmax_scale: float | None = None, dropout_p: float = 0.0,
                           window_size: int | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Attention over packed variable-length sequences (FlashAttention's ``varlen`` layout).

    q ``(total_q, H, D)``, k/v ``(total_k, Hk, D)`` (``H % Hk == 0``), ``cu_seqlens_q``/``cu_seqlens_k``
    int32 ``(n+1,)`` prefix sums from 0 (sequence b's tokens are rows ``cu[b]:cu[b+1]``; empty sequences
    allowed), ``max_seqlen_q``/``max_seqlen_k`` Python ints bounding the lengths (they size the grid: no
    host sync reads the offsets). Sequence b's queries attend only its own keys; ``causal`` is
    bottom-right aligned within the sequence (query i sees keys ``<= i + len_k - len_q``); GQA,
    ``window_size`` and ``softcap`` as in :func:`flash_attention`. Returns ``(total_q, H, D)`` in q's
    dtype, differentiable. Contract (not checked, that would sync): ``cu[-1]`` equals ``total`` and every
    length is at most its ``max_seqlen``; rows of q outside every sequence get zeros.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be (n+1,), got {tuple(cu_seqlens_q.shape)} "
                         f"and {tuple(cu_seqlens_k.shape)}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{name} must be an int >= 0 (a Python int: no host sync), got {m!r}")
    _total, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (total_k, Hk, D), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if H > 0 or k.shape[1] > 0:
        _check_heads(H, k.shape[1])
    if k.shape[-1] != D:
        raise ValueError(f"q and k must have the same head_dim, got {D} and {k.shape[-1]}")
    check_head_dim("q", D)
    _check_options(causal, softmax_scale, dropout_p, window_size, softcap)
    scale = float(D ** -0.5 if softmax_scale is None else softmax_scale)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    o, _lse = torch.ops.gpt_kernels.flash_attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), seed, causal, scale,
        float(dropout_p), int(window_size or 0), float(softcap))
    return o
