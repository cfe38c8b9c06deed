"""LayerNorm and fused residual-add + LayerNorm: Triton kernels (interpreter on CPU) vs an fp64 oracle."""

from __future__ import annotations

import pytest
import torch

import kernels._utils as kernels_utils
import kernels.layernorm as ln_mod
from kernels import LayerNorm, add_layer_norm, layer_norm
from kernels._utils import interpret_mode
from kernels.reference import add_layer_norm_ref, layer_norm_ref
from tests.utils import assert_verbose_allclose

SHAPES = [(3, 7, 1000), (1, 768), (37, 129), (5, 1)]
# (dtype, atol, rtol) of outputs and gradients vs the fp64 oracle run on the same (rounded) inputs.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
AFFINE = ["weight_bias", "weight", "none"]


def _params(n, dtype, affine, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(device, dtype) if affine != "none" else None
    b = (0.5 * torch.randn(n, generator=g)).to(device, dtype) if affine == "weight_bias" else None
    return w, b


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(True)


def _grads(ts):
    return [None if t is None else t.grad for t in ts]


# Tolerance of a result by its dtype (its final rounding dominates the error).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _check_all(actuals, expecteds, names, atol, rtol, dtype_of, scale=1.0):
    """Compare each result with its oracle at the looser of (atol, rtol) and its own dtype's tolerance;
    ``scale`` widens atol for sums over rows (dw, db)."""
    for a, e, name in zip(actuals, expecteds, names):
        if e is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert a.dtype == dtype_of[name], f"{name}: dtype {a.dtype} != {dtype_of[name]}"
        a_tol, r_tol = TOL[a.dtype]
        assert_verbose_allclose(a, e, atol=max(atol, a_tol) * scale, rtol=max(rtol, r_tol), name=name)


# ---------------------------------------------------------------------------------------------------
# layer_norm
# ---------------------------------------------------------------------------------------------------

def _run_layer_norm(shape, dtype, affine, atol, rtol, *, x=None):
    torch.manual_seed(0)
    if x is None:
        x = 1.5 * torch.randn(shape) + 0.3
        x = x.to(dtype)
    w, b = _params(shape[-1], dtype, affine)
    x, w, b = _leaf(x), _leaf(w), _leaf(b)
    y = layer_norm(x, w, b, eps=1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)

    x64, w64, b64 = _f64(x), _f64(w), _f64(b)
    y64 = layer_norm_ref(x64, w64, b64, eps=1e-5)
    y64.backward(dy.double())
    dtype_of = {"y": dtype, "dx": dtype, "dw": dtype, "db": dtype}
    rows_scale = max(1.0, (x.numel() / shape[-1]) ** 0.5)
    _check_all([y], [y64], ["y"], atol, rtol, dtype_of)
    _check_all([x.grad], [x64.grad], ["dx"], atol, rtol, dtype_of)
    _check_all(_grads([w, b]), _grads([w64, b64]), ["dw", "db"], atol, rtol, dtype_of, scale=rows_scale)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_fwd_bwd(shape, dtype, atol, rtol, affine):
    if shape[-1] == 1 and dtype == torch.float32 and not (kernels_utils.INTERPRETED and interpret_mode()):
        pytest.skip("fallback path: torch's native LayerNorm backward is off by ~3e-5 at width 1")
    _run_layer_norm(shape, dtype, affine, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_layer_norm_gpu_launch_settings_in_interpreter(monkeypatch, dtype, atol, rtol):
    """Small tiles and a 3-program backward: many programs, masked row tails, the strided row loop and
    the cross-program dw/db reduction, as on the GPU."""
    monkeypatch.setattr(ln_mod, "_TILE_INTERPRET", 1024)  # BLOCK_N 1024 -> one row per program
    monkeypatch.setattr(ln_mod, "_BWD_PROGRAMS_INTERPRET", 3)
    _run_layer_norm((2, 23, 1000), dtype, "weight_bias", atol, rtol)
    monkeypatch.setattr(ln_mod, "_TILE_INTERPRET", 4 * 256)  # BLOCK_N 256 -> 4 rows per program
    _run_layer_norm((37, 129), dtype, "weight_bias", atol, rtol)


def test_layer_norm_wide_rows(monkeypatch):
    _run_layer_norm((3, 16384), torch.float32, "weight_bias", 1e-5, 1e-5)
    # the backward's wide path (BLOCK_N 16384: w reloaded per row, x and dy read again after the row
    # sums, dW/dB accumulated in each program's partial rows in memory) with the GPU's one row per
    # program and 3 programs of 2-3 rows each, with and without weight and bias
    monkeypatch.setattr(ln_mod, "_TILE_INTERPRET", 16384)
    monkeypatch.setattr(ln_mod, "_BWD_PROGRAMS_INTERPRET", 3)
    for dtype, atol, rtol in DTYPES:
        _run_layer_norm((7, 8200), dtype, "weight_bias", atol, rtol)
    _run_layer_norm((4, 9000), torch.float32, "none", 1e-5, 1e-5)


def test_layer_norm_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 320)
    w, b = torch.randn(320), torch.randn(320)
    assert_verbose_allclose(layer_norm(x, w, b), torch.nn.functional.layer_norm(x, (320,), w, b),
                            atol=1e-5, rtol=1e-5)
    assert_verbose_allclose(layer_norm(x, eps=0.1), torch.nn.functional.layer_norm(x, (320,), eps=0.1),
                            atol=1e-5, rtol=1e-5)


def test_layer_norm_fp32_params_with_fp16_activations():
    """Mixed precision: fp16 activations with fp32 parameters give fp16 output and fp32 dW/dB."""
    torch.manual_seed(0)
    x = _leaf(torch.randn(6, 200).half())
    w, b = _params(200, torch.float32, "weight_bias")
    w, b = _leaf(w), _leaf(b)
    y = layer_norm(x, w, b)
    assert y.dtype == torch.float16
    dy = torch.randn(6, 200).half()
    y.backward(dy)
    x64, w64, b64 = _f64(x), _f64(w), _f64(b)
    layer_norm_ref(x64, w64, b64).backward(dy.double())
    assert x.grad.dtype == torch.float16 and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert_verbose_allclose(y, layer_norm_ref(x64, w64, b64), atol=2e-3, rtol=2e-3, name="y")
    assert_verbose_allclose(x.grad, x64.grad, atol=2e-3, rtol=2e-3, name="dx")
    assert_verbose_allclose(w.grad, w64.grad, atol=1e-5, rtol=1e-5, name="dw")
    assert_verbose_allclose(b.grad, b64.grad, atol=1e-5, rtol=1e-5, name="db")


def test_layer_norm_non_contiguous():
    torch.manual_seed(0)
    w, b = _params(96, torch.float32, "weight_bias")
    # (a) a column slice of a wider buffer: row stride 3 * 96, unit last stride (no copy needed)
    base = torch.randn(10, 3 * 96)
    x = base[:, 96:192]
    assert not x.is_contiguous()
    assert_verbose_allclose(layer_norm(x, w, b), layer_norm_ref(x.double(), w.double(), b.double()), name="slice")
    # (b) a transposed view: the last dim is not unit-stride
    xt = torch.randn(96, 4, 5).permute(1, 2, 0)
    assert not xt.is_contiguous()
    assert_verbose_allclose(layer_norm(xt, w, b), layer_norm_ref(xt.double(), w.double(), b.double()),
                            name="transposed")
    # (c) gradients through a non-contiguous input and an expanded (stride-0) upstream gradient
    leaf = _leaf(torch.randn(96, 7))
    layer_norm(leaf.t(), w, b).sum().backward()
    x64 = leaf.detach().t().double().requires_grad_(True)
    layer_norm_ref(x64, w.double(), b.double()).sum().backward()
    assert_verbose_allclose(leaf.grad.t(), x64.grad, name="dx")


def test_layer_norm_no_rows():
    x = _leaf(torch.randn(0, 3, 16))
    w, b = _leaf(torch.randn(16)), _leaf(torch.randn(16))
    y = layer_norm(x, w, b)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(16)) and torch.equal(b.grad, torch.zeros(16))


