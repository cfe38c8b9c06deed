"""A run folder's metrics: ``metrics.jsonl`` rows (strict JSON, one object per logged step) and the
``loss.png`` plot drawn from them (``gpt.training`` writes both; ``read_metrics`` and ``plot_losses`` are
also importable from ``gpt.training``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_row(metrics, row: dict) -> None:
    """Append ``row`` to the open ``metrics.jsonl`` file ``metrics`` (``None``: not rank 0, nothing)."""
    if metrics is not None:
        metrics.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                  for k, v in row.items()}) + "\n")  # strict JSON: NaN -> null
        metrics.flush()


def plot_losses(out: Path) -> None:
    """``loss.png`` from ``metrics.jsonl`` (skipped quietly without matplotlib)."""
    try:
        import matplotlib  # optional (the dev extra): lazy, only to draw loss.png

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = read_metrics(out / "metrics.jsonl")
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train", lw=1)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    hs = [(r["step"], r["hellaswag_acc_norm"]) for r in rows if r.get("hellaswag_acc_norm") is not None]
    if hs:  # train.py pretrain --eval-hellaswag: accuracy on a second axis
        ax2 = ax.twinx()
        ax2.plot(*zip(*hs), "s--", color="tab:green", label="HellaSwag acc_norm")
        ax2.set_ylabel("HellaSwag acc_norm")
        ax2.legend(loc="upper center")
    ax.legend()
    fig.tight_layout()
    tmp = out / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out / "loss.png")
