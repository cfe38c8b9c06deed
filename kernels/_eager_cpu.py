"""The eager CPU fast path of the fallback: torch's own fused CPU kernels, called with autograd.

On CPU without the interpreter every op has the pure-PyTorch fallback of ``kernels/reference.py``,
registered as the op's ``"cpu"`` kernel. Going through the registered custom op costs about 80 µs of
dispatch per call (``triton_op`` + ``register_autograd`` in Python; measured on the 2-core CI machine,
against a 20 µs ``F.layer_norm`` at 128×128), and the attention fallback materializes the ``T×T``
matrix twice (forward, and again in the backward). For the common eager case — fp32 CPU tensors, no
autocast, not being traced by ``torch.compile`` — the functional API calls the native ops below
instead: the same math (fp32 statistics, the same causal convention), fewer passes over memory.

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
    registered op."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    return (dropout_p == 0.0 and softmax_scale > 0.0 and Tk > 0 and (not causal or Tq == Tk)
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
