"""Every kernel once, forward and backward, on odd shapes with NaN guard bands: the program that
compute-sanitizer runs on a GPU (bench/gpu_session.sh), and a smoke test on the CPU.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/sanitize_driver.py
    python tests/sanitize_driver.py --device cpu                     # the PyTorch fallback
    TRITON_INTERPRET=1 python tests/sanitize_driver.py --device cpu  # the kernels in the interpreter

Ops: flash_attention (causal / full, Tq < Tk and Tq > Tk, dropout, head dims 24..128), decode_attention
(lengths past both ends, int32 / int64, NaN and inf in the unused cache slots), layer_norm and
add_layer_norm (widths 33..1001, weight / bias present or not, fp32 parameters with fp16 inputs), gelu
(tanh / exact) and linear_cross_entropy (ignored targets, bias or not, "none" and "mean"), in fp32,
fp16 and bf16. Each case runs in two layouts:

* ``exact``: every tensor is its own contiguous allocation of exactly its size. With PyTorch's caching
  allocator off (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``) each is its own cudaMalloc block, so a read or
  write past its end is outside any allocation and memcheck reports it.
* ``guarded``: every tensor is a strided / transposed / stride-0 view into a buffer that is NaN around
  and between its elements (tests/guard_utils.py). A read inside the buffer but outside the view is
  invisible to memcheck; it puts a NaN into an output or gradient, which this driver checks.

Outputs and gradients are compared with fp64 references on the CPU, loosely (the tests check
accuracy; this catches garbage and NaN). One line per case; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import (  # noqa: E402
    add_layer_norm,
    decode_attention,
    flash_attention,
    gelu,
    layer_norm,
    linear_cross_entropy,
)
from kernels import reference as ref  # noqa: E402
from tests.guard_utils import assert_close_to_ref, guarded, plain  # noqa: E402

LAYOUTS = ("strided", "transposed", "contiguous", "stride0")  # rotated over a guarded case's arguments
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # gradients: twice as much


class Args:
    """Builds a case's tensors: kernel views on ``device`` and fp64 CPU twins, in ``exact`` or guarded
    layouts (the i-th argument of a guarded case gets ``LAYOUTS[i % 4]`` unless told otherwise)."""

    def __init__(self, device, guard: bool, seed: int):
        self.device, self.guard, self.i = device, guard, 0
        self.gen = torch.Generator().manual_seed(seed)
        self.leaves = {}

    def float(self, name, shape, dtype, *, grad=False, scale=1.0, layout=None):
        lay = self._layout(layout)
        src_shape = (1, *shape[1:]) if lay == "stride0" else tuple(shape)
        src = torch.randn(src_shape, generator=self.gen) * scale
        return self._place(name, src.to(dtype), lay, shape, grad)

    def ints(self, values, dtype, *, layout=None):
        lay = self._layout(layout)
        src = torch.tensor(values[:1] if lay == "stride0" else values, dtype=dtype)
        return self._place("", src, lay, (len(values),), False)

    def _layout(self, layout):
        lay = layout or LAYOUTS[self.i % len(LAYOUTS)]
        self.i += 1
        return lay if self.guard else "exact"

    def _place(self, name, src, lay, shape, grad):
        k_src = src.to(self.device, copy=True).requires_grad_(grad)
        r_src = k_src.detach().cpu().double().requires_grad_(grad) if src.is_floating_point() else src
        if grad:
            self.leaves[name] = (k_src, r_src)
        if lay == "exact":
            return k_src, r_src
        return guarded(k_src, lay, dim0=0, size0=shape[0]), plain(r_src, lay, dim0=0, size0=shape[0])


def _compare(outs, refs, douts, a: Args, tol):
    """Outputs within ``tol`` (or only finite where ``refs`` is None), then backward with the upstream
    gradients ``douts`` [(kernel, fp64)], every leaf's gradient within ``2 tol`` (or finite)."""
    for i, (o, r) in enumerate(zip(outs, refs)):
        if r is None:
            assert torch.isfinite(o).all(), f"non-finite output {i}"
        else:
            assert_close_to_ref(o, r, tol, f"output {i}")
    if not a.leaves:
        return
    torch.autograd.backward(list(outs), [d[0] for d in douts])
    if all(r is not None for r in refs):
        torch.autograd.backward(list(refs), [d[1] for d in douts])
    for name, (k_src, r_src) in a.leaves.items():
        if r_src.grad is None:
            assert torch.isfinite(k_src.grad).all(), f"non-finite grad {name}"
        else:
            assert_close_to_ref(k_src.grad, r_src.grad, 2 * tol, f"grad {name}")


