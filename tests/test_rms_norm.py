"""RMSNorm and fused residual-add + RMSNorm: Triton kernels (interpreter) and the PyTorch fallback vs fp64
``torch.nn.functional.rms_norm`` (an independent oracle: torch's op, not ours)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.rmsnorm as rms_mod
from kernels import RMSNorm, add_rms_norm, rms_norm
from tests.guard_utils import guarded, plain, source_shape
from tests.utils import assert_verbose_allclose

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
WIDTHS = [1, 7, 96, 1000, 4097]


def _oracle(x64, w64, eps, offset):
    """fp64 ``F.rms_norm`` with the scale ``offset + weight``."""
    w = None if w64 is None else offset + w64
    return F.rms_norm(x64, (x64.shape[-1],), w, eps)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(True)


def _close(a, e, dtype, name, scale=1.0):
    atol, rtol = TOL[dtype]
    assert_verbose_allclose(a, e, atol=atol * scale, rtol=rtol, name=name)


def _run(shape, dtype, device, *, offset=0.0, affine=True, eps=1e-6, wdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _leaf((1.5 * torch.randn(shape, generator=g) + 0.3).to(device, dtype))
    w = _leaf((0.5 * torch.randn(shape[-1], generator=g) + (0 if offset else 1)).to(device, wdtype or dtype)) \
        if affine else None
    y = rms_norm(x, w, eps, offset=offset)
    assert y.shape == x.shape and y.dtype == x.dtype
    dy = torch.randn(shape, generator=g).to(device, dtype)
    y.backward(dy)
    x64, w64 = _f64(x), _f64(w)
    y64 = _oracle(x64, w64, eps, offset)
    y64.backward(dy.double())
    _close(y, y64, dtype, "y")
    _close(x.grad, x64.grad, dtype, "dx")
    if affine:
        assert w.grad.dtype == w.dtype
        rows = max(1, x.numel() // shape[-1])
        _close(w.grad, w64.grad, w.dtype, "dw", scale=max(1.0, rows ** 0.5))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rms_norm_fwd_bwd(kernel_path, device, width, dtype):
    _run((2, 3, width), dtype, device)  # (B, T, C)
    _run((width,), dtype, device, offset=1.0, seed=1)  # (N,), Gemma's offset


@pytest.mark.parametrize("case", ["no_weight", "fp32_weight_fp16_x", "eps"])
def test_rms_norm_variants(kernel_path, device, case):
    if case == "no_weight":
        _run((5, 33), torch.float32, device, affine=False)
        _run((5, 33), torch.float16, device, affine=False, offset=1.0)  # offset ignored without a weight
    elif case == "fp32_weight_fp16_x":
        _run((6, 200), torch.float16, device, wdtype=torch.float32)
    else:
        _run((4, 50), torch.float32, device, eps=0.5)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed", "stride0"])
def test_rms_norm_guarded_views(kernel_path, device, layout):
    """x, weight and the upstream gradient as views inside NaN-filled buffers: a stray read is a NaN."""
    shape = (5, 6, 40)
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(source_shape(shape, layout, 1), generator=g).to(device).requires_grad_(True)
    ws = torch.randn(40, generator=g).to(device).requires_grad_(True)
    x = guarded(xs, layout, dim0=1, size0=6)
    w = guarded(ws, "strided")
    dy = guarded(torch.randn(shape, generator=g).to(device), "strided")
    y = rms_norm(x, w, offset=0.5)
    dx, dw = torch.autograd.grad(y, (xs, ws), dy)
    x64, w64 = xs.detach().double().requires_grad_(True), ws.detach().double().requires_grad_(True)
    y64 = _oracle(plain(x64, layout, dim0=1, size0=6), w64, 1e-6, 0.5)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    _close(y, y64, torch.float32, "y")
    _close(dx, dx64, torch.float32, "dx", scale=3)
    _close(dw, dw64, torch.float32, "dw", scale=6)


def test_rms_norm_gpu_launch_settings_in_interpreter(monkeypatch):
    """Small tiles and a 3-program backward: many programs, masked row tails, the strided row loop and
    the cross-program dw reduction, as on the GPU; dw bit-identical run to run."""
    monkeypatch.setattr(rms_mod, "_TILE_INTERPRET", 4 * 256)  # BLOCK_N 256 -> 4 rows per program
    monkeypatch.setattr(rms_mod, "_BWD_PROGRAMS_INTERPRET", 3)
    _run((37, 129), torch.float16, "cpu", offset=1.0)
    x = torch.randn(50, 130)
    dy = torch.randn(50, 130)
    grads = []
    for _ in range(2):
        w = torch.randn(130, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        rms_norm(x, w).backward(dy)
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])


def test_rms_norm_wide_rows_in_interpreter(monkeypatch):
    """Rows wider than 8192 (BLOCK_N 16384): the backward's wide path (w reloaded per row, x and dy read
    again after the row sum, dw accumulated in each program's partial row in memory) with the GPU's one
    row per program and 3 programs of 2-3 rows each; with and without a weight, with a residual (ds);
    dw bit-identical run to run."""
    monkeypatch.setattr(rms_mod, "_TILE_INTERPRET", 16384)  # BLOCK_N 16384 -> 1 row per program
    monkeypatch.setattr(rms_mod, "_BWD_PROGRAMS_INTERPRET", 3)
    _run((7, 8200), torch.float16, "cpu", offset=1.0)
    _run((4, 9000), torch.float32, "cpu", affine=False)
    g = torch.Generator().manual_seed(5)
    x, r = (_leaf(torch.randn(5, 8200, generator=g)) for _ in range(2))
    w = _leaf(torch.randn(8200, generator=g))
    y, s = add_rms_norm(x, r, w)
    dy, ds = torch.randn(5, 8200, generator=g), torch.randn(5, 8200, generator=g)
    torch.autograd.backward([y, s], [dy, ds])
    xr, rr, wr = _f64(x), _f64(r), _f64(w)
    torch.autograd.backward([_oracle(xr + rr, wr, 1e-6, 0.0), xr + rr], [dy.double(), ds.double()])
    _close(x.grad, xr.grad, torch.float32, "dx", scale=2)
    _close(r.grad, rr.grad, torch.float32, "dres", scale=2)
    _close(w.grad, wr.grad, torch.float32, "dw", scale=4)
    first = w.grad.clone()
    w.grad = None
    y, s = add_rms_norm(x, r, w)
    torch.autograd.backward([y, s], [dy, ds])
    assert torch.equal(w.grad, first)


@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.float16, torch.float32)], ids=["fp32", "fp16", "mixed"])
def test_add_rms_norm_fwd_bwd(kernel_path, device, x_dtype, res_dtype):
    shape = (3, 5, 96)
    g = torch.Generator().manual_seed(4)
    x = _leaf(torch.randn(shape, generator=g).to(device, x_dtype))
    r = _leaf((2 * torch.randn(shape, generator=g) + 1).to(device, res_dtype))
    w = _leaf(torch.randn(96, generator=g).to(device, x_dtype))
    y, s = add_rms_norm(x, r, w, 1e-5, offset=1.0)
    sum_dtype = torch.promote_types(x_dtype, res_dtype)
    assert y.dtype == s.dtype == sum_dtype and y.shape == s.shape == x.shape
    dy, ds = torch.randn(shape, generator=g).to(device, sum_dtype), torch.randn(shape, generator=g).to(device, sum_dtype)
    torch.autograd.backward([y, s], [dy, ds])
    x64, r64, w64 = _f64(x), _f64(r), _f64(w)
    s64 = x64 + r64
    _close(s, s64, sum_dtype, "s")
    # values: the oracle normalizes the sum rounded to its dtype, as stored; gradients: the unrounded sum
    _close(y, _oracle(s64.to(sum_dtype).double(), w64, 1e-5, 1.0), sum_dtype, "y")
    xr, rr, wr = _f64(x), _f64(r), _f64(w)
    torch.autograd.backward([_oracle(xr + rr, wr, 1e-5, 1.0), xr + rr], [dy.double(), ds.double()])
    _close(x.grad, xr.grad, x_dtype, "dx", scale=2)
    _close(r.grad, rr.grad, res_dtype if res_dtype == x_dtype else x_dtype, "dres", scale=2)
    _close(w.grad, wr.grad, x_dtype, "dw", scale=4)


def test_rms_norm_module_is_a_drop_in_for_torch(kernel_path, device):
    torch.manual_seed(0)
    theirs = torch.nn.RMSNorm((4, 24), eps=1e-5).to(device)
    with torch.no_grad():
        theirs.weight.normal_()
    ours = RMSNorm((4, 24), eps=1e-5).to(device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 24, device=device)
    _close(ours(x), theirs.double()(x.double()), torch.float32, "y")
    # defaults: Gemma's offset starts at weight 0 (scale 1); eps=None is torch's finfo eps
    gemma = RMSNorm(24, offset=1.0)
    assert torch.equal(gemma.weight, torch.zeros(24)) and "offset=1.0" in repr(gemma)
    plain_norm = RMSNorm(24, eps=None, elementwise_affine=False).to(device)
    assert plain_norm.weight is None
    x2 = torch.randn(5, 24, device=device)
    _close(plain_norm(x2), torch.nn.RMSNorm(24, elementwise_affine=False).double()(x2.double()),
           torch.float32, "no-affine")


def test_rms_norm_empty_and_float64(kernel_path, device):
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(16, device=device))
    y, s = add_rms_norm(x, x.detach(), w)
    assert y.shape == s.shape == x.shape
    x64 = torch.randn(3, 16, dtype=torch.float64, device=device)
    assert_verbose_allclose(rms_norm(x64, w.double()), _oracle(x64, w.double(), 1e-6, 0.0), atol=1e-12, rtol=1e-12)


def test_rms_norm_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape \\(8,\\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="non-empty last dim"):
        rms_norm(torch.randn(4, 0))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="offset must be a real number"):
        rms_norm(x, torch.ones(8), offset=float("nan"))
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(x.long())
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        add_rms_norm(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="too large"):
        rms_norm(torch.randn(1, rms_mod.MAX_WIDTH + 1))
    with pytest.raises(ValueError, match="input must end with normalized_shape"):
        RMSNorm(8)(torch.randn(4, 9))


@pytest.mark.parametrize("mode", ["interpreter", "fallback"])
def test_opcheck(mode, monkeypatch):
    if mode == "fallback":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(5, 17, requires_grad=True)
    w = torch.randn(17, requires_grad=True)
    r = torch.randn(5, 17, requires_grad=True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.gpt_kernels.rms_norm_fwd.default, (x, None, w, 1e-6, 1.0, torch.float32),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.gpt_kernels.rms_norm_fwd.default, (x, r, w, 1e-6, 0.0, torch.float32),
                          test_utils=utils)
    _y, _s, rstd = torch.ops.gpt_kernels.rms_norm_fwd(x, None, w, 1e-6, 0.0, torch.float32)
    torch.library.opcheck(torch.ops.gpt_kernels.rms_norm_bwd.default,
                          (torch.randn(5, 17), x.detach(), w.detach(), rstd, None, 0.0, True), test_utils=utils)


def test_torch_compile_fullgraph_cpu(kernel_path):
    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32).half()
    w = torch.randn(32, requires_grad=True)
    fn = torch.compile(lambda x, w: add_rms_norm(x.half(), r, w, offset=1.0)[0].float().square().sum(),
                       fullgraph=True, backend="aot_eager")
    fn(x, w).backward()
    x64, w64 = _f64(x), _f64(w)
    s64 = (x64.half().double() + r.double())
    _oracle(s64, w64, 1e-6, 1.0).square().sum().backward()
    assert_verbose_allclose(x.grad, x64.grad, atol=2e-2, rtol=2e-2, name="dx")
    assert_verbose_allclose(w.grad, w64.grad, atol=2e-2, rtol=2e-2, name="dw")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 512, 4096), (37, 129), (4, 8192), (16, 16384)])
def test_gpu_rms_norm(shape, dtype):
    _run(shape, dtype, "cuda", offset=1.0)
    _run(shape, dtype, "cuda")
