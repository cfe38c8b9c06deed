"""Run the whole benchmark suite in one process and write the results.

    python -m bench                        # every benchmark (CUDA: the full sweep, bf16)
    python -m bench --quick                # fewer shapes, steps and configurations
    python -m bench --only kernels         # kernels | layernorm_gelu | attention | loss | train | generate | prepare | hf;
    python -m bench --only train,generate  #   repeatable or a comma list ("kernels" = the two kernel benches)
    python -m bench --out DIR              # where to write (see below); --no-save prints only

Benchmarks: ``bench.layernorm_gelu`` (LayerNorm, add+LayerNorm, GELU; GB/s), ``bench.attention``
(causal flash attention fwd/bwd vs every SDPA backend and the book's attention, TFLOP/s; decode
attention vs SDPA, µs and GB/s), ``bench.loss`` (fused linear + cross-entropy vs the eager/compiled/Liger
head + loss, ms and peak MiB; GPT-2 training step with and without it at the largest batch that fits), ``bench.model`` (GPT-2 training step and generation, tokens/s), ``bench.batch_generate``
(``generate_batch`` on 64 ragged prompts vs one at a time and HF ``generate``, tokens/s), ``bench.prepare`` (corpus preparation
tokens/s and MB/s vs a plain tiktoken loop; a CPU benchmark, real on any machine).
Every row records ours, each baseline, the speed-ups, the achieved TFLOP/s or GB/s and its fraction of
the ceiling measured at the start of the same run (copy bandwidth, bf16 matmul); the header records
device, driver, torch and triton versions. The docs/design.md targets are checked at the end.

Output: ``<date>-<device-slug>[-quick][-<parts>].json`` with all rows, a Markdown ``.md`` with the
tables and the target check, and PNG plots (attention speed-up vs T, decode latency vs context,
LayerNorm/GELU GB/s vs width, training/generation tokens/s). On CUDA they go to ``bench/results/``
(committed); on CPU, where the run is only a smoke test of tiny shapes on the fallback path, to
``out/bench/`` (git-ignored) so smoke runs never mix with GPU results. ``--out DIR`` overrides both.
Exit status 1 when a benchmark failed (the others still run and are written).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import traceback
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, device_slug, env_info, measure_ceilings

PARTS = ["layernorm_gelu", "attention", "loss", "train", "generate", "prepare", "hf"]
ALIASES = {"kernels": ["layernorm_gelu", "attention"]}
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
            if name not in PARTS and name not in ALIASES:
                raise SystemExit(f"--only: unknown benchmark {name!r}; choose from "
                                 f"{', '.join(['kernels', *PARTS])}")
            for part in ALIASES.get(name, [name]):
                if part not in chosen:
                    chosen.append(part)
    return [p for p in PARTS if p in chosen]


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
                        help="kernels, layernorm_gelu, attention, loss, train, generate, prepare, hf (repeatable or comma list)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: bench/results on CUDA, out/bench on CPU)")
    parser.add_argument("--no-save", action="store_true", help="print the tables, write nothing")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile baseline")
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
          f"matmul {ceilings['matmul_tflops']:.3g} TFLOP/s | parts: {', '.join(parts)}\n")

    rows: list[dict] = []
    errors: dict[str, str] = {}
    use_compile = False if args.no_compile else None
    for part in parts:
        print(f"== {part}", flush=True)
        try:
            part_rows = run_part(part, quick=args.quick, device=device, ceilings=ceilings,
                                 use_compile=use_compile)
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not lose the others
            traceback.print_exc()
            errors[part] = f"{type(e).__name__}: {e}"
            print(f"!! {part} failed: {errors[part]}\n", file=sys.stderr)
            continue
        rows += part_rows
        report.print_rows(part_rows)
        print()
        if cuda:
            torch.cuda.empty_cache()

    payload = {"env": env, "ceilings": ceilings, "quick": args.quick, "parts": parts, "notes": notes,
               "targets": report.check_targets(rows, cuda=cuda), "rows": rows, "errors": errors}
    print(report.targets_markdown(payload["targets"]))
    if not args.no_save:
        out_dir = args.out or (RESULTS_DIR if cuda else CPU_OUT)
        stem = f"{dt.date.today().isoformat()}-{device_slug(env)}"
        if args.quick:
            stem += "-quick"
        if parts != PARTS:
            stem += "-" + "-".join(parts)
        paths = report.write(payload, out_dir, stem, with_plots=not args.no_plots)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    if errors:
        print(f"\n{len(errors)} benchmark(s) failed: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
