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

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

DEFAULT_STEPS = 300


COMMANDS = ("pretrain", "classify", "instruct")
COMMAND_HELP = {
    "pretrain": "Pretrain a GPT-2 on text files, folders or llm.c .bin shards (default: the embedded corpus).",
    "classify": "Finetune a classifier on a label<TAB>text file (the book's spam classifier).",
    "instruct": "Finetune on Alpaca-format instruction JSON and write the test split's responses.",
}
# Flags a resumed run may change; every other flag is part of the run and fixed by its first launch.
RESUMABLE = {"steps", "epochs", "eval_every", "eval_batches", "save_every", "save_every_minutes", "device",
             "compile", "prompt", "max_new_tokens"}
RUN_NOTES = """\
run folder: config.json (the model and the run's arguments), metrics.jsonl, ckpt-last.pt (atomic),
ckpt-best.pt, loss.png and a .lock held while a process trains in it (a second run on the folder exits 2).
--resume continues the run in --out exactly, with the arguments stored in its config.json; on --resume
only --steps/--epochs (to extend the run), --eval-every, --eval-batches, --save-every,
--save-every-minutes, --device, --compile, --prompt and --max-new-tokens may be given with a new value;
any other flag that differs from the stored one is an error. A folder whose run crashed before its first
checkpoint resumes from step 0 with its stored arguments.
Ctrl-C or SIGTERM: finish the step, save ckpt-last.pt, exit 130 / 143. A non-finite loss or gradient
norm stops the run (exit 1) before the bad step is applied; no checkpoint with non-finite weights or
optimizer state is ever written. Bad input, a folder in use, a failed checkpoint write (disk full):
one line on stderr, exit 2, earlier files kept."""


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
    top = ("Pretrain or finetune a GPT-2: train.py [pretrain|classify|instruct] [flags]; "
           "`train.py COMMAND --help` lists a command's flags. With no command: pretrain.")
    p = _Parser(prog="train.py" if command is None else f"train.py {command}",
                description=top if command is None else COMMAND_HELP[command],
                epilog=RUN_NOTES, formatter_class=_HelpFormatter)
    data_help = {"pretrain": "text files/folders, llm.c .bin shards, or a `python -m gpt.data prepare` folder "
                             "(its *train* shards, validated on its *val* shards; default: the embedded corpus)",
                 "classify": "a label<TAB>text file", "instruct": "an Alpaca JSON file"}[cmd]
    p.add_argument("--data", nargs="+", default=None, help=data_help)
    p.add_argument("--preset", default=None, help="tiny, gpt2-small, gpt2-medium, gpt2-large, gpt2-xl "
                                                   "(default: tiny on CPU, gpt2-small on CUDA; with --init the weights decide, "
                                                   "and a --preset given is ignored with a warning)")
    p.add_argument("--init", default=None, help="start from weights: HF folder, .safetensors, checkpoint, "
                                                 "run folder or model name (gpt2, gpt2-medium, ...)")
    p.add_argument("--steps", type=POSITIVE_INT, default=None,
                   help="total optimizer steps of the run; on --resume, a larger value extends it"
                        + (f" (default {DEFAULT_STEPS})" if cmd == "pretrain" else ""))
    p.add_argument("--epochs", type=POSITIVE, default=None,
                   help="run length in epochs of the training split, instead of --steps"
                        + {"pretrain": "", "classify": " (default 5)", "instruct": " (default 2)"}[cmd])
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="examples per process per micro-batch")
    p.add_argument("--grad-accum", type=POSITIVE_INT, default=1, help="micro-batches per optimizer step")
    if cmd == "pretrain":
        p.add_argument("--context-length", type=POSITIVE_INT, default=None,
                       help="training window in tokens (default: the model's context length)")
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help="peak learning rate (default: " + ("1e-3 for tiny, 6e-4 otherwise)" if cmd == "pretrain"
                                                           else "5e-5)"))
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
                        "mask_prompt": False, "max_new_tokens": 256}


