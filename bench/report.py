"""Turn benchmark rows (``bench.common.make_row``) into tables, a Markdown report, JSON and PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.common import format_table

UNIT_HIGHER_IS_BETTER = {"tokens/s"}


def _ordered_keys(rows: list[dict], field: str) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k in r.get(field) or {}:
            if k not in keys:
                keys.append(k)
    return keys


def flatten(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Rows of one benchmark -> (columns, flat dicts): ours, each baseline, each speed-up, the metric."""
    if not rows:
        return [], []
    units = {r["unit"] for r in rows}
    unit = units.pop() if len(units) == 1 else "unit"
    metrics = {r.get("metric") for r in rows if r.get("metric")}
    metric = metrics.pop() if len(metrics) == 1 else "metric"
    base_keys = _ordered_keys(rows, "baselines")
    speed_keys = _ordered_keys(rows, "speedup")
    ours_col = f"ours ({unit})"
    columns = ["name", "shape", "dtype", ours_col, *base_keys, *(f"vs {k}" for k in speed_keys),
               f"ours {metric}", "% ceiling"]
    flat = []
    for r in rows:
        d = {"name": r["name"], "shape": r["shape"], "dtype": r["dtype"], ours_col: r["ours"]}
        for k in base_keys:
            d[k] = (r.get("baselines") or {}).get(k)
        for k in speed_keys:
            d[f"vs {k}"] = (r.get("speedup") or {}).get(k)
        d[f"ours {metric}"] = r.get("achieved")
        frac = r.get("frac_ceiling")
        d["% ceiling"] = None if frac is None else 100.0 * frac
        if r.get("notes"):
            d["notes"] = r["notes"]
        flat.append(d)
    if any("notes" in d for d in flat):
        columns.append("notes")
    return columns, flat


def by_bench(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["bench"], []).append(r)
    return out


def table(rows: list[dict]) -> str:
    """One Markdown table per benchmark in ``rows``."""
    parts = []
    for bench, group in by_bench(rows).items():
        columns, flat = flatten(group)
        parts.append(f"### {bench}\n\n" + format_table(flat, columns))
    return "\n\n".join(parts)


def print_rows(rows: list[dict]) -> None:
    print(table(rows))


BENCH_NOTES = {
    "attention": "ms per call; TFLOP/s with the causal FLOP count (fwd 4·B·H·T²·D × 0.5, bwd 2.5× fwd); "
                 "`vs sdpa_best` is against the fastest SDPA backend that ran; % ceiling is over the "
                 "bf16 matmul TFLOP/s measured in this run.",
    "decode": "µs per decode step (one new token per row); GB/s counts reading the valid part of the KV "
              "cache once (2·B·H·ctx·D·bytes); % ceiling is over the copy bandwidth measured in this run.",
    "layernorm_gelu": "ms per call; GB/s counts the minimal bytes each pass must read and write; % ceiling "
                      "is over the device-to-device copy bandwidth measured in this run.",
    "loss": "ms per call of head + loss (x @ Wᵀ, cross-entropy; fwd+bwd gives dx and dW); TFLOP/s counts "
            "2·N·V·d per GEMM (1 fwd, 3 fwd+bwd); % ceiling is over the bf16 matmul TFLOP/s of this run.",
    "loss_memory": "peak MiB of one head + loss fwd+bwd above the inputs (gradients included); the `vs` "
                   "columns are memory reductions (baseline / ours).",
    "loss_train": "tokens/s of a GPT-2 optimizer step with the fused loss (model.loss) vs the logits path, "
                  "at the largest batch each fits (B searched by doubling) and at the same batch.",
    "train": "tokens/s of a full optimizer step (forward, backward, AdamW); TFLOP/s = 6·N + 12·L·d·T "
             "FLOPs per token (the nanoGPT/PaLM estimate); % ceiling is MFU against the bf16 matmul "
             "TFLOP/s measured in this run.",
    "prepare": "tokens/s of `python -m gpt.data prepare` end to end (read jsonl, tokenize in N worker "
               "processes, write shards; process start-up included) vs a plain single-process tiktoken loop; "
               "`per worker` rows divide by N; MB/s of input text. A CPU benchmark: real on any machine.",
    "hf": "transformers GPT2LMHeadModel (random weights): tokens/s of a training step and of greedy generate "
          "(batch 1, prefill included); ours = our attention as attn_implementation + replace_modules "
          "(LayerNorm, GELU); baselines: our attention alone, transformers' sdpa and eager.",
    "generate": "tokens/s including the prefill (batch × new tokens / wall time); GB/s counts reading "
                "the weights plus the average KV cache once per decode step; % ceiling is over the copy "
                "bandwidth measured in this run.",
    "generate_batch": "tokens/s of `generate_batch` over ragged prompts (prompts × new tokens / wall time, "
                      "prefills included, no eos stop) vs `generate` one prompt at a time and HF `generate` "
                      "in left-padded batches of the same size; `rows_equal`: rows identical to the "
                      "one-at-a-time tokens.",
}