def attention(device, guard, dtype, shape, causal, p):
    B, H, Tq, Tk, D = shape
    a = Args(device, guard, seed=Tq)
    q, k, v = (a.float(n, (B, H, t, D), dtype, grad=True) for n, t in (("q", Tq), ("k", Tk), ("v", Tk)))
    do = a.float("do", (B, H, Tq, D), dtype)
    o = flash_attention(q[0], k[0], v[0], causal=causal, dropout_p=p)
    o_ref = ref.attention_ref(q[1], k[1], v[1], causal=causal) if p == 0 else None  # dropout: finite only
    _compare([o], [o_ref], [do], a, TOL[dtype])


def decode(device, guard, dtype, shape, lens, sl_dtype):
    B, H, Tq, Tmax, D = shape
    a = Args(device, guard, seed=Tmax)
    q = a.float("q", (B, H, Tq, D), dtype, layout="transposed")
    caches = []
    for poison, lay in ((float("nan"), "strided"), (float("inf"), "contiguous")):
        src = torch.randn(B, H, Tmax, D, generator=a.gen).to(dtype)
        for b, L in enumerate(lens):
            src[b, :, max(L, 0):] = poison  # an uninitialized cache: never read past the length
        src = src.to(device)
        caches.append(guarded(src, lay) if guard else src)
    seqlens = a.ints(lens, sl_dtype, layout="strided")[0]
    out = decode_attention(q[0], *caches, seqlens)
    rows = []
    for b, L in enumerate(lens):  # fp64, row by row over the clamped valid prefix
        L = min(max(L, 0), Tmax)
        k64, v64 = (c.cpu().double()[b:b + 1, :, :L] for c in caches)
        rows.append(ref.attention_ref(q[1][b:b + 1], k64, v64, causal=True))
    _compare([out], [torch.cat(rows)], [], a, TOL[dtype])


def norm(device, guard, dtype, shape, pdtype, has_w, has_b, fused):
    N = shape[-1]
    a = Args(device, guard, seed=N)
    x = a.float("x", shape, dtype, grad=True)
    r = a.float("residual", shape, dtype, grad=True) if fused else None
    w = a.float("weight", (N,), pdtype, grad=True) if has_w else (None, None)
    b = a.float("bias", (N,), pdtype, grad=True) if has_b else (None, None)
    dys = [a.float(f"d{i}", shape, dtype) for i in range(2 if fused else 1)]
    if fused:
        outs, refs = add_layer_norm(x[0], r[0], w[0], b[0]), ref.add_layer_norm_ref(x[1], r[1], w[1], b[1])
    else:
        outs, refs = [layer_norm(x[0], w[0], b[0])], [ref.layer_norm_ref(x[1], w[1], b[1])]
    _compare(list(outs), list(refs), dys, a, TOL[dtype])


def gelu_op(device, guard, dtype, shape, approximate):
    a = Args(device, guard, seed=shape[0])
    x = a.float("x", shape, dtype, grad=True, scale=3.0)  # both tails
    dy = a.float("dy", shape, dtype)
    _compare([gelu(x[0], approximate)], [ref.gelu_ref(x[1], approximate)], [dy], a, TOL[dtype])


