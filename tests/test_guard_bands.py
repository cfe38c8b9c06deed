"""Guard bands: every op, every tensor argument (upstream gradients included) as a view into a larger
buffer that is NaN before, after and between its elements; contiguous, strided, transposed and stride-0
views, and a mix of them; forward and backward; on the interpreter and on the fallback (on a CUDA
machine: the compiled kernels, on CUDA tensors, plus a few large gpu-marked shapes).

Any NaN in an output or a gradient is an out-of-bounds read or an unmasked load; any other difference
from the fp64 reference on the same logical values is a stride bug. The reference gradients are taken
with respect to the compact sources, so an expanded (stride-0) argument's gradient must be the sum over
the broadcast dim, as torch autograd gives.
"""

from __future__ import annotations

import pytest
import torch

from kernels import add_layer_norm, decode_attention, flash_attention, gelu, layer_norm
from kernels import reference as ref
from tests.guard_utils import LAYOUTS, assert_close_to_ref, guarded, plain, source_shape

MIXED = "mixed"  # each argument a different layout


def _layout(mode: str, i: int) -> str:
    return LAYOUTS[i % len(LAYOUTS)] if mode == MIXED else mode


def _inputs(specs: dict, mode: str, dtype=torch.float32, seed=0, device="cpu"):
    """specs: name -> (shape, stride-0 dim, differentiable). Returns (kernel args on ``device``, fp64 ref
    args on the CPU, leaves)."""
    g = torch.Generator().manual_seed(seed)
    kargs, rargs, leaves = {}, {}, {}
    for i, (name, (shape, dim0, grad)) in enumerate(specs.items()):
        lay = _layout(mode, i)
        src = torch.randn(source_shape(shape, lay, dim0), generator=g)
        k_src = src.to(device=device, dtype=dtype, copy=True).requires_grad_(grad)
        r_src = src.to(dtype).double().requires_grad_(grad)  # the same (rounded) values, in fp64
        kargs[name] = guarded(k_src, lay, dim0=dim0, size0=shape[dim0])
        rargs[name] = plain(r_src, lay, dim0=dim0, size0=shape[dim0])
        leaves[name] = (k_src, r_src)
    return kargs, rargs, leaves


def _check(outs, ref_outs, kargs, rargs, leaves, out_names, tol_fwd, tol_bwd, label):
    """Compare outputs, then backpropagate the guarded upstream gradients (kargs['d' + out]) and compare
    every leaf's gradient with the fp64 reference's."""
    for name, o, r in zip(out_names, outs, ref_outs):
        assert o.shape == r.shape
        assert_close_to_ref(o, r, tol_fwd, f"{label}: {name}")
    if not any(k.requires_grad for k, _ in leaves.values()):
        return
    torch.autograd.backward(list(outs), [kargs["d" + n] for n in out_names])
    torch.autograd.backward(list(ref_outs), [rargs["d" + n] for n in out_names])
    for name, (k_src, r_src) in leaves.items():
        if k_src.requires_grad:
            assert k_src.grad is not None, f"{label}: no gradient for {name}"
            assert_close_to_ref(k_src.grad, r_src.grad, tol_bwd, f"{label}: grad {name}")


MODES = [*LAYOUTS, MIXED]


@pytest.mark.parametrize("mode", MODES)
def test_layer_norm(kernel_path, device, mode):
    B, T, N = 2, 3, 40  # N not a power of two: masked columns
    specs = {"x": ((B, T, N), 1, True), "weight": ((N,), 0, True), "bias": ((N,), 0, True),
             "dy": ((B, T, N), 0, False)}
    kargs, rargs, leaves = _inputs(specs, mode, device=device)
    y = layer_norm(kargs["x"], kargs["weight"], kargs["bias"], eps=1e-5)
    y_ref = ref.layer_norm_ref(rargs["x"], rargs["weight"], rargs["bias"], eps=1e-5)
    _check([y], [y_ref], kargs, rargs, leaves, ["y"], 1e-5, 1e-4, f"layer_norm {mode} [{kernel_path}]")


@pytest.mark.parametrize("mode", MODES)
def test_add_layer_norm(kernel_path, device, mode):
    B, T, N = 2, 3, 40
    specs = {"x": ((B, T, N), 0, True), "residual": ((B, T, N), 2, True), "weight": ((N,), 0, True),
             "bias": ((N,), 0, True), "dy": ((B, T, N), 1, False), "ds": ((B, T, N), 0, False)}
    kargs, rargs, leaves = _inputs(specs, mode, device=device)
    y, s = add_layer_norm(kargs["x"], kargs["residual"], kargs["weight"], kargs["bias"])
    y_ref, s_ref = ref.add_layer_norm_ref(rargs["x"], rargs["residual"], rargs["weight"], rargs["bias"])
    _check([y, s], [y_ref, s_ref], kargs, rargs, leaves, ["y", "s"], 1e-5, 1e-4,
           f"add_layer_norm {mode} [{kernel_path}]")


