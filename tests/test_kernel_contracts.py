"""Contracts the kernels document, on both CPU paths (interpreter and fallback; on a CUDA machine the
compiled kernels, on CUDA tensors), against fp64 oracles:

* decode_attention's out-of-range ``cache_seqlens`` (clamped to [0, Tmax], no host sync; a query at a
  negative position outputs zeros), int32 and int64 (past 2**31 too);
* bf16 under the interpreter (whose bf16 ``tl.dot`` is wrong upstream) and compiled matches fp64 within
  bf16 error;
* every dtype on every path, for every op and module: it works (matches the fp64 reference, forward and
  backward) or raises a TypeError naming the argument and the dtype.
"""

from __future__ import annotations

import pytest
import torch

from kernels import (
    GELU,
    CausalSelfAttention,
    LayerNorm,
    RMSNorm,
    add_layer_norm,
    add_rms_norm,
    apply_rotary,
    decode_attention,
    flash_attention,
    geglu,
    gelu,
    layer_norm,
    rms_norm,
    swiglu,
)
from kernels import reference as ref
from tests.guard_utils import CUDA, assert_close_to_ref


def _decode_oracle(q, k, v, lens):
    """fp64, row by row: attention over the first clamp(L, 0, Tmax) keys, causal bottom-right."""
    rows = []
    for b, L in enumerate(lens):
        L = min(max(int(L), 0), k.shape[2])
        rows.append(ref.attention_ref(q[b:b + 1].double(), k[b:b + 1, :, :L].double(), v[b:b + 1, :, :L].double(),
                                      causal=True))
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_decode_out_of_range_lengths_are_clamped(kernel_path, device, dtype):
    """Negative, zero, shorter than Tq, past the cache; the caches sit inside a larger buffer whose
    rest is NaN, so reading past Tmax (the old kernel did) shows up as NaN."""
    B, H, Tq, Tmax, D = 6, 2, 3, 20, 16
    big = 2**40 if dtype == torch.int64 else 2**31 - 1
    lens = [-big if dtype == torch.int64 else -3, 0, 1, Tmax + 5, big, 7]
    g = torch.Generator().manual_seed(0)
    buf = torch.full((2, B, H, Tmax + 8, D), float("nan"), device=device)
    buf[:, :, :, :Tmax] = torch.randn(2, B, H, Tmax, D, generator=g).to(device)
    k, v = buf[0, :, :, :Tmax], buf[1, :, :, :Tmax]  # the NaN rows Tmax.. follow each (b, h) slice
    q = torch.randn(B, H, Tq, D, generator=g).to(device)
    out = decode_attention(q, k, v, torch.tensor(lens, dtype=dtype, device=device))
    want = _decode_oracle(q, k, v, lens)
    assert_close_to_ref(out, want, 2e-5, f"decode lengths {lens} [{kernel_path}]")
    assert (out[:2] == 0).all()  # an empty row
    assert (out[2, :, :2] == 0).all() and out[2, :, 2].abs().sum() > 0  # L=1 < Tq: only the last query sees
    clamped = torch.tensor(lens, dtype=dtype, device=device).clamp(0, Tmax)  # past the cache == full, etc.
    assert torch.equal(decode_attention(q, k, v, clamped), out)


def test_decode_paths_agree_on_out_of_range_lengths(monkeypatch):
    """The same call on the kernel (the interpreter; compiled on CUDA) and on the CPU fallback gives the
    same answer (one semantics)."""
    B, H, Tq, Tmax, D = 4, 1, 2, 18, 32
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(B, H, t, D, generator=g) for t in (Tq, Tmax, Tmax)]
    args.append(torch.tensor([-1, 1, 40, 18], dtype=torch.int32))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fallback = decode_attention(*args)
    if CUDA:
        kernel = decode_attention(*(t.cuda() for t in args)).cpu()
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        kernel = decode_attention(*args)
    torch.testing.assert_close(kernel, fallback, atol=2e-6, rtol=2e-6)


# ---------------------------------------------------------------------------------------------------
# bf16 on the interpreter (and the fallback): close to fp64, never garbage
# ---------------------------------------------------------------------------------------------------

BF16_TOL = 3e-2  # the interpreter also rounds fp32 -> bf16 toward zero (1 ulp = 2**-7 relative)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bf16_flash_attention_matches_fp64(kernel_path, device, causal):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, t, 32, generator=g).bfloat16().to(device).requires_grad_()
               for t in (11, 19, 19))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    o = flash_attention(q, k, v, causal=causal)
    o64 = ref.attention_ref(q64, k64, v64, causal=causal)
    assert o.dtype == torch.bfloat16
    assert_close_to_ref(o, o64, BF16_TOL, f"bf16 attention [{kernel_path}]")
    do = torch.randn(o.shape, generator=g).bfloat16()
    o.backward(do.to(device))
    o64.backward(do.double())
    for name, a, e in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close_to_ref(a.grad, e.grad, BF16_TOL, f"bf16 attention {name} [{kernel_path}]")


