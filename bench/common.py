"""Shared benchmark helpers: honest timing, device ceilings, environment record, tables.

Timing follows gpt-fast / triton.testing: warm-up (autotune, compilation) excluded, CUDA events,
median with p20/p80 over many repetitions. ``triton.testing.do_bench`` clears the L2 cache (it writes a
256 MB buffer) before every timed run, so each run reads its inputs cold from HBM even when they would
fit in L2; inputs therefore need no rotation for the kernel benchmarks. Inputs are random (``randn``),
never zeros. The model-level benchmarks (``time_calls``) time whole steps with a device sync per call
and rotate their random batches.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def env_info(device: torch.device | str | None = None) -> dict:
    """Device name, driver and library versions, date: recorded next to every result."""
    import triton

    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(device=props.name, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - best effort
            info["driver"] = "unknown"
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})",
                    threads=torch.get_num_threads())
    return info


def bench(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> dict:
    """Time ``fn`` and return ``{"median_ms", "p20_ms", "p80_ms"}``.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flush between runs). CPU: wall clock with
    warm-up, for the small fallback benchmarks.
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}
    for _ in range(max(3, warmup // 10)):
        fn()
    times = []
    deadline = time.perf_counter() + rep / 1000 * 5
    while len(times) < 10 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def _quantiles(times: Sequence[float]) -> dict:
    times = sorted(times)

    def q(p):
        return times[min(len(times) - 1, int(p * len(times)))]

    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def time_calls(fns: Callable[[], object] | Sequence[Callable[[], object]], *, warmup: int = 3,
               iters: int = 10, device: torch.device | str = "cuda") -> dict:
    """Time whole calls (a training step, a generation) one by one, syncing the device around each.

    ``fns`` is one callable or several (e.g. the same step on different random batches), used in
    rotation. ``warmup`` calls (compilation, autotuning, allocator growth) are excluded. Returns
    ``{"median_ms", "p20_ms", "p80_ms", "n"}``. For calls of milliseconds and more, where the sync
    costs nothing measurable; kernels go through :func:`bench`.
    """
    fns = [fns] if callable(fns) else list(fns)
    cuda = torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for i in range(warmup):
        fns[i % len(fns)]()
    sync()
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {**_quantiles(times), "n": len(times)}


def copy_bandwidth_gbs(nbytes: int = 1 << 30, device: str = "cuda") -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time), the memory ceiling."""
    n = nbytes // 4
    src = torch.randn(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))["median_ms"]
    return 2 * n * 4 / (t * 1e-3) / 1e9


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> float:
    """Measured dense matmul throughput, the compute ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = bench(lambda: a @ b)["median_ms"]
    return 2 * n**3 / (t * 1e-3) / 1e12


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows as a Markdown table; floats get 3 significant digits, ``None`` is shown as ``-``."""
    if not rows:
        return ""
    columns = columns or list(rows[0].keys())

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != v:  # nan
                return "-"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}" if abs(v) < 1e5 else f"{v:.3g}"
        return str(v)

    body = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(b, widths)) + " |" for b in body]
    return "\n".join(lines)


def print_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Print (and return) rows as a Markdown table (see :func:`format_table`)."""
    text = format_table(rows, columns)
    if text:
        print(text)
    return text


def save_results(name: str, payload: dict) -> Path:
    """Write ``bench/results/<date>-<name>-<device>.json`` and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    dev = str(payload.get("env", {}).get("device", "unknown")).replace(" ", "_").replace("/", "_")
    path = RESULTS_DIR / f"{_dt.date.today().isoformat()}-{name}-{dev}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def measure_ceilings(device: torch.device | str = "cuda", *, quick: bool = False) -> dict:
    """The device's measured ceilings, in this run: copy bandwidth (GB/s) and bf16 matmul (TFLOP/s)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return {"copy_gbs": copy_bandwidth_gbs(device="cuda"),
                "matmul_tflops": matmul_tflops(n=4096 if quick else 8192, device="cuda")}
    # CPU: small sizes (the smoke runs), fp32 matmul (bf16 GEMM on CPU is not representative).
    return {"copy_gbs": copy_bandwidth_gbs(nbytes=1 << 26, device="cpu"),
            "matmul_tflops": matmul_tflops(n=1024, dtype=torch.float32, device="cpu")}


