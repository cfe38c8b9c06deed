"""Adversarial inputs for the kernel tests: tensors that are views into larger NaN-filled buffers.

``guarded(src, layout)`` returns a differentiable view holding ``src``'s values (or, for the stride-0
layouts, ``src`` broadcast along one dim) whose buffer is NaN everywhere else: before the first element,
after the last and between elements. A kernel that reads one element outside the view (wrong stride,
missing mask, offset ignored) puts a NaN into its output or gradient. ``plain(src, layout)`` is the
same logical tensor without the buffer, for the fp64 reference; gradients flow back to ``src`` in both.

Layouts: ``contiguous`` (still inside a NaN buffer: an offset, NaN on both sides), ``strided`` (every
dim strided by 2), ``transposed`` (dims stored in reverse order), ``stride0`` (``src`` has size 1 in
dim ``dim0`` and is expanded to ``size0``; stride 0 there).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

LAYOUTS = ("contiguous", "strided", "transposed", "stride0")


def _poison(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point else 1_000_003


def _embed(src: torch.Tensor, step: int, reverse: bool) -> torch.Tensor:
    """A view with ``src``'s values at stride ``step`` (storage order reversed if asked) in a poisoned buffer."""
    d = src.dim()
    full = [step * n + 2 for n in src.shape]  # a guard element before and after in every dim
    order = list(reversed(range(d))) if reverse else list(range(d))
    buf = torch.full([full[i] for i in order], _poison(src.dtype), dtype=src.dtype, device=src.device)
    t = buf.permute(*[order.index(i) for i in range(d)])  # logical dims back in place; storage order kept
    inner = tuple(slice(1, 1 + step * n, step) for n in src.shape)
    t[inner] = src  # (autograd: CopySlices, so gradients reach src)
    return t[inner]


def guarded(src: torch.Tensor, layout: str, *, dim0: int = 0, size0: int | None = None) -> torch.Tensor:
    if src.dim() == 0:
        raise ValueError("guarded() needs at least one dim")
    if layout == "contiguous":
        return _embed(src, 1, False)
    if layout == "strided":
        return _embed(src, 2, False)
    if layout == "transposed":
        return _embed(src, 1, True) if src.dim() > 1 else _embed(src, 2, False)
    if layout == "stride0":
        return _expand(_embed(src, 2, False), dim0, size0)
    raise ValueError(f"unknown layout {layout!r}")


def plain(src: torch.Tensor, layout: str, *, dim0: int = 0, size0: int | None = None) -> torch.Tensor:
    return _expand(src, dim0, size0) if layout == "stride0" else src


def _expand(t: torch.Tensor, dim0: int, size0: int | None) -> torch.Tensor:
    if t.shape[dim0] != 1 or size0 is None:
        raise ValueError("stride0 needs a source of size 1 in dim0 and a size0")
    shape = list(t.shape)
    shape[dim0] = size0
    return t.expand(*shape)


def source_shape(shape, layout: str, dim0: int = 0) -> tuple[int, ...]:
    """Shape of the compact source for ``layout`` (size 1 in ``dim0`` for stride0)."""
    shape = list(shape)
    if layout == "stride0":
        shape[dim0] = 1
    return tuple(shape)


CUDA = torch.cuda.is_available()


def path_device(path: str) -> torch.device:
    """Where a test of ``path`` builds its tensors: on a CUDA machine the ``"interpreter"`` case means the
    compiled kernels (tests/conftest.py's ``kernel_path``), so CUDA; otherwise CPU."""
    return torch.device("cuda" if CUDA and path == "interpreter" else "cpu")


@contextmanager
def kernel_path_env(path: str):
    """Run ops on ``"interpreter"`` (TRITON_INTERPRET=1, kernels imported under it) or ``"fallback"``.
    On a CUDA machine ``"interpreter"`` leaves the environment alone: CUDA tensors run compiled."""
    if CUDA and path == "interpreter":
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if path == "interpreter" else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def assert_close_to_ref(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    """No NaN/inf where the reference is finite, and |a - e| <= tol * (1 + |e|) elementwise, with the
    tolerance scaled by the reference's magnitude (gradients can be large)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    bad_nan = ~torch.isfinite(a) & torch.isfinite(e)
    if bad_nan.any():
        i = tuple(bad_nan.nonzero()[0].tolist())
        raise AssertionError(f"{name}: {int(bad_nan.sum())} non-finite values where the reference is finite "
                             f"(first at {i}: {a[i].item()}): an out-of-bounds read or unmasked load")
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    diff = (a - e).abs()
    bad = diff > tol * (scale + e.abs())
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{name}: {int(bad.sum())}/{a.numel()} differ (tol {tol}, scale {scale:.3g}); "
                             f"max diff {diff.max().item():.3g}; first at {i}: {a[i].item():.6g} vs {e[i].item():.6g}")
