"""GELU forward and backward in Triton: ``gelu(x, approximate="tanh")`` (GPT-2's form) or ``"none"`` (erf).

File order: ``@triton.jit`` kernels -> launchers -> op registration / autograd -> functional API ->
``nn.Module``. Dispatch and registration are ``kernel_op``/``launch`` of ``kernels/_utils.py``: a
``torch.library.triton_op`` (Triton through ``wrap_triton`` on CUDA, the PyTorch fallback on other devices
and when fake-tracing CPU inputs), a ``"cpu"`` kernel (the interpreter when ``TRITON_INTERPRET=1``, else
the fallback) and ``register_autograd`` with a triton_op backward.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _eager_cpu
from . import reference as ref
from ._utils import FLOAT_DTYPES, check_tensor, kernel_op, launch, needs_int64, tl, triton

APPROXIMATIONS = ("tanh", "none")


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _sigmoid_parts(z):
    # s = sigmoid(z) and s * (1 - s) from e = exp(-|z|) in (0, 1]: no overflow, and no cancellation
    # where 1 + tanh(u) would lose precision (0.5 * (1 + tanh(u)) = sigmoid(2u)).
    e = tl.exp(-tl.abs(z))
    d = 1.0 / (1.0 + e)
    return tl.where(z >= 0, d, e * d), e * d * d


@triton.jit
def _offsets(n, BLOCK: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:  # pid * BLOCK can exceed 2**31
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < n


# Forward, elementwise in fp32:
#   tanh: y = 0.5 * x * (1 + tanh(u)) = x * sigmoid(2u),  u = k * (x + 0.044715 * x^3),  k = sqrt(2 / pi)
#   none: y = 0.5 * x * (1 + erf(x / sqrt(2)))
@triton.jit
def _gelu_fwd_kernel(X, Y, n, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    offs, mask = _offsets(n, BLOCK, INT64)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if APPROX_TANH:
        s, _ = _sigmoid_parts(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2u
        y = x * s
    else:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# Backward, dx = dy * gelu'(x), recomputed from x (nothing but x is saved):
#   tanh: gelu'(x) = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * k * (1 + 3 * 0.044715 * x^2),  t = tanh(u)
#                  = s + 2 * x * s * (1 - s) * k * (1 + 0.134145 * x^2),              s = sigmoid(2u)
#   none: gelu'(x) = 0.5 * (1 + erf(x / sqrt(2))) + x * exp(-x^2 / 2) / sqrt(2 * pi)
@triton.jit
def _gelu_bwd_kernel(DY, X, DX, n, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    offs, mask = _offsets(n, BLOCK, INT64)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    if APPROX_TANH:
        s, s_1ms = _sigmoid_parts(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2u
        grad = s + 1.5957691216057308 * x * s_1ms * (1.0 + 0.134145 * x * x)
    else:
        grad = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    tl.store(DX + offs, (dy * grad).to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers: contiguous tensors, flattened
# ---------------------------------------------------------------------------------------------------

# Launch settings: BLOCK elements per program (~16 per thread on CUDA); the interpreter runs programs
# one after another in Python, so it gets one big block.
_BLOCK = 4096
_NUM_WARPS = 8
_BLOCK_INTERPRET = 1 << 16


def _grid_settings(t: torch.Tensor) -> tuple[int, int]:
    return (_BLOCK, _NUM_WARPS) if t.device.type == "cuda" else (_BLOCK_INTERPRET, 1)


def _launch_elementwise(kernel, inputs, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Launch a GELU kernel over the elements of contiguous ``x``: arguments ``(*inputs, out, n)``, with
    ``out`` a new tensor like ``x``; returns ``out``."""
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    BLOCK, num_warps = _grid_settings(x)
    launch(kernel, (triton.cdiv(n, BLOCK),), (*inputs, out, n),
           dict(APPROX_TANH=approximate == "tanh", BLOCK=BLOCK, INT64=needs_int64(x, slack=BLOCK),
                num_warps=num_warps))
    return out


def _gelu_fwd_launch(x: torch.Tensor, approximate: str) -> torch.Tensor:
    x = x.contiguous()
    return _launch_elementwise(_gelu_fwd_kernel, (x,), x, approximate)


def _gelu_bwd_launch(dy: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    x = x.contiguous()
    return _launch_elementwise(_gelu_bwd_kernel, (dy.contiguous(), x), x, approximate)


def _check_gelu_args(x, approximate):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")


# ---------------------------------------------------------------------------------------------------
# Op registration and autograd
# ---------------------------------------------------------------------------------------------------

@kernel_op("gpt_kernels::gelu_bwd", launch=_gelu_bwd_launch, fallback=ref.gelu_bwd_ref, dispatch_arg=1)
def _gelu_bwd(dy: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """dx = dy · gelu'(x), in x's dtype."""


def _gelu_setup_context(ctx, inputs, output):
    x, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(x)


def _gelu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.gpt_kernels.gelu_bwd(dy, x, ctx.approximate), None


@kernel_op("gpt_kernels::gelu_fwd", launch=_gelu_fwd_launch, fallback=ref.gelu_fwd_ref,
           backward=_gelu_backward, setup_context=_gelu_setup_context)
def _gelu_fwd(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(x) in x's dtype."""


# ---------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------

def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU of ``x`` (any shape, fp32/fp16/bf16, math in fp32, output in ``x.dtype``), differentiable.

    ``approximate="tanh"`` (default, GPT-2's form) or ``"none"`` (exact, erf), as ``torch.nn.GELU``.
    Any strides (the kernel reads a contiguous copy of a non-contiguous ``x``). float64 runs the
    PyTorch reference in float64 (as ``torch.nn.GELU`` accepts it); other dtypes raise ``TypeError``.
    """
    _check_gelu_args(x, approximate)
    if x.dtype == torch.float64:
        return ref.gelu_ref(x, approximate)
    if _eager_cpu.applies(x):  # fp32 eager CPU fallback: torch's native op (see kernels/_eager_cpu.py)
        return _eager_cpu.gelu(x, approximate)
    return torch.ops.gpt_kernels.gelu_fwd(x, approximate)


# ---------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------

class GELU(nn.GELU):
    """Drop-in ``torch.nn.GELU(approximate=...)`` on the Triton kernel (note the default here is
    ``torch.nn.GELU``'s ``"none"``; GPT-2 uses ``GELU(approximate="tanh")``)."""

    def __init__(self, approximate: str = "none") -> None:
        if approximate not in APPROXIMATIONS:
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        super().__init__(approximate=approximate)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_tensor("input", input, dtypes=FLOAT_DTYPES)
        return gelu(input, self.approximate)
