"""Every op and module on every zero-sized dimension, forward and backward, on every CPU path (issue 22).

An empty tensor once killed the interpreter (ATen's CPU flash kernel divides by zero on Tq = 0 or
H = 0: SIGFPE, exit 136), which no ``pytest.raises`` can catch. So the cases run in child processes: one
child per ``TRITON_INTERPRET`` setting runs the whole case list on each of its paths (this file run as
a script), printing ``CASE job`` before each case and ``RESULT job {json}`` after it. When a child dies, the case it announced last is the one that
killed it (a failure naming it), and a fresh child resumes at the next case, so every case still runs.

Paths: ``interp`` (fp32, ``TRITON_INTERPRET=1``: the Triton kernels' launchers), ``aten`` (fp32,
``TRITON_INTERPRET=0``: the ATen fast path of ``kernels/_eager_cpu.py`` where it applies, else the
fallback) and ``fallback`` (bf16, ``TRITON_INTERPRET=0``: always the registered op's PyTorch fallback).
Expectations are torch's own ops in fp64 on the same shapes (``F.scaled_dot_product_attention`` math
backend, ``F.layer_norm``, ``F.gelu``, ``F.cross_entropy``, ``F.rms_norm``, ``F.silu``), or explicit values where torch's are not our
contract (the mean of zero targets is 0, as for all-ignored targets; meaningless shapes raise ValueError).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"interp": ("1", "float32"), "aten": ("0", "float32"), "fallback": ("0", "bfloat16")}
CHILD_TIMEOUT_S = 300
D = 16  # a legal head_dim


# ---------------------------------------------------------------------------------------------------
# Cases (built in the child; only their names are needed in the parent)
# ---------------------------------------------------------------------------------------------------

def _randn(shape, dt, grad=True):
    import torch

    return torch.randn(shape, dtype=dt).requires_grad_(grad)


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def _grads(out, inputs, g):
    """Gradients of ``(out * g).sum()`` for each input; an input the output does not reach gets zeros."""
    import torch

    need = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, need, grad_outputs=g.to(out.dtype), allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(need, got)]


def _fwd_bwd(fn, ref_fn, inputs, names):
    """[(label, actual, expected)] for the output and the gradient of every input that requires one."""
    import torch

    out = fn(*inputs)
    ins64 = [_f64(t) for t in inputs]
    exp = ref_fn(*ins64)
    g = torch.randn(out.shape, dtype=torch.float64)
    pairs = [("out", out, exp)]
    grads = _grads(out, inputs, g)
    grads64 = _grads(exp, ins64, g)
    live = [n for n, t in zip(names, inputs) if t is not None and t.requires_grad]
    pairs += [(f"d{n}", a, e) for n, a, e in zip(live, grads, grads64)]
    return pairs


def _sdpa_ref(q, k, v, causal):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    Tq, Tk = q.shape[2], k.shape[2]
    mask = None
    if causal and Tk > 0:  # bottom-right aligned; the cases keep Tq <= Tk, so every row sees a key
        mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=q.shape[-1] ** -0.5)


def _case_flash(B, H, Tq, Tk, causal, d=D):
    def run(dt):
        import kernels

        q, k, v = _randn((B, H, Tq, d), dt), _randn((B, H, Tk, d), dt), _randn((B, H, Tk, d), dt)
        return _fwd_bwd(lambda q, k, v: kernels.flash_attention(q, k, v, causal=causal),
                        lambda q, k, v: _sdpa_ref(q, k, v, causal), [q, k, v], "qkv")
    return run


def _decode_ref(q, k, v, lens):
    """Token t of row b sits at L_b - Tq + t and sees keys j <= that position, j < L_b (L_b clamped)."""
    import torch

    B, H, Tq, d = q.shape
    Tmax = k.shape[2]
    out = torch.zeros(B, H, Tq, d, dtype=torch.float64)
    for b in range(B):
        L = min(max(int(lens[b]), 0), Tmax)
        for t in range(Tq):
            n = L - Tq + t + 1  # keys visible to token t
            if n <= 0:
                continue
            s = (q[b, :, t:t + 1] @ k[b, :, :n].transpose(-1, -2))[:, 0] * d ** -0.5  # (H, n)
            out[b, :, t] = (s.softmax(-1)[:, :, None] * v[b, :, :n]).sum(1)
    return out


def _case_decode(B, H, Tq, Tmax, lens=None, d=D):
    def run(dt):
        import torch

        import kernels

        q = _randn((B, H, Tq, d), dt, grad=False)
        k, v = _randn((B, H, Tmax, d), dt, grad=False), _randn((B, H, Tmax, d), dt, grad=False)
        L = torch.tensor(lens if lens is not None else [Tmax - i % 2 * (Tmax > Tq) for i in range(B)],
                         dtype=torch.int32)
        out = kernels.decode_attention(q, k, v, L)
        return [("out", out, _decode_ref(q.double(), k.double(), v.double(), L))]
    return run


def _gqa_ref(q, k, v, causal, window=None, softcap=0.0):
    """fp64 by hand: query head h reads k/v head h // (H // Hk); p_i = i + Tk - Tq; causal j <= p_i,
    window j > p_i - W; softcap c·tanh(s/c); rows that see no key give zeros."""
    import torch

    H, Hk = q.shape[-3], k.shape[-3]
    if Hk and H != Hk:
        k, v = k.repeat_interleave(H // Hk, -3), v.repeat_interleave(H // Hk, -3)
    Tq, Tk = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
    return s.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0) @ v


def _case_flash_gqa(B, H, Hk, Tq, Tk, window, softcap):
    def run(dt):
        import kernels

        q, k, v = _randn((B, H, Tq, D), dt), _randn((B, Hk, Tk, D), dt), _randn((B, Hk, Tk, D), dt)
        return _fwd_bwd(lambda q, k, v: kernels.flash_attention(q, k, v, window_size=window, softcap=softcap),
                        lambda q, k, v: _gqa_ref(q, k, v, True, window, softcap), [q, k, v], "qkv")
    return run


def _case_varlen(H, Hk, lens_q, lens_k, window=None, softcap=0.0):
    def run(dt):
        import torch

        import kernels

        def cu(lens):
            return torch.tensor([0, *[sum(lens[:i + 1]) for i in range(len(lens))]], dtype=torch.int32)

        q = _randn((sum(lens_q), H, D), dt)
        k, v = _randn((sum(lens_k), Hk, D), dt), _randn((sum(lens_k), Hk, D), dt)

        def ref_fn(q, k, v):
            outs, a, b = [q[:0]], 0, 0  # (differentiable even with no sequence)
            for nq, nk in zip(lens_q, lens_k):
                o = _gqa_ref(q[a:a + nq].transpose(0, 1), k[b:b + nk].transpose(0, 1), v[b:b + nk].transpose(0, 1),
                             True, window, softcap)
                outs.append(o.transpose(0, 1))
                a, b = a + nq, b + nk
            return torch.cat(outs)

        return _fwd_bwd(lambda q, k, v: kernels.flash_attention_varlen(
            q, k, v, cu(lens_q), cu(lens_k), max(lens_q, default=0), max(lens_k, default=0), window_size=window,
            softcap=softcap), ref_fn, [q, k, v], "qkv")
    return run


def _case_decode_gqa(B, H, Hk, Tq, Tmax, window, softcap):
    def run(dt):
        import torch

        import kernels

        q = _randn((B, H, Tq, D), dt, grad=False)
        k, v = _randn((B, Hk, Tmax, D), dt, grad=False), _randn((B, Hk, Tmax, D), dt, grad=False)
        L = torch.full((B,), Tmax, dtype=torch.int32)
        out = kernels.decode_attention(q, k, v, L, window_size=window, softcap=softcap)
        want = _gqa_ref(q.double(), k.double(), v.double(), True, window, softcap)
        return [("out", out, want)]
    return run


def _case_layer_norm(shape, affine, add=False, module=False):
    def run(dt):
        import torch
        import torch.nn.functional as F

        import kernels

        n = shape[-1]
        x = _randn(shape, dt)
        w = _randn((n,), dt) if affine else None
        b = _randn((n,), dt) if affine else None
        if module:
            m = kernels.LayerNorm(n, elementwise_affine=affine).to(dt)
            ref = torch.nn.LayerNorm(n, elementwise_affine=affine, dtype=torch.float64)
            if affine:
                ref.load_state_dict({k: p.double() for k, p in m.state_dict().items()})
            x64 = _f64(x)
            out, exp = m(x), ref(x64)
            g = torch.randn(out.shape, dtype=torch.float64)
            got = torch.autograd.grad(out, [x, *m.parameters()], g.to(dt))
            want = torch.autograd.grad(exp, [x64, *ref.parameters()], g)
            return [("out", out, exp), *[(f"d{i}", a, e) for i, (a, e) in enumerate(zip(got, want))]]
        if add:
            r = _randn(shape, dt)

            def fn(x, r, w, b):
                y, s = kernels.add_layer_norm(x, r, w, b)
                return torch.cat([y.reshape(-1), s.reshape(-1)])

            def ref_fn(x, r, w, b):
                s = x + r
                return torch.cat([F.layer_norm(s, (n,), w, b).reshape(-1), s.reshape(-1)])

            return _fwd_bwd(fn, ref_fn, [x, r, w, b], ["x", "residual", "weight", "bias"])
        return _fwd_bwd(lambda x, w, b: kernels.layer_norm(x, w, b), lambda x, w, b: F.layer_norm(x, (n,), w, b),
                        [x, w, b], ["x", "weight", "bias"])
    return run


def _case_gelu(shape, approximate, module=False):
    def run(dt):
        import torch.nn.functional as F

        import kernels

        fn = kernels.GELU(approximate) if module else (lambda x: kernels.gelu(x, approximate))
        return _fwd_bwd(fn, lambda x: F.gelu(x, approximate=approximate), [_randn(shape, dt)], ["x"])
    return run


def _case_lce(lead, V, reduction, bias, d=8, ignore_all=False, label_smoothing=0.0, softcap=0.0):
    def run(dt):
        import torch
        import torch.nn.functional as F

        import kernels

        x, w = _randn((*lead, d), dt), _randn((V, d), dt)
        b = _randn((V,), dt) if bias else None
        t = torch.randint(0, max(V, 1), lead) if not ignore_all else torch.full(lead, -100)

        def ref_fn(x, w, b):
            z = F.linear(x, w, b).reshape(-1, V)
            z = softcap * torch.tanh(z / softcap) if softcap else z
            loss = F.cross_entropy(z, t.reshape(-1), reduction=reduction, label_smoothing=label_smoothing)
            if reduction == "none":
                return loss.view(lead)
            if reduction == "mean" and not bool((t != -100).any()):  # our contract: 0 (torch says NaN)
                return (x.sum() + w.sum() + (b.sum() if b is not None else 0.0)) * 0.0
            return loss

        return _fwd_bwd(lambda x, w, b: kernels.linear_cross_entropy(x, w, t, b, reduction=reduction,
                                                                     label_smoothing=label_smoothing, softcap=softcap),
                        ref_fn, [x, w, b], ["x", "weight", "bias"])
    return run


def _case_attention_module(B, T, d_in=8):
    def run(dt):
        import copy

        import torch
        import torch.nn.functional as F

        import kernels

        m = kernels.CausalSelfAttention(d_in, 2 * D, 8, 0.0, 2).to(dt)
        ref = copy.deepcopy(m).double()
        x = _randn((B, T, d_in), dt)
        x64 = _f64(x)

        def ref_fwd(x):
            q, k, v = (F.linear(x, w).view(B, T, 2, D).transpose(1, 2)  # (B, T, 2D) -> (B, 2, T, D)
                       for w in ref.wqkv.weight.chunk(3))  # the fused weight's rows: W_query, W_key, W_value
            o = _sdpa_ref(q, k, v, causal=True)
            return ref.out_proj(o.transpose(1, 2).reshape(B, T, 2 * D))

        out, exp = m(x), ref_fwd(x64)
        g = torch.randn(out.shape, dtype=torch.float64)
        got = torch.autograd.grad(out, [x, *m.parameters()], g.to(dt))
        want = torch.autograd.grad(exp, [x64, *ref.parameters()], g)
        names = ["x", *(n for n, _ in m.named_parameters())]
        return [("out", out, exp), *[(f"d{n}", a, e) for n, a, e in zip(names, got, want)]]
    return run


def _case_rms_norm(shape, affine, add=False, module=False):
    def run(dt):
        import torch
        import torch.nn.functional as F

        import kernels

        n = shape[-1]
        x = _randn(shape, dt)
        w = _randn((n,), dt) if affine else None
        if module:
            m = kernels.RMSNorm(n, elementwise_affine=affine).to(dt)
            ref = torch.nn.RMSNorm(n, eps=1e-6, elementwise_affine=affine, dtype=torch.float64)
            if affine:
                ref.load_state_dict({k: p.double() for k, p in m.state_dict().items()})
            x64 = _f64(x)
            out, exp = m(x), ref(x64)
            g = torch.randn(out.shape, dtype=torch.float64)
            got = torch.autograd.grad(out, [x, *m.parameters()], g.to(dt))
            want = torch.autograd.grad(exp, [x64, *ref.parameters()], g)
            return [("out", out, exp), *[(f"d{i}", a, e) for i, (a, e) in enumerate(zip(got, want))]]
        if add:
            r = _randn(shape, dt)

            def fn(x, r, w):
                y, s = kernels.add_rms_norm(x, r, w, offset=1.0)
                return torch.cat([y.reshape(-1), s.reshape(-1)])

            def ref_fn(x, r, w):
                s = x + r
                return torch.cat([F.rms_norm(s, (n,), None if w is None else 1.0 + w, 1e-6).reshape(-1),
                                  s.reshape(-1)])

            return _fwd_bwd(fn, ref_fn, [x, r, w], ["x", "residual", "weight"])
        return _fwd_bwd(lambda x, w: kernels.rms_norm(x, w), lambda x, w: F.rms_norm(x, (n,), w, 1e-6),
                        [x, w], ["x", "weight"])
    return run


def _case_glu(shape, op):
    def run(dt):
        import torch.nn.functional as F

        import kernels

        fn = kernels.swiglu if op == "swiglu" else kernels.geglu
        act = F.silu if op == "swiglu" else (lambda g: F.gelu(g, approximate="tanh"))
        return _fwd_bwd(fn, lambda g, u: act(g) * u, [_randn(shape, dt), _randn(shape, dt)], ["gate", "up"])
    return run


def _case_gated_mlp(lead, d_in=8, hidden=12):
    def run(dt):
        import copy

        import torch
        import torch.nn.functional as F

        import kernels

        lins = [torch.nn.Linear(d_in, hidden, bias=False), torch.nn.Linear(d_in, hidden, bias=False),
                torch.nn.Linear(hidden, d_in)]
        m = kernels.GatedMLP(*lins).to(dt)
        ref = copy.deepcopy(m).double()
        x = _randn((*lead, d_in), dt)
        x64 = _f64(x)
        out = m(x)
        exp = ref.down_proj(F.silu(ref.gate_proj(x64)) * ref.up_proj(x64))
        g = torch.randn(out.shape, dtype=torch.float64)
        got = torch.autograd.grad(out, [x, *m.parameters()], g.to(dt))
        want = torch.autograd.grad(exp, [x64, *ref.parameters()], g)
        names = ["x", *(n for n, _ in m.named_parameters())]
        return [("out", out, exp), *[(f"d{n}", a, e) for n, a, e in zip(names, got, want)]]
    return run


def _case_rotary(B, H, T, d=D, batched=False):
    def run(dt):
        import torch

        import kernels

        cos = torch.randn((B, T, d) if batched else (T, d), dtype=dt)
        sin = torch.randn(cos.shape, dtype=dt)

        def ref_fn(x):
            c, s = (cos[:, None], sin[:, None]) if batched else (cos, sin)
            h = d // 2
            return x * c.double() + torch.cat((-x[..., h:], x[..., :h]), -1) * s.double()

        return _fwd_bwd(lambda x: kernels.apply_rotary(x, cos, sin), ref_fn, [_randn((B, H, T, d), dt)], ["x"])
    return run


def _raises_value_error(fn):
    def run(dt):
        try:
            fn(dt)
        except ValueError as e:
            return str(e)
        raise AssertionError("no ValueError")
    run.expects_error = True
    return run


def cases() -> list[tuple[str, object]]:
    out = []
    z = (0, 2)
    for B in z:
        for H in z:
            for Tq, Tk in ((0, 0), (0, 5), (3, 0), (3, 5)):
                if B and H and Tq and Tk:
                    continue  # nothing empty
                for causal in (False, True):
                    out.append((f"flash_attention[B={B},H={H},Tq={Tq},Tk={Tk},causal={causal}]",
                                _case_flash(B, H, Tq, Tk, causal)))
    out.append(("flash_attention[D=0]", _raises_value_error(_case_flash(1, 2, 3, 5, False, d=0))))
    out.append(("flash_attention[D=0,all empty]", _raises_value_error(_case_flash(0, 0, 0, 0, True, d=0))))
    for B in z:
        for H in z:
            for Tq, Tmax in ((0, 0), (0, 4), (1, 4), (2, 4)):
                if B and H and Tq:
                    continue
                out.append((f"decode_attention[B={B},H={H},Tq={Tq},Tmax={Tmax}]", _case_decode(B, H, Tq, Tmax)))
    out.append(("decode_attention[empty rows L=(0,3)]", _case_decode(2, 2, 1, 4, lens=[0, 3])))
    out.append(("decode_attention[Tq=1>Tmax=0]", _raises_value_error(_case_decode(2, 2, 1, 0))))
    out.append(("decode_attention[D=0]", _raises_value_error(_case_decode(2, 2, 1, 4, d=0))))
    # GQA / window / softcap (issue 24) on every empty dim: B, H (and Hk), Tq, Tk
    for B, H, Hk, Tq, Tk in ((0, 4, 2, 3, 5), (2, 0, 0, 3, 5), (2, 4, 2, 0, 5), (2, 4, 2, 3, 0), (2, 4, 1, 0, 0)):
        for window, softcap in ((None, 0.0), (2, 1.5)):
            out.append((f"flash_attention[GQA B={B},H={H},Hk={Hk},Tq={Tq},Tk={Tk},W={window},cap={softcap}]",
                        _case_flash_gqa(B, H, Hk, Tq, Tk, window, softcap)))
    for lq, lk in (((), ()), ((0,), (0,)), ((0, 0), (0, 0)), ((3, 0), (0, 0)), ((0, 2), (4, 2))):
        for window, softcap in ((None, 0.0), (2, 1.5)):
            out.append((f"flash_attention_varlen[lens_q={lq},lens_k={lk},W={window},cap={softcap}]",
                        _case_varlen(4, 2, list(lq), list(lk), window, softcap)))
    out.append(("flash_attention_varlen[H=0]", _case_varlen(0, 0, [3, 0], [3, 2])))
    for B, H, Hk, Tq in ((0, 4, 2, 1), (2, 0, 0, 1), (2, 4, 2, 0)):
        out.append((f"decode_attention[GQA B={B},H={H},Hk={Hk},Tq={Tq},W=2,cap=1.5]",
                    _case_decode_gqa(B, H, Hk, Tq, 4, 2, 1.5)))
    for lead in ((0,), (2, 0), (0, 3), (0, 0)):
        for affine in (True, False):
            shape = (*lead, 8)
            out.append((f"layer_norm[{shape},affine={affine}]", _case_layer_norm(shape, affine)))
            out.append((f"add_layer_norm[{shape},affine={affine}]", _case_layer_norm(shape, affine, add=True)))
            out.append((f"LayerNorm[{shape},affine={affine}]", _case_layer_norm(shape, affine, module=True)))
    for shape in ((3, 0), (0, 0), (0,)):
        out.append((f"layer_norm[width 0 {shape}]", _raises_value_error(_case_layer_norm(shape, True))))
        out.append((f"add_layer_norm[width 0 {shape}]", _raises_value_error(_case_layer_norm(shape, True, add=True))))
        out.append((f"LayerNorm[width 0 {shape}]", _raises_value_error(_case_layer_norm(shape, True, module=True))))
    for shape in ((0,), (0, 4), (3, 0, 2)):
        for approximate in ("none", "tanh"):
            out.append((f"gelu[{shape},{approximate}]", _case_gelu(shape, approximate)))
            out.append((f"GELU[{shape},{approximate}]", _case_gelu(shape, approximate, module=True)))
    for lead in ((0,), (2, 0), (0, 0)):
        for reduction in ("mean", "sum", "none"):
            for bias in (True, False):
                out.append((f"linear_cross_entropy[N={lead},{reduction},bias={bias}]",
                            _case_lce(lead, 5, reduction, bias)))
    for reduction in ("mean", "none"):
        out.append((f"linear_cross_entropy[N=(0,),{reduction},label_smoothing,softcap]",
                    _case_lce((0,), 5, reduction, True, label_smoothing=0.1, softcap=3.0)))
        out.append((f"linear_cross_entropy[all ignored,{reduction},label_smoothing,softcap]",
                    _case_lce((3,), 5, reduction, True, ignore_all=True, label_smoothing=0.1, softcap=3.0)))
    for reduction in ("mean", "sum", "none"):
        out.append((f"linear_cross_entropy[all ignored,{reduction}]", _case_lce((3,), 5, reduction, True,
                                                                                ignore_all=True)))
    out.append(("linear_cross_entropy[V=0]", _raises_value_error(_case_lce((3,), 0, "mean", True))))
    out.append(("linear_cross_entropy[V=0,N=0]", _raises_value_error(_case_lce((0,), 0, "mean", False))))
    for B, T in ((0, 4), (2, 0), (0, 0)):
        out.append((f"CausalSelfAttention[B={B},T={T}]", _case_attention_module(B, T)))
    for lead in ((0,), (2, 0), (0, 3)):
        for affine in (True, False):
            shape = (*lead, 8)
            out.append((f"rms_norm[{shape},affine={affine}]", _case_rms_norm(shape, affine)))
            out.append((f"add_rms_norm[{shape},affine={affine}]", _case_rms_norm(shape, affine, add=True)))
            out.append((f"RMSNorm[{shape},affine={affine}]", _case_rms_norm(shape, affine, module=True)))
    for shape in ((3, 0), (0,)):
        out.append((f"rms_norm[width 0 {shape}]", _raises_value_error(_case_rms_norm(shape, True))))
        out.append((f"add_rms_norm[width 0 {shape}]", _raises_value_error(_case_rms_norm(shape, True, add=True))))
        out.append((f"RMSNorm[width 0 {shape}]", _raises_value_error(_case_rms_norm(shape, True, module=True))))
    for shape in ((0,), (0, 4), (3, 0), (2, 0, 5)):
        for op in ("swiglu", "geglu"):
            out.append((f"{op}[{shape}]", _case_glu(shape, op)))
    for lead in ((0,), (2, 0)):
        out.append((f"GatedMLP[{lead}]", _case_gated_mlp(lead)))
    for B, H, T in ((0, 2, 3), (2, 0, 3), (2, 2, 0), (0, 0, 0)):
        out.append((f"apply_rotary[B={B},H={H},T={T}]", _case_rotary(B, H, T)))
        out.append((f"apply_rotary[B={B},H={H},T={T},(B,T,D) table]", _case_rotary(B, H, T, batched=True)))
    out.append(("apply_rotary[D=0]", _raises_value_error(_case_rotary(1, 2, 3, d=0))))
    return out


# ---------------------------------------------------------------------------------------------------
# Child: run cases[start:] on one path, one line per event
# ---------------------------------------------------------------------------------------------------

def _check(pairs, dt) -> str | None:
    import torch

    tol = 1e-4 if dt == torch.float32 else 3e-2
    for label, got, want in pairs:
        if tuple(got.shape) != tuple(want.shape):
            return f"{label}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.is_floating_point() and label == "out" and got.dtype not in (dt, torch.float32):
            return f"{label}: dtype {got.dtype}"
        g, w = got.detach().double(), want.detach().double()
        if not torch.allclose(g, w, rtol=tol, atol=tol, equal_nan=False):
            return f"{label}: max error {(g - w).abs().nan_to_num(float('inf')).max().item():.3g} (tol {tol})"
    return None


def _jobs(interpret: str) -> list[tuple[str, int]]:
    """(path, case index) for every path that runs with this ``TRITON_INTERPRET`` (one child each)."""
    return [(path, i) for path, (flag, _) in PATHS.items() if flag == interpret for i in range(len(cases()))]


def _child(interpret: str, start: int) -> None:
    import torch

    all_cases = cases()
    for job, (path, i) in enumerate(_jobs(interpret)):
        if job < start:
            continue
        dt = getattr(torch, PATHS[path][1])
        print("CASE", job, flush=True)
        torch.manual_seed(i)
        run = all_cases[i][1]
        try:
            res = run(dt)
            if getattr(run, "expects_error", False):
                report = {"ok": True, "detail": f"ValueError: {res}"}
            else:
                err = _check(res, dt)
                report = {"ok": err is None, "detail": err or ""}
        except Exception as e:  # noqa: BLE001 - every failure is reported against its case
            report = {"ok": False, "detail": f"{type(e).__name__}: {e}"}
        print("RESULT", job, json.dumps(report), flush=True)


# ---------------------------------------------------------------------------------------------------
# Parent: run the children, then one test per (path, case)
# ---------------------------------------------------------------------------------------------------

def _run_setting(interpret: str) -> dict[tuple[str, int], dict]:
    """Run every job of one ``TRITON_INTERPRET`` setting in as few children as crashes allow."""
    jobs = _jobs(interpret)
    reports: dict[int, dict] = {}
    start = 0
    env = dict(os.environ, TRITON_INTERPRET=interpret,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    while start < len(jobs):
        try:
            r = subprocess.run([sys.executable, __file__, interpret, str(start)], capture_output=True, text=True,
                               env=env, cwd=ROOT, timeout=CHILD_TIMEOUT_S)
            stdout, stderr, rc = r.stdout, r.stderr, r.returncode
            how = f"killed the process (exit {rc})"
        except subprocess.TimeoutExpired as e:
            def text(b):
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            stdout, stderr, rc = text(e.stdout), text(e.stderr), None
            how = f"hung (no result in {CHILD_TIMEOUT_S} s)"
        last = None
        for line in stdout.splitlines():
            if line.startswith("CASE "):
                last = int(line.split()[1])
            elif line.startswith("RESULT "):
                _, job, js = line.split(" ", 2)
                reports[int(job)] = json.loads(js)
                last = None
        if rc == 0 and last is None:
            break
        if last is None:  # died outside a case (import error, ...): blame the next case and stop
            reports[start] = {"ok": False, "detail": f"child failed outside a case (exit {rc}): {stderr[-2000:]}"}
            break
        reports[last] = {"ok": False, "detail": f"{how}; stderr tail: {stderr[-1500:]}"}
        start = last + 1
    return {jobs[job]: rep for job, rep in reports.items()}


@cache
def _reports() -> dict[tuple[str, int], dict]:
    """{(path, case index): report} over every path; the two settings' children run side by side."""
    from concurrent.futures import ThreadPoolExecutor

    flags = sorted({flag for flag, _ in PATHS.values()})
    with ThreadPoolExecutor(len(flags)) as pool:
        return {k: v for part in pool.map(_run_setting, flags) for k, v in part.items()}


def _params():
    import pytest

    return [pytest.param(path, i, id=f"{path}-{name}") for path in PATHS for i, (name, _) in enumerate(cases())]


try:
    import pytest

    @pytest.mark.parametrize(("path", "index"), _params())
    def test_empty_shape(path, index):
        if path == "interp":
            from tests.conftest import INTERPRETER_OK

            if not INTERPRETER_OK:
                pytest.skip("the Triton interpreter needs triton >= 3.7")
        report = _reports().get((path, index))
        assert report is not None, "the case did not run (an earlier case's child failed outside a case)"
        assert report["ok"], f"{cases()[index][0]} on {path}: {report['detail']}"
except ImportError:  # the child needs no pytest
    pass


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a fatal signal prints the Python stack into the report
    _child(sys.argv[1], int(sys.argv[2]))  # TRITON_INTERPRET value, first job
