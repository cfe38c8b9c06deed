"""CPU gate that keeps the kernels GPU-ready: every kernel compiles for sm_90 (H100/H200) as the launchers
bind it (tests/gpu_ready.py: real-shaped tensors through Triton's own argument binding, so alignment and
stride-1 specializations are a GPU launch's), with 0 spill bytes in bf16/fp16, shared memory within
227 KB and wgmma (HGMMA) in the attention and linear+cross-entropy SASS.

The default run compiles the default (first) autotune config of every kernel at bf16 D=64/128 and GPT-2
widths, and of the three attention kernels in fp32 (whose default tiles must not spill either);
``pytest -m slow`` compiles every config x dtype x causal/dropout/EVEN flag x layout. Each run compiles
into a throw-away Triton cache (nothing is cached across runs or written to the repo).
Also here: ``bash bench/gpu_session.sh --dry-run`` fits the GPU window.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "gpu_ready.py"
SMEM_LIMIT = 232448


def _triton_ok() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(x) for x in version("triton").split("+")[0].split(".")[:2]) >= (3, 7)
    except (PackageNotFoundError, ValueError):
        return False


def _compile_all(tmp: Path, extra: list[str], shards: int) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp / "triton-cache"),
               TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))

    def one(i: int) -> tuple[subprocess.CompletedProcess, Path]:
        out = tmp / f"facts-{i}.json"
        r = subprocess.run([sys.executable, str(SCRIPT), *extra, "--shard", f"{i}/{shards}", "--json", str(out)],
                           capture_output=True, text=True, env=env, timeout=3600)
        return r, out

    with ThreadPoolExecutor(shards) as pool:
        done = list(pool.map(one, range(shards)))
    facts = []
    for r, out in done:
        assert out.exists(), f"tests/gpu_ready.py crashed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}"
        facts += json.loads(out.read_text())
    return facts


@pytest.fixture(scope="module")
def fast_facts(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    if not _triton_ok():
        pytest.skip("the as-launched binding needs triton >= 3.7 here")
    return _compile_all(tmp_path_factory.mktemp("gpu_ready"), [], shards=2)


def _report(bad: list[dict]) -> str:
    return "\n".join(f"{f['name']} {f['label']}: {f.get('error') or f.get('problems')} "
                     f"(regs={f.get('regs')} spill={f.get('spill_stores')}/{f.get('spill_loads')} smem={f.get('smem')})"
                     for f in bad)


def test_fast_subset_covers_every_kernel(fast_facts):
    names = {f["name"] for f in fast_facts}
    assert names >= {"attn_fwd", "attn_dkdv", "attn_dq", "decode_split", "decode_combine", "ln_fwd", "ln_bwd",
                     "gelu_fwd", "gelu_bwd", "lce_fwd", "lce_dlogits", "rms_fwd", "rms_bwd", "glu_fwd", "glu_bwd",
                     "rotary"}, names
    assert any("smoothing+softcap" in f["label"] for f in fast_facts if f["name"] == "lce_dlogits")
    assert {re.search(r"D=(\d+)", f["label"]).group(1) for f in fast_facts if f["name"] == "attn_fwd"} == {"64", "128"}
    varlen_d = {re.search(r"D=(\d+)", f["label"]).group(1) for f in fast_facts
                if f["name"] == "attn_dkdv" and "varlen" in f["label"] and "W=" in f["label"] and "softcap" in f["label"]}
    assert varlen_d == {"64", "128"}, varlen_d  # the varlen + window + softcap dK/dV pass at both head dims
    # fp32 attention (issue 21): each kernel's default FMA tile at D=64 and D=128 (its spills are checked
    # below, with bf16's)
    fp32 = {(f["name"], re.search(r"D=(\d+)", f["label"]).group(1)) for f in fast_facts
            if f["dtype"] == "fp32" and f["default"]}
    assert fp32 == {(n, d) for n in ("attn_fwd", "attn_dkdv", "attn_dq") for d in ("64", "128")}, fp32


def test_every_kernel_compiles_for_sm90(fast_facts):
    bad = [f for f in fast_facts if not f["ok"]]
    assert not bad, _report(bad)


def test_no_register_spills_in_bf16(fast_facts):
    """bf16, and the default fp32 attention tiles (tests/gpu_ready.py FP32_ATTN_SPILL_LIMIT = 0)."""
    bad = [f for f in fast_facts if f["ok"] and (f["spill_stores"] or f["spill_loads"])]
    assert not bad, _report(bad)


def test_shared_memory_fits_227kb(fast_facts):
    bad = [f for f in fast_facts if f["ok"] and f["smem"] > SMEM_LIMIT]
    assert not bad, _report(bad)


def test_attention_and_linear_ce_use_wgmma(fast_facts):
    mma = [f for f in fast_facts if f["name"].startswith(("attn_fwd", "attn_dkdv", "attn_dq", "lce_"))
           and f["dtype"] != "fp32"]  # fp32: IEEE dots (FMA)
    assert mma
    bad = [f for f in mma if f["ok"] and not f["hgmma"]]
    assert not bad, _report(bad)


def test_binding_specializes_like_a_gpu_launch(fast_facts):
    """The binder folds stride 1 into a constant and marks 16-byte-aligned pointers and strides divisible
    by 16 (what the removed tests/aot_compile.py, with hand-built all-i32 signatures, missed)."""
    fwd = [f for f in fast_facts if f["name"] == "attn_fwd" and f["ok"]]
    assert fwd
    for f in fwd:
        assert {"stride_qd", "stride_kd", "stride_vd", "stride_od"} <= set(f["folded"]), f["folded"]
        assert {"Q", "K", "V", "O", "LSE", "stride_qm", "stride_kn"} <= set(f["aligned"]), f["aligned"]
        assert "TQ" in f["aligned"] and "stride_qm" not in f["folded"]


@pytest.mark.slow
def test_full_sweep_every_config_dtype_and_flag(tmp_path):
    """Every autotune candidate x bf16/fp16/fp32 x causal/dropout/EVEN x layout (~600 variants: most of an
    hour on 2 idle cores; fp32 D=128 compiles are the slow ones)."""
    pytest.importorskip("triton.backends.nvidia")
    if not _triton_ok():
        pytest.skip("needs triton >= 3.7")
    facts = _compile_all(tmp_path, ["--full"], shards=max(1, os.cpu_count() or 1))
    bad = [f for f in facts if f["problems"]]
    assert not bad, _report(bad)


# ---------------------------------------------------------------------------------------------------
# bench/gpu_session.sh fits the GPU window
# ---------------------------------------------------------------------------------------------------

def _dry_run(**env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, **env))


def test_gpu_session_dry_run_fits_the_window():
    r = _dry_run(OUT="/nonexistent/never-written")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    req = int(re.search(r"sum of required caps: (\d+)s", out).group(1))
    budget = int(re.search(r"budget (\d+)s", out).group(1))
    assert budget <= 540 and req <= budget, out
    caps = [(m.group(1), int(m.group(2)), m.group(3)) for m in re.finditer(r"^\d+\s+(\S+)\s+(\d+)\s+(req|opt)", out, re.M)]
    assert sum(c for _, c, k in caps if k == "req") == req, out
    files = re.search(r"\((\d+) files at most: ([^)]*)\)", out)
    assert int(files.group(1)) <= 8 and len(files.group(2).split()) == int(files.group(1)), out
    assert "python 'python3'" in out, out
    # the headline steps, in priority order, before the optional ones
    order = [name for name, _, _ in caps]
    for name in ("env", "gpu_tests", "attn_d64", "attn_d128", "norm_gelu", "train_step", "decode_b1", "linear_ce"):
        assert name in order, order
    assert order.index("env") < order.index("gpu_tests") < order.index("attn_d64") < order.index("linear_ce")
    first_opt = min(i for i, (_, _, k) in enumerate(caps) if k == "opt")
    assert all(k == "opt" for _, _, k in caps[first_opt:]), caps
    assert not Path("/nonexistent/never-written").exists()


def test_gpu_session_dry_run_honours_python_and_budget():
    r = _dry_run(PYTHON="/opt/py/bin/python3.12", BUDGET_S="300")
    assert "python '/opt/py/bin/python3.12'" in r.stdout and "budget 300s" in r.stdout


def test_gpu_session_bench_steps_exist():
    """Every `bench STEP` line of the plan names a python -m bench step (a typo would only show on the GPU)."""
    from bench.__main__ import STEPS

    text = (ROOT / "bench" / "gpu_session.sh").read_text()
    steps = re.findall(r'^\s*"[^"|\n]+(?:\|[^|\n]+){3}\|\s*bench (\S+)\s*"$', text, re.M)
    assert len(steps) >= 6
    assert set(steps) <= set(STEPS), set(steps) - set(STEPS)
