"""The attention and decode kernels compile for an H100 (sm_90) with Triton's real compiler, on CPU."""

import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_compile.py")), "--quick"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert " 0 failed" in r.stdout and "FAIL" not in r.stdout
