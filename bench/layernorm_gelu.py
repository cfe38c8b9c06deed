"""Benchmark LayerNorm, residual-add + LayerNorm and GELU: forward, backward, forward+backward.

    python -m bench.layernorm_gelu            # GPT-2 widths + large widths, fp32 and bf16 (CUDA)
    python -m bench.layernorm_gelu --quick    # widths 768 and 1600, bf16 only

Providers: ours (this repo's Triton kernels), ``torch`` (F.layer_norm / F.gelu, the unfused add for
add_layer_norm), ``compiled`` (torch.compile of the pure-PyTorch reference in kernels/reference.py),
``book`` (the book's from-scratch LayerNorm with ``scale``/``shift`` and its tanh GELU, cast to the
benchmark dtype) and ``liger`` (Liger-Kernel's Triton LayerNorm, when ``liger_kernel`` is importable on
a CUDA machine; optional). GB/s counts the bytes each pass must move at least (reads + writes of every tensor it
touches, each once); ``%copy`` is that over the device-to-device copy bandwidth measured in the same
run, the ceiling for these memory-bound ops. GELU is benchmarked at the MLP's hidden width (4x).
Timing: ``triton.testing.do_bench`` medians (L2 flushed before every run, warm-up excluded).
On CPU the run is only a smoke test (tiny shapes; ours is the Triton interpreter or the PyTorch
fallback; no torch.compile), and nothing is saved. ``run()`` returns the rows for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import (
    bench,
    cli_finish,
    cli_start,
    make_row,
    measure_ceilings,
    ratio,
)
from kernels import add_layer_norm, gelu, layer_norm
from kernels.reference import add_layer_norm_ref, gelu_ref, layer_norm_ref

try:  # the book's modules, when the package's reference model is importable
    from gpt.reference import GELU as BookGELU
    from gpt.reference import LayerNorm as BookLayerNorm
except ImportError:  # pragma: no cover - bench/ used on its own

    class BookLayerNorm(nn.Module):
        def __init__(self, emb_dim):
            super().__init__()
            self.eps = 1e-5
            self.scale = nn.Parameter(torch.ones(emb_dim))
            self.shift = nn.Parameter(torch.zeros(emb_dim))

        def forward(self, x):
            mean = x.mean(dim=-1, keepdim=True)
            var = x.var(dim=-1, keepdim=True, unbiased=False)
            return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift

    class BookGELU(nn.Module):
        def forward(self, x):
            return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPT2_WIDTHS = [768, 1024, 1280, 1600]
LARGE_WIDTHS = [4096, 8192, 16384]
PASSES = ["fwd", "bwd", "fwd+bwd"]


def _bytes(op: str, rows: int, width: int, elem: int, param_elem: int) -> dict[str, int]:
    """Minimal bytes moved per pass (reads + writes)."""
    n = rows * width
    if op == "gelu":
        fwd, bwd = 2 * n * elem, 3 * n * elem  # x -> y ; x, dy -> dx
    elif op == "layer_norm":
        # x -> y (+ w, b, mean, rstd) ; x, dy (+ w, mean, rstd) -> dx (+ dw, db)
        fwd = 2 * n * elem + 2 * width * param_elem + 8 * rows
        bwd = 3 * n * elem + 3 * width * param_elem + 8 * rows
    else:  # add_layer_norm: x, r -> y, s ; s, dy, ds -> d(x + r) (one tensor, the same grad for both)
        fwd = 4 * n * elem + 2 * width * param_elem + 8 * rows
        bwd = 4 * n * elem + 3 * width * param_elem + 8 * rows
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _providers(op: str, width: int, dtype: torch.dtype, device: str, use_compile: bool):
    """name -> (fn(inputs) -> output tensor or tuple). Parameters are fp32 for ours/torch/compiled
    (mixed-precision training keeps fp32 master weights); the book modules are cast to ``dtype``."""
    provs = {}
    if op == "layer_norm":
        provs["triton"] = lambda x, w, b: layer_norm(x, w, b)
        provs["torch"] = lambda x, w, b: F.layer_norm(x, (width,), w.to(x.dtype), b.to(x.dtype))
        if use_compile:
            provs["compiled"] = torch.compile(layer_norm_ref, dynamic=False)
        book = BookLayerNorm(width).to(device=device, dtype=dtype)
        provs["book"] = lambda x, w, b: book(x)
        liger = _liger_layer_norm() if device == "cuda" else None
        if liger is not None:
            provs["liger"] = lambda x, w, b: liger(x, w.to(x.dtype), b.to(x.dtype), 1e-5)
    elif op == "add_layer_norm":
        provs["triton"] = lambda x, r, w, b: add_layer_norm(x, r, w, b)

        def torch_add_ln(x, r, w, b):
            s = x + r
            return F.layer_norm(s, (width,), w.to(s.dtype), b.to(s.dtype)), s

        provs["torch"] = torch_add_ln
        if use_compile:
            provs["compiled"] = torch.compile(add_layer_norm_ref, dynamic=False)
        book = BookLayerNorm(width).to(device=device, dtype=dtype)

        def book_add_ln(x, r, w, b):
            s = x + r
            return book(s), s

        provs["book"] = book_add_ln
    else:
        provs["triton"] = lambda x: gelu(x, "tanh")
        provs["torch"] = lambda x: F.gelu(x, approximate="tanh")
        if use_compile:
            provs["compiled"] = torch.compile(gelu_ref, dynamic=False)
        book_gelu = BookGELU()
        provs["book"] = lambda x: book_gelu(x)
    return provs


def _liger_layer_norm():
    """Liger-Kernel's LayerNorm autograd function (X, W, B, eps), or None when not installed."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except Exception:  # noqa: BLE001 - optional baseline; any import problem means "not available"
        return None
    return LigerLayerNormFunction.apply


