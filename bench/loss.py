"""Benchmark the fused linear + cross-entropy head: time and peak memory, and the GPT-2 training step.

    python -m bench.loss            # CUDA: d 768-1600 x N 4k-32k, V = 50,257, bf16; training step
    python -m bench.loss --quick    # d 768 and 1600, N 8k; training step at fewer batch sizes

Head + loss (bench ``loss`` in ms, ``loss_memory`` in MiB), forward+backward (gradients of x and W)
and forward alone, of ``kernels.linear_cross_entropy`` vs ``cross_entropy(linear(x, W).float(), t)``
eager (``torch``), its ``torch.compile`` (``compiled``) and Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss`` (``liger``, when ``liger_kernel`` is importable on CUDA). TFLOP/s
counts the useful GEMMs (2·N·V·d forward, 3× that for forward+backward). Peak memory is
``torch.cuda.max_memory_allocated`` during one call above what was allocated before it (inputs and
weights excluded, gradients included); in ``loss_memory`` the "speed-up" columns are memory reductions
(baseline peak / ours).

Training (bench ``loss_train``, tokens/s): one optimizer step of GPT-2 124M at T=1024, bf16 autocast, with
the fused loss (``model.loss``) vs the logits path (``cross_entropy(model(x))``), each at the largest
batch that fits (searched by doubling, then the same batch for both) — the fused loss's point is the
bigger batch. On CPU the run is a smoke test (tiny shapes, the fallback or the interpreter; no compile,
no Liger, no memory numbers). ``run()`` / ``run_train()`` return rows for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bench.common import bench, env_info, make_row, measure_ceilings, ratio, save_results, time_calls
from kernels import linear_cross_entropy

V_GPT2 = 50257
WIDTHS = [768, 1024, 1280, 1600]
ROWS = [4096, 8192, 16384, 32768]


def _liger():
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss(w, x, t)


def _providers(use_compile: bool) -> dict:
    def plain(x, w, t):
        return F.cross_entropy(F.linear(x, w).float(), t)

    provs = {"ours": lambda x, w, t: linear_cross_entropy(x, w, t), "torch": plain}
    if use_compile:
        provs["compiled"] = torch.compile(plain)
    liger = _liger()
    if liger is not None:
        provs["liger"] = liger
    return provs


def _peak_mib(fn, cuda: bool) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _check(provs, x, w, t):
    """Every provider computes the same loss (catches a broken baseline before timing it)."""
    want = provs["torch"](x, w, t).float()
    for name, fn in provs.items():
        got = fn(x, w, t).float()
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
            raise AssertionError(f"{name}: loss {got.item():.5f} != torch {want.item():.5f}")


def _measure(provs, N, d, V, dtype, device, warmup, rep):
    """({provider: {pass: timing}}, {provider: peak MiB}, {provider: error}) for one shape."""
    cuda = device == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, d, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(V, d, device=device, dtype=dtype, generator=g) * d**-0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=device, generator=g)
    _check(provs, x, w, t)
    times, peaks, errors = {}, {}, {}
    for name, fn in provs.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(x, w, t)

        def fwd_bwd(fn=fn):
            x.grad = w.grad = None
            fn(x, w, t).backward()

        try:
            times[name] = {"fwd": bench(fwd, warmup=warmup, rep=rep), "fwd+bwd": bench(fwd_bwd, warmup=warmup, rep=rep)}
            peaks[name] = _peak_mib(fwd_bwd, cuda)
        except Exception as e:  # noqa: BLE001 - e.g. a baseline out of memory at N=32k: report, go on
            if name == "ours":
                raise
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"
        x.grad = w.grad = None
        if cuda:
            torch.cuda.empty_cache()
    return times, peaks, errors


def run(quick: bool = False, *, device: str | None = None, ceilings: dict | None = None,
        use_compile: bool | None = None) -> list[dict]:
    """Head + loss rows: fwd and fwd+bwd time (bench ``loss``) and fwd+bwd peak memory (``loss_memory``)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if cuda:
        shapes = [(8192, d) for d in (768, 1600)] if quick else [(n, d) for d in WIDTHS for n in ROWS]
        V, dtype, dname, warmup, rep = V_GPT2, torch.bfloat16, "bf16", 10, 50
    else:
        shapes, V, dtype, dname, warmup, rep = [(64, 32)], 1000, torch.float32, "fp32", 1, 3
    use_compile = cuda if use_compile is None else use_compile
    ceilings = ceilings or measure_ceilings(device, quick=quick)
    provs = _providers(use_compile)
    rows = []
    for N, d in shapes:
        times, peaks, errors = _measure(provs, N, d, V, dtype, device, warmup, rep)
        notes = "; ".join(f"{k}: {v}" for k, v in errors.items())
        shape = f"N={N} d={d} V={V}"
        params = {"N": N, "d": d, "V": V, "peak_mib": peaks}
        for p, flops in (("fwd", 2.0 * N * V * d), ("fwd+bwd", 6.0 * N * V * d)):
            ms = times["ours"][p]["median_ms"]
            base = {k: times[k][p]["median_ms"] if k in times else None for k in provs if k != "ours"}
            tflops = flops / (ms * 1e-3) / 1e12
            rows.append(make_row(
                group="kernels", bench="loss", name=f"linear+cross_entropy {p}", shape=shape, dtype=dname,
                unit="ms", ours=ms, ours_p20=times["ours"][p]["p20_ms"], ours_p80=times["ours"][p]["p80_ms"],
                baselines=base, speedup={k: ratio(ms, v) for k, v in base.items()}, metric="TFLOP/s",
                achieved=tflops, ceiling=ceilings["matmul_tflops"], params={**params, "pass": p}, notes=notes))
        if cuda:
            base = {k: peaks.get(k) for k in provs if k != "ours"}
            rows.append(make_row(
                group="kernels", bench="loss_memory", name="linear+cross_entropy fwd+bwd peak", shape=shape,
                dtype=dname, unit="MiB", ours=peaks["ours"], baselines=base,
                speedup={k: ratio(peaks["ours"], v) for k, v in base.items()}, params={**params, "pass": "fwd+bwd"},
                notes=notes))
    return rows


