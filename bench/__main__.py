"""Run the whole benchmark suite in one process and write the results.

    python -m bench                        # every benchmark (CUDA: the full sweep, bf16)
    python -m bench --quick                # fewer shapes, steps and configurations
    python -m bench --only kernels         # kernels | layernorm_gelu | attention | loss | train | generate | prepare | hf | llama;
    python -m bench --only train,generate  #   repeatable or a comma list ("kernels" = the two kernel benches)
    python -m bench --out DIR              # where to write (see below); --no-save prints only
    python -m bench --only attention_d64 --json-out F.json   # a GPU-session step (see STEPS), merged
                                           #   into F.json/F.md, both rewritten after every piece

Benchmarks: ``bench.layernorm_gelu`` (LayerNorm, add+LayerNorm, GELU; GB/s), ``bench.attention``
(causal flash attention fwd/bwd vs every SDPA backend and the book's attention, TFLOP/s; decode
attention vs SDPA, µs and GB/s; with ``bench.attention_variants``: GQA H/Hk 4 and 8, varlen documents
and a 4096-token window at 16k vs SDPA with enable_gqa / explicit masks and our dense kernel),
``bench.loss`` (fused linear + cross-entropy vs the eager/compiled/Liger
head + loss, ms and peak MiB; GPT-2 training step with and without it at the largest batch that fits), ``bench.model`` (GPT-2 training step and generation, tokens/s), ``bench.batch_generate``
(``generate_batch`` on 64 ragged prompts vs one at a time and HF ``generate``, tokens/s), ``bench.prepare`` (corpus preparation
tokens/s and MB/s vs a plain tiktoken loop; a CPU benchmark, real on any machine), ``bench.llama_layers``
(RMSNorm, add+RMSNorm, SwiGLU, rotary GB/s; linear+CE at Llama-3's vocabulary; a Llama decoder layer with
and without ``replace_modules``).
Every row records ours, each baseline, the speed-ups, the achieved TFLOP/s or GB/s and its fraction of
the ceiling measured at the start of the same run (copy bandwidth, bf16 matmul); the header records
device, driver, torch and triton versions. The docs/design.md targets are checked at the end.

Output: ``<date>-<device-slug>[-quick][-<parts>].json`` with all rows, a Markdown ``.md`` with the
tables and the target check, and PNG plots (attention speed-up vs T, decode latency vs context,
LayerNorm/GELU GB/s vs width, training/generation tokens/s). On CUDA they go to ``bench/results/``
(committed); on CPU, where the run is only a smoke test of tiny shapes on the fallback path, to
``out/bench/`` (git-ignored) so smoke runs never mix with GPU results. ``--out DIR`` overrides both.
Exit status 1 when a benchmark failed (the others still run and are written).

Session steps (``STEPS``, the headline numbers that ``bench/gpu_session.sh`` runs one per process, each
under its own time cap): ``attention_d64`` / ``attention_d128`` (flash attention fwd and fwd+bwd, bf16,
causal, T 1k/4k/16k vs SDPA flash and cuDNN), ``norm_gelu`` (LayerNorm, add+LayerNorm, GELU fwd/bwd at
widths 768/1600, bf16, vs the copy bandwidth of the same run), ``train_step`` (GPT-2 124M, T=1024),
``decode_b1`` (batch-1 generation with the KV cache vs uncached), ``linear_ce`` (fused linear+CE vs the
eager/compiled head + loss at GPT-2 shapes). Each is a list of pieces (one shape or op each); with
``--json-out FILE`` the rows of every finished piece are merged into FILE (rows of earlier runs kept) and
FILE and its ``.md`` are rewritten atomically, so a process killed mid-step loses only the piece in flight.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, device_slug, env_info, measure_ceilings

PARTS = ["layernorm_gelu", "attention", "loss", "train", "generate", "prepare", "hf", "llama"]
ALIASES = {"kernels": ["layernorm_gelu", "attention"]}
#: Focused steps of the GPU session (bench/gpu_session.sh): name -> what it measures.
STEPS = {
    "attention_d64": "flash attention fwd, fwd+bwd: bf16 causal D=64, T 1k/4k/16k vs SDPA flash/cuDNN",
    "attention_d128": "flash attention fwd, fwd+bwd: bf16 causal D=128, T 1k/4k/16k vs SDPA flash/cuDNN",
    "norm_gelu": "LayerNorm, add+LayerNorm, GELU fwd/bwd: bf16, widths 768/1600, % of copy bandwidth",
    "train_step": "GPT-2 124M training step T=1024: tokens/s, MFU vs torch.compile(reference+SDPA), reference",
    "decode_b1": "batch-1 generation with the KV cache vs uncached: tokens/s",
    "linear_ce": "fused linear+cross-entropy fwd+bwd time and peak memory vs compiled cross_entropy(linear)",
    "decode_attention": "decode attention kernel vs SDPA: µs and GB/s over cache lengths",
    "batch_generate": "generate_batch on ragged prompts vs one at a time and HF generate: tokens/s",
    "loss_train": "GPT-2 training step with and without the fused loss, each at its largest batch",
    "attention_variants": "GQA H/Hk 4, 8 (D 128, T 4k), varlen documents summing to 16k, window W=4096 at T=16k: "
                          "fwd, fwd+bwd vs SDPA (enable_gqa, explicit masks) and the dense kernel",
    "llama_layers": "Llama family: RMSNorm/add+RMSNorm/SwiGLU/rotary GB/s vs torch eager; linear+CE at V=128,256; "
                    "a Llama decoder layer with and without replace_modules",
}
CPU_OUT = Path(__file__).resolve().parents[1] / "out" / "bench"
CPU_NOTE = ("CPU smoke run: no CUDA device, so every benchmark ran tiny shapes on the PyTorch fallback "
            "path (the Triton interpreter when TRITON_INTERPRET=1), without torch.compile or the CUDA-only "
            "SDPA backends. These numbers check that the suite runs; they are not performance results (except "
            "`prepare`, a CPU benchmark of corpus preparation).")


def parse_only(values: list[str] | None) -> list[str]:
    if not values:
        return list(PARTS)
    chosen: list[str] = []
    for v in values:
        for name in filter(None, (s.strip() for s in v.split(","))):
            if name not in PARTS and name not in ALIASES and name not in STEPS:
                raise SystemExit(f"--only: unknown benchmark {name!r}; choose from "
                                 f"{', '.join(['kernels', *PARTS, *STEPS])}")
            for part in ALIASES.get(name, [name]):
                if part not in chosen:
                    chosen.append(part)
    return [p for p in PARTS if p in chosen] + [s for s in chosen if s in STEPS]


def step_pieces(step: str, *, quick: bool, device: str, ceilings: dict, use_compile: bool | None):
    """``[(label, thunk)]``: the pieces of a session step, each returning rows (one shape or op each)."""
    cuda = device == "cuda"
    common = dict(device=device, ceilings=ceilings)
    if step.startswith("attention_d"):
        from bench import attention

        D = int(step.removeprefix("attention_d"))
        seqs = [[1024], [4096], [16384]] if cuda else [None]  # CPU: the smoke shapes
        return [(f"D={D} T={t[0] if t else 'smoke'}",
                 lambda t=t: attention.run_train_shapes(True, head_dims=[D], seq_lens=t, include_math=False,
                                                        use_compile=False, **common)) for t in seqs]
    if step == "norm_gelu":
        from bench import layernorm_gelu

        widths = [768, 1600] if cuda else None
        return [(op, lambda op=op: layernorm_gelu.run(True, use_compile=False, widths=widths, dtypes=None, ops=[op],
                                                     **common))
                for op in ("layer_norm", "add_layer_norm", "gelu")]
    if step == "train_step":
        from bench import model

        return [("train", lambda: model.run_train(True, use_compile=use_compile, **common))]
    if step == "decode_b1":
        from bench import model

        return [("decode", lambda: model.run_generate(True, configs=[(1, 16, 512)] if cuda else None, **common))]
    if step == "linear_ce":
        from bench import loss

        return [("linear_ce", lambda: loss.run(True, use_compile=use_compile, **common))]
    if step == "decode_attention":
        from bench import attention

        return [("decode_attention", lambda: attention.run_decode(True, **common))]
    if step == "batch_generate":
        from bench import batch_generate

        return [("batch_generate", lambda: batch_generate.run(True, **common))]
    if step == "loss_train":
        from bench import loss

        return [("loss_train", lambda: loss.run_train(True, **common))]
    if step == "attention_variants":
        from bench import attention_variants

        return attention_variants.pieces(True, **common)
    if step == "llama_layers":
        from bench import llama_layers

        kw = dict(use_compile=False, **common)  # (the session's time: the compiled baselines are in --only llama)
        return [("llama kernels", lambda: llama_layers.run_kernels(True, **kw)),
                ("llama linear_ce", lambda: llama_layers.run_loss(True, **kw)),
                ("llama decoder layer", lambda: llama_layers.run_layer(True, **kw))]
    return [(step, lambda: run_part(step, quick=quick, device=device, ceilings=ceilings, use_compile=use_compile))]


def merge_results(old: dict | None, payload: dict) -> dict:
    """``payload`` merged into earlier results ``old`` (their rows, errors, parts and runs kept)."""
    if not old:
        return payload
    merged = dict(payload)
    merged["rows"] = old.get("rows", []) + payload["rows"]
    merged["errors"] = {**old.get("errors", {}), **payload["errors"]}
    merged["parts"] = old.get("parts", []) + [p for p in payload["parts"] if p not in old.get("parts", [])]
    merged["notes"] = list(dict.fromkeys(old.get("notes", []) + payload["notes"]))
    merged["runs"] = old.get("runs", []) + payload.get("runs", [])
    return merged


def run_part(part: str, *, quick: bool, device: str, ceilings: dict, use_compile: bool | None) -> list[dict]:
    if part == "layernorm_gelu":
        from bench import layernorm_gelu

        return layernorm_gelu.run(quick, device=device, ceilings=ceilings, use_compile=use_compile)
    if part == "attention":
        from bench import attention

        return attention.run(quick, device=device, ceilings=ceilings, use_compile=use_compile)
    if part == "loss":
        from bench import loss

        return (loss.run(quick, device=device, ceilings=ceilings, use_compile=use_compile)
                + loss.run_train(quick, device=device, ceilings=ceilings))
    if part == "prepare":
        from bench import prepare

        return prepare.run(quick)
    if part == "llama":
        from bench import llama_layers

        return llama_layers.run(quick, device=device, ceilings=ceilings, use_compile=use_compile)
    if part == "hf":
        from bench import hf

        return hf.run(quick, device=device, ceilings=ceilings, use_compile=use_compile)
    from bench import model

    if part == "train":
        return model.run_train(quick, device=device, ceilings=ceilings, use_compile=use_compile)
    from bench import batch_generate

    return (model.run_generate(quick, device=device, ceilings=ceilings)
            + batch_generate.run(quick, device=device, ceilings=ceilings))


def main(argv=None) -> int:
    from bench import report

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes, steps and configurations")
    parser.add_argument("--only", action="append", metavar="NAMES",
                        help="kernels, layernorm_gelu, attention, loss, train, generate, prepare, hf, llama (repeatable or comma list)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: bench/results on CUDA, out/bench on CPU)")
    parser.add_argument("--no-save", action="store_true", help="print the tables, write nothing")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile baseline")
    parser.add_argument("--json-out", type=Path, default=None, metavar="FILE",
                        help="merge the rows into FILE (and FILE's .md), rewritten after every finished piece; "
                             "no plots (the GPU session's incremental mode)")
    args = parser.parse_args(argv)
    parts = parse_only(args.only)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    notes = []
    if not cuda:
        notes.append(CPU_NOTE)
        print(f"NOTE: {CPU_NOTE}\n")
    if cuda:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    env = env_info(device)
    ceilings = measure_ceilings(device, quick=args.quick)
    print(f"device: {env.get('device')} | driver {env.get('driver', '-')} | torch {env['torch']} | "
          f"triton {env['triton']} | copy {ceilings['copy_gbs']:.1f} GB/s | "
          f"matmul {ceilings['matmul_tflops']:.3g} TFLOP/s | parts: {', '.join(parts)}\n", flush=True)

    rows: list[dict] = []
    errors: dict[str, str] = {}
    use_compile = False if args.no_compile else None
    run_info = {"parts": parts, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "ceilings": ceilings, "quick": args.quick}

    def payload() -> dict:
        return {"env": env, "ceilings": ceilings, "quick": args.quick, "parts": parts, "notes": notes,
                "targets": report.check_targets(rows, cuda=cuda), "rows": rows, "errors": errors,
                "runs": [run_info]}

    def save_incremental() -> None:
        if args.json_out is None or args.no_save:
            return
        merged = merge_results(base, payload())
        merged["targets"] = report.check_targets(merged["rows"], cuda=cuda)
        report.write_atomic(merged, args.json_out)

    # --json-out merges into what is there: remember it once, so each rewrite adds this run's rows once.
    base = (json.loads(args.json_out.read_text())
            if args.json_out is not None and args.json_out.exists() and args.json_out.stat().st_size else None)
    for part in parts:
        print(f"== {part}" + (f": {STEPS[part]}" if part in STEPS else ""), flush=True)
        for label, thunk in step_pieces(part, quick=args.quick, device=device, ceilings=ceilings,
                                        use_compile=use_compile):
            t0 = time.perf_counter()
            key = part if label == part else f"{part}/{label}"
            try:
                piece_rows = thunk()
            except Exception as e:  # noqa: BLE001 - one failing benchmark must not lose the others
                traceback.print_exc()
                errors[key] = f"{type(e).__name__}: {e}"
                print(f"!! {key} failed: {errors[key]}\n", file=sys.stderr, flush=True)
                piece_rows = []
            rows.extend(piece_rows)
            report.print_rows(piece_rows)
            print(f"-- {key}: {len(piece_rows)} rows in {time.perf_counter() - t0:.0f}s\n", flush=True)
            save_incremental()
            if cuda:
                torch.cuda.empty_cache()

    print(report.targets_markdown(payload()["targets"]))
    if args.json_out is not None and not args.no_save:
        print(f"\nwrote {args.json_out} and {args.json_out.with_suffix('.md')}")
    elif not args.no_save:
        out_dir = args.out or (RESULTS_DIR if cuda else CPU_OUT)
        stem = f"{dt.date.today().isoformat()}-{device_slug(env)}"
        if args.quick:
            stem += "-quick"
        if parts != PARTS:
            stem += "-" + "-".join(parts)
        paths = report.write(payload(), out_dir, stem, with_plots=not args.no_plots)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    if errors:
        print(f"\n{len(errors)} benchmark(s) failed: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
