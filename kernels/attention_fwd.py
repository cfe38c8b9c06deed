"""Flash attention's forward Triton kernel and the device functions the backward shares with it.

The algorithm, masks, dropout, GQA/window/softcap/varlen conventions: see ``kernels/attention.py``. Here:
``_attn_fwd_kernel`` (online softmax over key blocks, log2-domain log-sum-exp) with its loop
``_fwd_inner``; ``_dropout_keep`` (Philox mask), ``_seq_bounds`` (dense or varlen sequence bounds) and
``_key_ranges`` (the key blocks a query tile visits), which ``kernels/attention_bwd.py`` also calls.
Launch settings and argument binding are in ``kernels/attention_launch.py``.
"""

from __future__ import annotations

from ._blocks import _dot, _load_tile, _online_softmax_step, _scores, _store_tile, _visible
from ._utils import tl, triton


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


