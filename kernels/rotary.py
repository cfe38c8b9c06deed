"""Rotary position embeddings (RoPE) in transformers' layout, forward and backward in Triton.

``apply_rotary(x, cos, sin)`` returns ``x·cos + rotate_half(x)·sin`` with
``rotate_half(x) = cat(−x[..., D/2:], x[..., :D/2])``: x ``(B, H, T, D)`` with any strides (a
``(B, T, H, D)`` projection viewed as ``(B, H, T, D)`` is read in place), cos/sin ``(T, D)`` or
``(B, T, D)`` as transformers' rotary embedding classes return them (the two halves repeated, any
position ids). Differentiable in x; the backward is the transposed rotation of the upstream gradient.

File order: ``@triton.jit`` kernels -> launchers -> op registration / autograd -> functional API.
Dispatch and registration are the shared plumbing of ``kernels/_utils.py`` (``kernel_op``, ``launch``).
"""

from __future__ import annotations

import torch

from . import _eager_cpu
from . import reference as ref
from ._utils import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    kernel_op,
    launch,
    next_power_of_2,
    tl,
    triton,
)

# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

# With halves x1 = x[..., :D/2], x2 = x[..., D/2:] (and c1, c2, s1, s2 of cos/sin likewise; transformers
# repeats the halves, but nothing here assumes it):
#   forward:   y1 = x1·c1 − x2·s1,      y2 = x2·c2 + x1·s2
#   backward:  dx1 = dy1·c1 + dy2·s2,   dx2 = dy2·c2 − dy1·s1      (the transpose of the forward)
# One program owns one (b, h) and BLOCK_T positions, both halves; math in fp32.
@triton.jit
def _rotary_kernel(
    X, COS, SIN, Y,
    stride_xb, stride_xh, stride_xt, stride_xd,
    stride_cb, stride_ct, stride_cd,  # cos strides; stride_cb 0 for a (T, D) or batch-1 table
    stride_sb, stride_st, stride_sd,
    stride_yb, stride_yh, stride_yt, stride_yd,
    H, T, HALF,
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)  # offsets in int64: b * stride can exceed 2**31
    h = (pid_bh % H).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t < T)[:, None] & (d < HALF)[None, :]
    t64 = t.to(tl.int64)[:, None]
    x_ptr = X + b * stride_xb + h * stride_xh + t64 * stride_xt + d[None, :] * stride_xd
    c_ptr = COS + b * stride_cb + t64 * stride_ct + d[None, :] * stride_cd
    s_ptr = SIN + b * stride_sb + t64 * stride_st + d[None, :] * stride_sd
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c_ptr, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + HALF * stride_sd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_ptr = Y + b * stride_yb + h * stride_yh + t64 * stride_yt + d[None, :] * stride_yd
    tl.store(y_ptr, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF * stride_yd, y2.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------

# CUDA: about _TILE elements of each half per program (4 warps); the interpreter runs programs one after
# another in Python, so it gets all positions of a (b, h) at once.
_TILE = 2048
_NUM_WARPS = 4
_TILE_INTERPRET = 1 << 15


def _cos_strides(c: torch.Tensor) -> tuple[int, int, int]:
    if c.dim() == 2 or c.shape[0] == 1:
        return 0, c.stride(-2), c.stride(-1)
    return c.stride(0), c.stride(1), c.stride(2)


def _rotary_launch(x, cos, sin, backward: bool):
    B, H, T, D = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    half = D // 2
    BLOCK_D = next_power_of_2(half)
    tile = _TILE if x.device.type == "cuda" else _TILE_INTERPRET
    BLOCK_T = max(1, min(next_power_of_2(T), tile // BLOCK_D))
    launch(_rotary_kernel, (B * H, triton.cdiv(T, BLOCK_T)),
           (x, cos, sin, y, *x.stride(), *_cos_strides(cos), *_cos_strides(sin), *y.stride(), H, T, half),
           dict(BACKWARD=backward, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
                num_warps=_NUM_WARPS if x.device.type == "cuda" else 1))
    return y


def _check_rotary_args(x, cos, sin):
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("cos", cos, dtypes=FLOAT_DTYPES)
    check_tensor("sin", sin, dtypes=FLOAT_DTYPES)
    B, _H, T, D = x.shape
    if D % 2 or D == 0:
        raise ValueError(f"x must have an even, non-zero head dim D (rotate_half splits it in halves), "
                         f"got shape {tuple(x.shape)}")
    for name, c in (("cos", cos), ("sin", sin)):
        ok = (c.dim() == 2 and tuple(c.shape) == (T, D)) or (
            c.dim() == 3 and tuple(c.shape[1:]) == (T, D) and c.shape[0] in (1, B))
        if not ok:
            raise ValueError(f"{name} must have shape (T, D) = {(T, D)} or (B, T, D) = {(B, T, D)} "
                             f"(B may be 1) for x of shape {tuple(x.shape)}, got {tuple(c.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    check_same_device(x=x, cos=cos, sin=sin)


# ---------------------------------------------------------------------------------------------------
# Op registration and autograd
# ---------------------------------------------------------------------------------------------------

def _rotary_setup_context(ctx, inputs, output):
    _x, cos, sin, backward = inputs
    ctx.backward = backward
    ctx.save_for_backward(cos, sin)


def _rotary_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return torch.ops.gpt_kernels.rotary(dy, cos, sin, not ctx.backward), None, None, None


@kernel_op("gpt_kernels::rotary", launch=_rotary_launch, fallback=ref.rotary_fwd_ref,
           backward=_rotary_backward, setup_context=_rotary_setup_context)
def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """The rotation of 4-D x (or, with ``backward``, its transpose applied to a gradient)."""


# ---------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------

def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` (transformers' ``apply_rotary_pos_emb`` for one tensor).

    x ``(B, H, T, D)``, even D, any strides; cos/sin ``(T, D)`` or ``(B, T, D)`` (batch 1 broadcasts),
    any strides and float dtype; fp32 math, the result contiguous in x's dtype.
    Differentiable in x (cos/sin that require grad run the differentiable PyTorch reference).
    float64 runs the reference in float64; an odd D (or D = 0) raises ``ValueError``.
    """
    _check_rotary_args(x, cos, sin)
    if x.dtype == torch.float64 or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)):
        return ref.apply_rotary_ref(x, cos, sin)
    if _eager_cpu.applies(x, cos, sin):  # fp32 eager CPU fallback: torch's native ops (kernels/_eager_cpu.py)
        return _eager_cpu.apply_rotary(x, cos, sin)
    return torch.ops.gpt_kernels.rotary(x, cos, sin, False)
