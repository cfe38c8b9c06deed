"""Pretrain and finetune GPT-2: ``python train.py [pretrain|classify|instruct] [flags]``.

With no arguments it runs the main job: pretrain the ``tiny`` preset on an embedded corpus (CPython's
bundled documentation, no download) for 300 steps on CPU (a few minutes), printing progress, the
validation loss and a text sample, into a run folder ``runs/pretrain``. On CUDA the default model is
``gpt2-small`` in bf16. Subcommands: ``classify`` (TSV ``label<TAB>text``, the book's spam classifier)
and ``instruct`` (Alpaca JSON). Under ``torchrun --nproc_per_node=N`` the same script trains with DDP.

A run folder holds ``config.json``, ``metrics.jsonl``, ``ckpt-last.pt`` (atomic), ``ckpt-best.pt`` and
``loss.png``; ``--resume`` continues a run exactly. Bad input prints one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DEFAULT_STEPS = 300


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where it says something: not ``None``/``False``, not when the help text
    already describes it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain or finetune a GPT-2.",
                                formatter_class=_HelpFormatter)
    p.add_argument("command", nargs="?", default="pretrain", choices=["pretrain", "classify", "instruct"])
    p.add_argument("--data", nargs="+", default=None,
                   help="pretrain: text files/folders or llm.c .bin shards (default: the embedded corpus); "
                        "classify: a label<TAB>text file; instruct: an Alpaca JSON file")
    p.add_argument("--preset", default=None, help="tiny, gpt2-small, gpt2-medium, gpt2-large, gpt2-xl "
                                                   "(default: tiny on CPU, gpt2-small on CUDA)")
    p.add_argument("--init", default=None, help="start from weights: HF folder, .safetensors, checkpoint, "
                                                 "run folder or model name (gpt2, gpt2-medium, ...)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps of the run "
                                                           f"(pretrain default {DEFAULT_STEPS})")
    p.add_argument("--epochs", type=float, default=None, help="finetuning length in epochs (classify 5, instruct 2)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--context-length", type=int, default=None, help="pretraining window (default: the model's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (pretrain 1e-3 tiny / 6e-4, finetune 5e-5)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 disables)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU; fp16 uses a grad scaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--backend", choices=["fused", "reference"], default=None,
                   help="model: fused Triton kernels or the book's PyTorch reference (default: fused if available)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, default=10, help="batches per evaluation")
    p.add_argument("--save-every", type=int, default=None, help="write ckpt-last.pt every N steps (default: eval-every)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<command>, numbered if taken)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt-last.pt")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--prompt", default=None, help="pretrain: start of the sample printed at each evaluation")
    p.add_argument("--train-all", action="store_true", help="classify: train every layer, not only the last block")
    p.add_argument("--predict", default=None, metavar="TEXT", help="classify: print the label of TEXT with --init")
    p.add_argument("--mask-prompt", action="store_true", help="instruct: loss on the response tokens only")
    p.add_argument("--max-new-tokens", type=int, default=256, help="instruct: response length for the test split")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
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


def choose_run_folder(out: str | None, command: str, resume: bool) -> Path:
    """The run folder; never overwrites an earlier run (an explicit --out holding one is an error)."""
    def holds_run(p: Path) -> bool:
        return (p / "ckpt-last.pt").exists() or (p / "metrics.jsonl").exists()

    if resume:
        path = Path(out or f"runs/{command}")
        if not (path / "ckpt-last.pt").is_file():
            raise ValueError(f"nothing to resume: {path / 'ckpt-last.pt'} does not exist")
        return path
    if out is not None:
        if holds_run(Path(out)):
            raise ValueError(f"run folder {out} already holds a run; pass --resume or choose another --out")
        return Path(out)
    base = candidate = Path(f"runs/{command}")
    n = 1
    while holds_run(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def build_model(args, device, extra_cfg=None):
    """(model, cfg, backend): from --resume's checkpoint config, --init weights, or a preset."""
    from gpt.checkpoint import load_checkpoint
    from gpt.config import GPTConfig

    cls, backend = model_class(args.backend)
    if args.resume:
        ckpt = load_checkpoint(args.out_path / "ckpt-last.pt")  # validates the file before anything runs
        cfg = GPTConfig.from_dict(ckpt["config"])
        return cls(cfg), cfg, backend, ckpt
    if args.init:
        model = cls.from_pretrained(args.init, **(extra_cfg or {}))
        return model, model.cfg, backend, None
    preset = args.preset or ("gpt2-small" if device.type == "cuda" else "tiny")
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

    ctx = args.context_length or cfg.context_length
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
        sample=lambda m: generate_sample(m, tokenizer, device, prompt, max_new_tokens=30, temperature=0.8,
                                         top_k=40, generator=torch.Generator(device).manual_seed(args.seed)),
        extra={"task": "pretrain"},
    )
    info = f"data: {source}: {n_train:,} train / {n_val:,} val tokens, context {ctx}"
    return spec, info, None


