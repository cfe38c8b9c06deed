"""Pure-PyTorch version of every op: the test oracle and the CPU fallback (same semantics as the kernels)."""

from __future__ import annotations

import torch

from .reference_attention import (  # noqa: F401 - re-exported: ``ref.attention_ref`` etc.
    _stat_dtype,
    attention_ref,
    causal_mask,
    decode_attention_ref,
    expand_kv,
    flash_attention_bwd_ref,
    flash_attention_fwd_ref,
    flash_attention_varlen_bwd_ref,
    flash_attention_varlen_fwd_ref,
    reduce_kv_grad,
    varlen_ids,
    varlen_mask,
    window_mask,
)

# ---------------------------------------------------------------------------------------------------
# LayerNorm, residual-add + LayerNorm, GELU (kernels/layernorm.py, kernels/gelu.py)
#
# Public-semantics references (differentiable, the test oracle; pass fp64 tensors for an fp64 oracle):
# statistics in at least fp32, result in the input dtype. Below them the op-level fallbacks that the
# custom ops run on CPU without the interpreter (and trace under torch.compile / fake tensors): same
# outputs as the Triton launchers, including the fp32 mean/rstd the backward uses.
# ---------------------------------------------------------------------------------------------------

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


def _residual_sum_ref(x: torch.Tensor, residual: torch.Tensor | None, sum_dtype: torch.dtype | None):
    """``(s, src)`` of the fused norms' fallbacks: with a residual, ``s = x + residual`` rounded to
    ``sum_dtype`` is what gets normalized (``src = s``); without, ``s`` is empty and ``src = x``."""
    if residual is None:
        return x.new_empty(0), x
    s = (x.float() + residual.float()).to(sum_dtype)
    return s, s


def layer_norm_fwd_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float, sum_dtype: torch.dtype | None = None):
    """Fallback of the fused forward on a 2-D ``x``: ``(y, s, mean, rstd)``.

    ``s = (x + residual).to(sum_dtype)`` when ``residual`` is given (else an empty tensor), and the
    LayerNorm runs over ``s`` (else over ``x``). ``mean``/``rstd`` are fp32 of shape ``(rows,)``.
    """
    s, src = _residual_sum_ref(x, residual, sum_dtype)
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


# ---------------------------------------------------------------------------------------------------
# Fused linear + cross-entropy (kernels/cross_entropy.py)
#
# ``linear_cross_entropy_ref`` is the differentiable oracle (materializes the logits; pass fp64 tensors
# for an fp64 oracle). The op-level fallbacks below never hold more than ``LCE_CHUNK_ELEMENTS`` logits:
# the forward walks row chunks keeping only the log-sum-exp, the backward recomputes each chunk's
# logits. Math in fp32 (fp64 for fp64 inputs); same outputs as the Triton launchers.
# ---------------------------------------------------------------------------------------------------

#: Logits held at once by the CPU fallback (fp32: 16 MiB), whatever N and V.
LCE_CHUNK_ELEMENTS = 1 << 22


