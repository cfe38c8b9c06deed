"""Fused causal flash attention, forward and backward, in Triton (FlashAttention-2 algorithm).

``flash_attention(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0, deterministic=False,
window_size=None, softcap=0.0)``: q ``(B, H, Tq, D)``, k/v ``(B, Hk, Tk, D)`` (``H % Hk == 0``), any strides (q, k, v may be transposed views of one fused
QKV projection: no copy), any lengths (masked tails; the fast path skips masks where the lengths divide
the block), head_dim 16..128 including 80 and 96 (padded to a power of two in registers), fp32 (IEEE
dot products, no TF32), fp16 and bf16 with fp32 accumulation and statistics.

* Causal masks are aligned bottom-right (flash-attention's convention): query i sees keys
  ``j <= i + Tk - Tq``, so a chunk of new queries at the end of a longer key sequence is causal among
  itself. A query that sees no key (only possible when Tq > Tk) outputs zeros, never NaN.
* The forward keeps only the fp32 log-sum-exp per query (no T×T matrix), in the log2 domain of its
  scores (``s · log2 e``, as the Triton tutorial: no conversion to natural log and back); the backward
  recomputes the probabilities ``exp2(s · log2 e - lse)`` block by block.
* Dropout on the attention weights uses an in-kernel counter-based RNG (Philox, ``tl.rand``) keyed on
  (seed + batch·head, query·Tk + key); the backward regenerates exactly the same mask from the seed.
* The backward is two passes that each own their output tile (dK/dV per key block, dQ per query block):
  no atomics, so gradients are bit-identical run to run whatever ``deterministic`` says.
* GQA/MQA: query head h reads K/V head ``h // (H // Hk)`` by pointer arithmetic (no repeated copy).
  The dK/dV pass runs one program per (key block, K/V head) that walks the query blocks of every query
  head of its group in turn, accumulating in registers: dK/dV in k/v's shape, deterministic, no atomics.
* Sliding window ``W`` (causal): each query block computes the key-block range its rows' windows
  cover, and each key block of the dK/dV pass the query-block range that sees it; blocks outside are
  never visited (O(T·W) work). Forward and dQ mask only the blocks cut by the window edge; the dK/dV
  pass masks every block it visits (one loop: fewer registers at D=128).
* Softcap ``c``: scores ``c · tanh(s / c)`` before masking/softmax; the backward recomputes tanh and
  multiplies dS by ``1 - tanh²``.
* ``flash_attention_varlen``: packed ``(total, H, D)`` sequences; the same kernels with ``VARLEN``:
  grid (max_seqlen blocks, sequences × heads), each program loads its sequence's offsets from the
  int32 ``cu_seqlens`` (no host sync) and exits when its block lies past the sequence's length.
* Element offsets of each (batch, head) slice are int64; row offsets inside a slice switch to int64
  (``LARGE``) when a slice spans more than 2**31 elements.

File order: ``@triton.jit`` kernels -> launchers -> op registration / autograd -> functional API
(the module: ``self_attention.py``). Registration, dispatch and launches are the shared plumbing of ``kernels/_utils.py``
(``kernel_op``, ``launch``): a ``triton_op`` in the ``gpt_kernels`` namespace (CUDA: ``wrap_triton``
launches, visible to ``torch.compile``), a ``"cpu"`` kernel that runs the same Triton code under the
interpreter when ``TRITON_INTERPRET=1`` and the PyTorch fallback of ``kernels/reference.py`` otherwise,
``register_autograd`` for the backward. Device building blocks come from ``kernels/_blocks.py``.

That order runs across files: the ``@triton.jit`` kernels are in ``kernels/attention_fwd.py`` (the
forward and the device functions the backward shares) and ``kernels/attention_bwd.py``; autotune
candidates, argument binding and the launchers in ``kernels/attention_launch.py``; op registration,
autograd and the functional API here.
"""

from __future__ import annotations

import math

import torch

from . import _eager_cpu
from . import reference as ref
from ._utils import check_same_device, check_tensor, kernel_op
from .attention_launch import _attn_bwd_launch, _attn_fwd_launch, _varlen_bwd_launch, _varlen_fwd_launch

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


# ---------------------------------------------------------------------------------------------------
# Op registration and autograd
# ---------------------------------------------------------------------------------------------------

@kernel_op("gpt_kernels::flash_attention_bwd", launch=_attn_bwd_launch, fallback=ref.flash_attention_bwd_ref,
           dispatch_arg=1)