def markdown(payload: dict) -> str:
    env = payload.get("env", {})
    ceil = payload.get("ceilings", {})
    lines = [f"# Benchmark results: {env.get('device', '?')}", ""]
    lines.append(" | ".join(f"{k} {env[k]}" for k in ("date", "torch", "triton", "cuda", "driver", "python")
                            if k in env))
    if ceil:
        lines.append("")
        lines.append(f"Measured ceilings: copy bandwidth {ceil.get('copy_gbs', float('nan')):.1f} GB/s, "
                     f"matmul {ceil.get('matmul_tflops', float('nan')):.1f} TFLOP/s.")
    for note in payload.get("notes", []):
        lines += ["", f"> {note}"]
    lines.append("")
    lines.append("Timing: warm-up excluded; kernels with `triton.testing.do_bench` (CUDA events, L2 "
                 "flushed before every run, median; p20/p80 in the JSON); model steps one by one with a "
                 "device sync. Speed-up > 1 means ours is faster.")
    for bench, group in by_bench(payload.get("rows", [])).items():
        columns, flat = flatten(group)
        lines += ["", f"## {bench}", ""]
        if bench in BENCH_NOTES:
            lines += [BENCH_NOTES[bench], ""]
        lines.append(format_table(flat, columns))
    if payload.get("targets"):
        lines += ["", "## docs/design.md targets", "",
                  "The binding (worst, or best available for the end-to-end ones) measured value per target.",
                  "", targets_markdown(payload["targets"])]
    errors = payload.get("errors", {})
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- `{k}`: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def plots(payload: dict, out_dir: Path, stem: str) -> list[Path]:
    """PNG plots next to the JSON: attention speed-up vs T, decode latency vs context, LayerNorm/GELU
    GB/s vs width, training and generation tokens/s. Returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev extra
        return []
    groups = by_bench(payload.get("rows", []))
    device = payload.get("env", {}).get("device", "?")
    written = []

    def save(fig, suffix):
        path = out_dir / f"{stem}-{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "attention" in groups:
        rows = groups["attention"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, key, target in ((axes[0], "sdpa_flash", 1.2), (axes[1], "sdpa_best", 1.0)):
            for (p, d) in sorted({(r["params"]["pass"], r["params"]["D"]) for r in rows}):
                pts = sorted((r["params"]["T"], r["speedup"].get(key)) for r in rows
                             if r["params"]["pass"] == p and r["params"]["D"] == d
                             and r["speedup"].get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{p}, D={d}")
            ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target}x")
            ax.axhline(1.0, color="black", lw=0.6)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T (B·T fixed)")
            ax.set_title(f"speed-up vs {key}")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("speed-up (ours faster > 1)")
        fig.suptitle(f"causal flash attention, {device}", fontsize=10)
        save(fig, "attention")

    if "decode" in groups:
        rows = groups["decode"]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for b in sorted({r["params"]["B"] for r in rows}):
            sel = sorted((r for r in rows if r["params"]["B"] == b), key=lambda r: r["params"]["ctx"])
            ctx = [r["params"]["ctx"] for r in sel]
            ax.plot(ctx, [r["ours"] for r in sel], marker="o", label=f"ours B={b}")
            sd = [(c, r["baselines"].get("sdpa")) for c, r in zip(ctx, sel) if r["baselines"].get("sdpa")]
            if sd:
                ax.plot(*zip(*sd), marker="x", ls="--", label=f"SDPA B={b}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (cached tokens)")
        ax.set_ylabel(f"latency ({rows[0]['unit']})")
        ax.set_title(f"decode attention, {device}", fontsize=10)
        ax.legend(fontsize=7)
        save(fig, "decode")

    if "layernorm_gelu" in groups:
        rows = groups["layernorm_gelu"]
        ops = list(dict.fromkeys(r["params"]["op"] for r in rows))
        fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 4), squeeze=False)
        ceiling = next((r["ceiling"] for r in rows if r.get("ceiling")), None)
        for ax, op in zip(axes[0], ops):
            for (dt, p) in sorted({(r["dtype"], r["params"]["pass"]) for r in rows if r["params"]["op"] == op}):
                sel = sorted((r for r in rows if r["params"]["op"] == op and r["dtype"] == dt
                              and r["params"]["pass"] == p), key=lambda r: r["params"]["width"])
                ax.plot([r["params"]["width"] for r in sel], [r["achieved"] for r in sel], marker="o",
                        label=f"ours {p} {dt}")
                tb = [(r["params"]["width"], r["params"].get("torch_gbs")) for r in sel
                      if r["params"].get("torch_gbs")]
                if tb:
                    ax.plot(*zip(*tb), ls=":", marker=".", label=f"torch {p} {dt}")
            if ceiling:
                ax.axhline(ceiling, color="black", lw=0.8, label="copy bandwidth")
                ax.axhline(0.85 * ceiling, color="gray", ls="--", lw=0.8, label="85% target")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("width (last dim)")
            ax.set_ylabel("GB/s")
            ax.set_title(op)
            ax.legend(fontsize=6)
        fig.suptitle(f"LayerNorm / GELU bandwidth, {device}", fontsize=10)
        save(fig, "layernorm_gelu")

    model_groups = [g for g in ("train", "generate") if g in groups]
    if model_groups:
        fig, axes = plt.subplots(1, len(model_groups), figsize=(6 * len(model_groups), 4.2), squeeze=False)
        for ax, g in zip(axes[0], model_groups):
            rows = groups[g]
            labels, values, colors = [], [], []
            for r in rows:
                tag = r["shape"] if g == "generate" else r["name"]
                labels.append(f"ours\n{tag}")
                values.append(r["ours"])
                colors.append("tab:blue")
                for k, v in r["baselines"].items():
                    if v is not None:
                        labels.append(f"{k}\n{tag}")
                        values.append(v)
                        colors.append("tab:gray")
            ax.bar(range(len(values)), values, color=colors)
            ax.set_xticks(range(len(values)), labels, rotation=70, fontsize=6, ha="right")
            ax.set_ylabel("tokens/s")
            ax.set_title(g)
        fig.suptitle(f"GPT-2 training and generation, {device}", fontsize=10)
        save(fig, "model")
    return written


def write(payload: dict, out_dir: Path, stem: str, *, with_plots: bool = True) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and the PNG plots into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(payload))
    paths = [json_path, md_path]
    if with_plots:
        paths += plots(payload, out_dir, stem)
    return paths


def write_atomic(payload: dict, json_path: Path) -> list[Path]:
    """Write ``json_path`` and its ``.md`` through temporary files and a rename: a process killed at any
    moment leaves the previous complete pair or the new one, never half a file."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path = json_path.with_suffix(".md")
    for path, text in ((json_path, json.dumps(payload, indent=2, default=str)), (md_path, markdown(payload))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return [json_path, md_path]


# ---------------------------------------------------------------------------------------------------
# docs/design.md performance targets, checked on the rows of one run
# ---------------------------------------------------------------------------------------------------

GPT2_WIDTHS = (768, 1024, 1280, 1600)


def _worst(rows: list[dict], value) -> tuple[float | None, str]:
    """The smallest ``value(row)`` over rows (the binding case for a ">= x" target) and where."""
    vals = [(v, r) for r in rows if (v := value(r)) is not None]
    if not vals:
        return None, ""
    v, r = min(vals, key=lambda t: t[0])
    return v, f"{r['name']} {r['shape']} {r['dtype']}"


def _best(rows: list[dict], value) -> tuple[float | None, str]:
    vals = [(v, r) for r in rows if (v := value(r)) is not None]
    if not vals:
        return None, ""
    v, r = max(vals, key=lambda t: t[0])
    return v, f"{r['name']} {r['shape']}"


def check_targets(rows: list[dict], *, cuda: bool) -> list[dict]:
    """Each docs/design.md target with the measured binding value and whether it is met (None: not measured).

    GPU targets are reported as not applicable on a CPU run; the CPU target only on a CPU run.
    """
    out = []

    def add(target, threshold, measured, where, applicable=True):
        if not applicable:
            out.append({"target": target, "threshold": threshold, "measured": None, "where": "n/a on this device",
                        "met": None})
            return
        met = None if measured is None else measured >= threshold
        out.append({"target": target, "threshold": threshold, "measured": measured,
                    "where": where or "not measured", "met": met})

    att = [r for r in rows if r["bench"] == "attention" and r["params"].get("D") == 64
           and 1024 <= r["params"].get("T", 0) <= 16384 and r["params"].get("pass") in ("fwd", "fwd+bwd")]
    for key, thr in (("sdpa_flash", 1.2), ("sdpa_best", 1.0)):
        v, where = _worst(att, lambda r, key=key: r["speedup"].get(key))
        add(f"attention fwd & fwd+bwd, D=64, T 1k-16k: speed-up vs {key}", thr, v, where, cuda)

    def gpt2_width(r):
        w = r["params"].get("width", 0)
        return (w // 4 if r["params"].get("op") == "gelu" else w) in GPT2_WIDTHS

    ln = [r for r in rows if r["bench"] == "layernorm_gelu" and r["params"].get("pass") in ("fwd", "bwd")
          and gpt2_width(r)]
    v, where = _worst(ln, lambda r: r.get("frac_ceiling"))
    add("LayerNorm/GELU fwd & bwd at GPT-2 widths: fraction of copy bandwidth", 0.85, v, where, cuda)
    v, where = _worst(ln, lambda r: r["speedup"].get("torch"))
    add("LayerNorm/GELU fwd & bwd at GPT-2 widths: speed-up vs torch native", 1.0 + 1e-9, v, where, cuda)

    train = [r for r in rows if r["bench"] == "train"]
    v, where = _best(train, lambda r: r["speedup"].get("compile(reference+SDPA)"))
    add("GPT-2 124M training T=1024: tokens/s vs torch.compile(reference+SDPA)", 1.1, v, where, cuda)
    v, where = _best(train, lambda r: r["speedup"].get("reference"))
    add("GPT-2 124M training T=1024: tokens/s vs the book reference (eager)", 10.0, v, where, cuda)

    lce = [r for r in rows if r["bench"] == "loss" and r["params"].get("pass") == "fwd+bwd"]
    v, where = _worst(lce, lambda r: r["speedup"].get("compiled"))
    add("fused linear+cross-entropy fwd+bwd at GPT-2 shapes: speed-up vs compiled cross_entropy(linear)", 1.0,
        v, where, cuda)
    lce_mem = [r for r in rows if r["bench"] == "loss_memory"]
    v, where = _worst(lce_mem, lambda r: r["speedup"].get("compiled"))
    add("fused linear+cross-entropy: peak memory reduction vs compiled cross_entropy(linear)", 4.0, v, where, cuda)
    lce_train = [r for r in rows if r["bench"] == "loss_train" and "largest" in r["name"]]
    v, where = _best(lce_train, lambda r: r["speedup"].get("logits path"))
    add("GPT-2 124M training T=1024: tokens/s with the fused loss vs without (each at its largest batch)",
        1.0 + 1e-9, v, where, cuda)

    gen = [r for r in rows if r["bench"] == "generate" and r["params"].get("B") == 1
           and r["params"].get("new", 0) >= 512]
    v, where = _best(gen, lambda r: r["speedup"].get("fused no cache"))
    add("batch-1 decoding, 512 new tokens: KV cache vs uncached", 10.0, v, where, cuda)
    v, where = _best(gen, lambda r: r["ours"])
    add("batch-1 decoding, 512 new tokens: tokens/s", 5000.0, v, where, cuda)

    batched = [r for r in rows if r["bench"] == "generate_batch" and r["params"].get("B") == 64]
    v, where = _best(batched, lambda r: r["speedup"].get("one at a time"))
    add("batched generation at batch 64: tokens/s vs one prompt at a time", 10.0, v, where, cuda)
    v, where = _best(batched, lambda r: r["speedup"].get("hf generate (left pad)"))
    add("batched generation at batch 64: tokens/s vs HF generate (left padding)", 1.0 + 1e-9, v, where, cuda)

    v, where = _worst(train, lambda r: r["speedup"].get("reference"))
    add("CPU fallback: fused training step vs the book reference (tiny shapes; noisy)", 1.0, v, where,
        not cuda)
    return out


def targets_markdown(targets: list[dict]) -> str:
    lines = ["| target | needs | measured | where | met |", "|---|---|---|---|---|"]
    for t in targets:
        m = t["measured"]
        measured = "-" if m is None else f"{m:.3g}"
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | ≥ {t['threshold']:.3g} | {measured} | {t['where']} | {met} |")
    return "\n".join(lines)
