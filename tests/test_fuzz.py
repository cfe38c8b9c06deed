"""Differential fuzzing with hypothesis: every op against its fp64 reference over shapes, strides
(NaN-guarded contiguous / strided / transposed / stride-0 views, see tests/guard_utils.py), dtypes
(fp32, fp16, bf16) and flags (causal, softmax_scale, approximate, eps, lengths), forward and backward,
on the interpreter and on the fallback; on a CUDA machine the "interpreter" case builds CUDA tensors
(the compiled kernels) and the fallback case is skipped, as tests/conftest.py's ``kernel_path`` does.

The default run is a small derandomized budget; ``pytest -m slow`` runs a larger random one
(``FUZZ_MAX_EXAMPLES`` examples per test, 150 unless set: on a GPU every new shape and stride pattern
compiles new kernels, so bench/gpu_session.sh sets a budget that fits its time). A failing example found
here becomes a fixed regression case (``REGRESSIONS`` below, or an ``@example``).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import add_layer_norm, decode_attention, flash_attention, gelu, layer_norm
from kernels import reference as ref
from tests.guard_utils import (
    CUDA,
    LAYOUTS,
    assert_close_to_ref,
    guarded,
    kernel_path_env,
    path_device,
    plain,
    source_shape,
)

PATHS = ["interpreter", pytest.param("fallback", marks=pytest.mark.skipif(
    CUDA, reason="on CUDA the kernels run compiled, once (the 'interpreter' case)"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerance (relative to max(1, |ref|max) + |ref|) per dtype; gradients get twice as much.
TOL = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

FAST = settings(derandomize=True, max_examples=6, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=int(os.environ.get("FUZZ_MAX_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _draw_arg(data, name, shape, dtype, grad, device, scale=1.0):
    """A random tensor of ``shape`` in a random NaN-guarded layout: (kernel view on ``device``, fp64 view
    on the CPU, leaves)."""
    lay = data.draw(st.sampled_from(LAYOUTS), label=f"{name} layout")
    dim0 = data.draw(st.integers(0, len(shape) - 1), label=f"{name} stride-0 dim") if lay == "stride0" else 0
    seed = data.draw(st.integers(0, 2**16), label=f"{name} seed")
    src = (torch.randn(source_shape(shape, lay, dim0), generator=torch.Generator().manual_seed(seed)) * scale)
    k_src = src.to(device=device, dtype=dtype).requires_grad_(grad)
    r_src = k_src.detach().cpu().double().requires_grad_(grad)
    return (guarded(k_src, lay, dim0=dim0, size0=shape[dim0]), plain(r_src, lay, dim0=dim0, size0=shape[dim0]),
            (k_src, r_src))


def _backward_and_compare(outs, ref_outs, dys, leaves, tol, label, peer_grads=None):
    """Outputs within ``tol``, gradients within ``2 tol``, or (ill-conditioned cases, e.g. LayerNorm
    of 2 nearly equal values) within twice the error of PyTorch's own op in the same dtype
    (``peer_grads``: name -> gradient)."""
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == outs[0].dtype and o.shape == r.shape
        assert_close_to_ref(o, r, tol, f"{label} out {i}")
    torch.autograd.backward(list(outs), [d[0] for d in dys])
    torch.autograd.backward(list(ref_outs), [d[1] for d in dys])
    for name, (k_src, r_src) in leaves.items():
        gtol = 2 * tol
        if peer_grads is not None:
            e = r_src.grad
            peer_err = (peer_grads[name].cpu().double() - e).abs().max().item()
            gtol = max(gtol, 2 * peer_err / max(1.0, e.abs().max().item()))
        assert_close_to_ref(k_src.grad, r_src.grad, gtol, f"{label} grad {name}")


# ---------------------------------------------------------------------------------------------------
# LayerNorm / add + LayerNorm
# ---------------------------------------------------------------------------------------------------

def _layer_norm_case(data, path):
    device = path_device(path)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    lead = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=2), label="lead dims")
    N = data.draw(st.sampled_from([1, 2, 7, 16, 33, 64, 100]), label="N")
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 1e-3, 0.5]), label="eps")
    fused = data.draw(st.booleans(), label="add_layer_norm")
    has_w, has_b = data.draw(st.booleans(), label="weight"), data.draw(st.booleans(), label="bias")
    shape = (*lead, N)
    args, leaves = {}, {}
    names = ["x", "residual"] if fused else ["x"]
    for name in names:
        k, r, leaves[name] = _draw_arg(data, name, shape, dtype, True, device)
        args[name] = (k, r)
    for name, present in (("weight", has_w), ("bias", has_b)):
        pdtype = data.draw(st.sampled_from([dtype, torch.float32]), label=f"{name} dtype")
        if present:
            k, r, leaves[name] = _draw_arg(data, name, (N,), pdtype, True, device)
            args[name] = (k, r)
        else:
            args[name] = (None, None)
    dys = [_draw_arg(data, f"d{i}", shape, dtype, False, device)[:2] for i in range(2 if fused else 1)]
    label = f"{'add_layer_norm' if fused else 'layer_norm'} {dtype} {shape} eps={eps} [{path}]"
    with kernel_path_env(path):
        if fused:
            outs = add_layer_norm(args["x"][0], args["residual"][0], args["weight"][0], args["bias"][0], eps)
            refs = ref.add_layer_norm_ref(args["x"][1], args["residual"][1], args["weight"][1], args["bias"][1], eps)
        else:
            outs = (layer_norm(args["x"][0], args["weight"][0], args["bias"][0], eps),)
            refs = (ref.layer_norm_ref(args["x"][1], args["weight"][1], args["bias"][1], eps),)
        # the reference rounds like the op: the sum to the input dtype, the output to it
        refs = [r.to(o.dtype).double() if fused and i == 1 else r for i, (o, r) in enumerate(zip(outs, refs))]
        _backward_and_compare(outs, refs, dys, leaves, TOL[dtype], label,
                              _layer_norm_peer_grads(args, leaves, dys, eps, fused, dtype))


def _layer_norm_peer_grads(args, leaves, dys, eps, fused, dtype):
    """Gradients of torch's own LayerNorm on the same values in the op's dtype (fp32 parameters cast)."""
    p = {n: leaves[n][0].detach().clone().requires_grad_() for n in leaves}

    def view(name):
        if args[name][0] is None:
            return None
        lay_src = p[name]  # rebuild the logical tensor from the compact source (stride-0 expands)
        return lay_src.expand(args[name][0].shape) if lay_src.shape != args[name][0].shape else lay_src

    x = view("x")
    s = x + view("residual") if fused else x
    w, b = view("weight"), view("bias")
    y = torch.nn.functional.layer_norm(s, (s.shape[-1],), None if w is None else w.to(dtype),
                                       None if b is None else b.to(dtype), eps)
    outs = [y, s] if fused else [y]
    torch.autograd.backward(outs, [d[0].to(dtype) for d in dys])
    return {n: t.grad for n, t in p.items()}


@pytest.mark.parametrize("path", PATHS)
@FAST
@given(data=st.data())
def test_fuzz_layer_norm(path, data):
    _layer_norm_case(data, path)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@SLOW
@given(data=st.data())
def test_fuzz_layer_norm_slow(path, data):
    _layer_norm_case(data, path)


# ---------------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------------

def _gelu_case(data, path):
    device = path_device(path)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = tuple(data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=3), label="shape"))
    approximate = data.draw(st.sampled_from(["tanh", "none"]), label="approximate")
    scale = data.draw(st.sampled_from([1.0, 4.0, 30.0]), label="scale")
    k, r, leaf = _draw_arg(data, "x", shape, dtype, True, device, scale)
    dy = _draw_arg(data, "dy", shape, dtype, False, device)[:2]
    with kernel_path_env(path):
        out = gelu(k, approximate)
        _backward_and_compare([out], [ref.gelu_ref(r, approximate)], [dy], {"x": leaf}, TOL[dtype],
                              f"gelu {approximate} {dtype} {shape} x{scale} [{path}]")


@pytest.mark.parametrize("path", PATHS)
@FAST
@given(data=st.data())
def test_fuzz_gelu(path, data):
    _gelu_case(data, path)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@SLOW
@given(data=st.data())
def test_fuzz_gelu_slow(path, data):
    _gelu_case(data, path)


# ---------------------------------------------------------------------------------------------------
# Flash attention
# ---------------------------------------------------------------------------------------------------

def _attention_case(data, path, max_t=40):
    device = path_device(path)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B, H = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 2), label="H")
    D = data.draw(st.sampled_from([16, 24, 32, 64, 80]), label="D")
    causal = data.draw(st.booleans(), label="causal")
    Tq = data.draw(st.integers(1, max_t), label="Tq")
    Tk = data.draw(st.integers(Tq if causal else 1, max(max_t, Tq)), label="Tk")
    scale = data.draw(st.one_of(st.none(), st.floats(0.02, 1.5)), label="softmax_scale")
    q, k, v = (_draw_arg(data, n, (B, H, t, D), dtype, True, device)
               for n, t in (("q", Tq), ("k", Tk), ("v", Tk)))
    do = _draw_arg(data, "do", (B, H, Tq, D), dtype, False, device)[:2]
    with kernel_path_env(path):
        out = flash_attention(q[0], k[0], v[0], causal=causal, softmax_scale=scale)
        want = ref.attention_ref(q[1], k[1], v[1], causal=causal, softmax_scale=scale)
        _backward_and_compare([out], [want], [do], {"q": q[2], "k": k[2], "v": v[2]}, TOL[dtype],
                              f"flash_attention {dtype} B={B} H={H} Tq={Tq} Tk={Tk} D={D} causal={causal} "
                              f"scale={scale} [{path}]")


@pytest.mark.parametrize("path", PATHS)
@FAST
@given(data=st.data())
def test_fuzz_flash_attention(path, data):
    _attention_case(data, path, max_t=24)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@SLOW
@given(data=st.data())
def test_fuzz_flash_attention_slow(path, data):
    _attention_case(data, path, max_t=80)


# ---------------------------------------------------------------------------------------------------
# Decode attention (no autograd)
# ---------------------------------------------------------------------------------------------------

def _decode_case(data, path):
    device = path_device(path)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B, H = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 2), label="H")
    D = data.draw(st.sampled_from([16, 32, 80]), label="D")
    Tq = data.draw(st.integers(1, 4), label="Tq")
    Tmax = data.draw(st.integers(Tq, 48), label="Tmax")
    lens = data.draw(st.lists(st.integers(-2, Tmax + 3), min_size=B, max_size=B), label="cache_seqlens")
    sl_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="seqlens dtype")
    scale = data.draw(st.one_of(st.none(), st.floats(0.02, 1.5)), label="softmax_scale")
    q, k, v = (_draw_arg(data, n, (B, H, t, D), dtype, False, device)[:2]
               for n, t in (("q", Tq), ("k", Tmax), ("v", Tmax)))
    seqlens = guarded(torch.tensor(lens, dtype=sl_dtype, device=device),
                      data.draw(st.sampled_from(LAYOUTS[:3]), label="sl layout"))
    rows = []
    for b, L in enumerate(lens):  # fp64 oracle, row by row over the clamped valid prefix
        L = min(max(L, 0), Tmax)
        rows.append(ref.attention_ref(q[1][b:b + 1], k[1][b:b + 1, :, :L], v[1][b:b + 1, :, :L], causal=True,
                                      softmax_scale=scale))
    with kernel_path_env(path):
        out = decode_attention(q[0], k[0], v[0], seqlens, softmax_scale=scale)
    assert out.dtype == dtype
    assert_close_to_ref(out, torch.cat(rows), TOL[dtype],
                        f"decode {dtype} B={B} H={H} Tq={Tq} Tmax={Tmax} D={D} lens={lens} scale={scale} [{path}]")


@pytest.mark.parametrize("path", PATHS)
@FAST
@given(data=st.data())
def test_fuzz_decode_attention(path, data):
    _decode_case(data, path)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@SLOW
@given(data=st.data())
def test_fuzz_decode_attention_slow(path, data):
    _decode_case(data, path)


# ---------------------------------------------------------------------------------------------------
# Regression cases found by the fuzzer
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("arg", ["q", "k", "v", "do"])
def test_regression_fallback_attention_last_dim_stride(causal, arg):
    """Found by test_fuzz_flash_attention[fallback] (B=H=Tq=Tk=1, D=16, v strided): the fp32 eager CPU
    fast path called ATen's CPU flash-attention kernel, which assumes a unit-stride last dim, on a view
    with stride 2 there, and read the NaN guard elements in between."""
    T, D = 5, 16
    g = torch.Generator().manual_seed(0)
    src = {n: torch.randn(1, 2, T, D, generator=g) for n in ("q", "k", "v", "do")}
    leaves = {n: src[n].clone().requires_grad_() for n in ("q", "k", "v")}
    view = {n: guarded(leaves.get(n, src[n]), "strided" if n == arg else "contiguous") for n in src}
    with kernel_path_env("fallback"):
        out = flash_attention(view["q"], view["k"], view["v"], causal=causal)
        out.backward(view["do"])
    r = {n: src[n].double().requires_grad_(n != "do") for n in src}
    want = ref.attention_ref(r["q"], r["k"], r["v"], causal=causal)
    want.backward(r["do"])
    assert_close_to_ref(out, want, 2e-5, f"{arg} strided: out")
    for n in ("q", "k", "v"):
        assert_close_to_ref(leaves[n].grad, r[n].grad, 1e-4, f"{arg} strided: grad {n}")


@pytest.mark.parametrize("path", PATHS)
def test_regression_layer_norm_two_nearly_equal_values(path):
    """Found by test_fuzz_layer_norm_slow[fallback] (fp32, N=2, eps=1e-6): the gradient is a cancellation
    scaled by rstd, ill-conditioned in fp32 for every implementation; within 2x torch's own fp32 error."""
    device = path_device(path)
    x = torch.tensor([[0.30, 0.3004], [-1.0, -1.002]], device=device, requires_grad=True)
    dy = torch.tensor([[0.7, -0.2], [0.1, 0.9]], device=device)
    x64 = x.detach().cpu().double().requires_grad_()
    x32 = x.detach().clone().requires_grad_()  # torch's own fp32 LayerNorm on the same device: the peer
    with kernel_path_env(path):
        layer_norm(x, eps=1e-6).backward(dy)
    ref.layer_norm_ref(x64, eps=1e-6).backward(dy.cpu().double())
    torch.nn.functional.layer_norm(x32, (2,), eps=1e-6).backward(dy)
    peer = (x32.grad.cpu().double() - x64.grad).abs().max().item()
    err = (x.grad.cpu().double() - x64.grad).abs().max().item()
    assert err <= 2 * peer + 1e-6 * x64.grad.abs().max().item()