def _flash_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         o: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor | None, causal: bool,
                         softmax_scale: float, dropout_p: float, window_size: int = 0, softcap: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the dtypes and shapes of q, k, v (dK/dV summed over each K/V head's group)."""


def _setup_context(ctx, inputs, output):
    q, k, v, seed, causal, softmax_scale, dropout_p, *opts = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.softmax_scale, ctx.dropout_p = causal, softmax_scale, dropout_p
    ctx.opts = tuple(opts)  # (window_size, softcap) when given
    ctx.save_for_backward(q, k, v, o, lse, seed)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.gpt_kernels.flash_attention_bwd(
        do, q, k, v, o, lse, seed, ctx.causal, ctx.softmax_scale, ctx.dropout_p, *ctx.opts)
    return (dq, dk, dv, None, None, None, None) + (None,) * len(ctx.opts)


@kernel_op("gpt_kernels::flash_attention_fwd", launch=_attn_fwd_launch, fallback=ref.flash_attention_fwd_ref,
           backward=_backward, setup_context=_setup_context)
def _flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor | None,
                         causal: bool, softmax_scale: float, dropout_p: float, window_size: int = 0,
                         softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o (B, H, Tq, D) stored as (B, Tq, H, D); lse (B, H, Tq) fp32 log-sum-exp of the scaled
    scores in the log2 domain (log2 Σ_j exp2(s_j · log2 e), +inf for a query that sees no key).
    k/v (B, Hk, Tk, D) with H % Hk == 0 (GQA); window_size 0 = unlimited; softcap 0 = off."""


def _varlen_fwd_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal,
                    softmax_scale, dropout_p, window_size=0, softcap=0.0):
    return ref.flash_attention_varlen_fwd_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, seed, causal, softmax_scale,
                                              dropout_p, window_size, softcap)


def _varlen_bwd_ref(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed,
                    causal, softmax_scale, dropout_p, window_size=0, softcap=0.0):
    return ref.flash_attention_varlen_bwd_ref(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, seed, causal,
                                              softmax_scale, dropout_p, window_size, softcap)


@kernel_op("gpt_kernels::flash_attention_varlen_bwd", launch=_varlen_bwd_launch, fallback=_varlen_bwd_ref,
           dispatch_arg=1)
def _flash_attention_varlen_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                o: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                seed: torch.Tensor | None, causal: bool, softmax_scale: float,
                                dropout_p: float, window_size: int, softcap: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the packed layouts of q, k, v."""


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, seed, causal, softmax_scale, dropout_p, window_size, softcap = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (max_q, max_k, causal, softmax_scale, dropout_p, window_size, softcap)
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k, seed)


def _varlen_backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, causal, softmax_scale, dropout_p, window_size, softcap = ctx.args
    dq, dk, dv = torch.ops.gpt_kernels.flash_attention_varlen_bwd(
        do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, seed, causal, softmax_scale, dropout_p, window_size,
        softcap)
    return (dq, dk, dv) + (None,) * 10


@kernel_op("gpt_kernels::flash_attention_varlen_fwd", launch=_varlen_fwd_launch, fallback=_varlen_fwd_ref,
           backward=_varlen_backward, setup_context=_varlen_setup_context)
def _flash_attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                seed: torch.Tensor | None, causal: bool, softmax_scale: float,
                                dropout_p: float, window_size: int, softcap: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o (total_q, H, D) in q's dtype; lse (H, total_q) fp32, log2 domain (+inf: no key)."""


# ---------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------

def check_head_dim(name: str, d: int) -> None:
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")


def _check_options(causal, softmax_scale, dropout_p, window_size, softcap):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if window_size is not None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be an int >= 1 or None, got {window_size!r}")
        if not causal:
            raise ValueError("window_size needs causal=True (the sliding window is causal: query i sees keys "
                             "p_i - W < j <= p_i)")
    if isinstance(softcap, bool) or not (isinstance(softcap, (int, float)) and math.isfinite(softcap)
                                         and softcap >= 0.0):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")


def _check_heads(H: int, Hk: int) -> None:
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"k/v heads must divide q's heads (GQA/MQA: H % Hk == 0), got H={H}, Hk={Hk}")


