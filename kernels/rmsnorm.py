"""RMSNorm and fused residual-add + RMSNorm, forward and backward, in Triton (the Llama family's norm).

``rms_norm(x, weight, eps, offset=0.0)`` is ``x / sqrt(mean(x², -1) + eps) · (offset + weight)`` over the
last dim with fp32 statistics (Gemma stores ``weight`` around 0 and uses ``offset=1``);
``add_rms_norm(x, residual, ...)`` returns ``(rms_norm(x + residual), x + residual)`` in one pass over
memory. Both are differentiable in every tensor input; dW is reduced deterministically (per-program
partial sums, no atomics).

File order: ``@triton.jit`` kernels -> launchers -> op registration / autograd -> functional API ->
``nn.Module``. Dispatch and registration are the shared plumbing of ``kernels/_utils.py`` (``kernel_op``, ``launch``,
``row_launch_config``), as in ``kernels/layernorm.py``; the fallback is ``kernels/reference.py``'s.
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

#: Widest normalized dim: a whole row lives in registers (one block per row).
MAX_WIDTH = 16384


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_fwd_kernel(
    X, RES, S, Y, W, RSTD,  # pointers; RES/S (residual in, sum out) only when HAS_RES
    stride_x, stride_res, stride_s, stride_y,  # row strides (elements); the last dim is unit-stride
    stride_w,  # element stride of W (any: a strided or an expanded stride-0 vector)
    M, N, eps, offset,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program normalizes BLOCK_M whole rows held in registers (BLOCK_N >= N).
    # s = x + residual (rounded to S's dtype, exactly what is stored and what an unfused add gives);
    # rstd = 1 / sqrt(sum(s^2) / N + eps);  y = s * rstd * (offset + w).  rstd is saved in fp32.
    rows, cols, row_mask, col_mask, mask, rows64 = _row_tile(tl.program_id(0) * BLOCK_M, M, N, BLOCK_M, BLOCK_N)
    x = _load_residual_sum(X, RES, S, rows64, stride_x, stride_res, stride_s, cols, mask, HAS_RES)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
        y = y * (offset + w[None, :])
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


# Backward math (per row). With xhat = x * rstd, wt = offset + w and y = xhat * wt, for the upstream
# gradient dy:
#   dxhat = dy * wt
#   dx    = rstd * (dxhat - xhat * c),   c = sum(xhat * dxhat) / N
#   dw    = sum over rows of dy * xhat
# For add_rms_norm, x is the sum s = x_in + residual, whose output s also receives a gradient ds,
# so d(x_in) = d(residual) = dx + ds.
# dw is deterministic: program p accumulates rows p, p + P, p + 2P, ... (P programs) in fp32 registers
# (a wide row: in its own partial row in memory) and writes one partial row to DW[p, :]; the launcher sums the P partials afterwards in a fixed order.
@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DS, DX, DW,  # DS only when HAS_DS; DW: (programs, N) fp32 partials
    stride_dy, stride_x, stride_ds, stride_dx, stride_w,
    M, N, offset,
    HAS_W: tl.constexpr, HAS_DS: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # A wide row (BLOCK_N > 8192: more than 16 elements per thread at the launcher's 16 warps) holds no
    # row-length vector across rows or across the row sum (w, dw_acc, x and dy all in registers spilled
    # 132-188 B at N=16384 on sm_90): w is reloaded per row, x and dy are read again after the row sum
    # (L1/L2 hits), and program p accumulates its partial row DW[p, :] in memory (its own row, read-
    # modify-write per row tile, in a fixed order: still deterministic; the row
    # sum's cross-warp barrier orders one tile's store before the next tile's load).
    WIDE: tl.constexpr = BLOCK_N > 8192
    if HAS_W and not WIDE:
        wt = offset + tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for row_start in range(pid * BLOCK_M, M, num_programs * BLOCK_M):
        rows, cols, row_mask, col_mask, mask, rows64 = _row_tile(row_start, M, N, BLOCK_M, BLOCK_N)
        x = _load_rows(X, rows64, stride_x, cols, mask)
        dy = _load_rows(DY, rows64, stride_dy, cols, mask)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        if HAS_W:
            if WIDE:
                wt = offset + tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
            dxhat = dy * wt[None, :]
        else:
            dxhat = dy
        if COMPUTE_DW and WIDE:  # before the row sum (dy dead across it); the first row tile adds to 0
            dw_ptrs = DW + pid * N + cols[None, :]  # (1, BLOCK_N), in dy's layout: no conversion
            later = tl.full((1, BLOCK_N), row_start, tl.int32) > pid * BLOCK_M
            dw_prev = tl.load(dw_ptrs, mask=col_mask[None, :] & later, other=0.0)
            tl.store(dw_ptrs, dw_prev + tl.sum(dy * xhat, axis=0, keep_dims=True), mask=col_mask[None, :])
        c = tl.sum(xhat * dxhat, axis=1) / N
        if WIDE:  # read x, dy (and w) again (L1/L2 hits) instead of holding them across the row sum
            xhat = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0,
                           eviction_policy="evict_first").to(tl.float32) * rstd[:, None]
            dxhat = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
            if HAS_W:
                dxhat = dxhat * (offset + tl.load(W + cols * stride_w, mask=col_mask, other=0.0,
                                                  eviction_policy="evict_last").to(tl.float32))[None, :]
        dx = (dxhat - xhat * c[:, None]) * rstd[:, None]
        _store_dx(DX, DS, dx, rows64, stride_dx, stride_ds, cols, mask, HAS_DS)
        if COMPUTE_DW and not WIDE:
            dw_acc += dy * xhat
    if COMPUTE_DW and not WIDE:
        _store_partial_row(DW, dw_acc, pid, N, cols, col_mask)


# ---------------------------------------------------------------------------------------------------
# Launchers: 2-D inputs (rows, N) whose last dim is unit-stride (any row stride)
# ---------------------------------------------------------------------------------------------------

# Launch settings. CUDA: about _TILE_* elements per program, ~16 per thread. The interpreter runs the
# programs one after another in Python, so it gets big tiles (few programs) instead.
_TILE_FWD = 4096
_TILE_BWD = 2048
_TILE_INTERPRET = 32768
_BWD_PROGRAMS_INTERPRET = 4


def _rms_norm_fwd_launch(x, residual, weight, eps, offset, sum_dtype):
    """Triton forward on 2-D tensors: ``(y, s, rstd)`` (``s`` is empty without a residual)."""
    return row_fwd_launch(_rms_norm_fwd_kernel, x, residual, sum_dtype, (weight,), 1, (eps, offset),
                          dict(HAS_W=weight is not None), tile=_TILE_FWD, interpret_tile=_TILE_INTERPRET)


def _rms_norm_bwd_launch(dy, x, weight, rstd, ds, offset, compute_dw):
    """Triton backward on 2-D tensors: ``(dx, dw)``, dw fp32 (empty when not asked for)."""
    compute_dw = compute_dw and weight is not None
    M, N = x.shape
    return row_bwd_launch(_rms_norm_bwd_kernel, x, (dy, x, weight, rstd, ds), (compute_dw,),
                          (dy.stride(0), x.stride(0), ds.stride(0) if ds is not None else 0, N,
                           weight.stride(0) if weight is not None else 0, M, N, offset),
                          dict(HAS_W=weight is not None, HAS_DS=ds is not None, COMPUTE_DW=compute_dw),
                          tile=_TILE_BWD, interpret_tile=_TILE_INTERPRET, interpret_programs=_BWD_PROGRAMS_INTERPRET)


def _check_number(name, value, *, minimum=None):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_rms_norm_args(x, weight, eps, offset, *, name="x"):
    n = check_rows(name, x, MAX_WIDTH)
    if weight is not None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
        if tuple(weight.shape) != (n,):
            raise ValueError(f"weight must have shape ({n},) to match the last dim of {name}, "
                             f"got {tuple(weight.shape)}")
    _check_number("eps", eps, minimum=0)
    _check_number("offset", offset)


# ---------------------------------------------------------------------------------------------------
# Op registration and autograd
# ---------------------------------------------------------------------------------------------------

@kernel_op("gpt_kernels::rms_norm_bwd", launch=_rms_norm_bwd_launch, fallback=ref.rms_norm_bwd_ref, dispatch_arg=1)
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                  ds: torch.Tensor | None, offset: float, compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) for 2-D tensors; ds (grad of the residual sum) is added to dx; dw in fp32."""


