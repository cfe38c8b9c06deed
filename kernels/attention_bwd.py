"""Flash attention's backward Triton kernels: delta preprocess, dK/dV pass, dQ pass.

The math is in the comment above ``_dkdv_inner``; conventions as in ``kernels/attention.py``. Device
functions shared with the forward come from ``kernels/attention_fwd.py``; launch settings and argument
binding are in ``kernels/attention_launch.py``.
"""

from __future__ import annotations

from ._blocks import _dot, _load_tile, _scores, _store_tile, _visible
from ._utils import tl, triton
from .attention_fwd import _dropout_keep, _key_ranges, _seq_bounds


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
    # Causal varlen with dropout runs one masked loop too: with two, every wgmma dK/dV tile spilled at
    # D=128 (sm_90; the mask is exact on every row, so only the unmasked blocks' masking is extra work).
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
        if WINDOW or (CAUSAL and VARLEN and DROPOUT):  # one masked loop (see above)
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


