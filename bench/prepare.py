"""Corpus preparation throughput: ``python -m gpt.data prepare`` vs a plain single-process tiktoken loop.

    python -m bench.prepare [--quick] [--mb 32] [--workers 1,2,4]
    python -m bench --only prepare

A CPU benchmark (real numbers on any machine, GPU or not). The corpus is a ``.jsonl`` of the Python
documentation topics that ship with CPython (``gpt.data.default_corpus``, one topic per record),
repeated to the wanted size and written to a temporary folder; the page cache is warmed by reading it
once. Baseline ("tiktoken loop"): read each line, ``json.loads``, ``tiktoken``'s ``encode_ordinary``,
``<|endoftext|>`` before each document, one ``.bin`` written at the end — the loop a script would
write. Ours: the whole ``prepare`` (reading, ``--workers`` tokenizer processes, shard writing, with
process start-up) for each worker count. Rows report tokens/s (and MB/s of input text) for all
workers and per worker, and the CPU time spent (this process and its workers): tokens per CPU-second is
the cost measure that holds on a busy machine. The streams are checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import make_row


def write_corpus(folder: Path, mb: float) -> tuple[Path, int]:
    from gpt.data import default_corpus

    topics = default_corpus().split("<|endoftext|>")
    lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in topics if t.strip()]
    path, size = folder / "corpus.jsonl", 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            for line in lines:
                f.write(line)
                size += len(line.encode("utf-8"))
    return path, size


def tiktoken_loop(path: Path, out: Path) -> np.ndarray:
    """The plain single-process baseline."""
    from gpt.tokenizer import EOT_ID, get_tokenizer

    enc = get_tokenizer()
    tokens: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens.append(EOT_ID)
            tokens.extend(enc.encode_ordinary(json.loads(line)["text"]))
    arr = np.asarray(tokens, dtype=np.uint16)
    arr.tofile(out)
    return arr


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool workers): load-independent cost."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(quick: bool = False, *, mb: float | None = None, workers: list[int] | None = None, **_) -> list[dict]:
    from gpt.data import read_shard
    from gpt.prepare import prepare

    ncpu = os.cpu_count() or 1
    mb = mb or (2.0 if quick else 32.0)
    workers = workers or sorted({1, 2, ncpu} if quick else {1, 2, 4, 8, 16, ncpu} & set(range(1, ncpu + 1)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path, size = write_corpus(tmp, mb)
        path.read_bytes()  # warm the page cache
        from gpt.tokenizer import get_tokenizer

        get_tokenizer()  # loaded once, as prepare's worker initializer does before timing matters
        t0, c0 = time.perf_counter(), cpu_seconds()
        base = tiktoken_loop(path, tmp / "loop.bin")
        base_s, base_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        base_tps = base.size / base_s
        for w in workers:
            out = tmp / f"out{w}"
            t0, c0 = time.perf_counter(), cpu_seconds()
            m = prepare([path], out, val_tokens=0, shard_tokens=1 << 30, workers=w, progress=False)
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            stream = np.concatenate([np.asarray(read_shard(out / n)) for n in m["train_shards"]])
            if not np.array_equal(stream, base):
                raise AssertionError(f"prepare --workers {w} and the tiktoken loop disagree")
            tps, mbs = base.size / seconds, size / 1e6 / seconds
            shape = f"{size / 1e6:.0f} MB, {base.size / 1e6:.2f}M tokens"
            for name, div in ((f"prepare --workers {w}", 1), (f"prepare --workers {w}, per worker", w)):
                rows.append(make_row(
                    group="data", bench="prepare", name=name, shape=shape, dtype="text", unit="tokens/s",
                    ours=tps / div, baselines={"tiktoken loop": base_tps},
                    speedup={"tiktoken loop": tps / div / base_tps}, metric="MB/s", achieved=mbs / div,
                    params={"workers": w, "per_worker": div > 1, "mb": size / 1e6, "tokens": int(base.size),
                            "baseline_mbs": size / 1e6 / base_s, "cpus": ncpu,
                            "tokens_per_cpu_s": base.size / cpu, "baseline_tokens_per_cpu_s": base.size / base_cpu},
                ))
    return rows


def main(argv=None) -> int:
    from bench.common import format_table
    from bench.report import flatten

    p = argparse.ArgumentParser(prog="python -m bench.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 MB corpus, fewer worker counts")
    p.add_argument("--mb", type=float, default=None, help="corpus size in MB (default 32; quick 2)")
    p.add_argument("--workers", default=None, help="comma list of worker counts (default 1,2,4,... up to the CPUs)")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else None
    rows = run(args.quick, mb=args.mb, workers=workers)
    print(f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}); baseline (tiktoken loop) "
          f"{rows[0]['params']['baseline_mbs']:.2f} MB/s, "
          f"{rows[0]['params']['baseline_tokens_per_cpu_s']:,.0f} tokens per CPU-second")
    print(format_table(*reversed(flatten(rows))))
    for r in rows[::2]:
        print(f"{r['name']}: {r['params']['tokens_per_cpu_s']:,.0f} tokens per CPU-second (all processes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