def _rms_norm_setup_context(ctx, inputs, output):
    x, residual, weight, _eps, offset, _sum_dtype = inputs
    _y, s, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.has_res = residual is not None
    ctx.offset = offset
    ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
    ctx.save_for_backward(s if ctx.has_res else x, weight, rstd)


def _rms_norm_backward(ctx, dy, ds, _drstd):
    normed_in, weight, rstd = ctx.saved_tensors
    need_x, need_res, need_w = ctx.needs_input_grad[:3]
    dy = as_rows(dy)
    ds = as_rows(ds) if ctx.has_res else None
    dx, dw = torch.ops.gpt_kernels.rms_norm_bwd(dy, normed_in, weight, rstd, ds, ctx.offset, need_w)
    dw = dw.to(weight.dtype) if weight is not None and need_w else None
    x_dtype, res_dtype = ctx.dtypes
    dres = dx.to(res_dtype) if ctx.has_res and need_res else None
    return dx.to(x_dtype) if need_x else None, dres, dw, None, None, None


@kernel_op("gpt_kernels::rms_norm_fwd", launch=_rms_norm_fwd_launch, fallback=ref.rms_norm_fwd_ref,
           backward=_rms_norm_backward, setup_context=_rms_norm_setup_context)
def _rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                  offset: float, sum_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, rstd) for 2-D x; with a residual, s = x + residual (dtype sum_dtype) is normalized."""


# ---------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
             offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x², -1) + eps) · (offset + weight)``.

    Any leading dims, width up to ``MAX_WIDTH``; statistics in fp32, one rounding to ``x``'s dtype at the
    end (``weight`` may be another float dtype, e.g. fp32 parameters with bf16 activations).
    ``offset=1.0`` is Gemma's ``(1 + weight)``; without ``weight`` the output is the normalized ``x``
    (``offset`` scales only a weight). Differentiable in ``x`` and ``weight``; ``weight`` may have any
    stride. float64 anywhere runs the PyTorch reference in float64; other dtypes raise ``TypeError``.
    """
    _check_rms_norm_args(x, weight, eps, offset)
    check_same_device(x=x, weight=weight)
    if any_float64(x, weight):
        return ref.rms_norm_ref(x, weight, eps, offset=offset)
    if _eager_cpu.applies(x, weight):  # fp32 eager CPU fallback: torch's native op, no dispatch cost
        return _eager_cpu.rms_norm(x, weight, float(eps), float(offset))
    y, _s, _rstd = torch.ops.gpt_kernels.rms_norm_fwd(as_rows(x), None, weight, float(eps), float(offset), x.dtype)
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                 eps: float = 1e-6, *, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual, weight, eps, offset=offset), x + residual)`` in one pass over memory.

    ``x`` and ``residual`` have the same shape; the sum (and the normalized output) take their promoted
    dtype, and the sum is rounded to it before normalizing, exactly like the unfused code. Differentiable
    in all inputs; the gradient of the returned sum flows into both ``x`` and ``residual``.
    """
    _check_rms_norm_args(x, weight, eps, offset)
    check_tensor("residual", residual, dtypes=FLOAT_DTYPES)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_same_device(x=x, residual=residual, weight=weight)
    if any_float64(x, residual, weight):
        return ref.add_rms_norm_ref(x, residual, weight, eps, offset=offset)
    if _eager_cpu.applies(x, residual, weight):  # fp32 eager CPU fallback (see kernels/_eager_cpu.py)
        s = x + residual
        return _eager_cpu.rms_norm(s, weight, float(eps), float(offset)), s
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    y, s, _rstd = torch.ops.gpt_kernels.rms_norm_fwd(
        as_rows(x), as_rows(residual), weight, float(eps), float(offset), sum_dtype)
    return y.view(x.shape), s.view(x.shape)


# ---------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------

class RMSNorm(nn.RMSNorm):
    """Drop-in ``torch.nn.RMSNorm`` on the Triton kernel: parameter ``weight``, the same state_dict.

    ``eps`` defaults to 1e-6 (the Llama family's); ``eps=None`` is torch's ``finfo(x.dtype).eps``.
    ``offset`` scales by ``offset + weight`` (Gemma: 1.0); the weight is initialized to ``1 - offset`` so a
    fresh module is the plain normalization either way. A multi-dim ``normalized_shape`` is flattened
    into one row.
    """

    def __init__(self, normalized_shape, eps: float | None = 1e-6, *, offset: float = 0.0,
                 elementwise_affine: bool = True, device=None, dtype=None) -> None:
        if eps is not None:
            _check_number("eps", eps, minimum=0)
        _check_number("offset", offset)
        self.offset = float(offset)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                         device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            with torch.no_grad():
                self.weight.fill_(1.0 - self.offset)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", offset={self.offset}" if self.offset else "")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        k = check_normalized_input(input, self.normalized_shape)
        eps = torch.finfo(input.dtype).eps if self.eps is None else self.eps
        if k == 1:
            return rms_norm(input, self.weight, eps, offset=self.offset)
        lead = input.shape[: input.dim() - k]
        w = self.weight.reshape(-1) if self.weight is not None else None
        return rms_norm(input.reshape(*lead, -1), w, eps, offset=self.offset).view(input.shape)