def classify_spec(args, model, cfg, tokenizer, device, rows):
    from gpt.finetune import classify as C
    from gpt.training import TrainSpec

    train_rows, val_rows, test_rows, labels = C.balance_and_split(rows, seed=args.seed)
    train_ds = C.ClassificationDataset(train_rows, labels, tokenizer, max_length=cfg.context_length)
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
        (out / "accuracy.json").write_text(json.dumps(acc, indent=2))
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
        from tqdm import tqdm

        m.eval()
        results = [{**entry, "model_response": respond(m, entry)}
                   for entry in tqdm(test_data, desc="responses", file=sys.stdout)]
        (out / "responses.json").write_text(json.dumps(results, indent=4))
        print(f"wrote {len(results)} test responses to {out / 'responses.json'}")

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
    model.load_state_dict(ckpt["model"])
    model.to(device)
    print(C.classify_text(model, args.predict, tokenizer, ckpt["extra"]["labels"], device, ckpt["extra"]["max_length"]))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from gpt.tokenizer import get_tokenizer
    from gpt.training import LoopConfig, init_distributed, train

    d, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    tokenizer = get_tokenizer()
    if args.command == "classify" and args.predict is not None:
        return predict(args, device, tokenizer)

    # Read and check the data before touching the run folder (bad input must not leave files behind).
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

    out = choose_run_folder(args.out, args.command, args.resume) if d.main else None
    if d.world > 1:
        holder = [out]
        torch.distributed.broadcast_object_list(holder, src=0)
        out = holder[0]
    args.out_path = out

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

    steps = steps_for(args, len(spec.train_data), d.world, {"classify": 5, "instruct": 2}.get(args.command))
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    lr = args.lr or (5e-5 if finetune else (1e-3 if cfg.emb_dim <= 256 else 6e-4))
    loop = LoopConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr,
                      warmup=args.warmup if args.warmup is not None else max(1, steps // 20),
                      weight_decay=args.weight_decay, clip=args.clip, dtype=dtype, eval_every=args.eval_every,
                      save_every=args.save_every or args.eval_every, seed=args.seed, desc=args.command)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            saved = {k: v for k, v in vars(args).items() if k != "out_path"}
            (out / "config.json").write_text(json.dumps(
                {"command": args.command, "backend": backend, "model": cfg.to_dict(), "args": saved,
                 "steps": steps, "lr": lr, "dtype": dtype, "world_size": d.world}, indent=2))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {backend} ({n_params / 1e6:.1f}M parameters, context {cfg.context_length}) on {device}, "
              f"{dtype}{', compiled' if args.compile else ''}{f', {d.world} processes' if d.world > 1 else ''}")
        print(info)
        print(f"run folder: {out}; {steps} steps of {args.batch_size * args.grad_accum * d.world} examples")
    train(model, spec, loop, out, device, resume=args.resume, d=d, compile=args.compile)
    if finish is not None and d.main:
        finish(model, out)
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
    except KeyboardInterrupt as e:
        print(f"{e or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