def _inputs(op: str, rows: int, width: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, width, device=device, dtype=dtype, generator=g).requires_grad_(True)
    if op == "gelu":
        return (x,)
    w = torch.randn(width, device=device, generator=g).requires_grad_(True)
    b = torch.randn(width, device=device, generator=g).requires_grad_(True)
    if op == "layer_norm":
        return (x, w, b)
    r = torch.randn(rows, width, device=device, dtype=dtype, generator=g).requires_grad_(True)
    return (x, r, w, b)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _time_passes(fn, inputs, warmup, rep) -> dict[str, dict]:
    outs = _as_tuple(fn(*inputs))
    grads_out = [torch.randn_like(o) for o in outs]
    # The book's bf16 modules have no grad for the fp32 w/b it ignores: differentiate what was used.
    used = [t for t in inputs if t.requires_grad]

    def fwd():
        return fn(*inputs)

    def bwd():
        torch.autograd.grad(outs, used, grads_out, retain_graph=True, allow_unused=True)

    def fwd_bwd():
        o = _as_tuple(fn(*inputs))
        torch.autograd.grad(o, used, grads_out, allow_unused=True)

    return {p: bench(f, warmup=warmup, rep=rep) for p, f in
            (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd))}


def _check(op, provs, inputs):
    """Sanity check before timing: ours matches torch's outputs (a fast wrong kernel is no result)."""
    with torch.no_grad():
        a = _as_tuple(provs["triton"](*inputs))
        e = _as_tuple(provs["torch"](*inputs))
    for t, u in zip(a, e):
        tol = 1e-4 if t.dtype == torch.float32 else 5e-2
        if not torch.allclose(t.float(), u.float(), atol=tol, rtol=tol):
            print(f"WARNING: {op} triton output differs from torch (max abs diff "
                  f"{(t.float() - u.float()).abs().max().item():.3g})", file=sys.stderr)