def test_bf16_decode_attention_matches_fp64(kernel_path, device):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 2, 64, generator=g).bfloat16()
    k, v = (torch.randn(2, 3, 37, 64, generator=g).bfloat16() for _ in range(2))
    lens = [37, 12]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = decode_attention(q.to(device), k.to(device), v.to(device), seqlens)
    assert_close_to_ref(out, _decode_oracle(q, k, v, lens), BF16_TOL, f"bf16 decode [{kernel_path}]")


# ---------------------------------------------------------------------------------------------------
# Every dtype on every CPU path: works (matches fp64) or a clear TypeError
# ---------------------------------------------------------------------------------------------------

TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: BF16_TOL}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.float8_e4m3fn]
NORM_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # LayerNorm, GELU (fp64: reference)
ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _t(shape, dtype, seed, device):
    """Random values in ``dtype`` on ``device`` (integers: small ints; float8 via fp32)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2
    return (x.round().to(dtype) if not dtype.is_floating_point else x.to(dtype)).to(device)


def _leaf(x):
    return x.clone().requires_grad_() if x.dtype in NORM_DTYPES else x


def _run_layer_norm(dtype, device):
    x, w, b = (_leaf(_t(shape, dtype, i, device)) for i, shape in enumerate([(3, 40), (40,), (40,)]))
    return [x, w, b], lambda x, w, b: [layer_norm(x, w, b)], lambda x, w, b: [torch.nn.functional.layer_norm(
        x, (40,), w, b)]


def _run_add_layer_norm(dtype, device):
    x, r, w = (_leaf(_t(shape, dtype, i, device)) for i, shape in enumerate([(3, 40), (3, 40), (40,)]))
    return [x, r, w], lambda x, r, w: list(add_layer_norm(x, r, w)), lambda x, r, w: [
        torch.nn.functional.layer_norm(x + r, (40,), w), x + r]


def _run_gelu(dtype, device):
    return [_leaf(_t((5, 33), dtype, 0, device))], lambda x: [gelu(x)], lambda x: [torch.nn.functional.gelu(
        x, approximate="tanh")]


def _run_rms_norm(dtype, device):
    x, w = (_leaf(_t(shape, dtype, i, device)) for i, shape in enumerate([(3, 40), (40,)]))
    return [x, w], lambda x, w: [rms_norm(x, w, offset=1.0)], lambda x, w: [torch.nn.functional.rms_norm(
        x, (40,), 1.0 + w, 1e-6)]


def _run_add_rms_norm(dtype, device):
    x, r, w = (_leaf(_t(shape, dtype, i, device)) for i, shape in enumerate([(3, 40), (3, 40), (40,)]))
    return [x, r, w], lambda x, r, w: list(add_rms_norm(x, r, w)), lambda x, r, w: [
        torch.nn.functional.rms_norm(x + r, (40,), w, 1e-6), x + r]


def _run_glu(dtype, device):
    g, u = (_leaf(_t((5, 33), dtype, i, device)) for i in range(2))
    return [g, u], lambda g, u: [swiglu(g, u), geglu(g, u)], lambda g, u: [
        torch.nn.functional.silu(g) * u, torch.nn.functional.gelu(g, approximate="tanh") * u]


def _run_rotary(dtype, device):
    x = _leaf(_t((2, 2, 5, 8), dtype, 0, device))
    ang = torch.arange(5.0)[:, None] * torch.rand(4, generator=torch.Generator().manual_seed(1))
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(device) for f in (torch.cos, torch.sin))  # fp32 tables

    def oracle(x):
        return [x * cos.to(x.dtype) + torch.cat((-x[..., 4:], x[..., :4]), -1) * sin.to(x.dtype)]
    return [x], lambda x: [apply_rotary(x, cos, sin)], oracle


def _run_module(mod_cls, torch_cls, *args):
    def make(dtype, device):
        torch.manual_seed(0)
        ours, theirs = mod_cls(*args), torch_cls(*args)
        if dtype in NORM_DTYPES:  # (else: fp32 parameters, and the input's dtype must be refused)
            ours = ours.to(dtype)
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_()
        theirs.double().load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
        ours, theirs = ours.to(device), theirs.to(device)
        x = _leaf(_t((2, 3, 24), dtype, 5, device))
        return [x], lambda x: [ours(x)], lambda x: [theirs(x)]
    return make


def _run_flash_attention(dtype, device):
    q, k, v = (_leaf(_t((1, 2, t, 16), dtype, i, device)) for i, t in enumerate((7, 9, 9)))
    return [q, k, v], lambda q, k, v: [flash_attention(q, k, v)], lambda q, k, v: [ref.attention_ref(q, k, v)]


def _run_decode(dtype, device):
    q, k, v = (_t((2, 2, t, 16), dtype, i, device) for i, t in enumerate((1, 9, 9)))
    lens = torch.tensor([9, 4], dtype=torch.int32, device=device)
    return [q, k, v], lambda q, k, v: [decode_attention(q, k, v, lens)], lambda q, k, v: [
        _decode_oracle(q, k, v, lens.tolist())]


def _run_self_attention(dtype, device):
    torch.manual_seed(0)
    mod = CausalSelfAttention(24, 32, 16, 0.0, 2).to(device)
    if dtype in ATTN_DTYPES:
        mod = mod.to(dtype)

    def oracle(x):  # fp64: one projection per head group, attention_ref, out_proj
        lin = {n: (m.weight.double(), m.bias.double() if m.bias is not None else None)
               for n, m in mod.named_children()}
        w = lin["wqkv"][0].chunk(3)  # the fused weight's rows: W_query, W_key, W_value (no bias here)
        q, k, v = (torch.nn.functional.linear(x, w[i]).view(2, 3, 2, 16).transpose(1, 2)  # (2, 3, 32) -> (2, 2, 3, 16)
                   for i in range(3))
        ctx = ref.attention_ref(q, k, v).transpose(1, 2).reshape(2, 3, 32)
        return [torch.nn.functional.linear(ctx, *lin["out_proj"])]
    return [_leaf(_t((2, 3, 24), dtype, 5, device))], lambda x: [mod(x)], oracle


CASES = {
    "layer_norm": (_run_layer_norm, NORM_DTYPES),
    "add_layer_norm": (_run_add_layer_norm, NORM_DTYPES),
    "gelu": (_run_gelu, NORM_DTYPES),
    "LayerNorm": (_run_module(LayerNorm, torch.nn.LayerNorm, 24), NORM_DTYPES),
    "GELU": (_run_module(lambda: GELU("tanh"), lambda: torch.nn.GELU("tanh")), NORM_DTYPES),
    "rms_norm": (_run_rms_norm, NORM_DTYPES),
    "add_rms_norm": (_run_add_rms_norm, NORM_DTYPES),
    "RMSNorm": (_run_module(lambda: RMSNorm(24, eps=1e-6), lambda: torch.nn.RMSNorm(24, eps=1e-6)), NORM_DTYPES),
    "swiglu_geglu": (_run_glu, NORM_DTYPES),
    "apply_rotary": (_run_rotary, NORM_DTYPES),
    "flash_attention": (_run_flash_attention, ATTN_DTYPES),
    "decode_attention": (_run_decode, ATTN_DTYPES),
    "CausalSelfAttention": (_run_self_attention, ATTN_DTYPES),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_every_dtype_works_or_raises_type_error(kernel_path, device, case, dtype):
    make, supported = CASES[case]
    inputs, run, oracle = make(dtype, device)  # (the fp64 oracle runs on the device too)
    if dtype not in supported:
        with pytest.raises(TypeError, match=r"must have dtype in \(.*\), got " + str(dtype).replace("torch.", "")):
            run(*inputs)
        return
    outs = run(*inputs)
    refs = [r for r in oracle(*[x.detach().double().requires_grad_(x.requires_grad) for x in inputs])]
    assert [o.dtype for o in outs] == [dtype] * len(outs)
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert_close_to_ref(o, r, TOL[dtype], f"{case} {dtype} output {i} [{kernel_path}]")
    if case == "decode_attention":
        return
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(o.shape, generator=g).to(device=device, dtype=dtype) for o in outs]
    leaves = [x for x in inputs if x.requires_grad]
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ours = torch.autograd.grad(outs, leaves, grads)
    ref_in = iter(ref_leaves)
    theirs_out = oracle(*[next(ref_in) if x.requires_grad else x.double() for x in inputs])
    theirs = torch.autograd.grad(theirs_out, ref_leaves, [gr.double() for gr in grads])
    for i, (a, e) in enumerate(zip(ours, theirs)):
        assert a.dtype == leaves[i].dtype
        assert_close_to_ref(a, e, TOL[dtype] * 4, f"{case} {dtype} grad {i} [{kernel_path}]")