def linear_cross_entropy_ref(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                             reduction: str = "mean", label_smoothing: float = 0.0,
                             softcap: float = 0.0) -> torch.Tensor:
    """``cross_entropy(softcap(x @ weight.T + bias), target, label_smoothing=...)`` in at least fp32, with
    the kernels' conventions: ``"mean"`` over non-ignored targets is 0 (not NaN) when every target is
    ignored; ``softcap > 0`` caps the logits to ``softcap · tanh(z / softcap)`` first."""
    dt = _stat_dtype(x.dtype)
    logits = torch.nn.functional.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=ignore_index, reduction="none",
                                             label_smoothing=label_smoothing)
    if reduction == "none":
        return loss.view(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp(min=1).to(dt)


def _lce_chunks(N: int, V: int):
    step = max(1, LCE_CHUNK_ELEMENTS // V)
    return [(r0, min(N, r0 + step)) for r0 in range(0, N, step)]


def _lce_logits(x, w, b, r0, r1, dt, softcap: float = 0.0):
    """fp32 (or fp64) logits of rows [r0, r1): ``(r1 - r0, V)``, capped to ``softcap · tanh(z / softcap)``
    when ``softcap > 0``."""
    z = x[r0:r1].to(dt) @ w.t()
    z = z + b if b is not None else z
    return z.div_(softcap).tanh_().mul_(softcap) if softcap > 0 else z


def linear_cross_entropy_fwd_ref(x, weight, target, bias, ignore_index: int, label_smoothing: float = 0.0,
                                 softcap: float = 0.0):
    """Fallback of the fused forward on 2-D x: ``(loss, lse)`` per row, fp32 (fp64 for fp64 inputs);
    loss 0 on ignored rows and NaN for a target outside ``[0, V)``. Holds one chunk of logits at a time.
    With label smoothing ε (torch's semantics) ``loss = lse − (1 − ε)·z[target] − ε/V · Σ_v z_v``; the
    logits ``z`` are capped first when ``softcap > 0``."""
    N, V = x.shape[0], weight.shape[0]
    dt = _stat_dtype(x.dtype)
    w = weight.to(dt)  # no copy for fp32/fp64
    b = bias.to(dt) if bias is not None else None
    lse_parts, tlogit_parts, zsum_parts = [], [], []
    for r0, r1 in _lce_chunks(N, V):
        z = _lce_logits(x, w, b, r0, r1, dt, softcap)
        lse_parts.append(torch.logsumexp(z, dim=1))
        t = target[r0:r1].clamp(0, V - 1)
        tlogit_parts.append(z.gather(1, t[:, None]).squeeze(1))
        if label_smoothing > 0:
            zsum_parts.append(z.sum(dim=1))
    if N == 0:
        empty = x.new_empty((0,), dtype=dt)
        return empty, empty.clone()
    lse, tlogit = torch.cat(lse_parts), torch.cat(tlogit_parts)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    loss = lse - (1.0 - label_smoothing) * tlogit
    if label_smoothing > 0:
        loss = loss - (label_smoothing / V) * torch.cat(zsum_parts)
    loss = torch.where(in_range, loss, torch.full_like(lse, float("nan")))
    return torch.where(valid, loss, torch.zeros_like(lse)), lse


def linear_cross_entropy_bwd_ref(g, x, weight, target, bias, lse, ignore_index: int, need_dx: bool,
                                 need_dw: bool, need_db: bool, label_smoothing: float = 0.0, softcap: float = 0.0):
    """Fallback of the fused backward: ``(dx, dweight, dbias)`` (empty when not needed), recomputing one
    chunk of logits at a time: dz = g · (softmax(z) − (1 − ε)·onehot(target) − ε/V) · (1 − tanh²(z₀/c))
    (the last factor only with a softcap c, z₀ the uncapped logits), dx = dz W, dW = dzᵀ x, db = Σ dz."""
    N, d = x.shape
    V = weight.shape[0]
    dt = _stat_dtype(x.dtype)
    w = weight.to(dt)
    b = bias.to(dt) if bias is not None else None
    dx = torch.empty((N, d), dtype=x.dtype, device=x.device) if need_dx else x.new_empty(0)
    dw = torch.zeros((V, d), dtype=dt, device=x.device) if need_dw else x.new_empty(0)
    db = torch.zeros((V,), dtype=dt, device=x.device) if need_db else x.new_empty(0)
    gv = torch.where(target != ignore_index, g.to(dt), torch.zeros((), dtype=dt, device=x.device))
    in_range = ((target >= 0) & (target < V)).to(dt)
    for r0, r1 in _lce_chunks(N, V):
        z = _lce_logits(x, w, b, r0, r1, dt, softcap)
        cap_grad = 1.0 - (z / softcap).square() if softcap > 0 else None  # 1 - tanh², from the capped logits
        dz = z.sub_(lse[r0:r1, None].to(dt)).exp_()  # softmax, in place
        t = target[r0:r1].clamp(0, V - 1)
        dz.scatter_add_(1, t[:, None], -(1.0 - label_smoothing) * in_range[r0:r1, None])  # - (1 - ε) onehot
        if label_smoothing > 0:
            dz.sub_(label_smoothing / V)
        dz.mul_(gv[r0:r1, None])
        if cap_grad is not None:
            dz.mul_(cap_grad)
        if need_dx:
            dx[r0:r1] = (dz @ w).to(x.dtype)
        if need_dw:
            dw.addmm_(dz.t(), x[r0:r1].to(dt))
        if need_db:
            db += dz.sum(dim=0)
    return dx, dw.to(weight.dtype) if need_dw else dw, db.to(x.dtype) if need_db else db


# ---------------------------------------------------------------------------------------------------
# RMSNorm, residual-add + RMSNorm, SwiGLU / GeGLU, rotary embeddings
# (kernels/rmsnorm.py, kernels/glu.py, kernels/rotary.py)
# ---------------------------------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
                 offset: float = 0.0) -> torch.Tensor:
    """``x / sqrt(mean(x², -1) + eps) · (offset + weight)`` in at least fp32, output in ``x.dtype``;
    without a weight the normalized ``x`` (``offset`` scales only a weight)."""
    xf = x.to(_stat_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (offset + weight.to(y.dtype))
    return y.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                     eps: float = 1e-6, *, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``; the sum is rounded to its dtype before normalizing."""
    s = x + residual
    return rms_norm_ref(s, weight, eps, offset=offset), s


def rms_norm_fwd_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                     eps: float, offset: float, sum_dtype: torch.dtype):
    """Fallback of the fused forward on a 2-D ``x``: ``(y, s, rstd)``; ``s = (x + residual)`` in
    ``sum_dtype`` when a residual is given (else empty) and normalized instead of ``x``; rstd fp32 (rows,)."""
    s, src = _residual_sum_ref(x, residual, sum_dtype)
    xf = src.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)
    y = xf * rstd[:, None]
    if weight is not None:
        y = y * (offset + weight.float())
    return y.to(src.dtype), s, rstd


def rms_norm_bwd_ref(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                     ds: torch.Tensor | None, offset: float, compute_dw: bool):
    """Fallback of the backward on 2-D tensors: ``(dx, dw)``, dw fp32 (empty when not asked for).
    ``xhat = x·rstd``; ``dxhat = dy·(offset + w)``; ``dx = rstd·(dxhat − xhat·mean(xhat·dxhat))`` (+ ds);
    ``dw = Σ_rows dy·xhat``."""
    xhat = x.float() * rstd[:, None]
    dyf = dy.float()
    dxhat = dyf * (offset + weight.float()) if weight is not None else dyf
    dx = rstd[:, None] * (dxhat - xhat * (xhat * dxhat).mean(dim=-1, keepdim=True))
    if ds is not None:
        dx = dx + ds.float()
    dw = (dyf * xhat).sum(dim=0) if compute_dw and weight is not None else x.new_empty(0, dtype=torch.float32)
    return dx.to(x.dtype), dw


def _gate_act(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.nn.functional.silu(g)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(g, approximate="tanh")
    if activation == "gelu":
        return torch.nn.functional.gelu(g)
    raise ValueError(f"activation must be 'silu', 'gelu_tanh' or 'gelu', got {activation!r}")


def gated_act_ref(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) · up`` in at least fp32, output in gate's dtype (the oracle of ``swiglu``
    (``"silu"``) and ``geglu`` (``"gelu_tanh"``, ``"gelu"``))."""
    dt = _stat_dtype(gate.dtype)
    return (_gate_act(gate.to(dt), activation) * up.to(dt)).to(gate.dtype)


def gated_act_fwd_ref(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Fallback of the gated activation forward (fp32 math, output in gate's dtype)."""
    return (_gate_act(gate.float(), activation) * up.float()).to(gate.dtype)


def gated_act_bwd_ref(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str):
    """Fallback of the backward: ``(dgate, dup) = (dy·up·act'(gate), dy·act(gate))``, act recomputed."""
    g, dyf = gate.float(), dy.float()
    gu = dyf * up.float()
    if activation == "silu":
        dg = torch.ops.aten.silu_backward(gu, g)
    else:
        dg = torch.ops.aten.gelu_backward(gu, g, approximate="tanh" if activation == "gelu_tanh" else "none")
    return dg.to(gate.dtype), (dyf * _gate_act(g, activation)).to(up.dtype)


def rotate_half_ref(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x[..., D/2:], x[..., :D/2])`` (transformers' ``rotate_half``)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotary_cos_sin(cos: torch.Tensor) -> torch.Tensor:
    return cos[:, None] if cos.dim() == 3 else cos  # (B, T, D) -> (B, 1, T, D); (T, D) broadcasts


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` in at least fp32, output in ``x.dtype``; x ``(B, H, T, D)``, cos/sin
    ``(T, D)`` or ``(B, T, D)``."""
    dt = _stat_dtype(x.dtype)
    c, s = _rotary_cos_sin(cos).to(dt), _rotary_cos_sin(sin).to(dt)
    xf = x.to(dt)
    return (xf * c + rotate_half_ref(xf) * s).to(x.dtype)


def rotary_fwd_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Fallback of the rotary op (contiguous output in x's dtype). ``backward=True`` applies the
    transpose: ``dx1 = dy1·c1 + dy2·s2``, ``dx2 = dy2·c2 − dy1·s1`` (halves 1, 2 of the last dim)."""
    c, s = _rotary_cos_sin(cos).float(), _rotary_cos_sin(sin).float()
    xf = x.float()
    if not backward:
        y = xf * c + rotate_half_ref(xf) * s
    else:
        h = x.shape[-1] // 2
        xs = xf * s
        y = xf * c + torch.cat((xs[..., h:], -xs[..., :h]), dim=-1)
    return y.to(x.dtype).contiguous()
