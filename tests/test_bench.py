"""The benchmark suite runs end to end on CPU (a smoke run: tiny shapes, nothing timed for real), so
``python -m bench`` and ``pytest bench`` cannot rot between GPU sessions."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv, timeout=600):
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the CPU smoke run uses the PyTorch fallback
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)


def test_python_m_bench_quick_writes_json_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    r = _run("-m", "bench", "--quick", "--no-compile", "--out", str(tmp_path))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "CPU smoke run" in r.stdout
    for part in ("layernorm_gelu", "attention", "decode", "train", "generate", "llama_kernels", "llama_loss",
                 "llama_layer"):
        assert f"### {part}" in r.stdout, part
    [js] = tmp_path.glob("*.json")
    payload = json.loads(js.read_text())
    assert {"device", "torch", "triton"} <= set(payload["env"]) and payload["ceilings"]["copy_gbs"] > 0
    names = {row["name"] for row in payload["rows"]}
    assert {"attention fwd", "attention fwd+bwd", "decode_attention", "train step", "layer_norm fwd",
            "generate_batch", "rms_norm fwd+bwd", "swiglu bwd", "rotary fwd", "decoder layer fwd+bwd",
            "gqa H/Hk=4 fwd+bwd", "gqa H/Hk=8 fwd", "varlen fwd+bwd", "window W=16 fwd"} <= names
    assert not payload["errors"]
    assert list(tmp_path.glob("*.md")) and list(tmp_path.glob("*.png"))


def test_bench_only_rejects_unknown_parts():
    r = _run("-m", "bench", "--only", "nonsense", "--no-save")
    assert r.returncode != 0 and "unknown benchmark 'nonsense'" in r.stderr


def test_pytest_benchmarks_run_once():
    pytest.importorskip("pytest_benchmark")
    r = _run("-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--benchmark-disable")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = r.stdout.strip().splitlines()[-1]  # e.g. "12 passed in 3.1s" or "12 passed, 1 warning in ..."
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
    assert counts == {"passed": 12}, summary


def test_cpu_train_comparison_runs(capsys, monkeypatch):
    from bench import cpu_train

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cpu_train.main(["1", "8", "loss", "2"]) == 0
    out = capsys.readouterr().out
    assert "fused model.loss vs reference logits" in out and "speed-up median" in out


@pytest.mark.parametrize("argv,code,text", [
    (["--help"], 0, "usage: python -m bench.cpu_train"),  # once a traceback: int('--help')
    (["2", "x", "loss", "3"], 2, "error: argument T: 'x' is not an integer"),
    (["2", "8", "both", "3"], 2, "error: argument mode: invalid choice"),
    (["2", "8", "loss"], 2, "error: the following arguments are required: reps"),
])
def test_cpu_train_help_and_bad_arguments(capsys, argv, code, text):
    from bench import cpu_train

    with pytest.raises(SystemExit) as e:
        cpu_train.main(argv)
    assert e.value.code == code
    captured = capsys.readouterr()
    out = captured.out if code == 0 else captured.err
    assert text in out and "Traceback" not in out
    if code:
        assert len(captured.err.strip().splitlines()) == 1
