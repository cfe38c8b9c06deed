"""The shared kernel plumbing of kernels/_utils.py: one dispatch predicate, one int64 predicate, kernel_op."""

from __future__ import annotations

import pytest
import torch

import kernels._utils as U
from kernels._utils import INT32_MAX, kernel_op, launch, needs_int64, tl, triton


def _meta(shape, stride):
    return torch.empty_strided(shape, stride, device="meta")  # shapes and strides only, no memory


def test_needs_int64_is_the_largest_reachable_offset():
    assert not needs_int64(_meta((2, 2), (2**30, 1)))  # 2**30 + 1
    assert needs_int64(_meta((2, 2), (INT32_MAX, 1)))  # INT32_MAX + 1
    assert not needs_int64(_meta((3, 2), (INT32_MAX, 1)), start_dim=1)  # dim 0 is the kernel's own int64 base
    assert not needs_int64(_meta((2**31 - 16,), (1,)))  # last offset 2**31 - 17
    assert needs_int64(_meta((2**31 - 16,), (1,)), slack=16)  # a masked tail tile reaches past the end
    assert not needs_int64(_meta((0, 5), (INT32_MAX, 1)), None, _meta((2**31,), (0,)))  # empty; expanded


def test_use_triton_reads_the_environment_per_call(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not U.use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert U.use_triton(x) == U.INTERPRETED  # kernels decorated without the interpreter never run on CPU


def test_sm_count_needs_no_index():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert U.sm_count(torch.device("cuda")) == torch.cuda.get_device_properties(0).multi_processor_count


@triton.jit
def _twice_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, 2 * tl.load(X + offs, mask=offs < n), mask=offs < n)


calls = []


def _twice_launch(x):
    calls.append("kernel")
    y = torch.empty_like(x)
    launch(_twice_kernel, (triton.cdiv(x.numel(), 16),), (x, y, x.numel()), {"BLOCK": 16})
    return y


def _twice_fallback(x):
    calls.append("fallback")
    return 2 * x


def _backward(ctx, dy):
    return 2 * dy


@kernel_op("plumbing_test::twice", launch=_twice_launch, fallback=_twice_fallback,
           backward=_backward, setup_context=lambda ctx, inputs, output: None)
def _twice(x: torch.Tensor) -> torch.Tensor:
    """2 * x."""


@pytest.mark.parametrize("mode", ["interpreter", "fallback"])
def test_kernel_op_registers_dispatch_autograd_and_passes_opcheck(mode, monkeypatch):
    if mode == "fallback":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not (U.INTERPRETED and U.interpret_mode()):
        pytest.skip("kernels were not decorated under TRITON_INTERPRET=1")
    x = torch.arange(37.0, requires_grad=True)
    calls.clear()
    y = torch.ops.plumbing_test.twice(x)
    assert calls == ["kernel" if mode == "interpreter" else "fallback"]
    torch.testing.assert_close(y, 2 * x.detach())
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    if mode == "fallback":  # (the real ops run opcheck under the interpreter: tests/test_gelu.py, ...)
        torch.library.opcheck(torch.ops.plumbing_test.twice.default, (torch.randn(5, requires_grad=True),))