@pytest.mark.parametrize("mode", MODES)
def test_gelu(kernel_path, device, mode):
    specs = {"x": ((3, 5, 33), 1, True), "dy": ((3, 5, 33), 2, False)}
    kargs, rargs, leaves = _inputs(specs, mode, device=device)
    kargs["x"], rargs["x"] = kargs["x"] * 3, rargs["x"] * 3  # both tails of GELU
    _check([gelu(kargs["x"])], [ref.gelu_ref(rargs["x"])], kargs, rargs, leaves, ["y"], 1e-5, 1e-5,
           f"gelu {mode} [{kernel_path}]")


@pytest.mark.parametrize("mode, causal", [(m, True) for m in MODES] + [("strided", False), ("mixed", False)],
                         ids=[f"{m}-causal" for m in MODES] + ["strided-full", "mixed-full"])
def test_flash_attention(kernel_path, device, mode, causal):
    B, H, Tq, Tk, D = 2, 2, 13, 21, 24  # Tq < Tk, tails in every block, D padded to 32
    specs = {"q": ((B, H, Tq, D), 1, True), "k": ((B, H, Tk, D), 0, True), "v": ((B, H, Tk, D), 2, True),
             "do": ((B, H, Tq, D), 3, False)}
    kargs, rargs, leaves = _inputs(specs, mode, device=device)
    o = flash_attention(kargs["q"], kargs["k"], kargs["v"], causal=causal)
    o_ref = ref.attention_ref(rargs["q"], rargs["k"], rargs["v"], causal=causal)
    _check([o], [o_ref], kargs, rargs, leaves, ["o"], 2e-5, 1e-4, f"flash_attention {mode} [{kernel_path}]")


def _decode_oracle(q, k, v, lens):
    """Row by row, fp64: the Tq new queries attend the row's first min(max(L, 0), Tmax) keys, causal
    bottom-right (attention_ref: a query that sees no key gives zeros). Independent of the fallback."""
    Tmax = k.shape[2]
    rows = []
    for b, L in enumerate(lens):
        L = min(max(int(L), 0), Tmax)
        rows.append(ref.attention_ref(q[b:b + 1].double(), k[b:b + 1, :, :L].double(), v[b:b + 1, :, :L].double(),
                                      causal=True))
    return torch.cat(rows)  # (B, H, Tq, D)


@pytest.mark.parametrize("mode", MODES)
def test_decode_attention(kernel_path, device, mode):
    """Every argument guarded, and the unused cache slots past each row's length hold NaN and inf."""
    B, H, Tq, Tmax, D = 3, 2, 2, 29, 24
    specs = {"q": ((B, H, Tq, D), 1, False), "k_cache": ((B, H, Tmax, D), 1, False),
             "v_cache": ((B, H, Tmax, D), 3, False)}
    kargs, rargs, leaves = _inputs(specs, mode, device=device)
    lens = [2, 17, 26] if _layout(mode, 3) != "stride0" else [17] * B
    src = torch.tensor(lens[:1] if _layout(mode, 3) == "stride0" else lens, dtype=torch.int32, device=device)
    seqlens = guarded(src, _layout(mode, 3), dim0=0, size0=B)
    with torch.no_grad():  # poison the unused slots of the compact sources (the views share them)
        for name, poison in (("k_cache", float("nan")), ("v_cache", float("inf"))):
            k_src, _ = leaves[name]
            for b in range(k_src.shape[0]):
                k_src[b, :, lens[b]:] = poison
            shape, dim0, _ = specs[name]
            kargs[name] = guarded(k_src, _layout(mode, list(specs).index(name)), dim0=dim0, size0=shape[dim0])
    out = decode_attention(kargs["q"], kargs["k_cache"], kargs["v_cache"], seqlens)
    want = _decode_oracle(rargs["q"], rargs["k_cache"], rargs["v_cache"], lens)
    assert_close_to_ref(out, want, 2e-5, f"decode_attention {mode} [{kernel_path}]")