def parse_args(argv=None) -> argparse.Namespace:
    """Flags of ``train.py [COMMAND] [flags]``; ``args.given`` holds the flags given explicitly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else None
    if command is None and argv and not argv[0].startswith("-"):
        build_parser(None).error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
    p = build_parser(command)
    args = p.parse_args(argv)
    for name in ("out", "preset", "init", "device"):
        if getattr(args, name) == "":
            p.error(f"--{name} must not be empty")
    bare = build_parser(command)  # the same flags with no defaults: which ones the user typed
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(bare.parse_args(argv)))
    args.command = command or "pretrain"
    for name, value in OTHER_COMMANDS_FLAGS.items():  # flags of the other commands: their neutral value
        vars(args).setdefault(name, value)
    return args


# ------------------------------------------------------------------------------------------ set-up
def model_class(backend: str | None):
    if backend in (None, "fused"):
        try:
            from gpt.model import GPTModel

            return GPTModel, "fused"
        except ImportError:
            if backend == "fused":
                raise ValueError("--backend fused is not available in this build; use --backend reference") from None
    from gpt.reference import GPTModel

    return GPTModel, "reference"


# ------------------------------------------------------------------------------------- run folders
LOCK_NAME = ".lock"
NOT_STORED = {"given", "out_path", "out", "resume", "predict"}


def check_device(arg: str | None) -> None:
    if arg is None:
        return
    try:
        device = torch.device(arg)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {arg!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {arg}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {arg}: only cpu and cuda devices are supported")


def holds_run(p: Path) -> bool:
    """A folder holds a run once it has a checkpoint or logged a step (config.json alone does not)."""
    return (p / "ckpt-last.pt").exists() or (p / "metrics.jsonl").exists()


def check_folder(path: Path) -> None:
    """``path`` can be a run folder: not a file, not locked by a running process (checked again under
    the lock before anything is written)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder")
    if (path / LOCK_NAME).is_file():
        lock_run_folder(path, create=False).close()


def in_use_error(path: Path, f) -> ValueError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    return ValueError(f"run folder {path} is in use by process {holder} (it holds {path / LOCK_NAME}); "
                      "wait for it to finish or choose another --out")


def choose_run_folder(out: str | None, command: str) -> Path:
    """A new run's folder; never one holding a run (an explicit --out holding one is an error)."""
    if out is not None:
        path = Path(out)
        check_folder(path)
        if holds_run(path):
            raise ValueError(f"run folder {out} already holds a run; pass --resume or choose another --out")
        return path
    base = candidate = Path(f"runs/{command}")
    n = 1
    while holds_run(candidate) or (candidate / "config.json").exists() or candidate.is_file():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def stored_form(name: str, value):
    """An argument as config.json stores it: data and local --init paths absolute."""
    if name == "data" and value is not None:
        return [os.path.abspath(v) for v in value]
    if name == "init" and value is not None and os.path.exists(value):
        return os.path.abspath(value)
    return value


