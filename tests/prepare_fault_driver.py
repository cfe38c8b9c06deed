"""Run ``python -m gpt.data prepare``'s ``main`` many times in one process (torch is imported once), on bad
input and under signals, with a watchdog per run: a hang dumps the stacks and exits 3.

    python tests/prepare_fault_driver.py WORKDIR SPEC_JSON

SPEC_JSON: a list of ``{"case": ..., "workers": N, "reps": N, "timeout": S}``. Cases: ``empty`` (an empty
.txt), ``blank`` (whitespace only), ``latin1`` (a non-UTF-8 file after a good one), ``not-json`` (a
truncated JSON line), ``no-field`` (a record without ``text``), and the signals sent while a run is in
progress: ``INT-group`` / ``TERM-group`` (to the whole process group: this process and its workers; run
the driver in a session of its own), ``INT-main`` / ``TERM-main`` (to this process only); a signal case
with ``"early": true`` is sent as soon as the run starts (while the workers are being started), else after
the first shard is written. Every run writes over a previous output with ``--overwrite`` and checks it was
kept. stdout: one JSON line per run; stderr: ``@@run I`` before each run, then whatever the run printed."""

import contextlib
import faulthandler
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from gpt import prepare as P
from gpt.cli.prepare import main as prepare_cli
from gpt.tokenizer import get_tokenizer


def make_src(work: Path, case: str) -> Path:
    src = work / f"src-{case}"
    if src.exists():
        return src
    src.mkdir(parents=True)
    (src / "a.txt").write_text("a good document comes first\n")
    if case == "empty":
        (src / "a.txt").write_text("")
    elif case == "blank":
        (src / "a.txt").write_text(" \n\n\t\n")
    elif case == "latin1":
        (src / "z.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    elif case == "not-json":
        (src / "e.jsonl").write_text('{"text": "fine"}\n{"text": "trunc\n')
    elif case == "no-field":
        (src / "e.jsonl").write_text('{"body": "x"}\n')
    else:  # a signal case: a corpus that takes a while (many shards)
        lines = (f"line {i} of a long corpus, with some words to tokenize {i * 7919 % 1000}" for i in range(60_000))
        (src / "big.txt").write_text("\n".join(lines) + "\n")
    return src


def fresh_tokenizer() -> None:
    """Forget the loaded encoding, as in a new ``python -m gpt.data prepare`` process: the workers then
    spend their first moments loading it (where the old Pool's terminate() raced them)."""
    get_tokenizer.cache_clear()
    if "tiktoken.registry" in sys.modules:
        sys.modules["tiktoken.registry"].ENCODINGS.clear()


def snapshot(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else {}


def signal_when(out: Path, case: str, early: bool, done: threading.Event) -> None:
    sig = signal.SIGINT if case.startswith("INT") else signal.SIGTERM
    staging = out / P.STAGING
    while not done.is_set():
        if staging.is_dir() and (early or any(staging.glob("*.bin"))):
            if case.endswith("group"):
                os.killpg(os.getpgrp(), sig)
            else:
                os.kill(os.getpid(), sig)
            return
        time.sleep(0.001 if early else 0.01)


def main() -> int:
    work, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    old = work / "old-src"
    old.mkdir(parents=True, exist_ok=True)
    (old / "o.txt").write_text("the previous output's corpus\n" * 50)
    previous = work / "previous-output"
    with contextlib.redirect_stdout(io.StringIO()):
        assert prepare_cli(["prepare", str(old), "--out", str(previous), "--val-tokens", "10", "--workers", "1",
                       "--quiet"]) == 0
    late = []
    signal.signal(signal.SIGTERM, lambda *a: late.append("TERM"))  # a signal after a run ended: noted
    run = 0
    for item in spec:
        case, workers, early = item["case"], item["workers"], item.get("early", False)
        src = make_src(work, case)
        for _ in range(item.get("reps", 1)):
            run += 1
            out = work / f"out-{run}"
            shutil.copytree(previous, out)
            before = snapshot(out)
            os.write(2, f"@@run {run}\n".encode())
            done = threading.Event()
            thread = None
            if "-" in case:
                thread = threading.Thread(target=signal_when, args=(out, case, early, done), daemon=True)
                thread.start()
            fresh_tokenizer()
            faulthandler.dump_traceback_later(item.get("timeout", 120), exit=True)  # a hang: stacks, exit 1
            t0 = time.perf_counter()
            try:
                rc = prepare_cli(["prepare", str(src), "--out", str(out), "--overwrite", "--quiet", "--workers",
                             str(workers), "--val-tokens", "10", "--shard-tokens", "2000"])
            except KeyboardInterrupt:  # Ctrl-C outside main's try: a failure of the test, reported
                rc = "KeyboardInterrupt escaped"
            seconds = time.perf_counter() - t0
            faulthandler.cancel_dump_traceback_later()
            done.set()
            if thread:
                thread.join()
            import multiprocessing

            print(json.dumps({"run": run, "case": case, "workers": workers, "early": early, "rc": rc,
                              "seconds": round(seconds, 3), "kept": snapshot(out) == before,
                              "staging": (out / P.STAGING).exists(),
                              "children": len(multiprocessing.active_children()), "late": late[:]}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