def _check_attention_args(q, k, v, causal, softmax_scale, dropout_p, deterministic, window_size=None,
                          softcap=0.0):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    B, H, _Tq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k and v must have batch {B} like q (B, H, T, D), got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hk, Tk, D), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if (H > 0 or k.shape[1] > 0) and (k.shape[1] == 0 or H % k.shape[1] != 0):
        raise ValueError(f"k and v must have batch and heads compatible with q: batch {B} and Hk dividing H "
                         f"(GQA/MQA: H % Hk == 0), got H={H}, Hk={k.shape[1]}")
    if k.shape[-1] != D:
        raise ValueError(f"q and k must have the same head_dim, got {D} and {k.shape[-1]}")
    check_head_dim("q", D)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    _check_options(causal, softmax_scale, dropout_p, window_size, softcap)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    softmax_scale: float | None = None, dropout_p: float = 0.0,
                    deterministic: bool = False, window_size: int | None = None,
                    softcap: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention without materializing the T×T matrix.

    q ``(B, H, Tq, D)``, k/v ``(B, Hk, Tk, D)`` with ``H % Hk == 0`` (GQA/MQA: query head h reads K/V
    head ``h // (H // Hk)``, no copy of K/V; their gradients come back in k/v's shape, summed over the
    group); returns ``(B, H, Tq, D)`` in q's dtype (stored as ``(B, Tq, H, D)``, so
    ``out.transpose(1, 2).reshape(B, Tq, H * D)`` is free). ``causal`` masks are bottom-right aligned
    (query i sees keys ``<= p_i = i + Tk - Tq``). ``window_size=W`` (causal only) restricts query i to
    the W keys ``p_i - W < j <= p_i``; the kernels skip key blocks outside it (O(T·W)). ``softcap=c``
    > 0 caps the scores to ``c · tanh(s / c)`` before masking and softmax (Gemma 2). ``softmax_scale``
    defaults to ``D ** -0.5``. ``dropout_p`` drops attention weights (seeded from torch's RNG, so
    ``torch.manual_seed`` reproduces a mask; the backward uses the same mask). Gradients are always
    deterministic (no atomics); ``deterministic`` is accepted for API compatibility.
    """
    _check_attention_args(q, k, v, causal, softmax_scale, dropout_p, deterministic, window_size, softcap)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    window, cap = int(window_size or 0), float(softcap)
    plain = k.shape[1] == q.shape[1] and window == 0 and cap == 0.0
    if plain and _eager_cpu.attention_applies(q, k, v, causal, scale, dropout_p):  # fp32 eager CPU: ATen's flash kernel
        return _eager_cpu.attention(q, k, v, causal, scale)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    if plain:  # the original op call (its schema's defaults cover the new options)
        o, _lse = torch.ops.gpt_kernels.flash_attention_fwd(q, k, v, seed, causal, scale, float(dropout_p))
    else:
        o, _lse = torch.ops.gpt_kernels.flash_attention_fwd(q, k, v, seed, causal, scale, float(dropout_p),
                                                            window, cap)
    return o


def _check_cu_seqlens(name: str, cu: torch.Tensor, device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 prefix sums (n+1,), got dtype {str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D (n+1,) prefix sums starting at 0, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}; all inputs must be on the same device")


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           causal: bool = True, softmax_scale: float | None = None, dropout_p: float = 0.0,
                           window_size: int | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Attention over packed variable-length sequences (FlashAttention's ``varlen`` layout).

    q ``(total_q, H, D)``, k/v ``(total_k, Hk, D)`` (``H % Hk == 0``), ``cu_seqlens_q``/``cu_seqlens_k``
    int32 ``(n+1,)`` prefix sums from 0 (sequence b's tokens are rows ``cu[b]:cu[b+1]``; empty sequences
    allowed), ``max_seqlen_q``/``max_seqlen_k`` Python ints bounding the lengths (they size the grid: no
    host sync reads the offsets). Sequence b's queries attend only its own keys; ``causal`` is
    bottom-right aligned within the sequence (query i sees keys ``<= i + len_k - len_q``); GQA,
    ``window_size`` and ``softcap`` as in :func:`flash_attention`. Returns ``(total_q, H, D)`` in q's
    dtype, differentiable. Contract (not checked, that would sync): ``cu[-1]`` equals ``total`` and every
    length is at most its ``max_seqlen``; rows of q outside every sequence get zeros.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be (n+1,), got {tuple(cu_seqlens_q.shape)} "
                         f"and {tuple(cu_seqlens_k.shape)}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{name} must be an int >= 0 (a Python int: no host sync), got {m!r}")
    _total, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (total_k, Hk, D), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if H > 0 or k.shape[1] > 0:
        _check_heads(H, k.shape[1])
    if k.shape[-1] != D:
        raise ValueError(f"q and k must have the same head_dim, got {D} and {k.shape[-1]}")
    check_head_dim("q", D)
    _check_options(causal, softmax_scale, dropout_p, window_size, softcap)
    scale = float(D ** -0.5 if softmax_scale is None else softmax_scale)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    o, _lse = torch.ops.gpt_kernels.flash_attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), seed, causal, scale,
        float(dropout_p), int(window_size or 0), float(softcap))
    return o