# ---------------------------------------------------------------------------------------------------
# add_layer_norm
# ---------------------------------------------------------------------------------------------------

def _run_add_layer_norm(shape, x_dtype, res_dtype, affine, atol, rtol, param_dtype=None):
    torch.manual_seed(0)
    x = _leaf(torch.randn(shape).to(x_dtype))
    r = _leaf((2 * torch.randn(shape) + 1).to(res_dtype))
    w, b = _params(shape[-1], param_dtype or x_dtype, affine)
    w, b = _leaf(w), _leaf(b)
    y, s = add_layer_norm(x, r, w, b)
    sum_dtype = torch.promote_types(x_dtype, res_dtype)
    assert y.dtype == s.dtype == sum_dtype and y.shape == s.shape == x.shape
    dy, ds = torch.randn(shape).to(sum_dtype), torch.randn(shape).to(sum_dtype)
    ((y.float() * dy.float()).sum() + (s.float() * ds.float()).sum()).backward()

    x64, r64, w64, b64 = _f64(x), _f64(r), _f64(w), _f64(b)
    # The oracle normalizes the sum rounded to its dtype, as the kernel does.
    s64 = (x64 + r64).to(sum_dtype).double()
    y64 = layer_norm_ref(s64, w64, b64)
    ((y64 * dy.double()).sum() + ((x64 + r64) * ds.double()).sum()).backward()
    dtype_of = {"y": sum_dtype, "s": sum_dtype, "dx": x_dtype, "dres": res_dtype,
                "dw": param_dtype or x_dtype, "db": param_dtype or x_dtype}
    rows_scale = max(1.0, (x.numel() / shape[-1]) ** 0.5)
    _check_all([y, s], [y64, x64 + r64], ["y", "s"], atol, rtol, dtype_of)
    _check_all([x.grad, r.grad], [x64.grad, r64.grad], ["dx", "dres"], atol, rtol, dtype_of)
    _check_all(_grads([w, b]), _grads([w64, b64]), ["dw", "db"], atol, rtol, dtype_of, scale=rows_scale)


