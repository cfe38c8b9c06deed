"""LayerNorm and fused residual-add + LayerNorm, forward and backward, in Triton.

``layer_norm(x, weight, bias, eps)`` normalizes over the last dim with fp32 statistics;
``add_layer_norm(x, residual, weight, bias, eps)`` returns ``(layer_norm(x + residual), x + residual)``
in one pass over memory (the GPT block's shortcut add fused with the next LayerNorm). Both are
differentiable in every tensor input; dW/dB are reduced deterministically (no atomics, no locks).

File order: ``@triton.jit`` kernels -> launchers -> op registration / autograd -> functional API ->
``nn.Module``.

Dispatch and registration (docs/design.md) are the shared plumbing of ``kernels/_utils.py``: each op is
a ``torch.library.triton_op`` in the ``gpt_kernels`` namespace registered by ``kernel_op`` (Triton through
``wrap_triton`` on CUDA, so ``torch.compile(fullgraph=True)`` sees the kernels; a ``"cpu"`` kernel that
runs them under the interpreter when ``TRITON_INTERPRET=1``, else the PyTorch fallback of
``kernels/reference.py``; ``register_autograd`` with a triton_op backward), launched by ``launch``.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from . import _eager_cpu
from . import reference as ref
from ._blocks import _load_residual_sum, _load_rows, _row_tile, _store_dx, _store_partial_row
from ._utils import (
    FLOAT_DTYPES,
    any_float64,
    as_rows,
    check_normalized_input,
    check_rows,
    check_same_device,
    check_tensor,
    kernel_op,
    row_bwd_launch,
    row_fwd_launch,
    tl,
    triton,
)

#: Widest normalized dim: a whole row lives in registers (one block per row, as Triton tutorial 05).
MAX_WIDTH = 16384


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _layer_norm_fwd_kernel(
    X, RES, S, Y, W, B, MEAN, RSTD,  # pointers; RES/S (residual in, sum out) only when HAS_RES
    stride_x, stride_res, stride_s, stride_y,  # row strides (elements); the last dim is unit-stride
    stride_w, stride_b,  # element strides of W and B (any: a strided or an expanded stride-0 vector)
    M, N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program normalizes BLOCK_M whole rows held in registers (BLOCK_N >= N).
    # s = x + residual (rounded to S's dtype, exactly what is stored and what an unfused add gives);
    # mean = sum(s) / N;  var = sum((s - mean)^2) / N;  rstd = 1 / sqrt(var + eps)
    # y = (s - mean) * rstd * w + b.  mean and rstd are saved in fp32 for the backward.
    rows, cols, row_mask, col_mask, mask, rows64 = _row_tile(tl.program_id(0) * BLOCK_M, M, N, BLOCK_M, BLOCK_N)
    x = _load_residual_sum(X, RES, S, rows64, stride_x, stride_res, stride_s, cols, mask, HAS_RES)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols * stride_b, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


# Backward math (per row; as in Triton tutorial 05). With xhat = (x - mean) * rstd and
# y = xhat * w + b, for the upstream gradient dy:
#   dxhat = dy * w
#   dx    = rstd * (dxhat - (xhat * c1 + c2)),   c1 = sum(xhat * dxhat) / N,   c2 = sum(dxhat) / N
#   dw    = sum over rows of dy * xhat,           db = sum over rows of dy
# For add_layer_norm, x is the sum s = x_in + residual, whose output s also receives a gradient ds,
# so d(x_in) = d(residual) = dx + ds.
# dw/db are deterministic: program p accumulates rows p, p + P, p + 2P, ... (P programs) in fp32
# registers and writes one partial row to DW/DB[p, :]; the launcher sums the P partials afterwards.
@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DS, DX, DW, DB,  # DS only when HAS_DS; DW/DB: (programs, N) fp32 partials
    stride_dy, stride_x, stride_ds, stride_dx, stride_w,
    M, N,
    HAS_W: tl.constexpr, HAS_DS: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # A wide row (BLOCK_N > 8192), as in kernels/rmsnorm.py: w reloaded per row, x and dy read again after
    # the row sums, dW/dB accumulated in the program's own partial rows in memory (holding w, dw_acc,
    # db_acc, x and dy in registers spilled 388 B at N=16384 on sm_90).
    WIDE: tl.constexpr = BLOCK_N > 8192
    if HAS_W and not WIDE:
        w = tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for row_start in range(pid * BLOCK_M, M, num_programs * BLOCK_M):
        rows, cols, row_mask, col_mask, mask, rows64 = _row_tile(row_start, M, N, BLOCK_M, BLOCK_N)
        x = _load_rows(X, rows64, stride_x, cols, mask)
        dy = _load_rows(DY, rows64, stride_dy, cols, mask)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        if WIDE:  # (no mask on xhat: dy, hence dxhat, dx and dy * xhat are 0 past N; dx is stored masked)
            xhat = (x - mean[:, None]) * rstd[:, None]
        else:
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            if WIDE:
                w = tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
            dxhat = dy * w[None, :]
        else:
            dxhat = dy
        c1 = tl.sum(xhat * dxhat, axis=1) / N
        c2 = tl.sum(dxhat, axis=1) / N
        if WIDE:  # read x, dy (and w) again (L1/L2 hits) instead of holding them across the row sums
            xhat = (tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0,
                            eviction_policy="evict_first").to(tl.float32) - mean[:, None]) * rstd[:, None]
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            if HAS_W:
                dxhat = dy * tl.load(W + cols * stride_w, mask=col_mask, other=0.0,
                                     eviction_policy="evict_last").to(tl.float32)[None, :]
            else:
                dxhat = dy
        dx = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        _store_dx(DX, DS, dx, rows64, stride_dx, stride_ds, cols, mask, HAS_DS)
        if WIDE and (COMPUTE_DW or COMPUTE_DB):  # the first row tile adds to 0
            later = col_mask[None, :] & (tl.full((1, BLOCK_N), row_start, tl.int32) > pid * BLOCK_M)
            if COMPUTE_DW:
                dw_ptrs = DW + pid * N + cols[None, :]
                dw_prev = tl.load(dw_ptrs, mask=later, other=0.0)
                tl.store(dw_ptrs, dw_prev + tl.sum(dy * xhat, axis=0, keep_dims=True), mask=col_mask[None, :])
            if COMPUTE_DB:
                db_ptrs = DB + pid * N + cols[None, :]
                db_prev = tl.load(db_ptrs, mask=later, other=0.0)
                tl.store(db_ptrs, db_prev + tl.sum(dy, axis=0, keep_dims=True), mask=col_mask[None, :])
        if COMPUTE_DW and not WIDE:
            dw_acc += dy * xhat
        if COMPUTE_DB and not WIDE:
            db_acc += dy
    if COMPUTE_DW and not WIDE:
        _store_partial_row(DW, dw_acc, pid, N, cols, col_mask)
    if COMPUTE_DB and not WIDE:
        _store_partial_row(DB, db_acc, pid, N, cols, col_mask)


# ---------------------------------------------------------------------------------------------------
# Launchers: 2-D inputs (rows, N) whose last dim is unit-stride (any row stride)
# ---------------------------------------------------------------------------------------------------

# Launch settings. CUDA: about _TILE_* elements per program, ~16 per thread. The interpreter runs the
# programs one after another in Python, so it gets big tiles (few programs) instead.
_TILE_FWD = 4096
_TILE_BWD = 2048
_TILE_INTERPRET = 32768
_BWD_PROGRAMS_INTERPRET = 4


def _fwd_tile(N: int) -> int:
    """The forward's CUDA tile for rows of width ``N``: ``_TILE_FWD``, except 2048 for BLOCK_N 1024
    (N 513..1024: GPT-2 small's 768, medium's 1024), i.e. 2 rows x 4 warps instead of 4 rows x 8 warps,
    still 16 elements per thread: with 4 x 8 ptxas (sm_90) spilled 8 B in fp16 without a residual
    (48 registers); 2 x 4 compiles to 39-44 registers and no spill in bf16/fp16/fp32, with and without
    a residual (tests/gpu_ready.py; bench/results/2026-12-01-sm90-compile-norms.md)."""
    return 2048 if 512 < N <= 1024 else _TILE_FWD


def _layer_norm_fwd_launch(x, residual, weight, bias, eps, sum_dtype):
    """Triton forward on 2-D tensors: ``(y, s, mean, rstd)`` (``s`` is empty without a residual)."""
    return row_fwd_launch(_layer_norm_fwd_kernel, x, residual, sum_dtype, (weight, bias), 2, (eps,),
                          dict(HAS_W=weight is not None, HAS_B=bias is not None),
                          tile=_fwd_tile(x.shape[1]), interpret_tile=_TILE_INTERPRET)


def _layer_norm_bwd_launch(dy, x, weight, mean, rstd, ds, compute_dw, compute_db):
    """Triton backward on 2-D tensors: ``(dx, dw, db)``, dw/db fp32 (empty when not asked for)."""
    compute_dw = compute_dw and weight is not None
    M, N = x.shape
    return row_bwd_launch(_layer_norm_bwd_kernel, x, (dy, x, weight, mean, rstd, ds), (compute_dw, compute_db),
                          (dy.stride(0), x.stride(0), ds.stride(0) if ds is not None else 0, N,
                           weight.stride(0) if weight is not None else 0, M, N),
                          dict(HAS_W=weight is not None, HAS_DS=ds is not None, COMPUTE_DW=compute_dw,
                               COMPUTE_DB=compute_db),
                          tile=_TILE_BWD, interpret_tile=_TILE_INTERPRET, interpret_programs=_BWD_PROGRAMS_INTERPRET)


def _check_layer_norm_args(x, weight, bias, eps, *, name="x"):
    n = check_rows(name, x, MAX_WIDTH)
    for pname, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(pname, p, dtypes=FLOAT_DTYPES)
        if tuple(p.shape) != (n,):
            raise ValueError(f"{pname} must have shape ({n},) to match the last dim of {name}, "
                             f"got {tuple(p.shape)}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


# ---------------------------------------------------------------------------------------------------
# Op registration and autograd
# ---------------------------------------------------------------------------------------------------

@kernel_op("gpt_kernels::layer_norm_bwd", launch=_layer_norm_bwd_launch, fallback=ref.layer_norm_bwd_ref,
           dispatch_arg=1)
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                    rstd: torch.Tensor, ds: torch.Tensor | None, compute_dw: bool, compute_db: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db) for 2-D tensors; ds (grad of the residual sum) is added to dx; dw/db in fp32."""