def cross_entropy(device, guard, dtype, lead, V, d, has_bias, reduction):
    a = Args(device, guard, seed=V)
    x = a.float("x", (*lead, d), dtype, grad=True)
    w = a.float("weight", (V, d), dtype, grad=True, scale=0.1)
    b = a.float("bias", (V,), dtype, grad=True) if has_bias else (None, None)
    n = math.prod(lead)
    values = torch.randint(0, V, (n,), generator=a.gen)
    values[::5] = -100  # ignored rows
    values[1] = V - 1  # the last class
    t, t_ref = (tt.view(lead) for tt in a.ints(values.tolist(), torch.int64, layout="strided"))
    loss = linear_cross_entropy(x[0], w[0], t, b[0], reduction=reduction)
    logits = x[1] @ w[1].T + (b[1] if has_bias else 0)  # (..., V) fp64
    loss_ref = F.cross_entropy(logits.reshape(n, V), t_ref.reshape(n), reduction=reduction)  # (ignore: -100)
    loss_ref = loss_ref.reshape(loss.shape)
    if reduction == "none":
        douts = [a.float("dloss", lead, torch.float32)]
    else:
        douts = [(torch.ones((), device=device), torch.ones((), dtype=torch.float64))]
    _compare([loss], [loss_ref], douts, a, TOL[dtype])


bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
CASES = [  # (op, dtype, params...)
    (attention, bf16, (2, 3, 77, 77, 64), True, 0.0),  # (B, H, Tq, Tk, D), causal, dropout_p
    (attention, bf16, (1, 2, 13, 200, 80), True, 0.0),
    (attention, fp32, (2, 1, 33, 33, 24), False, 0.0),
    (attention, fp16, (1, 2, 50, 31, 128), False, 0.0),
    (attention, bf16, (2, 2, 45, 45, 64), True, 0.1),
    (decode, bf16, (3, 4, 1, 300, 64), [5, 300, 1000], torch.int32),  # (B, H, Tq, Tmax, D), lengths
    (decode, fp32, (3, 2, 3, 45, 80), [-1, 2, 44], torch.int64),
    (decode, fp16, (2, 1, 4, 33, 16), [33, 4], torch.int32),
    (norm, fp32, (3, 7, 1000), fp32, True, True, False),  # shape, param dtype, weight, bias, add_layer_norm
    (norm, bf16, (5, 769), bf16, True, False, False),
    (norm, fp16, (2, 3, 33), fp32, False, True, False),
    (norm, bf16, (4, 1001), bf16, True, True, True),
    (norm, fp32, (3, 65), fp32, False, False, True),
    (gelu_op, fp32, (3, 1001), "tanh"),
    (gelu_op, bf16, (7, 33), "none"),
    (gelu_op, fp16, (2049,), "tanh"),
    (cross_entropy, fp32, (37,), 1003, 72, True, "none"),  # leading shape, V, d, bias, reduction
    (cross_entropy, bf16, (2, 19), 517, 64, False, "mean"),
    (cross_entropy, fp16, (21,), 130, 40, True, "sum"),
]


def run(device) -> int:
    """Every case in both layouts on ``device``, one line each; returns the number of failures."""
    failures = 0
    for guard in (False, True):
        for op, *params in CASES:
            label = f"[{'guarded' if guard else 'exact'}] {op.__name__} " + " ".join(
                str(p).replace("torch.", "") for p in params)
            t0 = time.perf_counter()
            try:
                op(device, guard, *params)
                if device.type == "cuda":
                    torch.cuda.synchronize()  # (an asynchronous fault shows up here, in this case)
                status = "ok"
            except Exception as e:  # report every case, fail at the end
                status, failures = f"FAIL {type(e).__name__}: {e}", failures + 1
            print(f"{label}: {status} ({time.perf_counter() - t0:.2f} s)", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args(argv).device)
    mode = "compiled" if device.type == "cuda" else (
        "interpreter" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "fallback")
    print(f"sanitize driver on {device} ({mode}), torch {torch.__version__}", flush=True)
    failures = run(device)
    print(f"sanitize driver: {'all cases ok' if not failures else f'{failures} FAILED'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
