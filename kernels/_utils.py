"""Launch settings, dispatch helpers and input validation shared by every kernel family.

Dispatch rule (docs/design.md): CUDA tensors run the Triton kernel; CPU tensors run the Triton kernel under
the interpreter when ``TRITON_INTERPRET=1`` (set before ``import triton``; that is how CI tests the
kernels), otherwise the pure-PyTorch fallback in ``kernels/reference.py``.
"""

from __future__ import annotations

import os

import torch

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


def interpret_mode() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` should run its Triton kernel (else the PyTorch fallback)."""
    if not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpret_mode()


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


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when any flat element offset could overflow int32 (use int64 offsets in the kernel)."""
    return any(t is not None and t.numel() >= 2**31 - 1 for t in tensors)


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()
