"""Rotary embeddings: Triton kernel (interpreter) and the PyTorch fallback vs transformers'
``apply_rotary_pos_emb`` with its own rotary embedding classes, in fp64 (an independent oracle)."""

from __future__ import annotations

import pytest
import torch

import kernels.rotary as rot_mod
from kernels import apply_rotary
from tests.guard_utils import guarded
from tests.utils import assert_verbose_allclose

transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _cos_sin(B, T, D, *, rope_scaling=None, contiguous_positions=False, seed=0):
    """cos/sin (B, T, D) from transformers' LlamaRotaryEmbedding at non-contiguous position ids."""
    cfg = transformers.LlamaConfig(hidden_size=4 * D, num_attention_heads=4, head_dim=D, rope_theta=500000.0,
                                   max_position_embeddings=4096, rope_scaling=rope_scaling)
    emb = modeling_llama.LlamaRotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(seed)
    if contiguous_positions:
        pos = torch.arange(T)[None].expand(B, T)
    else:  # ragged, shuffled positions (packed sequences, left padding)
        pos = torch.stack([torch.randperm(3 * T, generator=g)[:T] for _ in range(B)])
    x = torch.zeros(B, T, D, dtype=torch.float64)
    return emb(x, pos)  # fp64 cos, sin (B, T, D)


def _hf(x64, cos64, sin64):
    c, s = (cos64, sin64) if cos64.dim() == 3 else (cos64[None], sin64[None])
    q, _k = modeling_llama.apply_rotary_pos_emb(x64, x64, c, s)
    return q


def _check(x_src, x, cos, sin, dtype, name):
    """x is a view of x_src (a leaf); compare forward and the gradient w.r.t. x_src with fp64 HF."""
    y = apply_rotary(x, cos, sin)
    assert y.shape == x.shape and y.dtype == x.dtype
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(y.shape, generator=g).to(y.device, dtype)
    (dx,) = torch.autograd.grad(y, x_src, dy)
    x64 = x_src.detach().double().requires_grad_(True)
    view = x64.transpose(1, 2) if x.shape != x_src.shape else x64
    y64 = _hf(view, cos.double(), sin.double())
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    atol, rtol = TOL[dtype]
    assert_verbose_allclose(y, y64, atol=atol, rtol=rtol, name=f"{name} y")
    assert_verbose_allclose(dx, dx64, atol=atol, rtol=rtol, name=f"{name} dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", [2, 16, 80, 128])
def test_rotary_matches_transformers(kernel_path, device, dtype, D):
    B, H, T = 2, 3, 11
    cos, sin = _cos_sin(B, T, D)
    g = torch.Generator().manual_seed(D)
    # (B, T, H, D) projection output viewed as (B, H, T, D): transformers' q after .transpose(1, 2)
    src = torch.randn(B, T, H, D, generator=g).to(device, dtype).requires_grad_(True)
    _check(src, src.transpose(1, 2), cos.to(device, dtype), sin.to(device, dtype), dtype, "bthd")
    # contiguous (B, H, T, D), a (T, D) table in fp32 while x is fp16
    src = torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_(True)
    cos2, sin2 = _cos_sin(1, T, D, contiguous_positions=True)
    _check(src, src, cos2[0].to(device), sin2[0].to(device), dtype, "(T, D)")


