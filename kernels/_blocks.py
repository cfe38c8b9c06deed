"""Triton building blocks shared by the kernel families: dot products, masked tile loads/stores, constants.

Device functions (``@triton.jit``) that more than one kernel file calls live here, once; the kernels
import them (attention, decode, cross-entropy). Host-side plumbing is in ``kernels/_utils.py``.
"""

from __future__ import annotations

from . import _utils
from ._utils import INTERPRETED, tl, triton

_constexpr = tl.constexpr if tl is not None else (lambda v: v)

#: ``log2(e)`` and ``ln(2)`` for device code (global constexprs; the host floats are ``_utils.LOG2E``/``LN2``).
LOG2E = _constexpr(_utils.LOG2E)
LN2 = _constexpr(_utils.LN2)

# The interpreter multiplies bf16 tiles in tl.dot wrongly (garbage, ~1e10 where 6.5 is right: numpy has
# no bf16), so under it bf16 dot operands are upcast to fp32 first: exact products, fp32 accumulation,
# as the tensor cores do. A global constexpr: compiled kernels (False) and their signatures are unchanged.
_UPCAST_BF16_DOT = _constexpr(INTERPRETED)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs multiply in full IEEE precision (no TF32); fp16/bf16 use the tensor cores.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    elif _UPCAST_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    # acc + a @ b with fp32 accumulation; the same precision rules as _dot.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif _UPCAST_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols,
               EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    # Load a (rows, cols) tile, masking only the dimensions that may run past the tensor.
    if EVEN_ROWS:
        if EVEN_COLS:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        if EVEN_COLS:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _store_tile(ptrs, val, rows, n_rows, cols, n_cols,
                EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    # Store a (rows, cols) tile, masking only the dimensions that may run past the tensor.
    if EVEN_ROWS:
        if EVEN_COLS:
            tl.store(ptrs, val)
        else:
            tl.store(ptrs, val, mask=cols[None, :] < n_cols)
    else:
        if EVEN_COLS:
            tl.store(ptrs, val, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, val, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _online_softmax_step(s, m_i, l_i):
    # One key block of an online softmax in the log2 domain (scores s already scaled by log2(e)):
    #   m_new = max(m, max_j s_j),  p_j = exp2(s_j - m_new),  alpha = exp2(m - m_new),  l = l·alpha + Σ_j p_j.
    # A row with no visible key so far (m_new = -inf) uses 0 as its max: p = alpha = 0, no NaN.
    # Returns (p, alpha, l_new, m_new); the caller rescales its accumulator by alpha.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1) in fp32: exact limits ±1 (exp2 overflows to inf -> 1, underflows
    # to 0 -> -1), absolute error ~1 ulp of 1 near 0. (tl has no tanh; libdevice's is not in the interpreter.)
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _scores(a, b, qk_scale, cap2, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    # Attention scores of a @ b in the log2 domain, and the tanh term the softcap backward needs:
    #   no softcap:  s = (a·b) · qk_scale            (qk_scale = scale · log2 e);  returns (s, s)
    #   softcap c:   t = tanh((a·b) · qk_scale),  s = cap2 · t   (qk_scale = scale / c, cap2 = c · log2 e)
    x = _dot(a, b, IEEE) * qk_scale
    if SOFTCAP:
        t = _tanh(x)
        return cap2 * t, t
    else:
        return x, x


@triton.jit
def _visible(rows, cols, n_cols, shift, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    # (rows, cols) bool: key `col` (< n_cols) is visible to query `row` at position p = row + shift —
    # causal: col <= p; sliding window of `window` keys: also col > p - window.
    vis = cols[None, :] < n_cols
    if CAUSAL:
        vis = vis & (cols[None, :] <= rows[:, None] + shift)
    if WINDOW:
        vis = vis & (cols[None, :] > rows[:, None] + (shift - window))
    return vis


# Row-wise kernels (LayerNorm, RMSNorm): whole rows of a row-major (M, N) tensor with unit-stride last dim,
# BLOCK_M rows per tile, row offsets in int64 (``rows64``: row * stride can exceed 2**31).

@triton.jit
def _row_tile(row_start, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # (rows, cols, row_mask, col_mask, mask, rows64) of the tile of rows [row_start, row_start + BLOCK_M).
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    return rows, cols, row_mask, col_mask, row_mask[:, None] & col_mask[None, :], rows.to(tl.int64)[:, None]


@triton.jit
def _load_rows(PTR, rows64, stride, cols, mask):
    # (BLOCK_M, BLOCK_N) tile in fp32; masked elements 0.
    return tl.load(PTR + rows64 * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_residual_sum(X, RES, S, rows64, stride_x, stride_res, stride_s, cols, mask, HAS_RES: tl.constexpr):
    # x, or s = x + residual rounded to S's dtype (stored to S: exactly what an unfused add gives), in fp32.
    x = _load_rows(X, rows64, stride_x, cols, mask)
    if HAS_RES:
        s = (x + _load_rows(RES, rows64, stride_res, cols, mask)).to(S.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _store_dx(DX, DS, dx, rows64, stride_dx, stride_ds, cols, mask, HAS_DS: tl.constexpr):
    # dx (+ ds, the gradient of a fused residual sum, which flows into both summands) in DX's dtype.
    if HAS_DS:
        dx += _load_rows(DS, rows64, stride_ds, cols, mask)
    tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _store_partial_row(P, acc, pid, N, cols, col_mask):
    # Program pid's partial row of a weight gradient, P[pid, :] = Σ over its rows of the (BLOCK_M,
    # BLOCK_N) accumulator; the launcher sums the partial rows in a fixed order (``row_bwd_launch``).
    tl.store(P + pid * N + cols, tl.sum(acc, axis=0), mask=col_mask)
