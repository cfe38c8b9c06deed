"""SwiGLU / GeGLU and GatedMLP: Triton kernels (interpreter) and the PyTorch fallback vs fp64
``F.silu(gate) * up`` / ``F.gelu(gate) * up`` (torch's ops, independent of ours)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.glu as glu_mod
from kernels import GatedMLP, geglu, swiglu
from tests.guard_utils import guarded, plain, source_shape
from tests.utils import assert_verbose_allclose

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
OPS = {
    "swiglu": (swiglu, lambda g, u: F.silu(g) * u),
    "geglu_tanh": (geglu, lambda g, u: F.gelu(g, approximate="tanh") * u),
    "geglu_erf": (lambda g, u: geglu(g, u, approximate="none"), lambda g, u: F.gelu(g) * u),
}


def _check(op, shape, dtype, device, *, layout="contiguous", seed=0):
    ours, oracle = OPS[op]
    g0 = torch.Generator().manual_seed(seed)
    src = source_shape(shape, layout, 0)
    gs = (3 * torch.randn(src, generator=g0)).to(device, dtype).requires_grad_(True)
    us = torch.randn(src, generator=g0).to(device, dtype).requires_grad_(True)
    gate, up = guarded(gs, layout, size0=shape[0]), guarded(us, layout, size0=shape[0])
    y = ours(gate, up)
    assert y.shape == gate.shape and y.dtype == dtype
    dy = guarded(torch.randn(shape, generator=g0).to(device, dtype), "strided")
    dg, du = torch.autograd.grad(y, (gs, us), dy)
    g64, u64 = gs.detach().double().requires_grad_(True), us.detach().double().requires_grad_(True)
    y64 = oracle(plain(g64, layout, size0=shape[0]), plain(u64, layout, size0=shape[0]))
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    atol, rtol = TOL[dtype]
    scale = shape[0] if layout == "stride0" else 1  # gradients summed over the broadcast dim
    assert_verbose_allclose(y, y64, atol=atol, rtol=rtol, name=f"{op} y")
    assert_verbose_allclose(dg, dg64, atol=atol * scale, rtol=rtol, name=f"{op} dgate")
    assert_verbose_allclose(du, du64, atol=atol * scale, rtol=rtol, name=f"{op} dup")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_glu_fwd_bwd(kernel_path, device, op, dtype):
    for i, shape in enumerate([(2, 3, 1000), (4097,), (7, 1), (3, 96)]):
        _check(op, shape, dtype, device, seed=i)


@pytest.mark.parametrize("layout", ["strided", "transposed", "stride0"])
def test_glu_guarded_views(kernel_path, device, layout):
    for op in OPS:
        _check(op, (5, 6, 40), torch.float32, device, layout=layout)


def test_glu_chunks_of_a_fused_projection_and_small_tiles(monkeypatch):
    """gate/up as the two halves of one (N, 2I) projection (row stride 2I, read in place), with
    the CUDA-sized tiles in the interpreter: many programs along both grid axes, masked tails."""
    monkeypatch.setattr(glu_mod, "_TILE_INTERPRET", 256)
    fused = torch.randn(13, 2 * 300, requires_grad=True)
    gate, up = fused.chunk(2, dim=-1)
    y = swiglu(gate, up)
    y.square().sum().backward()
    f64 = fused.detach().double().requires_grad_(True)
    g64, u64 = f64.chunk(2, dim=-1)
    y64 = F.silu(g64) * u64
    y64.square().sum().backward()
    assert_verbose_allclose(y, y64, name="y")
    assert_verbose_allclose(fused.grad, f64.grad, name="dfused")


def test_glu_empty_and_float64(kernel_path, device):
    for shape in [(0, 8), (4, 0), (0,)]:
        g = torch.randn(shape, device=device, requires_grad=True)
        u = torch.randn(shape, device=device, requires_grad=True)
        y = swiglu(g, u)
        y.sum().backward()
        assert y.shape == shape and g.grad.shape == shape and u.grad.shape == shape
    g0 = torch.tensor(1.5, device=device, requires_grad=True)  # 0-d
    y0 = swiglu(g0, 2 * g0)
    y0.backward()
    g64 = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    (F.silu(g64) * 2 * g64).backward()
    assert y0.shape == () and abs(g0.grad.item() - g64.grad.item()) < 1e-5
    g = torch.randn(3, 9, dtype=torch.float64, device=device)
    assert_verbose_allclose(geglu(g, g), F.gelu(g, approximate="tanh") * g, atol=1e-12, rtol=1e-12)


def test_glu_bad_inputs():
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"up must have the shape of gate \(4, 8\)"):
        swiglu(g, torch.randn(4, 9))
    with pytest.raises(TypeError, match="up must have the dtype of gate"):
        swiglu(g, torch.randn(4, 8).half())
    with pytest.raises(TypeError, match="gate must have dtype"):
        swiglu(g.long(), g)
    with pytest.raises(ValueError, match="approximate must be"):
        geglu(g, g, approximate="erf")
    with pytest.raises(ValueError, match="activation must be one of"):
        GatedMLP(torch.nn.Linear(2, 3), torch.nn.Linear(2, 3), torch.nn.Linear(3, 2), activation="relu")
    with pytest.raises(TypeError, match="down_proj must be a torch.nn.Module"):
        GatedMLP(torch.nn.Linear(2, 3), torch.nn.Linear(2, 3), None)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_mlp_holds_the_linears(kernel_path, device, activation):
    torch.manual_seed(0)
    lins = [torch.nn.Linear(24, 40, bias=False), torch.nn.Linear(24, 40, bias=False), torch.nn.Linear(40, 24)]
    mlp = GatedMLP(*lins, activation=activation).to(device)
    assert list(mlp.state_dict()) == ["gate_proj.weight", "up_proj.weight", "down_proj.weight", "down_proj.bias"]
    assert mlp.gate_proj is lins[0] and mlp.up_proj.weight is lins[1].weight
    x = torch.randn(2, 5, 24, device=device, requires_grad=True)
    mlp(x).square().sum().backward()
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    x64 = x.detach().double().requires_grad_(True)
    w = [p.detach().double().requires_grad_(True) for p in mlp.parameters()]
    y64 = F.linear(act(F.linear(x64, w[0])) * F.linear(x64, w[1]), w[2], w[3])
    y64.square().sum().backward()
    assert_verbose_allclose(mlp(x), y64, atol=1e-5, rtol=1e-5, name="y")
    assert_verbose_allclose(x.grad, x64.grad, atol=1e-4, rtol=1e-5, name="dx")
    for p, p64, name in zip(mlp.parameters(), w, ["gate", "up", "down", "down_b"]):
        assert_verbose_allclose(p.grad, p64.grad, atol=1e-4, rtol=1e-5, name=name)


@pytest.mark.parametrize("mode", ["interpreter", "fallback"])
def test_opcheck(mode, monkeypatch):
    if mode == "fallback":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.randn(5, 17, requires_grad=True)
    u = torch.randn(5, 17, requires_grad=True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for act in glu_mod.ACTIVATIONS:
        torch.library.opcheck(torch.ops.gpt_kernels.glu_fwd.default, (g, u, act), test_utils=utils)
        torch.library.opcheck(torch.ops.gpt_kernels.glu_bwd.default, (torch.randn(5, 17), g.detach(), u.detach(), act),
                              test_utils=utils)


def test_torch_compile_fullgraph_cpu(kernel_path):
    g = torch.randn(4, 32, requires_grad=True)
    u = torch.randn(4, 32, requires_grad=True)
    fn = torch.compile(lambda g, u: (swiglu(g.half(), u.half()).float() + geglu(g, u)).square().sum(),
                       fullgraph=True, backend="aot_eager")
    fn(g, u).backward()
    g64, u64 = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    (F.silu(g64.half().double()) * u64.half().double() + F.gelu(g64, approximate="tanh") * u64).square().sum().backward()
    assert_verbose_allclose(g.grad, g64.grad, atol=2e-2, rtol=2e-2, name="dg")
    assert_verbose_allclose(u.grad, u64.grad, atol=2e-2, rtol=2e-2, name="du")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 512, 14336), (37, 129), (8192, 1)])
def test_gpu_glu(shape, dtype):
    for op in OPS:
        _check(op, shape, dtype, "cuda")