# ---------------------------------------------------------------------------------------------------
# Large shapes on the GPU: many programs, full-size blocks, the widest LayerNorm row (the interpreter
# cannot afford these). Every argument in a different guarded layout.
# ---------------------------------------------------------------------------------------------------

GPU_TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 6e-2)}  # (forward, backward)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Tq, Tk, causal", [(1000, 1000, True), (999, 1000, False), (77, 1000, True)])
def test_gpu_flash_attention_large(dtype, Tq, Tk, causal):
    B, H, D = 1, 3, 64
    specs = {"q": ((B, H, Tq, D), 1, True), "k": ((B, H, Tk, D), 0, True), "v": ((B, H, Tk, D), 2, True),
             "do": ((B, H, Tq, D), 3, False)}
    kargs, rargs, leaves = _inputs(specs, MIXED, dtype, device="cuda")
    o = flash_attention(kargs["q"], kargs["k"], kargs["v"], causal=causal)
    o_ref = ref.attention_ref(rargs["q"], rargs["k"], rargs["v"], causal=causal)
    _check([o], [o_ref], kargs, rargs, leaves, ["o"], *GPU_TOL[dtype],
           f"flash_attention {dtype} Tq={Tq} Tk={Tk} causal={causal}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_gpu_layer_norm_widest_row(dtype, fused):
    N = 16384  # kernels.layernorm.MAX_WIDTH
    specs = {"x": ((3, 5, N), 1, True), "residual": ((3, 5, N), 0, True), "weight": ((N,), 0, True),
             "bias": ((N,), 0, True), "dy": ((3, 5, N), 2, False), "ds": ((3, 5, N), 0, False)}
    if not fused:
        del specs["residual"], specs["ds"]
    kargs, rargs, leaves = _inputs(specs, MIXED, dtype, device="cuda")
    tol = (1e-5, 1e-4) if dtype == torch.float32 else GPU_TOL[dtype]
    if fused:
        outs = add_layer_norm(kargs["x"], kargs["residual"], kargs["weight"], kargs["bias"])
        refs = ref.add_layer_norm_ref(rargs["x"], rargs["residual"], rargs["weight"], rargs["bias"])
        refs = (refs[0], refs[1].to(dtype).double())  # the op rounds the sum to its dtype
    else:
        outs = (layer_norm(kargs["x"], kargs["weight"], kargs["bias"]),)
        refs = (ref.layer_norm_ref(rargs["x"], rargs["weight"], rargs["bias"]),)
    _check(list(outs), list(refs), kargs, rargs, leaves, ["y", "s"][:len(outs)], *tol,
           f"{'add_layer_norm' if fused else 'layer_norm'} {dtype} N={N}")


@pytest.mark.gpu
def test_gpu_gelu_large_odd():
    specs = {"x": ((7, 1001, 769), 1, True), "dy": ((7, 1001, 769), 2, False)}  # 5.4M elements, odd
    kargs, rargs, leaves = _inputs(specs, MIXED, device="cuda")
    y, y_ref = gelu(kargs["x"]), ref.gelu_ref(rargs["x"])
    _check([y], [y_ref], kargs, rargs, leaves, ["y"], 1e-5, 1e-5, "gelu large")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_decode_attention_long_cache(dtype):
    """A 3001-slot cache (many splits), ragged lengths past both ends, NaN/inf in every unused slot."""
    B, H, Tq, Tmax, D = 4, 3, 2, 3001, 64
    lens = [2, 1500, 3001, 5000]
    specs = {"q": ((B, H, Tq, D), 1, False), "k_cache": ((B, H, Tmax, D), 1, False),
             "v_cache": ((B, H, Tmax, D), 3, False)}
    kargs, rargs, leaves = _inputs(specs, MIXED, dtype, device="cuda")
    with torch.no_grad():
        for name, poison in (("k_cache", float("nan")), ("v_cache", float("inf"))):
            k_src, _ = leaves[name]
            for b in range(B):
                k_src[b, :, lens[b]:] = poison
            shape, dim0, _ = specs[name]
            kargs[name] = guarded(k_src, LAYOUTS[list(specs).index(name)], dim0=dim0, size0=shape[dim0])
    seqlens = guarded(torch.tensor(lens, dtype=torch.int32, device="cuda"), "strided")
    out = decode_attention(kargs["q"], kargs["k_cache"], kargs["v_cache"], seqlens)
    want = _decode_oracle(rargs["q"], rargs["k_cache"], rargs["v_cache"], lens)
    assert_close_to_ref(out, want, GPU_TOL[dtype][0], f"decode_attention {dtype} Tmax={Tmax}")
