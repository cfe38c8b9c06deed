"""GELU (tanh and erf): Triton kernels (interpreter on CPU) vs an fp64 oracle and torch.nn.GELU."""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels._utils as kernels_utils
from kernels import GELU, gelu
from kernels.reference import gelu_ref
from tests.utils import assert_verbose_allclose

# ``kernels.gelu`` the attribute is the function (re-exported by kernels/__init__); get the module itself.
gelu_mod = importlib.import_module("kernels.gelu")

SHAPES = [(3, 7, 1000), (1, 768), (37, 129), (1,)]
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 2e-3)]  # fp32: docs/design.md's 1e-5
APPROX = ["tanh", "none"]


def _run(x, approximate, atol, rtol):
    x = x.detach().clone().requires_grad_(True)
    y = gelu(x, approximate)
    assert y.shape == x.shape and y.dtype == x.dtype
    dy = torch.randn(x.shape).to(x.dtype)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    y64 = gelu_ref(x64, approximate)
    y64.backward(dy.double())
    assert x.grad.dtype == x.dtype
    assert_verbose_allclose(y, y64, atol=atol, rtol=rtol, name="y")
    assert_verbose_allclose(x.grad, x64.grad, atol=atol, rtol=rtol, name="dx")


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_fwd_bwd(shape, dtype, atol, rtol, approximate):
    torch.manual_seed(0)
    _run((3 * torch.randn(shape)).to(dtype), approximate, atol, rtol)


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_extreme_values(approximate):
    """Large |x| (tanh/exp saturation: no inf/nan) and values around 0."""
    x = torch.tensor([-1e4, -60.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 60.0, 1e4])
    _run(x, approximate, 1e-6, 1e-5)


def test_gelu_many_programs(monkeypatch):
    """GPU-like blocks in the interpreter: many programs and a masked tail."""
    monkeypatch.setattr(gelu_mod, "_BLOCK_INTERPRET", 128)
    torch.manual_seed(0)
    _run(torch.randn(5, 301), "tanh", 1e-6, 1e-5)


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_matches_torch(approximate):
    torch.manual_seed(0)
    x = 4 * torch.randn(1000)
    assert_verbose_allclose(gelu(x, approximate), torch.nn.functional.gelu(x, approximate=approximate),
                            atol=1e-6, rtol=1e-5)


def test_gelu_non_contiguous():
    torch.manual_seed(0)
    base = torch.randn(64, 48)
    _run(base.t(), "tanh", 1e-6, 1e-5)
    _run(base[:, ::3], "none", 1e-6, 1e-5)
    x = base.clone().requires_grad_(True)
    gelu(x.t()).sum().backward()  # expanded (stride-0) upstream gradient
    x64 = base.double().requires_grad_(True)
    gelu_ref(x64.t()).sum().backward()
    assert_verbose_allclose(x.grad, x64.grad, atol=1e-6, rtol=1e-5)


def test_gelu_empty():
    x = torch.randn(0, 5, requires_grad=True)
    y = gelu(x)
    y.sum().backward()
    assert y.shape == (0, 5) and x.grad.shape == (0, 5)


@pytest.mark.parametrize("case", [
    ("approximate", lambda: gelu(torch.randn(3), "sigmoid"), ValueError, "approximate must be 'tanh' or 'none'"),
    ("approximate none", lambda: gelu(torch.randn(3), None), ValueError, "approximate must be"),
    ("module", lambda: GELU(approximate="fast"), ValueError, "approximate must be"),
    ("not a tensor", lambda: gelu([1.0]), TypeError, "x must be a torch.Tensor"),
    ("int dtype", lambda: gelu(torch.ones(3, dtype=torch.int32)), TypeError, "x must have dtype"),
    ("fp8", lambda: gelu(torch.ones(3).to(torch.float8_e5m2)), TypeError, "x must have dtype"),
], ids=lambda c: c[0])
def test_bad_input(case):
    _name, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("approximate", APPROX)
def test_module_matches_torch_gelu(approximate):
    torch.manual_seed(0)
    ours, theirs = GELU(approximate=approximate), torch.nn.GELU(approximate=approximate)
    assert isinstance(ours, torch.nn.GELU) and ours.approximate == approximate
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert repr(ours) == repr(theirs)
    x = torch.randn(4, 33)
    assert_verbose_allclose(ours(x), theirs(x), atol=1e-6, rtol=1e-5)
    assert GELU().approximate == torch.nn.GELU().approximate == "none"


def _boom(*args, **kwargs):
    raise AssertionError("this path should not run")


def test_interpreter_runs_the_kernel(monkeypatch):
    if not kernels_utils.INTERPRETED:
        pytest.skip("kernels were not decorated under TRITON_INTERPRET=1")
    launched = []
    real_launch = gelu_mod.launch

    def spy(kernel, *args, **kwargs):  # every Triton launch of the module goes through _utils.launch
        launched.append(kernel)
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(gelu_mod, "launch", spy)
    x = torch.randn(10, requires_grad=True)
    gelu(x).sum().backward()
    assert gelu_mod._gelu_fwd_kernel in launched and gelu_mod._gelu_bwd_kernel in launched


def test_fallback_path(fallback_path, monkeypatch):
    monkeypatch.setattr(gelu_mod, "launch", _boom)  # no Triton kernel may launch
    torch.manual_seed(0)
    for approximate in APPROX:
        _run(torch.randn(3, 7, 100), approximate, 1e-6, 1e-5)
        _run(torch.randn(37, 129).half(), approximate, 1e-3, 2e-3)


@pytest.mark.parametrize("mode", ["interpreter", "fallback"])
def test_opcheck(mode, monkeypatch):
    if mode == "fallback":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(5, 17, requires_grad=True)
    for approximate in APPROX:
        torch.library.opcheck(torch.ops.gpt_kernels.gelu_fwd.default, (x, approximate))
        torch.library.opcheck(torch.ops.gpt_kernels.gelu_bwd.default, (torch.randn(5, 17), x.detach(), approximate))


def test_torch_compile_fullgraph_cpu():
    x = torch.randn(4, 32, requires_grad=True)
    out = torch.compile(lambda t: gelu(t).sum(), fullgraph=True, backend="aot_eager")(x)
    out.backward()
    x64 = x.detach().double().requires_grad_(True)
    gelu_ref(x64).sum().backward()
    assert_verbose_allclose(x.grad, x64.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.bfloat16, 1e-2, 1.6e-2), (torch.float16, 1e-3, 2e-3),
                                             (torch.float32, 1e-6, 1e-5)])
@pytest.mark.parametrize("shape", [(8, 1024, 3072), (37, 129), (16, 16384)])
def test_gpu_gelu(shape, dtype, atol, rtol, approximate):
    torch.manual_seed(0)
    _run((3 * torch.randn(shape, device="cuda")).to(dtype), approximate, atol, rtol)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    x = torch.randn(8, 256, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(lambda t: gelu(t).float().square().sum(), fullgraph=True)(x)
    out.backward()
    g = x.grad.clone()
    x.grad = None
    gelu(x).float().square().sum().backward()
    torch.testing.assert_close(g, x.grad)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    n = 2**31 + 4096
    try:
        x = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x[-4096:] = torch.linspace(-4, 4, 4096, device="cuda").bfloat16()
    y = gelu(x)
    assert_verbose_allclose(y[-4096:], gelu_ref(x[-4096:].double()), atol=1e-2, rtol=1.6e-2)
    assert not y[:4096].any()