def resume_args(args: argparse.Namespace, path: Path, world: int = 1) -> argparse.Namespace:
    """The run's stored arguments, with the flags a resumed run may change taken from the command line."""
    check_folder(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        if not (path / "ckpt-last.pt").is_file():
            raise ValueError(f"nothing to resume: {path} holds no run (no config.json or ckpt-last.pt)")
        return args  # a run folder without config.json: the command line's arguments
    try:
        stored = json.loads(config_path.read_text())
        saved = stored["args"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot resume: {config_path} is unreadable or holds no 'args' ({e})") from None
    if stored.get("command") != args.command:
        raise ValueError(f"{path} holds a {stored.get('command')} run, not {args.command}; resume it with "
                         f"`train.py {stored.get('command')} --resume --out {path}`")
    if stored.get("world_size", world) != world:  # the global batch and the data order depend on it
        raise ValueError(f"the run in {path} used {stored['world_size']} processes, this is {world}; resume it "
                         f"with {stored['world_size']}")
    for name in sorted(args.given - RESUMABLE - NOT_STORED):
        new, old = stored_form(name, getattr(args, name)), saved.get(name)
        if new != old:
            flag = "--" + name.replace("_", "-")
            had = f"no {flag} (its default)" if old is None else f"{flag} {old}"
            raise ValueError(f"{flag} cannot change on --resume (the run in {path} has {had}, got {new}); "
                             f"only {', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE))} may")
    merged = {**vars(args), **{k: v for k, v in saved.items() if k in vars(args) and k not in NOT_STORED}}
    merged.update({k: getattr(args, k) for k in args.given & RESUMABLE})
    if args.given & {"steps", "epochs"}:  # a new length replaces the stored one
        merged["epochs" if "steps" in args.given else "steps"] = None
    return argparse.Namespace(**merged)


def lock_run_folder(path: Path, create: bool = True):
    """Create ``path`` and hold an exclusive lock on ``path/.lock`` (released by the OS when the process
    dies); an open file to keep for the run's lifetime. A folder locked by another process is an error."""
    import fcntl

    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        f = open(path / LOCK_NAME, "a+" if create else "r")
    except OSError as e:
        raise ValueError(f"cannot use {path} as the run folder: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise in_use_error(path, f) from None
    if not create:
        return f
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def remove_stale_temp_files(path: Path) -> None:
    """Temp files of writes killed mid-way (``.ckpt-last.pt.*.tmp``, a full checkpoint each)."""
    for p in path.iterdir():
        if p.name.startswith(".") and ".tmp" in p.name and p.is_file():
            p.unlink()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(tmp, path)


def build_model(args, device, extra_cfg=None):
    """(model, cfg, backend, checkpoint): from --resume's checkpoint config, --init weights, or a preset."""
    from gpt.checkpoint import CheckpointError, load_checkpoint
    from gpt.config import GPTConfig

    cls, backend = model_class(args.backend)
    if args.resume and (args.out_path / "ckpt-last.pt").is_file():
        path = args.out_path / "ckpt-last.pt"
        ckpt = load_checkpoint(path)  # validates the file before anything runs
        if not isinstance(ckpt.get("config"), dict):
            raise CheckpointError(f"{path} holds no model config; it cannot be resumed")
        task = ckpt["extra"].get("task")
        if task not in (None, args.command):
            raise CheckpointError(f"{path} is a checkpoint of a {task} run, not {args.command}")
        try:
            cfg = GPTConfig.from_dict(ckpt["config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path} holds an invalid model config ({e})") from None
        return cls(cfg), cfg, backend, ckpt
    if args.init:
        if args.preset is not None:  # the weights decide the architecture
            print(f"warning: --preset {args.preset} is ignored: --init {args.init} sets the model's size",
                  file=sys.stderr)
        model = cls.from_pretrained(args.init, **(extra_cfg or {}))
        return model, model.cfg, backend, None
    preset = args.preset if args.preset is not None else ("gpt2-small" if device.type == "cuda" else "tiny")
    cfg = GPTConfig.from_preset(preset, **(extra_cfg or {}))
    return cls(cfg), cfg, backend, None


def steps_for(args, n_items: int, world: int, default_epochs: float | None) -> int:
    if args.steps is not None:
        return args.steps
    per_epoch = n_items // (args.batch_size * world * args.grad_accum)
    if per_epoch == 0:
        raise ValueError(f"the training split holds {n_items} examples, fewer than one step's "
                         f"{args.batch_size * world * args.grad_accum}: use more data or a smaller --batch-size")
    epochs = args.epochs if args.epochs is not None else default_epochs
    if epochs is None:
        return DEFAULT_STEPS
    return max(1, round(epochs * per_epoch))


# ---------------------------------------------------------------------------------------- recipes
def check_token_ids(arrays, vocab_size: int, source: str) -> None:
    """Token ids the model cannot embed (llm.c shards of another tokenizer) fail before training."""
    from gpt.data import DataError

    top = max((int(a.max()) for a in arrays if len(a)), default=-1)  # streams through memory-mapped shards
    if top >= vocab_size:
        raise DataError(f"{source} holds token id {top}, outside the model's vocabulary of {vocab_size}")


def pretrain_spec(args, model, cfg, tokenizer, device):
    from gpt.data import (
        ShardWindowDataset,
        TokenWindowDataset,
        default_corpus,
        load_tokens,
        split_shards,
        train_val_split,
    )
    from gpt.training import TrainSpec, calc_loss_batch, generate_sample, perplexity

    ctx = cfg.context_length if args.context_length is None else args.context_length
    if ctx > cfg.context_length:
        raise ValueError(f"--context-length {ctx} exceeds the model's context_length {cfg.context_length}")
    shards = split_shards(args.data) if args.data else None
    if shards:  # a `python -m gpt.data prepare` folder: memory-mapped *train* / *val* shards
        train_ds, val_ds = (ShardWindowDataset(files, ctx, ctx) for files in shards)
        n_train, n_val, source = train_ds.n_tokens, val_ds.n_tokens, f"{args.data[0]} (prepared shards)"
    else:
        if args.data:
            tokens, source = load_tokens(args.data, tokenizer), " ".join(args.data)
        else:
            import numpy as np

            tokens = np.asarray(tokenizer.encode(default_corpus(), allowed_special={"<|endoftext|>"}), dtype=np.int64)
            source = "embedded corpus (CPython pydoc topics)"
        train_tokens, val_tokens = train_val_split(tokens, 0.9)
        train_ds = TokenWindowDataset(train_tokens, ctx, ctx)
        val_ds = TokenWindowDataset(val_tokens, ctx, ctx)
        n_train, n_val = len(train_tokens), len(val_tokens)
    check_token_ids([*train_ds.shards, *val_ds.shards] if shards else [tokens], cfg.vocab_size, source)
    prompt = args.prompt or ("The function" if not args.data else "Every effort moves you")

    def evaluate(m):
        n = min(len(val_ds), args.eval_batches * args.batch_size)
        total, count = 0.0, 0
        for s in range(0, n, args.batch_size):
            x, y = (torch.stack(t) for t in zip(*[val_ds[i] for i in range(s, min(s + args.batch_size, n))]))
            total += calc_loss_batch(x, y, m, device).item()
            count += 1
        val = total / count
        return {"val_loss": val, "val_ppl": perplexity(val)}

    spec = TrainSpec(
        train_data=train_ds,
        collate=lambda items: tuple(torch.stack(t) for t in zip(*items)),  # (b, T), (b, T)
        loss_fn=lambda m, batch, dev: calc_loss_batch(batch[0], batch[1], m, dev),
        evaluate=evaluate,
        sample=(lambda m: generate_sample(m, tokenizer, device, prompt, max_new_tokens=30, temperature=0.8,
                                          top_k=40, generator=torch.Generator(device).manual_seed(args.seed)))
        if cfg.vocab_size >= tokenizer.n_vocab else None,  # (a model of a smaller vocabulary: no text sample)
        extra={"task": "pretrain"},
    )
    info = f"data: {source}: {n_train:,} train / {n_val:,} val tokens, context {ctx}"
    return spec, info, None


def classify_spec(args, model, cfg, tokenizer, device, rows):
    from gpt.data import DataError
    from gpt.finetune import classify as C
    from gpt.training import TrainSpec

    train_rows, val_rows, test_rows, labels = C.balance_and_split(rows, seed=args.seed)
    if not (train_rows and val_rows and test_rows):  # an empty split has no accuracy
        n = len(train_rows) + len(val_rows) + len(test_rows)
        raise DataError(f"{args.data[0]}: the {n} rows left after balancing the labels split 70/10/20 into "
                        f"{len(train_rows)}/{len(val_rows)}/{len(test_rows)}; every split needs a row "
                        "(at least 10 balanced rows)")
    # The book pads every split to the training set's length (the last token's position changes the logits).
    train_ds = C.ClassificationDataset(train_rows, labels, tokenizer, limit=cfg.context_length)
    val_ds = C.ClassificationDataset(val_rows, labels, tokenizer, max_length=train_ds.max_length)
    test_ds = C.ClassificationDataset(test_rows, labels, tokenizer, max_length=train_ds.max_length)

    def evaluate(m):
        train_acc, _ = C.accuracy_and_loss(m, train_ds, device, args.batch_size, args.eval_batches)
        val_acc, val_loss = C.accuracy_and_loss(m, val_ds, device, args.batch_size, args.eval_batches)
        return {"val_loss": val_loss, "train_acc": train_acc, "val_acc": val_acc}

    def finish(m, out: Path):
        m.eval()
        with torch.no_grad():
            acc = {name: C.accuracy_and_loss(m, ds, device, args.batch_size)[0]
                   for name, ds in (("train", train_ds), ("val", val_ds), ("test", test_ds))}
        write_json_atomic(out / "accuracy.json", acc)
        print("accuracy: " + ", ".join(f"{k} {v * 100:.1f}%" for k, v in acc.items()))

    spec = TrainSpec(train_data=train_ds, collate=C.collate, loss_fn=C.loss_fn, evaluate=evaluate,
                     extra={"task": "classify", "labels": labels, "max_length": train_ds.max_length})
    info = (f"data: {len(rows)} rows, labels {labels}; balanced split {len(train_rows)}/{len(val_rows)}/"
            f"{len(test_rows)}, {train_ds.max_length} tokens per text")
    return spec, info, finish


def instruct_spec(args, model, cfg, tokenizer, device, data):
    from gpt import generate
    from gpt.finetune import instruct as I
    from gpt.tokenizer import text_to_token_ids, token_ids_to_text
    from gpt.training import TrainSpec, calc_loss_batch

    train_data, val_data, test_data = I.split(data)
    train_ds, val_ds = I.InstructionDataset(train_data, tokenizer), I.InstructionDataset(val_data, tokenizer)

    def collate(items):
        return I.custom_collate_fn(items, allowed_max_length=cfg.context_length, mask_prompt=args.mask_prompt)

    def evaluate(m):
        n = min(len(val_ds), args.eval_batches * args.batch_size)
        losses = [calc_loss_batch(*collate([val_ds[i] for i in range(s, min(s + args.batch_size, n))]), m, device).item()
                  for s in range(0, n, args.batch_size)]
        return {"val_loss": sum(losses) / len(losses)} if losses else {}

    def respond(m, entry) -> str:
        prompt = I.format_input(entry)
        ids = generate(m, text_to_token_ids(prompt, tokenizer)[:, -cfg.context_length:].to(device),
                       args.max_new_tokens, eos_id=I.PAD_ID, use_cache=True)
        return I.extract_response(token_ids_to_text(ids, tokenizer), prompt)

    def finish(m, out: Path):
        import time

        m.eval()
        start = time.perf_counter()
        answers = I.generate_responses(m, test_data, tokenizer, args.max_new_tokens, progress=True)
        results = [{**entry, "model_response": a} for entry, a in zip(test_data, answers)]
        (out / "responses.json").write_text(json.dumps(results, indent=4))
        print(f"wrote {len(results)} test responses to {out / 'responses.json'} "
              f"(generated together in {time.perf_counter() - start:.1f} s)")

    spec = TrainSpec(train_data=train_ds, collate=collate,
                     loss_fn=lambda m, batch, dev: calc_loss_batch(batch[0], batch[1], m, dev),
                     evaluate=evaluate,
                     sample=lambda m: respond(m, val_data[0]).replace("\n", " ")[:200] if val_data else "",
                     extra={"task": "instruct"})
    info = f"data: {len(data)} entries, split {len(train_data)}/{len(val_data)}/{len(test_data)}"
    return spec, info, finish


# ------------------------------------------------------------------------------------------- main
def predict(args, device, tokenizer) -> int:
    from gpt.checkpoint import load_checkpoint
    from gpt.config import GPTConfig
    from gpt.finetune import classify as C
    from gpt.weights import resolve_source

    if not args.init:
        raise ValueError("--predict needs --init pointing at a classify run folder or checkpoint")
    kind, path = resolve_source(args.init)
    ckpt = load_checkpoint(path) if kind == "checkpoint" else None
    if ckpt is None or ckpt["extra"].get("task") != "classify":
        raise ValueError(f"{args.init} is not a checkpoint of a classify run")
    cls, _ = model_class(args.backend)
    model = C.make_classifier(cls(GPTConfig.from_dict(ckpt["config"])), len(ckpt["extra"]["labels"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit its own config: {str(e).strip().splitlines()[-1].strip()}") from None
    model.to(device)
    print(C.classify_text(model, args.predict, tokenizer, ckpt["extra"]["labels"], device, ckpt["extra"]["max_length"]))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    check_device(args.device)
    from gpt.tokenizer import get_tokenizer
    from gpt.training import LoopConfig, autocast_context, init_distributed, train

    d, device = init_distributed(args.device)
    tokenizer = get_tokenizer()
    if args.command == "classify" and args.predict is not None:
        return predict(args, device, tokenizer)

    # Everything is read and checked before the run folder is touched: bad input leaves no files behind.
    if args.resume:
        out = Path(args.out or f"runs/{args.command}")
        args = resume_args(args, out, d.world)
    else:
        out = choose_run_folder(args.out, args.command) if d.main else None
        if d.world > 1:
            holder = [out]
            torch.distributed.broadcast_object_list(holder, src=0)
            out = holder[0]
    args.out_path = out
    from_checkpoint = args.resume and (out / "ckpt-last.pt").is_file()
    torch.manual_seed(args.seed)
    rows = data = None
    if args.command == "classify":
        from gpt.finetune.classify import read_tsv

        if not args.data:
            raise ValueError("classify needs --data FILE.tsv (label<TAB>text rows)")
        rows = read_tsv(args.data[0])
    elif args.command == "instruct":
        from gpt.finetune.instruct import read_instructions

        if not args.data:
            raise ValueError("instruct needs --data FILE.json (Alpaca-format entries)")
        data = read_instructions(args.data[0])

    model, cfg, backend, resume_ckpt = build_model(args, device)
    finetune = args.command != "pretrain"
    if args.command == "classify":
        from gpt.finetune.classify import make_classifier

        labels = (resume_ckpt["extra"]["labels"] if resume_ckpt else sorted({label for label, _ in rows}))
        make_classifier(model, len(labels), train_all=args.train_all)
        spec, info, finish = classify_spec(args, model, cfg, tokenizer, device, rows)
    elif args.command == "instruct":
        spec, info, finish = instruct_spec(args, model, cfg, tokenizer, device, data)
    else:
        spec, info, finish = pretrain_spec(args, model, cfg, tokenizer, device)
    if resume_ckpt is not None:  # a checkpoint that does not fit the model fails now, not mid-run
        from gpt.checkpoint import CheckpointError

        try:
            model.load_state_dict(resume_ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{out / 'ckpt-last.pt'} does not fit the model: "
                                  f"{str(e).strip().splitlines()[-1].strip()}") from None

    steps = steps_for(args, len(spec.train_data), d.world, {"classify": 5, "instruct": 2}.get(args.command))
    if resume_ckpt is not None and steps < resume_ckpt["step"]:  # (config.json would then claim fewer steps)
        raise ValueError(f"the run in {out} is at step {resume_ckpt['step']}, past the {steps} steps asked for; "
                         f"give --steps (or --epochs) of at least {resume_ckpt['step']} to resume it")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    lr = args.lr if args.lr is not None else (5e-5 if finetune else (1e-3 if cfg.emb_dim <= 256 else 6e-4))
    loop = LoopConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr,
                      warmup=args.warmup if args.warmup is not None else max(1, steps // 20),
                      weight_decay=args.weight_decay, clip=args.clip, dtype=dtype, eval_every=args.eval_every,
                      save_every=args.save_every if args.save_every is not None else args.eval_every,
                      save_every_minutes=args.save_every_minutes, seed=args.seed, desc=args.command)
    autocast_context(dtype, device)  # (fp16 without CUDA is an error now, not after the folder is written)
    if len(spec.train_data) < args.batch_size * d.world:
        raise ValueError(f"the training split holds {len(spec.train_data)} examples, fewer than one global batch "
                         f"of {args.batch_size * d.world}: use more data or a smaller --batch-size")
    lock = None
    try:
        if d.main:
            lock = lock_run_folder(out)  # held until this process exits; the checks below run under it
            if not args.resume and holds_run(out):
                raise ValueError(f"run folder {out} already holds a run; pass --resume or choose another --out")
            remove_stale_temp_files(out)
            if args.resume and not from_checkpoint:  # crashed before its first checkpoint: start over
                (out / "metrics.jsonl").unlink(missing_ok=True)
                print(f"{out} has no checkpoint yet: starting its run from step 0 with its stored arguments")
            saved = {k: stored_form(k, v) for k, v in vars(args).items() if k not in NOT_STORED}
            try:
                write_json_atomic(out / "config.json", {
                    "command": args.command, "backend": backend, "model": cfg.to_dict(), "args": saved,
                    "steps": steps, "lr": lr, "dtype": dtype, "world_size": d.world})
            except OSError as e:
                raise ValueError(f"cannot write to the run folder {out}: {e.strerror or e}") from None
            n_params = sum(p.numel() for p in model.parameters())
            print(f"model: {backend} ({n_params / 1e6:.1f}M parameters, context {cfg.context_length}) on {device}, "
                  f"{dtype}{', compiled' if args.compile else ''}{f', {d.world} processes' if d.world > 1 else ''}")
            print(info)
            print(f"run folder: {out}; {steps} steps of {args.batch_size * args.grad_accum * d.world} examples")
        train(model, spec, loop, out, device, resume=from_checkpoint, d=d, compile=args.compile)
        if finish is not None and d.main:
            finish(model, out)
    finally:
        if lock is not None:
            lock.close()
    if d.main:
        print(f"done: run folder {out}")
    return 0


def cli(argv=None) -> int:
    from gpt.checkpoint import CheckpointError
    from gpt.data import DataError
    from gpt.tokenizer import TokenizerError
    from gpt.training import TrainingDiverged
    from gpt.weights import WeightsError

    try:
        return main(argv)
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


if __name__ == "__main__":
    sys.exit(cli())
