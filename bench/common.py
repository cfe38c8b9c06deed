"""Shared benchmark helpers: honest timing, device ceilings, environment record, tables.

Timing follows gpt-fast / triton.testing: warm-up (autotune, compilation) excluded, CUDA events,
median with p20/p80 over many repetitions, L2 flushed between runs by ``do_bench``.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Callable
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
    import time

    for _ in range(max(1, warmup // 10)):
        fn()
    times = []
    deadline = time.perf_counter() + rep / 1000 * 5
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()

    def q(p):
        return times[min(len(times) - 1, int(p * len(times)))]

    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}


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


def print_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Print (and return) rows as a Markdown table; floats get 3 significant decimals."""
    if not rows:
        return ""
    columns = columns or list(rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    body = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(b, widths)) + " |" for b in body]
    text = "\n".join(lines)
    print(text)
    return text


def save_results(name: str, payload: dict) -> Path:
    """Write ``bench/results/<date>-<name>-<device>.json`` and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    dev = str(payload.get("env", {}).get("device", "unknown")).replace(" ", "_").replace("/", "_")
    path = RESULTS_DIR / f"{_dt.date.today().isoformat()}-{name}-{dev}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
