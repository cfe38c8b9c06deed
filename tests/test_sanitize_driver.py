"""tests/sanitize_driver.py, the program compute-sanitizer runs on a GPU (bench/gpu_session.sh), keeps
working: each of its cases in the NaN-guarded layout on the fallback (the driver's own code) and, but
for attention and decode (slow there, and covered by test_guard_bands.py), on the interpreter; on a CUDA
machine every case runs compiled."""

from __future__ import annotations

import pytest
import torch

from tests import sanitize_driver as drv


def _id(case):
    op, dtype, shape, *_ = case
    return f"{op.__name__}-{str(dtype).replace('torch.', '')}-{'x'.join(map(str, shape))}"


@pytest.mark.parametrize("case", drv.CASES, ids=[_id(c) for c in drv.CASES])
def test_driver_case(kernel_path, device, case):
    op, dtype, *params = case
    interpreted = device.type == "cpu" and kernel_path == "interpreter"
    if interpreted and op in (drv.attention, drv.decode):
        pytest.skip("slow on the interpreter; test_guard_bands.py covers these kernels there")
    op(device, True, dtype, *params)


def test_driver_reports_a_failure_and_exits_1(capsys, monkeypatch):
    """A case that raises is printed as FAIL with its label, the others still run, and main exits 1."""
    def broken(device, guard, dtype, shape):
        raise AssertionError("planted")
    cases = [(broken, torch.float32, (3,)), (drv.gelu_op, torch.float32, (5,), "tanh")]
    monkeypatch.setattr(drv, "CASES", cases)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert drv.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "[exact] broken float32 (3,): FAIL AssertionError: planted" in out
    assert "[guarded] gelu_op float32 (5,) tanh: ok" in out and "2 FAILED" in out