@pytest.mark.parametrize("affine", ["weight_bias", "none"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_add_layer_norm_fwd_bwd(shape, dtype, atol, rtol, affine):
    _run_add_layer_norm(shape, dtype, dtype, affine, atol, rtol)


def test_add_layer_norm_mixed_dtypes():
    """fp16 sublayer output added to an fp32 residual stream: sum and output in fp32."""
    _run_add_layer_norm((4, 5, 200), torch.float16, torch.float32, "weight_bias", 1e-5, 1e-5,
                        param_dtype=torch.float32)


def test_add_layer_norm_gpu_launch_settings_in_interpreter(monkeypatch):
    monkeypatch.setattr(ln_mod, "_TILE_INTERPRET", 1024)
    monkeypatch.setattr(ln_mod, "_BWD_PROGRAMS_INTERPRET", 3)
    _run_add_layer_norm((3, 7, 1000), torch.float32, torch.float32, "weight_bias", 1e-5, 1e-5)


def test_add_layer_norm_normalizes_the_rounded_sum():
    """fp16 1024 + r (r in [0, 1)) rounds to 1024 or 1025: the kernel must normalize the stored sum."""
    torch.manual_seed(0)
    x = torch.full((4, 256), 1024.0).half()
    r = torch.rand(4, 256).half()
    y, s = add_layer_norm(x, r)
    assert set(s.unique().tolist()) <= {1024.0, 1025.0}
    assert_verbose_allclose(y, layer_norm_ref(s.double()), atol=2e-3, rtol=2e-3)


def test_add_layer_norm_matches_unfused():
    torch.manual_seed(0)
    x, r = torch.randn(3, 11, 64).half(), torch.randn(3, 11, 64).half()
    w, b = torch.randn(64).half(), torch.randn(64).half()
    y, s = add_layer_norm(x, r, w, b)
    y_ref, s_ref = add_layer_norm_ref(x, r, w, b)
    assert torch.equal(s, s_ref)
    assert_verbose_allclose(y, y_ref, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def _bad_cases():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    return [
        ("not a tensor", lambda: layer_norm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        ("int dtype", lambda: layer_norm(torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must have dtype"),
        ("fp8", lambda: layer_norm(x.to(torch.float8_e4m3fn)), TypeError, "x must have dtype"),
        ("0-d", lambda: layer_norm(torch.tensor(1.0)), ValueError, "x must have at least 1 dims"),
        ("empty last dim", lambda: layer_norm(torch.randn(4, 0)), ValueError, "non-empty last dim"),
        ("too wide", lambda: layer_norm(torch.empty(1, ln_mod.MAX_WIDTH + 1)), ValueError, "too large"),
        ("weight shape", lambda: layer_norm(x, torch.randn(7)), ValueError, r"weight must have shape \(8,\)"),
        ("bias shape", lambda: layer_norm(x, w, torch.randn(4, 8)), ValueError, r"bias must have shape \(8,\)"),
        ("weight dtype", lambda: layer_norm(x, w.long()), TypeError, "weight must have dtype"),
        ("weight device", lambda: layer_norm(x, w.to("meta")), ValueError, "weight is on meta"),
        ("eps", lambda: layer_norm(x, w, eps=-1.0), ValueError, "eps must be a non-negative"),
        ("residual shape", lambda: add_layer_norm(x, torch.randn(4, 1)), ValueError, "residual must have the shape"),
        ("residual type", lambda: add_layer_norm(x, 1.0), TypeError, "residual must be a torch.Tensor"),
        ("residual device", lambda: add_layer_norm(x, x.to("meta")), ValueError, "residual is on meta"),
        ("module input", lambda: LayerNorm(8)(torch.randn(4, 7)), ValueError, "normalized_shape"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case):
    _name, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


# ---------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}],
                         ids=["affine", "no_affine", "no_bias", "eps"])
def test_module_matches_torch_layer_norm(kwargs):
    torch.manual_seed(0)
    ours, theirs = LayerNorm(48, **kwargs), torch.nn.LayerNorm(48, **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 5, 48)
    assert_verbose_allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    theirs2 = torch.nn.LayerNorm(48, **kwargs)
    theirs2.load_state_dict(ours.state_dict(), strict=True)
    assert_verbose_allclose(theirs2(x), ours(x), atol=1e-5, rtol=1e-5)
    assert repr(ours).endswith(repr(theirs)[len("LayerNorm"):])


def test_module_multi_dim_normalized_shape_and_dtype():
    torch.manual_seed(0)
    ours = LayerNorm((4, 6), dtype=torch.float16)
    theirs = torch.nn.LayerNorm((4, 6))
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert ours.weight.dtype == torch.float16
    x = torch.randn(3, 4, 6)
    assert_verbose_allclose(ours(x.half()), theirs(x), atol=3e-3, rtol=3e-3)


# ---------------------------------------------------------------------------------------------------
# Dispatch, registration, fallback
# ---------------------------------------------------------------------------------------------------

def _boom(*args, **kwargs):
    raise AssertionError("this path should not run")


def test_interpreter_runs_the_kernel(monkeypatch):
    """Under TRITON_INTERPRET=1 the CPU ops run the Triton kernels, not the PyTorch fallback."""
    if not kernels_utils.INTERPRETED:
        pytest.skip("kernels were not decorated under TRITON_INTERPRET=1")
    launched = []
    real_launch = kernels_utils.launch

    def spy(kernel, *args, **kwargs):  # every Triton launch of the module goes through _utils.launch
        launched.append(kernel)
        return real_launch(kernel, *args, **kwargs)

    # the launchers call _utils.row_fwd_launch / row_bwd_launch, which launch through _utils.launch
    monkeypatch.setattr(kernels_utils, "launch", spy)
    x = _leaf(torch.randn(3, 10))
    y, s = add_layer_norm(x, torch.randn(3, 10))
    (y.sum() + s.sum() + layer_norm(x).sum()).backward()
    assert ln_mod._layer_norm_fwd_kernel in launched and ln_mod._layer_norm_bwd_kernel in launched


def test_fallback_path(fallback_path, monkeypatch):
    """TRITON_INTERPRET=0 on CPU: the pure-PyTorch fallback, same results and gradients."""
    monkeypatch.setattr(kernels_utils, "launch", _boom)  # no Triton kernel may launch (row_*_launch's)
    _run_layer_norm((3, 7, 100), torch.float32, "weight_bias", 1e-5, 1e-5)
    _run_layer_norm((37, 129), torch.float16, "weight", 2e-3, 2e-3)
    _run_add_layer_norm((3, 7, 100), torch.float32, torch.float32, "weight_bias", 1e-5, 1e-5)
    _run_add_layer_norm((9, 64), torch.float16, torch.float32, "none", 1e-5, 1e-5)


@pytest.mark.parametrize("mode", ["interpreter", "fallback"])
def test_opcheck(mode, monkeypatch):
    if mode == "fallback":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    x = torch.randn(6, 40, requires_grad=True)
    r = torch.randn(6, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    op = torch.ops.gpt_kernels.layer_norm_fwd.default
    torch.library.opcheck(op, (x, None, w, b, 1e-5, torch.float32))
    torch.library.opcheck(op, (x, r, w, None, 1e-5, torch.float32))
    mean, rstd = torch.zeros(6), torch.ones(6)
    bwd = torch.ops.gpt_kernels.layer_norm_bwd.default
    torch.library.opcheck(bwd, (x.detach(), x.detach(), w.detach(), mean, rstd, None, True, True))
    torch.library.opcheck(bwd, (x.detach(), r.detach(), None, mean, rstd, x.detach(), False, True))


def test_torch_compile_fullgraph_cpu():
    """Dynamo traces the ops with no graph break (on CPU torch.compile runs the traced PyTorch body)."""
    torch.manual_seed(0)
    x, r = _leaf(torch.randn(4, 32)), _leaf(torch.randn(4, 32))
    w = _leaf(torch.randn(32))

    def f(x, r, w):
        y, s = add_layer_norm(x, r, w)
        return (layer_norm(y, w) + s).sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r, w)
    out.backward()
    grads = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    f(x, r, w).backward()
    for g, t in zip(grads, (x, r, w)):
        assert_verbose_allclose(g, t.grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# GPU (bf16, wide rows, compile, determinism, int64 offsets)
# ---------------------------------------------------------------------------------------------------

GPU_SHAPES = [(8, 1024, 768), (4, 1000, 1600), (37, 129), (64, 4096), (16, 16384)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.bfloat16, 2e-2, 2e-2), (torch.float32, 1e-5, 1e-5),
                                             (torch.float16, 2e-3, 2e-3)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_layer_norm_and_add(shape, dtype, atol, rtol):
    torch.manual_seed(0)
    x = _leaf(torch.randn(shape, device="cuda").to(dtype))
    r = _leaf(torch.randn(shape, device="cuda").to(dtype))
    w, b = _params(shape[-1], dtype, "weight_bias", device="cuda")
    w, b = _leaf(w), _leaf(b)
    y, s = add_layer_norm(x, r, w, b)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward([y, s], [dy, ds])
    x64, r64, w64, b64 = _f64(x), _f64(r), _f64(w), _f64(b)
    s64 = (x64 + r64).to(dtype).double()
    y64 = layer_norm_ref(s64, w64, b64)
    torch.autograd.backward([y64, x64 + r64], [dy.double(), ds.double()])
    rows_scale = max(1.0, (x.numel() / shape[-1]) ** 0.5)
    assert_verbose_allclose(y, y64, atol=atol, rtol=rtol, name="y")
    assert_verbose_allclose(x.grad, x64.grad, atol=atol, rtol=rtol, name="dx")
    assert_verbose_allclose(r.grad, r64.grad, atol=atol, rtol=rtol, name="dres")
    assert_verbose_allclose(w.grad, w64.grad, atol=atol * rows_scale, rtol=rtol, name="dw")
    assert_verbose_allclose(b.grad, b64.grad, atol=atol * rows_scale, rtol=rtol, name="db")
    assert_verbose_allclose(layer_norm(x, w, b), layer_norm_ref(x64, w64, b64), atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_deterministic_dw():
    torch.manual_seed(0)
    x = torch.randn(8192, 768, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    grads = []
    for _ in range(3):
        w, b = _leaf(torch.ones(768, device="cuda")), _leaf(torch.zeros(768, device="cuda"))
        layer_norm(x, w, b).backward(dy)
        grads.append((w.grad, b.grad))
    for g in grads[1:]:
        assert torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1])


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    torch.manual_seed(0)
    x = _leaf(torch.randn(4, 256, 768, device="cuda", dtype=torch.bfloat16))
    r = _leaf(torch.randn(4, 256, 768, device="cuda", dtype=torch.bfloat16))
    w, b = _leaf(torch.randn(768, device="cuda")), _leaf(torch.randn(768, device="cuda"))

    def f(x, r, w, b):
        y, s = add_layer_norm(x, r, w, b)
        return layer_norm(y, w, b).float().square().sum() + s.float().sum()

    out = torch.compile(f, fullgraph=True)(x, r, w, b)
    out.backward()
    grads = [t.grad.clone() for t in (x, r, w, b)]
    for t in (x, r, w, b):
        t.grad = None
    ref_out = f(x, r, w, b)
    ref_out.backward()
    torch.testing.assert_close(out, ref_out, atol=1e-2, rtol=1e-3)
    for g, t in zip(grads, (x, r, w, b)):
        torch.testing.assert_close(g, t.grad, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """rows * stride > 2**31: the last rows of a >2**31-element tensor are normalized correctly."""
    n = 1024
    rows = 2**31 // n + 8
    try:
        x = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x[:16].normal_()
    x[-16:].normal_()
    x[16:-16].fill_(1.0)
    w, b = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    y = layer_norm(x, w, b)
    for sl in (slice(0, 16), slice(rows - 16, rows)):
        assert_verbose_allclose(y[sl], layer_norm_ref(x[sl].double(), w.double(), b.double()),
                                atol=2e-2, rtol=2e-2)