# ---------------------------------------------------------------------------------------------------
# GPT-2 124M training step with and without the fused loss
# ---------------------------------------------------------------------------------------------------

def _train_step_fn(model, opt, B, T, device, fused: bool):
    g = torch.Generator(device=device).manual_seed(B)
    data = torch.randint(0, model.cfg.vocab_size, (B, T + 1), device=device, generator=g)
    x, y = data[:, :-1], data[:, 1:]
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            if fused:
                loss = model.loss(x, y)
            else:
                loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _fits(model, opt, B, T, device, fused) -> bool:
    try:
        _train_step_fn(model, opt, B, T, device, fused)()
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def _largest_batch(model, opt, T, device, fused, start: int = 8, limit: int = 256) -> int:
    """Largest batch (doubling from ``start``, then halving the step) whose step fits in memory."""
    lo, hi = 0, start
    while hi <= limit and _fits(model, opt, hi, T, device, fused):
        lo, hi = hi, hi * 2
    step = max(1, (hi - lo) // 2)
    while step >= max(1, start // 2) and lo + step < hi:
        if _fits(model, opt, lo + step, T, device, fused):
            lo += step
        step //= 2
    return lo


def run_train(quick: bool = False, *, device=None, ceilings: dict | None = None) -> list[dict]:
    """Rows of bench ``loss_train``: tokens/s with the fused loss vs the logits path, each at its largest
    batch and both at the logits path's largest batch."""
    from gpt.config import GPTConfig
    from gpt.model import GPTModel

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    cfg = GPTConfig.from_preset("gpt2-small" if cuda else "tiny", drop_rate=0.0)
    T = cfg.context_length if cuda else 32
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    warmup, iters = (3, 5 if quick else 10) if cuda else (1, 2)
    if cuda:
        best = {fused: _largest_batch(model, opt, T, device, fused) for fused in (True, False)}
    else:
        best = {True: 2, False: 2}
    results = {}
    for fused in (True, False):
        for B in sorted({best[fused], best[False]}):
            if B == 0:
                continue
            t = time_calls(_train_step_fn(model, opt, B, T, device, fused), warmup=warmup, iters=iters, device=device)
            results[(fused, B)] = B * T / (t["median_ms"] * 1e-3)
            if cuda:
                torch.cuda.empty_cache()
    rows = []
    shape = f"{'gpt2-small' if cuda else 'tiny'} T={T}"
    for label, B_ours, B_base in (("at each one's largest batch", best[True], best[False]),
                                  ("same batch", best[False], best[False])):
        ours, base = results.get((True, B_ours)), results.get((False, B_base))
        if ours is None or (label == "same batch" and B_ours == best[True]):
            continue  # (the first row already is at the same batch)
        rows.append(make_row(
            group="train", bench="loss_train", name=f"train step, fused loss ({label})",
            shape=f"{shape} B={B_ours} vs {B_base}", dtype="bf16 autocast" if cuda else "fp32", unit="tokens/s",
            ours=ours, baselines={"logits path": base}, speedup={"logits path": ratio(ours, base, higher_is_better=True)},
            params={"T": T, "B_fused": best[True], "B_logits": best[False], "largest_batch_searched": cuda},
            notes="" if cuda else "CPU smoke run: batch 2, no batch search"))
    return rows


def main(argv=None) -> int:
    from bench.report import print_rows

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-train", action="store_true", help="only the head + loss rows")
    args = p.parse_args(argv)
    rows = run(args.quick, use_compile=False if args.no_compile else None)
    if not args.no_train:
        rows += run_train(args.quick)
    print_rows(rows)
    if torch.cuda.is_available():
        print(save_results("loss", {"env": env_info(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