def run(quick: bool = False, *, device: str | None = None, ceilings: dict | None = None,
        use_compile: bool | None = None, rows: int | None = None, widths: list[int] | None = None,
        dtypes: list[str] | None = None, ops: list[str] | None = None) -> list[dict]:
    """Benchmark every (op, dtype, width, pass); return rows in the ``bench.common.make_row`` format.

    CUDA: rows 8*1024, GPT-2 widths (+ 4k..16k unless ``quick``), fp32 and bf16 (bf16 only when quick).
    CPU: a smoke run (64 rows, widths 64 and 96, fp32, no torch.compile).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    ops = ops or ["layer_norm", "add_layer_norm", "gelu"]
    if cuda:
        rows = rows or 8 * 1024
        widths = widths or ([768, 1600] if quick else GPT2_WIDTHS + LARGE_WIDTHS)
        dtypes = dtypes or (["bf16"] if quick else ["fp32", "bf16"])
        warmup, rep = 25, 100
    else:
        rows = rows or 64
        widths = widths or [64, 96]
        dtypes = dtypes or ["fp32"]
        warmup, rep = 2, 5
    use_compile = cuda if use_compile is None else use_compile
    if use_compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    ceilings = ceilings or measure_ceilings(device, quick=quick)
    copy_gbs = ceilings["copy_gbs"]

    results = []
    for op in ops:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for width in widths:
                w_eff = 4 * width if op == "gelu" else width  # GELU runs on the MLP hidden layer
                inputs = _inputs(op, rows, w_eff, dtype, device)
                provs = _providers(op, w_eff, dtype, device, use_compile)
                _check(op, provs, inputs)
                nbytes = _bytes(op, rows, w_eff, dtype.itemsize, 4)
                times = {name: _time_passes(fn, inputs, warmup, rep) for name, fn in provs.items()}
                for p in PASSES:
                    t = times["triton"][p]
                    ms = t["median_ms"]
                    base = {name: times[name][p]["median_ms"] for name in provs if name != "triton"}
                    speed = {name: ratio(ms, v) for name, v in base.items()}
                    gbs = nbytes[p] / (ms * 1e-3) / 1e9
                    results.append(make_row(
                        group="kernels", bench="layernorm_gelu", name=f"{op} {p}",
                        shape=f"{rows}x{w_eff}", dtype=dname, unit="ms", ours=ms,
                        ours_p20=t["p20_ms"], ours_p80=t["p80_ms"], baselines=base, speedup=speed,
                        metric="GB/s", achieved=gbs, ceiling=copy_gbs,
                        params={"op": op, "pass": p, "rows": rows, "width": w_eff, "bytes": nbytes[p],
                                "torch_gbs": nbytes[p] / (base["torch"] * 1e-3) / 1e9},
                        notes="" if use_compile else "no torch.compile baseline"))
                del inputs, provs
                if cuda:
                    torch.cuda.empty_cache()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="widths 768 and 1600, bf16 only")
    parser.add_argument("--rows", type=int, default=None, help="rows (batch * tokens); default 8*1024")
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--ops", nargs="+", choices=["layer_norm", "add_layer_norm", "gelu"],
                        default=["layer_norm", "add_layer_norm", "gelu"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = parser.parse_args(argv)

    device, ceilings, env = cli_start(args.quick, "a CPU smoke test with tiny shapes; ours runs the Triton "
                                      "interpreter (TRITON_INTERPRET=1) or the PyTorch fallback. Timings mean nothing "
                                      "for the GPU targets.")
    results = run(args.quick, device=device, ceilings=ceilings,
                  use_compile=False if args.no_compile else None, rows=args.rows, widths=args.widths,
                  dtypes=args.dtypes, ops=args.ops)
    return cli_finish("layernorm_gelu", results, device=device, env=env, ceilings=ceilings, save=not args.no_save,
                      legend="vs X: speed-up of ours over provider X for the same pass (> 1 is faster); % ceiling "
                      "is ours' GB/s over the measured copy bandwidth.")


if __name__ == "__main__":
    raise SystemExit(main())
