"""The one kernel plumbing: dispatch, launch, int64 offsets, device queries, constants, op registration.

Every kernel family (``kernels/*.py``) uses these instead of its own copy; the Triton device functions
they share (``_dot``, ``_load_tile``, ...) live in ``kernels/_blocks.py``.

Dispatch rule (docs/design.md): CUDA tensors run the Triton kernel; CPU tensors run the Triton kernel under
the interpreter when ``TRITON_INTERPRET=1`` (set before ``import triton``; that is how CI tests the
kernels), otherwise the pure-PyTorch fallback in ``kernels/reference.py``.

Interpreter mode, one source: ``@triton.jit`` decides once, when a kernel is decorated (at import of its
module), whether it is an interpreted function; that fact is ``INTERPRETED`` and nothing can change it
afterwards. Whether a call *uses* the interpreter is read per call by ``use_triton`` (``INTERPRETED``
and ``TRITON_INTERPRET`` still set now), so a test or a CLI that sets ``TRITON_INTERPRET=0`` for a while
gets the PyTorch fallback, and restoring it brings the kernels back (tests/conftest.py flips it between
tests; bench/cpu_train.py sets it inside ``main``). No kernel file keeps its own copy of either.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
from torch.library import triton_op, wrap_triton

try:  # triton is a Linux dependency; elsewhere every op runs its PyTorch fallback.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    class triton:  # noqa: N801 - stand-in so kernel files can still define their @triton.jit functions
        jit = staticmethod(lambda fn: fn)

    tl = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Also accepted by the elementwise/normalization ops, which run float64 on the PyTorch reference.
FLOAT_DTYPES = (*SUPPORTED_DTYPES, torch.float64)

#: log2(e) and ln(2): softmax statistics are kept in the log2 domain (``exp(x) = exp2(x * LOG2E)``,
#: ``ln(x) = log2(x) * LN2``), as in the Triton tutorial. Host floats; device code uses the
#: ``tl.constexpr`` twins of the same names in ``kernels/_blocks.py``.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: The largest int32: an element offset at or past it needs int64 arithmetic in a kernel.
INT32_MAX = 2**31 - 1


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` is set now (read at call time; tests flip it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: Whether the ``@triton.jit`` kernels were created as interpreter functions (``TRITON_INTERPRET`` at
#: import of ``kernels``; triton reads it when it decorates, so this cannot change later).
INTERPRETED = HAS_TRITON and interpret_mode()


def use_triton(t: torch.Tensor) -> bool:
    """The one dispatch predicate: whether an op on ``t`` runs its Triton kernel (else the fallback).

    CUDA: always (with triton installed). CPU: only under the interpreter, i.e. the kernels were
    decorated interpreted (``INTERPRETED``) and ``TRITON_INTERPRET`` is still set at this call.
    """
    if not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and INTERPRETED and interpret_mode()


def launch(kernel, grid, args, meta, *, tuned=None, interpret=None) -> None:
    """Launch the ``@triton.jit`` ``kernel`` on ``args`` with keyword ``meta`` (constexprs, num_warps...).

    Compiled (CUDA): ``wrap_triton(tuned or kernel)[grid](*args, **meta)`` — visible to
    ``torch.compile``; ``tuned`` is the ``triton.autotune`` wrapper (its config supplies the block
    sizes, so ``grid`` is then a callable of the meta-parameters). Interpreted: ``kernel`` itself,
    launched without ``wrap_triton`` (torch < 2.13 rejects an ``InterpretedFunction``; nothing is
    traced on that path), with ``interpret`` (fixed small blocks, ``num_warps``...) merged over
    ``meta`` and a callable ``grid`` evaluated on the result.
    """
    if INTERPRETED:
        meta = {**meta, **(interpret or {})}
        kernel[grid(meta) if callable(grid) else grid](*args, **meta)
    else:
        wrap_triton(tuned if tuned is not None else kernel)[grid](*args, **meta)


def needs_int64(*tensors: torch.Tensor | None, start_dim: int = 0, slack: int = 0) -> bool:
    """True when an element offset a kernel computes for these tensors may not fit in int32.

    One meaning: the largest offset from a tensor's base pointer reachable by indexing its dims
    ``start_dim..`` — ``Σ (size - 1) · |stride|`` over those dims — plus ``slack`` (the elements a
    masked tail tile computes past the end, e.g. ``BLOCK`` for a flat elementwise kernel) reaches
    ``INT32_MAX``. Dims before ``start_dim`` are the kernel's job to offset in int64 itself (e.g.
    attention's per-(batch, head) base pointers), so they do not count. ``None`` and empty tensors
    never need int64.
    """
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        span = sum((n - 1) * abs(s) for n, s in zip(t.shape[start_dim:], t.stride()[start_dim:]))
        if span + slack >= INT32_MAX:
            return True
    return False


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (its current device when it has no index); cached."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def as_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """View ``t`` as ``(rows, N)`` with a unit-stride last dim (copying only when that is impossible):
    the layout of the row-wise kernels (LayerNorm, RMSNorm, the gated activations)."""
    if t is None:
        return None
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def any_float64(*tensors: torch.Tensor | None) -> bool:
    """float64 anywhere: the op runs its differentiable PyTorch reference (the kernels compute in fp32)."""
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def row_launch_config(M: int, N: int, device: torch.device, tile: int, interpret_tile: int
                      ) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` for a kernel that holds whole rows of width ``N`` in registers.

    CUDA: about ``tile`` elements per program (~16 per thread), warps scaled with it. The interpreter
    runs programs one after another in Python, so it gets big tiles (``interpret_tile``) instead."""
    BLOCK_N = next_power_of_2(N)
    if device.type != "cuda":
        return max(1, min(next_power_of_2(M), interpret_tile // BLOCK_N)), BLOCK_N, 1
    BLOCK_M = max(1, min(16, tile // BLOCK_N))
    num_warps = min(16, max(1, BLOCK_M * BLOCK_N // 512))
    return BLOCK_M, BLOCK_N, num_warps


def row_partials_grid(M: int, BLOCK_M: int, num_warps: int, device: torch.device, interpret_programs: int) -> int:
    """Programs of a row-wise backward that also reduces a weight gradient into per-program partial rows
    (deterministic, no atomics): about one wave on CUDA (~32 resident warps per SM), at least 1."""
    if device.type == "cuda":
        grid = min(triton.cdiv(M, BLOCK_M), sm_count(device) * max(1, 32 // num_warps))
    else:
        grid = min(triton.cdiv(M, BLOCK_M), interpret_programs)
    return max(grid, 1)


def row_fwd_launch(kernel, x, residual, sum_dtype, params, n_stats, scalars, meta, *, tile, interpret_tile):
    """Launch a row-wise forward (LayerNorm, RMSNorm) over 2-D ``x (M, N)``: ``(y, s, *stats)``.

    With ``residual`` the kernel normalizes ``s = x + residual`` (``sum_dtype``, also returned; ``y`` in
    ``sum_dtype``), else ``x`` (``y`` in x's dtype, ``s`` empty). ``stats``: ``n_stats`` fp32 ``(M,)``
    per-row statistics the backward reads. Kernel arguments: ``(x, residual, s, y, *params, *stats,
    x.stride(0), residual.stride(0), N, N, *param strides, M, N, *scalars)`` (a ``None`` param: stride 0);
    ``meta`` gets ``HAS_RES``, ``BLOCK_M``, ``BLOCK_N``, ``num_warps`` (``row_launch_config``)."""
    M, N = x.shape
    has_res = residual is not None
    s = torch.empty((M, N), dtype=sum_dtype, device=x.device) if has_res else x.new_empty(0)
    y = torch.empty((M, N), dtype=sum_dtype if has_res else x.dtype, device=x.device)
    stats = [torch.empty((M,), dtype=torch.float32, device=x.device) for _ in range(n_stats)]
    if M > 0:
        BLOCK_M, BLOCK_N, num_warps = row_launch_config(M, N, x.device, tile, interpret_tile)
        launch(kernel, (triton.cdiv(M, BLOCK_M),),
               (x, residual, s, y, *params, *stats, x.stride(0), residual.stride(0) if has_res else 0, N, N,
                *(p.stride(0) if p is not None else 0 for p in params), M, N, *scalars),
               dict(meta, HAS_RES=has_res, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps))
    return (y, s, *stats)


def row_bwd_launch(kernel, x, pointers, partials, scalars, meta, *, tile, interpret_tile, interpret_programs):
    """Launch a row-wise backward (LayerNorm, RMSNorm) over 2-D ``x (M, N)``: ``(dx, *sums)``.

    ``dx`` in x's dtype. Each ``True`` of ``partials`` is a weight gradient that the kernel reduces into
    one fp32 partial row per program (``(programs, N)``; program p takes rows p, p + P, ...; no atomics)
    and that is summed here in a fixed order: deterministic. A ``False`` is an empty fp32 ``(0,)``.
    Kernel arguments: ``(*pointers, dx, *partial buffers, *scalars)``; ``meta`` gets ``BLOCK_M``,
    ``BLOCK_N``, ``num_warps`` (``row_launch_config``; grid ``row_partials_grid``)."""
    M, N = x.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    BLOCK_M, BLOCK_N, num_warps = row_launch_config(M, N, x.device, tile, interpret_tile)
    grid = row_partials_grid(M, BLOCK_M, num_warps, x.device, interpret_programs)
    # Every program writes its partial row, so only an empty problem needs zeros.
    alloc = torch.zeros if M == 0 else torch.empty
    bufs = [alloc((grid, N) if p else (0,), dtype=torch.float32, device=x.device) for p in partials]
    if M > 0:
        launch(kernel, (grid,), (*pointers, dx, *bufs, *scalars),
               dict(meta, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps))
    return (dx, *(b.sum(dim=0) if p else b for p, b in zip(partials, bufs)))


def kernel_op(name: str, *, launch, fallback, dispatch_arg: int = 0, triton_if=None,
              backward=None, setup_context=None):
    """Register a ``torch.library.triton_op`` with its CPU kernel and autograd in one call (a decorator).

    The decorated function gives only the op's annotated signature (and docstring); its body is not
    run. ``launch(*args)`` runs the Triton kernels, ``fallback(*args)`` the PyTorch reference; both
    take the op's arguments and return its outputs. ``args[dispatch_arg]`` decides the dispatch;
    ``triton_if(t)`` (optional) may refuse it (e.g. float64, which the kernels do not compute).

    * the triton_op body (also its fake kernel, and what ``torch.compile`` decomposes into) launches
      for CUDA tensors (through ``wrap_triton``: compiled graphs call the Triton kernels) and runs the
      fallback for any other device — fake-tensor tracing of CPU inputs needs it (the interpreter
      cannot run on fake tensors);
    * the ``"cpu"`` kernel is the eager CPU path: ``launch`` when ``use_triton`` (the interpreter),
      else the fallback;
    * ``register_autograd(backward, setup_context=setup_context)`` when ``backward`` is given (the
      backward itself calls a second ``kernel_op``, so compiled backward graphs run Triton too).

    Returns the op (``torch.ops.<namespace>.<name>`` is the same op).
    """
    def triton_for(t: torch.Tensor) -> bool:
        return triton_if is None or triton_if(t)

    def decorate(signature):
        def body(*args):
            t = args[dispatch_arg]
            if t.device.type == "cuda" and use_triton(t) and triton_for(t):
                return launch(*args)
            return fallback(*args)

        def cpu(*args):
            t = args[dispatch_arg]
            if use_triton(t) and triton_for(t):
                return launch(*args)
            return fallback(*args)

        functools.update_wrapper(body, signature)
        body.__signature__ = inspect.signature(signature, eval_str=True)  # real types for the schema
        op = triton_op(name, mutates_args=())(body)
        op.register_kernel("cpu")(cpu)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        return op

    return decorate


def check_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None,
                 dtypes=SUPPORTED_DTYPES) -> None:
    """Raise a clear TypeError/ValueError naming ``name`` when ``t`` is not an acceptable tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_rows(name: str, x, max_width: int) -> int:
    """Checks of a row-wise op's input (LayerNorm, RMSNorm): a float tensor with a non-empty last dim of
    at most ``max_width``; returns that width."""
    check_tensor(name, x, min_ndim=1, dtypes=FLOAT_DTYPES)
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{name} must have a non-empty last dim, got shape {tuple(x.shape)}")
    if n > max_width:
        raise ValueError(f"{name}: normalized (last) dim {n} is too large; at most {max_width} is supported")
    return n


def check_normalized_input(input, normalized_shape) -> int:
    """A norm module's input: a float tensor ending with ``normalized_shape``; returns its length."""
    k = len(normalized_shape)
    check_tensor("input", input, min_ndim=k, dtypes=FLOAT_DTYPES)
    if tuple(input.shape[input.dim() - k:]) != tuple(normalized_shape):
        raise ValueError(f"input must end with normalized_shape {normalized_shape}, "
                         f"got shape {tuple(input.shape)}")
    return k


def check_same_device(**tensors) -> None:
    """Raise ValueError when the given (non-None) tensors are not all on one device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all inputs must be on the same device")


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()
