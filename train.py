"""Pretrain and finetune GPT-2: ``python train.py [pretrain|classify|instruct] [flags]``.

With no arguments it runs the main job: pretrain the ``tiny`` preset on an embedded corpus (CPython's
bundled documentation, no download) for 300 steps on CPU (a few minutes), printing progress, the
validation loss and a text sample, into a run folder ``runs/pretrain``. On CUDA the default model is
``gpt2-small`` in bf16. Subcommands: ``classify`` (TSV ``label<TAB>text``, the book's spam classifier)
and ``instruct`` (Alpaca JSON). Under ``torchrun --nproc_per_node=N`` the same script trains with DDP.

A run folder holds ``config.json`` (with the run's arguments), ``metrics.jsonl``, ``ckpt-last.pt``
(atomic), ``ckpt-best.pt``, ``loss.png`` and ``.lock`` (one process per folder); ``--resume`` continues a
run exactly with its stored arguments. Ctrl-C/SIGTERM save and exit 130/143; bad input prints one line on
stderr, exit code 2. ``python train.py COMMAND --help`` lists a command's flags.
"""

import sys

from gpt.cli.train import cli, main, parse_args  # noqa: F401 (the flags and exit codes live in gpt/cli/train.py)

if __name__ == "__main__":
    sys.exit(cli())
