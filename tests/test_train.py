"""train.py: the main job's smoke run, the run folder, and clean exits on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_main_job_smoke(tmp_path):
    out = tmp_path / "run"
    r = run_train("--steps", 4, "--batch-size", 2, "--eval-every", 2, "--eval-batches", 1, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "embedded corpus" in r.stdout and "sample:" in r.stdout and "val loss" in r.stdout
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "ckpt-last.pt", "ckpt-best.pt"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"train_loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert "val_loss" in rows[1] and "val_loss" in rows[3] and "val_loss" not in rows[0]
    ckpt = torch.load(out / "ckpt-last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["n_layers"] == 4


def test_loss_decreases_on_the_verdict(tmp_path, shared_data):
    out = tmp_path / "verdict"
    r = run_train("--data", shared_data / "the-verdict.txt", "--steps", 12, "--batch-size", 4, "--lr", 2e-3,
                  "--warmup", 2, "--eval-every", 100, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0


@pytest.mark.parametrize("case", ["missing", "empty", "short", "preset", "corrupt-init"])
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    args = ["--steps", 1, "--out", tmp_path / "out"]
    if case == "missing":
        args += ["--data", tmp_path / "nope.txt"]
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        args += ["--data", tmp_path / "empty.txt"]
    elif case == "short":
        (tmp_path / "short.txt").write_text("far too short for one context window")
        args += ["--data", tmp_path / "short.txt"]
    elif case == "preset":
        args += ["--preset", "gpt-9"]
    else:
        (tmp_path / "bad.pt").write_bytes(b"garbage" * 100)
        args += ["--init", tmp_path / "bad.pt"]
    r = run_train(*args, timeout=120)
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_existing_run_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    r = run_train("--steps", 1, "--out", out, timeout=120)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