def _layer_norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, _sum_dtype = inputs
    _y, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.has_res = residual is not None
    ctx.has_bias = bias is not None
    ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None,
                  bias.dtype if bias is not None else None)
    ctx.save_for_backward(s if ctx.has_res else x, weight, mean, rstd)


def _layer_norm_backward(ctx, dy, ds, _dmean, _drstd):
    normed_in, weight, mean, rstd = ctx.saved_tensors
    need_x, need_res, need_w, need_b = ctx.needs_input_grad[:4]
    dy = as_rows(dy)
    ds = as_rows(ds) if ctx.has_res else None
    dx, dw, db = torch.ops.gpt_kernels.layer_norm_bwd(
        dy, normed_in, weight, mean, rstd, ds, need_w, need_b and ctx.has_bias)
    dw = dw.to(weight.dtype) if weight is not None and need_w else None
    x_dtype, res_dtype, bias_dtype = ctx.dtypes
    db = db.to(bias_dtype) if ctx.has_bias and need_b else None
    dres = dx.to(res_dtype) if ctx.has_res and need_res else None
    return dx.to(x_dtype) if need_x else None, dres, dw, db, None, None


@kernel_op("gpt_kernels::layer_norm_fwd", launch=_layer_norm_fwd_launch, fallback=ref.layer_norm_fwd_ref,
           backward=_layer_norm_backward, setup_context=_layer_norm_setup_context)
