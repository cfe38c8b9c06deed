"""Pure-PyTorch version of every op: the test oracle and the CPU fallback (same semantics as the kernels)."""

from __future__ import annotations

import torch  # noqa: F401

# ---------------------------------------------------------------------------------------------------
# LayerNorm, residual-add + LayerNorm, GELU (kernels/layernorm.py, kernels/gelu.py)
#
# Public-semantics references (differentiable, the test oracle; pass fp64 tensors for an fp64 oracle):
# statistics in at least fp32, result in the input dtype. Below them the op-level fallbacks that the
# custom ops run on CPU without the interpreter (and trace under torch.compile / fake tensors): same
# outputs as the Triton launchers, including the fp32 mean/rstd the backward uses.
# ---------------------------------------------------------------------------------------------------

def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim: biased variance, stats in fp32 (or fp64), output in ``x.dtype``."""
    xf = x.to(_stat_dtype(x.dtype))
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(x + residual), x + residual)``; the sum is rounded to its dtype before normalizing."""
    s = x + residual
    return layer_norm_ref(s, weight, bias, eps), s


def gelu_ref(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU computed in fp32 (or fp64): ``"tanh"`` is GPT-2's approximation, ``"none"`` the exact erf form."""
    xf = x.to(_stat_dtype(x.dtype))
    if approximate == "tanh":
        k = (2.0 / torch.pi) ** 0.5
        y = 0.5 * xf * (1.0 + torch.tanh(k * (xf + 0.044715 * xf.pow(3))))
    elif approximate == "none":
        y = 0.5 * xf * (1.0 + torch.erf(xf * 0.5**0.5))
    else:
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return y.to(x.dtype)


def _opt_float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def layer_norm_fwd_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float, sum_dtype: torch.dtype | None = None):
    """Fallback of the fused forward on a 2-D ``x``: ``(y, s, mean, rstd)``.

    ``s = (x + residual).to(sum_dtype)`` when ``residual`` is given (else an empty tensor), and the
    LayerNorm runs over ``s`` (else over ``x``). ``mean``/``rstd`` are fp32 of shape ``(rows,)``.
    """
    if residual is not None:
        s = (x.float() + residual.float()).to(sum_dtype)
        src = s
    else:
        s = x.new_empty(0)
        src = x
    n = src.shape[-1]
    y, mean, rstd = torch.native_layer_norm(src.float(), [n], _opt_float(weight), _opt_float(bias), eps)
    return y.to(src.dtype), s, mean.reshape(-1).float(), rstd.reshape(-1).float()


def layer_norm_bwd_ref(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                       rstd: torch.Tensor, ds: torch.Tensor | None, compute_dw: bool, compute_db: bool):
    """Fallback of the backward on 2-D tensors: ``(dx, dw, db)``; ``ds`` (grad of the residual-sum
    output) is added to ``dx``; ``dw``/``db`` are fp32 (empty when not asked for)."""
    n = x.shape[-1]
    has_w = weight is not None
    dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
        dy.float(), x.float(), [n], mean.reshape(-1, 1), rstd.reshape(-1, 1), _opt_float(weight), None,
        [True, has_w and compute_dw, False])
    if ds is not None:
        dx = dx + ds.float()
    if not (has_w and compute_dw):
        dw = x.new_empty(0, dtype=torch.float32)
    db = dy.float().sum(dim=0) if compute_db else x.new_empty(0, dtype=torch.float32)
    return dx.to(x.dtype), dw, db


def gelu_fwd_ref(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Fallback of the GELU forward (fp32 math, output in ``x.dtype``)."""
    return torch.nn.functional.gelu(x.float(), approximate=approximate).to(x.dtype)


def gelu_bwd_ref(dy: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Fallback of the GELU backward: ``dy * gelu'(x)`` in fp32, output in ``x.dtype``."""
    return torch.ops.aten.gelu_backward(dy.float(), x.float(), approximate=approximate).to(x.dtype)