def cli_start(quick: bool, cpu_note: str, device: torch.device | str | None = None) -> tuple[str, dict, dict]:
    """A standalone benchmark's start: the device (CUDA when available), on CPU a NOTE that the numbers are
    a smoke test, the ceilings measured in this run and the environment line. ``(device, ceilings, env)``."""
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.device(device).type != "cuda":
        print(f"NOTE: no CUDA device: {cpu_note}\n")
    ceilings = measure_ceilings(device, quick=quick)
    env = env_info(device)
    line = " | ".join(f"{k} {v:.1f} {u}" for k, u in (("copy", "GB/s"), ("matmul", "TFLOP/s"))
                      for v in [ceilings.get(f"{k}_gbs" if k == "copy" else f"{k}_tflops")] if v is not None)
    print(f"device: {env.get('device')} | torch {env['torch']} | triton {env['triton']} | {line}\n")
    return device, ceilings, env


def cli_finish(name: str, rows: list[dict], *, device: str, env: dict, ceilings: dict, legend: str = "",
               save: bool = True) -> int:
    """A standalone benchmark's end: the rows as a table, the legend, and on CUDA (unless ``save`` is off)
    ``bench/results/<date>-<name>-<device>.json``. Returns the exit code 0."""
    from bench.report import print_rows  # report draws plots: imported only when a table is printed

    print_rows(rows)
    if legend:
        print("\n" + legend)
    if torch.device(device).type == "cuda" and save:
        print(f"saved {save_results(name, {'env': env, 'ceilings': ceilings, 'rows': rows})}")
    return 0


def device_slug(env: dict) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``; CPU runs are ``cpu-<arch>``."""
    name = str(env.get("device", "unknown"))
    if name.startswith("cpu"):
        name = "cpu-" + (platform.machine() or "unknown")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def make_row(*, group: str, bench: str, name: str, shape: str, dtype: str, unit: str,
             ours: float, baselines: dict[str, float | None], speedup: dict[str, float | None],
             metric: str | None = None, achieved: float | None = None, ceiling: float | None = None,
             ours_p20: float | None = None, ours_p80: float | None = None, params: dict | None = None,
             notes: str = "", **extra) -> dict:
    """One result row, the format every benchmark returns and the suite writes.

    ``ours`` and every ``baselines`` value are in ``unit`` (``ms``/``us``: lower is better;
    ``tokens/s``: higher is better); a baseline that was skipped is ``None`` and says why in
    ``notes``. ``speedup[k] > 1`` means ours is faster than baseline ``k``. ``achieved`` is ours in
    ``metric`` (TFLOP/s or GB/s), ``frac_ceiling`` is that over the device ceiling measured in the same
    run (``ceiling``). ``params`` holds the numbers the plots use (T, width, batch, ...).
    """
    frac = achieved / ceiling if achieved is not None and ceiling else None
    return {"group": group, "bench": bench, "name": name, "shape": shape, "dtype": dtype, "unit": unit,
            "ours": ours, "ours_p20": ours_p20, "ours_p80": ours_p80, "baselines": baselines,
            "speedup": speedup, "metric": metric, "achieved": achieved, "ceiling": ceiling,
            "frac_ceiling": frac, "params": params or {}, "notes": notes, **extra}


def ratio(ours: float | None, base: float | None, *, higher_is_better: bool = False) -> float | None:
    """Speed-up of ours over a baseline (> 1: ours is faster), or None when either is missing."""
    if ours is None or base is None or ours <= 0 or base <= 0:
        return None
    return ours / base if higher_is_better else base / ours
