"""``python train.py [pretrain|classify|instruct] [flags]``: the flags, the help and the exit codes.

The work is ``gpt.recipes.run(args)``; this module parses argv into ``args`` (``parse_args``) and turns the
library's exceptions into exit codes (``cli``): bad input 2 (one line on stderr), a diverged run 1,
Ctrl-C 130, SIGTERM 143.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from ..checkpoint import CheckpointError
from ..data import DataError
from ..recipes import DEFAULT_STEPS, run
from ..tokenizer import TokenizerError
from ..training import TrainingDiverged
from ..weights import WeightsError

COMMANDS = ("pretrain", "classify", "instruct", "dpo")
COMMAND_HELP = {
    "pretrain": "Pretrain a GPT-2 on text files, folders or llm.c .bin shards (default: the embedded corpus).",
    "classify": "Finetune a classifier on a label<TAB>text file (the book's spam classifier).",
    "instruct": "Finetune on Alpaca-format instruction JSON and write the test split's responses.",
    "dpo": "Preference-tune a model (--init, e.g. an instruct run) with DPO on chosen/rejected responses.",
}
# Flags a resumed run may change; every other flag is part of the run and fixed by its first launch.
RUN_NOTES = """\
run folder: config.json (the model and the run's arguments), metrics.jsonl, ckpt-last.pt (atomic),
ckpt-best.pt, loss.png and a .lock held while a process trains in it (a second run on the folder exits 2).
--resume continues the run in --out exactly, with the arguments stored in its config.json; on --resume
only --steps/--epochs (to extend the run), --eval-every, --eval-batches, --save-every,
--save-every-minutes, --device, --compile, --prompt, --max-new-tokens, --eval-hellaswag
may be given with a new value;
any other flag that differs from the stored one is an error. A folder whose run crashed before its first
checkpoint resumes from step 0 with its stored arguments.
Ctrl-C or SIGTERM: finish the step, save ckpt-last.pt, exit 130 / 143. A non-finite loss or gradient
norm stops the run (exit 1) before the bad step is applied; no checkpoint with non-finite weights or
optimizer state is ever written. Bad input, a folder in use, a failed checkpoint write (disk full):
one line on stderr, exit 2, earlier files kept.
LoRA (--lora-rank, classify/instruct/dpo): only the adapters (and a classifier's new head) train and the
checkpoints hold only them, with the --init base recorded (path and a fingerprint of its weights, checked
on --resume); from_pretrained / python -m gpt.export on the run give the merged model."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show a default only where it says something: not ``None``/``False``, not when the help text
    already describes it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (no usage block)
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _number(kind, low: float, strict: bool):
    """argparse type: a finite ``kind`` > ``low`` (``strict``) or >= ``low``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value
    return parse


POSITIVE_INT, NONNEG_INT = _number(int, 0, True), _number(int, 0, False)
POSITIVE, NONNEG = _number(float, 0, True), _number(float, 0, False)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The flags of ``command`` (``None``: the top-level help, which lists the subcommands)."""
    cmd = command or "pretrain"
    top = ("Pretrain or finetune a GPT-2: train.py [pretrain|classify|instruct|dpo] [flags]; "
           "`train.py COMMAND --help` lists a command's flags. With no command: pretrain.")
    p = _Parser(prog="train.py" if command is None else f"train.py {command}",
                description=top if command is None else COMMAND_HELP[command],
                epilog=RUN_NOTES, formatter_class=_HelpFormatter)
    data_help = {"pretrain": "text files/folders, llm.c .bin shards, or a `python -m gpt.data prepare` folder "
                             "(its *train* shards, validated on its *val* shards; default: the embedded corpus)",
                 "classify": "a label<TAB>text file", "instruct": "an Alpaca JSON file",
                 "dpo": "a preference JSON file (the book's format: instruction, input, output, chosen, "
                        "rejected; e.g. data/preference-data.json)"}[cmd]
    p.add_argument("--data", nargs="+", default=None, help=data_help)
    p.add_argument("--preset", default=None, help="tiny, gpt2-small, gpt2-medium, gpt2-large, gpt2-xl "
                                                   "(default: tiny on CPU, gpt2-small on CUDA; with --init the weights decide, "
                                                   "and a --preset given is ignored with a warning)")
    p.add_argument("--init", default=None, help="start from weights: HF folder, .safetensors, checkpoint, "
                                                 "run folder or model name (gpt2, gpt2-medium, ...)"
                                                 + ("; required: the policy's start and the frozen reference"
                                                    if cmd == "dpo" else ""))
    p.add_argument("--steps", type=POSITIVE_INT, default=None,
                   help="total optimizer steps of the run; on --resume, a larger value extends it"
                        + (f" (default {DEFAULT_STEPS})" if cmd == "pretrain" else ""))
    p.add_argument("--epochs", type=POSITIVE, default=None,
                   help="run length in epochs of the training split, instead of --steps"
                        + {"pretrain": "", "classify": " (default 5)", "instruct": " (default 2)",
                           "dpo": " (default 1)"}[cmd])
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="examples per process per micro-batch")
    p.add_argument("--grad-accum", type=POSITIVE_INT, default=1, help="micro-batches per optimizer step")
    if cmd == "pretrain":
        p.add_argument("--context-length", type=POSITIVE_INT, default=None,
                       help="training window in tokens (default: the model's context length)")
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help="peak learning rate (default: " + {"pretrain": "1e-3 for tiny, 6e-4 otherwise)",
                                                           "dpo": "5e-6, the book's)"}.get(cmd, "5e-5)"))
    p.add_argument("--warmup", type=NONNEG_INT, default=None, help="linear warm-up steps, 0 for none "
                                                                    "(default: 5%% of the steps, at least 1)")
    p.add_argument("--weight-decay", type=NONNEG, default=0.1)
    p.add_argument("--clip", type=NONNEG, default=1.0, help="gradient-norm clip (0 disables)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU; fp16 uses a grad scaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--backend", choices=["fused", "reference"], default=None,
                   help="model: fused Triton kernels or the book's PyTorch reference (default: fused if available)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=100, help="evaluate every N steps (and at the end)")
    p.add_argument("--eval-batches", type=POSITIVE_INT, default=10, help="batches per evaluation")
    p.add_argument("--save-every", type=POSITIVE_INT, default=None,
                   help="write ckpt-last.pt every N steps (default: eval-every)")
    p.add_argument("--save-every-minutes", type=POSITIVE, default=None,
                   help="also write ckpt-last.pt when this many minutes passed since the last save")
    p.add_argument("--out", default=None, help="run folder (default: runs/<command>, numbered if taken)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default runs/<command>) with its stored arguments")
    p.add_argument("--seed", type=NONNEG_INT, default=123)
    if cmd == "pretrain":
        p.add_argument("--prompt", default=None, help="start of the sample printed at each evaluation")
        p.add_argument("--doc-mask", action="store_true",
                       help="attention never crosses an <|endoftext|> inside a window: each document attends "
                            "only to itself, positions counted from its start (fused backend only)")
        p.add_argument("--eval-hellaswag", default=None, metavar="FILE",
                       help="also report HellaSwag acc / acc_norm of this jsonl at each evaluation (metrics.jsonl, "
                            "loss.png); `--eval-hellaswag` files are read whole, so pick a slice for frequent evals")
    if cmd in ("classify", "instruct", "dpo"):
        p.add_argument("--lora-rank", type=POSITIVE_INT, default=None,
                       help="train LoRA adapters of this rank (the book's Appendix E) instead of the weights; "
                            "needs --init")
        p.add_argument("--lora-alpha", type=POSITIVE, default=None,
                       help="LoRA scale: the update is alpha * (x @ A @ B) (default 16, the book's)")
    if cmd == "dpo":
        p.add_argument("--beta", type=POSITIVE, default=0.1, help="DPO temperature (the book: 0.1 to 0.5)")
    if cmd == "classify":
        p.add_argument("--train-all", action="store_true", help="train every layer, not only the last block")
        p.add_argument("--predict", default=None, metavar="TEXT", help="print the label of TEXT with --init "
                                                                        "(a classify run folder); no training")
    if cmd == "instruct":
        p.add_argument("--mask-prompt", action="store_true", help="loss on the response tokens only")
        p.add_argument("--max-new-tokens", type=NONNEG_INT, default=256,
                       help="response length for the test split")
    return p


OTHER_COMMANDS_FLAGS = {"context_length": None, "prompt": None, "train_all": False, "predict": None,
                        "mask_prompt": False, "max_new_tokens": 256, "eval_hellaswag": None, "lora_rank": None,
                        "lora_alpha": None, "beta": None, "doc_mask": False}


def parse_args(argv=None) -> argparse.Namespace:
    """Flags of ``train.py [COMMAND] [flags]``; ``args.given`` holds the flags given explicitly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else None
    if command is None and argv and not argv[0].startswith("-"):
        build_parser(None).error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
    p = build_parser(command)
    args = p.parse_args(argv)
    for name in ("out", "preset", "init", "device", "eval_hellaswag"):
        if getattr(args, name, None) == "":
            p.error(f"--{name.replace('_', '-')} must not be empty")
    bare = build_parser(command)  # the same flags with no defaults: which ones the user typed
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(bare.parse_args(argv)))
    args.command = command or "pretrain"
    for name, value in OTHER_COMMANDS_FLAGS.items():  # flags of the other commands: their neutral value
        vars(args).setdefault(name, value)
    return args



def cli(argv=None) -> int:
    """``train.py``'s exit code for ``argv`` (default ``sys.argv[1:]``)."""
    try:
        run(parse_args(argv))
        return 0
    except (DataError, CheckpointError, WeightsError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C 130, SIGTERM 143 (after saving ckpt-last.pt)
        print(f"{e or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


main = cli  # (python -m gpt.cli.train == python train.py)

if __name__ == "__main__":
    sys.exit(cli())
