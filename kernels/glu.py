"""Gated activations of the Llama family's MLP, forward and backward in Triton: SwiGLU and GeGLU.

``swiglu(gate, up) = silu(gate) · up`` (Llama, Mistral, Qwen) and ``geglu(gate, up, approximate="tanh") =
gelu(gate) · up`` (Gemma), elementwise with fp32 math; the backward recomputes the activation from
``gate`` instead of saving it. ``GatedMLP(gate_proj, up_proj, down_proj, activation)`` is the whole MLP,
``down_proj(act(gate_proj(x)) · up_proj(x))``, around the given Linear modules.

File order: ``@triton.jit`` kernels -> launchers -> op registration / autograd -> functional API ->
``nn.Module``. Dispatch and registration are the shared plumbing of ``kernels/_utils.py`` (``kernel_op``,
``launch``), as in ``kernels/layernorm.py``; the SiLU/GELU building block ``_sigmoid_parts`` is gelu's.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _eager_cpu
from . import reference as ref
from ._utils import (
    FLOAT_DTYPES,
    as_rows,
    check_same_device,
    check_tensor,
    kernel_op,
    launch,
    next_power_of_2,
    tl,
    triton,
)
from .gelu import _sigmoid_parts

#: The activations of ``GatedMLP`` (and the op): SiLU, tanh-approximated GELU, exact (erf) GELU.
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
_ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

# Activations a(g) and their derivatives a'(g), in fp32 (ACT: 0 silu, 1 gelu tanh, 2 gelu erf):
#   silu:      a = g · s,  s = sigmoid(g);            a' = s + g · s · (1 - s)
#   gelu tanh: a = g · s,  s = sigmoid(2u), u = k (g + 0.044715 g³), k = sqrt(2/pi)
#              a' = s + 2 k g · s (1 - s) · (1 + 3 · 0.044715 g²)
#   gelu erf:  a = g/2 · (1 + erf(g / sqrt 2));       a' = (1 + erf(g / sqrt 2)) / 2 + g · exp(-g²/2) / sqrt(2 pi)
@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    if ACT == 0:
        s, s_1ms = _sigmoid_parts(g)
        a = g * s
        da = s + g * s_1ms
    elif ACT == 1:
        s, s_1ms = _sigmoid_parts(1.5957691216057308 * (g + 0.044715 * g * g * g))  # 2u
        a = g * s
        da = s + 1.5957691216057308 * g * s_1ms * (1.0 + 0.134145 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    return a, da


# y = a(g) · u; one program owns a (BLOCK_M, BLOCK_N) tile of the (M, N) rows.
@triton.jit
def _glu_fwd_kernel(G, U, Y, stride_g, stride_u, M, N,
                    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # row * stride can exceed 2**31
    g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(Y + rows64 * N + cols[None, :], (a * u).to(Y.dtype.element_ty), mask=mask)


# Backward (a recomputed from g, nothing saved but the inputs):  dg = dy · u · a'(g),  du = dy · a(g)
@triton.jit
def _glu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, M, N,
                    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(DG + rows64 * N + cols[None, :], (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows64 * N + cols[None, :], (dy * a).to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers: 2-D inputs (rows, N) whose last dim is unit-stride (any row stride: a chunk of a fused
# gate/up projection needs no copy); outputs contiguous
# ---------------------------------------------------------------------------------------------------

# CUDA: a 4096-element tile (~16 per thread at 8 warps) of up to 1024 columns; the interpreter runs the
# programs one after another in Python, so it gets big tiles instead.
_TILE = 4096
_MAX_BLOCK_N = 1024
_NUM_WARPS = 8
_TILE_INTERPRET = 1 << 16


def _grid(M: int, N: int, device: torch.device):
    tile = _TILE if device.type == "cuda" else _TILE_INTERPRET
    BLOCK_N = min(next_power_of_2(N), _MAX_BLOCK_N if device.type == "cuda" else tile)
    BLOCK_M = max(1, min(next_power_of_2(M), tile // BLOCK_N))
    num_warps = _NUM_WARPS if device.type == "cuda" else 1
    return (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N)), BLOCK_M, BLOCK_N, num_warps


def _glu_fwd_launch(gate, up, activation):
    M, N = gate.shape
    y = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    if M == 0 or N == 0:
        return y
    grid, BLOCK_M, BLOCK_N, num_warps = _grid(M, N, gate.device)
    launch(_glu_fwd_kernel, grid, (gate, up, y, gate.stride(0), up.stride(0), M, N),
           dict(ACT=_ACT_ID[activation], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps))
    return y


def _glu_bwd_launch(dy, gate, up, activation):
    M, N = gate.shape
    dg = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    du = torch.empty((M, N), dtype=up.dtype, device=gate.device)
    if M == 0 or N == 0:
        return dg, du
    grid, BLOCK_M, BLOCK_N, num_warps = _grid(M, N, gate.device)
    launch(_glu_bwd_kernel, grid, (dy, gate, up, dg, du, dy.stride(0), gate.stride(0), up.stride(0), M, N),
           dict(ACT=_ACT_ID[activation], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps))
    return dg, du


def _check_glu_args(gate, up):
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, dtypes=FLOAT_DTYPES)
    if gate.shape != up.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"up must have the dtype of gate ({str(gate.dtype).replace('torch.', '')}), "
                        f"got {str(up.dtype).replace('torch.', '')}")
    check_same_device(gate=gate, up=up)


# ---------------------------------------------------------------------------------------------------
# Op registration and autograd
# ---------------------------------------------------------------------------------------------------

@kernel_op("gpt_kernels::glu_bwd", launch=_glu_bwd_launch, fallback=ref.gated_act_bwd_ref, dispatch_arg=1)
def _glu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) for 2-D tensors, the activation recomputed from gate."""