def _layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, sum_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, mean, rstd) for 2-D x; with a residual, s = x + residual (dtype sum_dtype) is normalized."""


# ---------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------

def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (any leading dims, width up to ``MAX_WIDTH``).

    Statistics in fp32; the output has ``x``'s dtype (``weight``/``bias`` may be another float dtype,
    e.g. fp32 parameters with bf16 activations). Differentiable in ``x``, ``weight`` and ``bias``.
    ``weight``/``bias`` may have any stride (a strided view, an expanded stride-0 vector). float64
    anywhere runs the PyTorch reference in float64 (as ``torch.nn.LayerNorm`` accepts it); other
    dtypes (integers, float8) raise ``TypeError``.
    """
    _check_layer_norm_args(x, weight, bias, eps)
    check_same_device(x=x, weight=weight, bias=bias)
    if any_float64(x, weight, bias):
        return ref.layer_norm_ref(x, weight, bias, eps)
    if _eager_cpu.applies(x, weight, bias):  # fp32 eager CPU fallback: torch's native op, no dispatch cost
        return _eager_cpu.layer_norm(x, weight, bias, float(eps))
    y, _s, _mean, _rstd = torch.ops.gpt_kernels.layer_norm_fwd(as_rows(x), None, weight, bias, float(eps), x.dtype)
    return y.view(x.shape)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(x + residual, weight, bias, eps), x + residual)`` in one pass over memory.

    ``x`` and ``residual`` have the same shape; the sum (and the normalized output) take their promoted
    dtype, and the sum is rounded to it before normalizing, exactly like the unfused code. Differentiable
    in all inputs; the gradient of the returned sum flows into both ``x`` and ``residual``.
    """
    _check_layer_norm_args(x, weight, bias, eps)
    check_tensor("residual", residual, dtypes=FLOAT_DTYPES)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    if any_float64(x, residual, weight, bias):
        return ref.add_layer_norm_ref(x, residual, weight, bias, eps)
    if _eager_cpu.applies(x, residual, weight, bias):  # fp32 eager CPU fallback (see kernels/_eager_cpu.py)
        return _eager_cpu.add_layer_norm(x, residual, weight, bias, float(eps))
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    y, s, _mean, _rstd = torch.ops.gpt_kernels.layer_norm_fwd(
        as_rows(x), as_rows(residual), weight, bias, float(eps), sum_dtype)
    return y.view(x.shape), s.view(x.shape)


# ---------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """Drop-in ``torch.nn.LayerNorm`` on the Triton kernel: same constructor, parameters, state_dict.

    A multi-dim ``normalized_shape`` is handled by flattening those trailing dims into one row.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        k = check_normalized_input(input, self.normalized_shape)
        if k == 1:
            return layer_norm(input, self.weight, self.bias, self.eps)
        lead = input.shape[: input.dim() - k]
        w = self.weight.reshape(-1) if self.weight is not None else None
        b = self.bias.reshape(-1) if self.bias is not None else None
        return layer_norm(input.reshape(*lead, -1), w, b, self.eps).view(input.shape)