def test_rotary_scaled_rope_and_batch1_table(kernel_path, device):
    """Llama-3's rope scaling; a (1, T, D) table broadcast over B = 3."""
    cos, sin = _cos_sin(1, 9, 64, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    src = torch.randn(3, 2, 9, 64, device=device, requires_grad=True)
    _check(src, src, cos.float().to(device), sin.float().to(device), torch.float32, "llama3")


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_rotary_guarded_views(kernel_path, device, layout, monkeypatch):
    """x, cos, sin and dy inside NaN-filled buffers; small tiles so T spans several programs."""
    monkeypatch.setattr(rot_mod, "_TILE_INTERPRET", 4 * 8)  # BLOCK_D 8 -> 4 positions per program
    B, H, T, D = 2, 3, 13, 16
    cos, sin = _cos_sin(B, T, D)
    g = torch.Generator().manual_seed(1)
    src = torch.randn(B, H, T, D, generator=g).to(device).requires_grad_(True)
    x = guarded(src, layout)
    c, s = guarded(cos.float().to(device), layout), guarded(sin.float().to(device), layout)
    y = apply_rotary(x, c, s)
    dy = guarded(torch.randn(B, H, T, D, generator=g).to(device), "strided")
    (dx,) = torch.autograd.grad(y, src, dy)
    x64 = src.detach().double().requires_grad_(True)
    y64 = _hf(x64, cos, sin)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert_verbose_allclose(y, y64, name="y")
    assert_verbose_allclose(dx, dx64, name="dx")


def test_rotary_empty_float64_and_grad_through_cos(kernel_path, device):
    for shape in [(0, 2, 5, 8), (2, 0, 5, 8), (2, 2, 0, 8)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        c = torch.randn(shape[2], 8, device=device)
        y = apply_rotary(x, c, c)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape
    cos, sin = _cos_sin(2, 5, 8)
    x64 = torch.randn(2, 3, 5, 8, dtype=torch.float64, device=device)
    assert_verbose_allclose(apply_rotary(x64, cos.to(device), sin.to(device)), _hf(x64, cos.to(device), sin.to(device)),
                            atol=1e-12, rtol=1e-12)
    # a learned table: the gradient reaches cos/sin too (the reference path)
    c = cos.float().to(device).requires_grad_(True)
    x = x64.float()
    apply_rotary(x, c, sin.float().to(device)).sum().backward()
    assert_verbose_allclose(c.grad, x.sum(1), atol=1e-5, rtol=1e-5, name="dcos")


def test_rotary_bad_inputs():
    x = torch.randn(2, 3, 5, 8)
    c = torch.randn(5, 8)
    with pytest.raises(ValueError, match="x must have an even, non-zero head dim"):
        apply_rotary(torch.randn(2, 3, 5, 7), torch.randn(5, 7), torch.randn(5, 7))
    with pytest.raises(ValueError, match="x must be 4-D"):
        apply_rotary(x[0], c, c)
    with pytest.raises(ValueError, match=r"cos must have shape \(T, D\)"):
        apply_rotary(x, torch.randn(6, 8), c)
    with pytest.raises(ValueError, match=r"cos must have shape"):
        apply_rotary(x, torch.randn(3, 5, 8), c)  # batch 3 for B = 2
    with pytest.raises(ValueError, match="sin must have the shape of cos"):
        apply_rotary(x, c, torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="sin must have dtype"):
        apply_rotary(x, c, c.long())


@pytest.mark.parametrize("mode", ["interpreter", "fallback"])
def test_opcheck(mode, monkeypatch):
    if mode == "fallback":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 3, 5, 8, requires_grad=True).transpose(1, 2)
    c = torch.randn(2, 3, 8)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for backward in (False, True):
        torch.library.opcheck(torch.ops.gpt_kernels.rotary.default, (x, c, c.cos(), backward), test_utils=utils)


def test_torch_compile_fullgraph_cpu(kernel_path):
    cos, sin = (t.float() for t in _cos_sin(2, 6, 16))
    x = torch.randn(2, 6, 4, 16, requires_grad=True)
    fn = torch.compile(lambda x: apply_rotary(x.transpose(1, 2), cos, sin).square().sum(), fullgraph=True,
                       backend="aot_eager")
    fn(x).backward()
    x64 = x.detach().double().requires_grad_(True)
    _hf(x64.transpose(1, 2), cos.double(), sin.double()).square().sum().backward()
    assert_verbose_allclose(x.grad, x64.grad, name="dx")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 96])
def test_gpu_rotary(dtype, D):
    B, H, T = 4, 32, 2048
    cos, sin = _cos_sin(B, T, D)
    src = torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True)
    _check(src, src.transpose(1, 2), cos.to("cuda", dtype), sin.to("cuda", dtype), dtype, "gpu")