def _glu_setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(gate, up)


def _glu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = torch.ops.gpt_kernels.glu_bwd(as_rows(dy), gate, up, ctx.activation)
    return dg, du, None


@kernel_op("gpt_kernels::glu_fwd", launch=_glu_fwd_launch, fallback=ref.gated_act_fwd_ref,
           backward=_glu_backward, setup_context=_glu_setup_context)
def _glu_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) · up for 2-D gate/up (unit-stride rows), contiguous, gate's dtype."""


# ---------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------

def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) · up`` for ``activation`` in ``ACTIVATIONS``; ``swiglu`` and ``geglu`` call it."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check_glu_args(gate, up)
    if gate.dtype == torch.float64 or gate.numel() == 0:  # (empty: nothing to launch, any shape)
        return ref.gated_act_ref(gate, up, activation)
    if gate.dim() == 0:  # a scalar: one row of one element
        return gated_activation(gate[None], up[None], activation)[0]
    if _eager_cpu.applies(gate, up):  # fp32 eager CPU fallback: torch's native ops (kernels/_eager_cpu.py)
        return _eager_cpu.gated_activation(gate, up, activation)
    y = torch.ops.gpt_kernels.glu_fwd(as_rows(gate), as_rows(up), activation)
    return y.view(gate.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) · up`` (Llama's gated MLP activation), differentiable in both.

    ``gate`` and ``up`` have one shape and one dtype (fp32/fp16/bf16 with fp32 math; float64 runs the
    PyTorch reference); any strides (row-strided views such as the halves of a fused gate/up projection
    are read in place). The result is contiguous, in their dtype.
    """
    return gated_activation(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) · up`` (Gemma's gated MLP: ``"tanh"``; ``"none"`` is the erf form);
    otherwise as ``swiglu``."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return gated_activation(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")


# ---------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------

class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) · up_proj(x))`` with the fused gated activation.

    Holds the given modules themselves (no parameter copies), under the names transformers' Llama/
    Mistral/Qwen/Gemma MLPs use, so the state_dict keys are theirs: ``gate_proj.weight``,
    ``up_proj.weight``, ``down_proj.weight`` (+ biases). ``activation``: ``"silu"`` (SwiGLU),
    ``"gelu_tanh"`` (GeGLU, Gemma) or ``"gelu"`` (erf GeGLU).
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                 activation: str = "silu") -> None:
        super().__init__()
        for name, m in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), self.activation))
