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


ROW = {"group": "g", "bench": "b", "name": "ours-row", "shape": "s", "dtype": "fp32", "unit": "ms", "ours": 1.0,
       "baselines": {}, "speedup": {}}


@pytest.mark.parametrize("module,runners,legend", [
    ("bench.attention", ["run"], "sdpa_best"),
    ("bench.attention_variants", ["run"], "dense = our kernel"),
    ("bench.layernorm_gelu", ["run"], "copy bandwidth"),
    ("bench.llama_layers", ["run"], None),
    ("bench.model", ["run_train", "run_generate"], "tokens/s"),
])
def test_standalone_mains_share_one_start_and_finish(module, runners, legend, monkeypatch, capsys):
    """Each ``python -m bench.<name>`` runs through bench.common's cli_start/cli_finish: the CPU note, the
    ceilings line, every row its runners return, the legend; nothing saved off CUDA."""
    import importlib

    import bench.common as common

    mod = importlib.import_module(module)
    monkeypatch.setattr(common, "measure_ceilings", lambda device, quick=False: {"copy_gbs": 1.5, "matmul_tflops": 2.5})
    monkeypatch.setattr(common, "save_results", lambda *a: pytest.fail("saved without CUDA"))
    for name in runners:
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: [{**ROW, "name": f"row-{_n}"}])
    assert mod.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("NOTE: no CUDA device: ") and "copy 1.5 GB/s | matmul 2.5 TFLOP/s" in out
    assert all(f"row-{n}" in out for n in runners)
    assert legend is None or legend in out


def test_cli_finish_saves_on_cuda(monkeypatch, capsys):
    import bench.common as common

    saved = []
    monkeypatch.setattr(common, "save_results", lambda name, payload: saved.append((name, payload)) or "x.json")
    assert common.cli_finish("attention", [ROW], device="cuda", env={"device": "d"}, ceilings={}) == 0
    assert common.cli_finish("attention", [ROW], device="cuda:1", env={}, ceilings={}, save=False) == 0
    assert [n for n, _ in saved] == ["attention"] and saved[0][1]["rows"] == [ROW]
    assert "saved x.json" in capsys.readouterr().out
