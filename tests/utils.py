"""Test helpers shared by the test modules."""

from __future__ import annotations

import torch


def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-5,
                            rtol: float = 1e-5, max_print: int = 5, name: str = "tensor") -> None:
    """Like torch.testing.assert_close but reports where and by how much values differ (Liger idiom)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_mismatch = torch.isnan(a) ^ torch.isnan(e)
    diff = (a - e).abs()
    bad = (diff > atol + rtol * e.abs()) | nan_mismatch
    bad &= ~(torch.isnan(a) & torch.isnan(e))
    if not bad.any():
        return
    idx = bad.nonzero()
    lines = [f"{name}: {int(bad.sum())} / {a.numel()} elements differ (atol={atol}, rtol={rtol}); "
             f"max abs diff {diff[~torch.isnan(diff)].max().item() if (~torch.isnan(diff)).any() else 'nan'}"]
    for i in idx[:max_print].tolist():
        t = tuple(i)
        lines.append(f"  at {t}: actual={a[t].item():.6g} expected={e[t].item():.6g}")
    raise AssertionError("\n".join(lines))
