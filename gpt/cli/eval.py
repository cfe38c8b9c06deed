"""``python -m gpt.eval hellaswag --init SOURCE --data FILE.jsonl [--limit N] [--batch-size B] [--out F]``:
the flags and the exit codes.

The work is ``gpt.eval.read_hellaswag`` + ``gpt.eval.evaluate_hellaswag``; the summary
``{"acc", "acc_norm", "n"}`` is printed as one JSON line; errors are one ``error:`` line on stderr and
exit 2 (a malformed data line names its number); Ctrl-C exits 130 and SIGTERM 143 with one line, the
``--out`` files not written (they are written whole at the end).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..eval import evaluate_hellaswag, read_hellaswag, write_predictions
from ..recipes import model_class
from ..run import check_device
from ..tokenizer import TokenizerError, get_tokenizer
from ..weights import WeightsError
from .stopping import exit_code, sigterm_raises


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (no usage block)
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m gpt.eval", description="Evaluate a model on a benchmark.")
    sub = p.add_subparsers(dest="task", required=True, parser_class=_Parser)
    h = sub.add_parser("hellaswag", help="HellaSwag accuracy (acc, acc_norm) as llm.c and build-nanogpt compute it",
                       description="HellaSwag: each example's four endings scored by the summed (acc) and the "
                                   "per-token mean (acc_norm) log-probability after the context. Prints "
                                   '{"acc", "acc_norm", "n"} as one JSON line.')
    h.add_argument("--init", required=True, help="the model: anything from_pretrained takes (HF folder, "
                                                  ".safetensors, checkpoint, run folder, model name)")
    h.add_argument("--data", required=True, help="HellaSwag jsonl (e.g. hellaswag_val.jsonl; see the README)")
    h.add_argument("--limit", type=_positive, default=None, help="only the first N examples")
    h.add_argument("--batch-size", type=_positive, default=8, help="examples per forward pass (4 rows each)")
    h.add_argument("--out", default=None, help="write one prediction per example to this .jsonl, and the "
                                               "summary to <stem>.summary.json next to it")
    h.add_argument("--backend", choices=["fused", "reference"], default=None)
    h.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m gpt.eval``'s exit code for ``argv`` (default ``sys.argv[1:]``)."""
    args = build_parser().parse_args(argv)
    with sigterm_raises():  # SIGTERM stops as Ctrl-C does: nothing written, exit 143
        try:
            out = Path(args.out) if args.out is not None else None
            if out is not None and out.is_dir():
                raise ValueError(f"--out {out} is a folder; give a file name such as preds.jsonl")
            if out is not None and not out.parent.is_dir():
                raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
            check_device(args.device)
            examples = read_hellaswag(args.data, args.limit)  # bad data fails before the model loads
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            cls, _ = model_class(args.backend)
            model = cls.from_pretrained(args.init, device=device)
            summary, preds = evaluate_hellaswag(model, examples, get_tokenizer(), batch_size=args.batch_size,
                                                device=device, progress=True)
            if out is not None:
                write_predictions(out, preds, summary)
        except (ValueError, OSError, CheckpointError, WeightsError, TokenizerError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            print("interrupted: nothing written", file=sys.stderr)
            return exit_code(e)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
