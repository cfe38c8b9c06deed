"""The eager CPU fast path of the fallback: torch's own fused CPU kernels, called with autograd.

On CPU without the interpreter every op has the pure-PyTorch fallback of ``kernels/reference.py``,
registered as the op's ``"cpu"`` kernel. Going through the registered custom op costs about 80 µs of
dispatch per call (``triton_op`` + ``register_autograd`` in Python; measured on the 2-core CI machine,
against a 20 µs ``F.layer_norm`` at 128×128), and the attention fallback materializes the ``T×T``
matrix twice (forward, and again in the backward). For the common eager case — fp32 CPU tensors, no
autocast, not being traced by ``torch.compile`` — the functional API calls the native ops below
instead: the same math (fp32 statistics, the same causal convention), fewer passes over memory; and
``linear_cross_entropy`` with a scalar loss computes its gradient in the forward (three matmul passes
instead of the op's four, the same one-chunk bound on the logits held).

Anything else (fp16/bf16, dropout, ``Tq != Tk`` causal attention, autocast, compile tracing, the
interpreter) keeps using the registered ops, so ``torch.compile`` and ``opcheck`` still see them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import use_triton


def applies(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor is an fp32 CPU tensor on the eager fallback path."""
    x = tensors[0]
    if x.device.type != "cpu" or use_triton(x) or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def layer_norm(x, weight, bias, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


def gelu(x, approximate: str) -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def attention_applies(q, k, v, causal: bool, softmax_scale: float, dropout_p: float) -> bool:
    """Where ATen's CPU flash kernel computes what ours does. Measured on torch 2.13, it aligns causal
    masks top-left (equal to ours only when Tq == Tk), returns NaN for a scale <= 0, and silently
    ignores the stride of the last dim (``x[..., ::2]`` gives garbage): those cases stay on the
    registered op. So does every empty shape: with B, H or Tq = 0 the kernel divides by zero (SIGFPE
    kills the process, torch 2.13), and Tk = 0 must give zeros; the op's launchers and fallback handle
    those without a launch."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    return (dropout_p == 0.0 and softmax_scale > 0.0 and q.numel() > 0 and k.numel() > 0
            and (not causal or Tq == Tk)
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and applies(q, k, v))


class _CPUFlashAttention(torch.autograd.Function):
    """ATen's CPU flash-attention kernel (online softmax over key blocks, fp32 accumulation, the
    log-sum-exp saved for a backward that recomputes the probabilities) — the same algorithm as the
    Triton kernel, called directly (``scaled_dot_product_attention`` would pick the math backend for some shapes), its
    output stored as ``(B, Tq, H, D)`` like the op's."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=softmax_scale)  # o (B, H, Tq, D) in q's layout
        if not o.transpose(1, 2).is_contiguous():  # keep the op's (B, Tq, H, D) storage: free head merge
            o = o.transpose(1, 2).contiguous().transpose(1, 2)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, ctx.causal, scale=ctx.softmax_scale)
        return dq, dk, dv, None, None


def attention(q, k, v, causal: bool, softmax_scale: float) -> torch.Tensor:
    return _CPUFlashAttention.apply(q, k, v, causal, softmax_scale)


class _LinearCrossEntropyGradInForward(torch.autograd.Function):
    """Fused linear + cross-entropy for a scalar (``"mean"``/``"sum"``) loss on fp32 CPU tensors.

    The registered op recomputes each chunk's logits in the backward: four matmul passes over
    ``(N, V, d)`` against three for ``cross_entropy(linear(...))``, which on a CPU is simply slower
    (1.2-1.6× measured at N 128-2048, V 50,257). A scalar loss's gradient is known in the forward up to
    the incoming scalar, so this computes it there, chunk by chunk (Liger-Kernel's approach): three
    passes, and never more than ``LCE_CHUNK_ELEMENTS`` logits alive, as in the op's fallback.
    With ``z = x Wᵀ + b`` and ``p = softmax(z)``: ``dz = s · (p − onehot(target))`` on non-ignored
    rows (``s`` = 1/count for the mean, 1 for the sum), ``dx = dz W``, ``dW = dzᵀ x``, ``db = Σ dz``;
    the backward multiplies them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index: int, mean: bool, chunk_elements: int,
                grad_enabled: bool):
        N, V = x.shape[0], weight.shape[0]
        need_dx, need_dw, need_db = (grad_enabled and n for n in ctx.needs_input_grad[:3])  # not under no_grad
        valid = target != ignore_index  # (N,)
        count = valid.sum()
        scale = 1.0 / count.clamp(min=1).to(x.dtype) if mean else torch.ones((), dtype=x.dtype)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_dw else None
        db = torch.zeros_like(bias) if need_db else None
        total = torch.zeros((), dtype=x.dtype)
        step = max(1, chunk_elements // V)
        for r0 in range(0, N, step):
            r1 = min(N, r0 + step)
            z = torch.addmm(bias, x[r0:r1], weight.t()) if bias is not None else x[r0:r1] @ weight.t()
            t = target[r0:r1].clamp(0, V - 1)[:, None]  # (rows, 1); ignored rows are zeroed below
            ok = valid[r0:r1]
            target_logit = z.gather(1, t).squeeze(1)  # (rows,)
            m = z.amax(dim=1)  # (rows,); the rest in place: one chunk of logits is the whole footprint
            e = z.sub_(m[:, None]).exp_()  # exp(z - m)
            s = e.sum(dim=1)
            total += torch.where(ok, m + s.log() - target_logit, 0.0).sum()  # lse - z[target]
            if need_dx or need_dw or need_db:
                dz = e.div_(s[:, None])  # softmax
                dz.scatter_add_(1, t, torch.full_like(t, -1.0, dtype=dz.dtype))  # − onehot
                dz.mul_(torch.where(ok, scale, 0.0)[:, None])
                if need_dx:
                    torch.mm(dz, weight, out=dx[r0:r1])
                if need_dw:
                    dw.addmm_(dz.t(), x[r0:r1])
                if need_db:
                    db += dz.sum(dim=0)
        ctx.save_for_backward(dx, dw, db)
        return total * scale

    @staticmethod
    def backward(ctx, g):
        dx, dw, db = ctx.saved_tensors
        return (None if dx is None else dx * g, None if dw is None else dw * g,
                None if db is None else db * g, None, None, None, None, None)


def linear_cross_entropy_applies(x, weight, bias, reduction: str) -> bool:
    return reduction in ("mean", "sum") and applies(x, weight, bias)


def linear_cross_entropy(x, weight, target, bias, ignore_index: int, reduction: str,
                         chunk_elements: int) -> torch.Tensor:
    """``x`` (N, d), ``target`` (N,) already validated; returns the fp32 scalar loss."""
    return _LinearCrossEntropyGradInForward.apply(x, weight, bias, target, ignore_index,
                                                  reduction == "mean", chunk_elements, torch.is_grad_enabled())


def rms_norm(x, weight, eps: float, offset: float) -> torch.Tensor:
    w = weight if weight is None or offset == 0.0 else weight + offset
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def gated_activation(gate, up, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none") * up


def apply_rotary(x, cos, sin) -> torch.Tensor:
    c, s = (cos[:, None], sin[:, None]) if cos.dim() == 3 else (cos, sin)  # (B, T, D) -> (B, 1, T, D)
    h = x.shape[-1] // 2
    return x * c + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * s
