"""``python -m gpt.data prepare INPUT... --out DIR [flags]``: the flags, the report and the exit codes.

The work is ``gpt.prepare.prepare(...)`` (its module docstring is this command's ``--help``); bad input is
one ``error:`` line on stderr and exit 2, a dead worker exit 1, Ctrl-C 130, SIGTERM 143 (nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..data import DataError
from ..prepare import __doc__ as PREPARE_DOC
from ..prepare import prepare, skipped_note
from ..prepare_workers import WorkerError
from .stopping import exit_code, sigterm_raises


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


USAGE = ("usage: python -m gpt.data prepare INPUT... --out DIR [--val-tokens N] [--shard-tokens N] "
         "[--workers N] [--text-field F] [--prefix P] [--overwrite] [--quiet]")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpt.data prepare", description=PREPARE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files (.jsonl, .jsonl.gz, .parquet, else text) and folders (their .txt .md .rst .text "
                        ".jsonl .jsonl.gz .parquet files; others skipped with a notice)")
    p.add_argument("--out", required=True, help="output folder (empty or new, unless --overwrite)")
    p.add_argument("--val-tokens", type=int, default=1_000_000,
                   help="tokens in the validation split, taken first (default: 1,000,000)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000,
                   help="tokens per shard (default: 100,000,000 as llm.c; 200 MB)")
    p.add_argument("--workers", type=int, default=_usable_cpus(),
                   help="tokenizer processes (default: the CPUs this process may use)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column of the text (default: text)")
    p.add_argument("--prefix", default="data", help="shard name prefix (default: data)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous prepare output in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no notice of skipped files")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\ncommands:\n  prepare    text files, folders, .jsonl(.gz), .parquet -> llm.c token "
              "shards (streaming, in parallel)\n\nSee python -m gpt.data prepare --help.")
        return 0
    if not argv or argv[0] != "prepare":
        print(f"{USAGE}\n(see python -m gpt.data --help, python -m gpt.data prepare --help)", file=sys.stderr)
        return 2
    args = parse_args(argv[1:])
    with sigterm_raises():  # SIGTERM stops the run as Ctrl-C does (exit 143)
        try:
            m = prepare(args.inputs, args.out, val_tokens=args.val_tokens, shard_tokens=args.shard_tokens,
                        workers=args.workers, text_field=args.text_field, prefix=args.prefix,
                        overwrite=args.overwrite, progress=False if args.quiet else None)
        except (DataError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except WorkerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            print("interrupted: nothing written", file=sys.stderr)
            return exit_code(e)
    mb = m["bytes"] / 1e6
    other = f", {skipped_note(m['skipped_files'])} skipped by suffix" if m["skipped_files"] else ""
    print(f"{m['documents']:,} documents ({m['skipped_empty_documents']:,} empty skipped) from {m['files']} "
          f"files{other}, {mb:,.1f} MB -> {m['tokens']:,} tokens in {m['seconds']:.1f} s "
          f"({mb / max(m['seconds'], 1e-9):,.1f} MB/s, {m['tokens'] / max(m['seconds'], 1e-9):,.0f} tokens/s)")
    print(f"{args.out}: {len(m['val_shards'])} val shard(s), {m['val_tokens']:,} tokens; "
          f"{len(m['train_shards'])} train shard(s), {m['train_tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
