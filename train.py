"""Pretrain a GPT-2 (the main job): ``python train.py`` trains on an embedded corpus, no download.

With no arguments it pretrains the ``tiny`` preset on CPython's bundled documentation text for a few
hundred steps on CPU (a few minutes), printing progress, validation loss and a text sample, and writes
a run folder (``runs/pretrain``): ``config.json``, ``metrics.jsonl``, ``ckpt-last.pt``, ``ckpt-best.pt``.

Bad input (missing/empty data, a corpus shorter than one context, an unknown preset) prints one line
on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", nargs="?", default="pretrain", choices=["pretrain"],
                   help="what to run (classification and instruction finetuning: see the issues)")
    p.add_argument("--data", nargs="+", default=None,
                   help="text files/folders or llm.c .bin shards (default: the embedded corpus)")
    p.add_argument("--preset", default=None, help="model size: tiny, gpt2-small, ... (default: tiny)")
    p.add_argument("--init", default=None, help="start from pretrained weights (as from_pretrained)")
    p.add_argument("--steps", type=int, default=300, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context-length", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps before cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 disables)")
    p.add_argument("--backend", default="reference", choices=["reference"],
                   help="model implementation (the fused model arrives with its issue)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--out", default=None,
                   help="run folder (default: runs/pretrain, or runs/pretrain-N when that holds a run)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--prompt", default="The function", help="start of the sample printed at each evaluation")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    """Linear warm-up to ``--lr``, then cosine decay to 10% of it at ``--steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(argv=None) -> int:
    args = parse_args(argv)
    from gpt.config import GPTConfig
    from gpt.data import TokenWindowDataset, default_corpus, load_tokens, train_val_split
    from gpt.reference import GPTModel
    from gpt.tokenizer import get_tokenizer

    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = get_tokenizer()

    if args.init:
        model = GPTModel.from_pretrained(args.init)
        cfg = model.cfg
    else:
        cfg = GPTConfig.from_preset(args.preset or "tiny")
        model = GPTModel(cfg)
    model.to(device)
    ctx = args.context_length or cfg.context_length
    if ctx > cfg.context_length:
        raise ValueError(f"--context-length {ctx} exceeds the model's context_length {cfg.context_length}")

    if args.data:
        tokens = load_tokens(args.data, tokenizer)
        source = " ".join(args.data)
    else:
        tokens = load_tokens_from_text(default_corpus(), tokenizer)
        source = "embedded corpus (CPython pydoc topics)"
    train_tokens, val_tokens = train_val_split(tokens, 0.9)
    train_ds = TokenWindowDataset(train_tokens, ctx, ctx)
    val_ds = TokenWindowDataset(val_tokens, ctx, ctx)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True,
                                               drop_last=True, generator=gen)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=args.batch_size, shuffle=False)
    if len(train_loader) == 0:
        raise ValueError(f"the training split holds {len(train_ds)} windows, fewer than one batch of "
                         f"{args.batch_size}: use more data or a smaller --batch-size")

    out = choose_run_folder(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "args": vars(args)}, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.backend} {args.preset or 'tiny'} ({n_params / 1e6:.1f}M parameters) on {device}")
    print(f"data: {source}: {len(train_tokens):,} train / {len(val_tokens):,} val tokens, context {ctx}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    train_loop(model, optimizer, train_loader, val_loader, tokenizer, device, out, args)
    return 0


def choose_run_folder(out: str | None) -> Path:
    """The run folder; never overwrites an earlier run (an explicit --out holding one is an error)."""
    def holds_run(p: Path) -> bool:
        return (p / "ckpt-last.pt").exists() or (p / "metrics.jsonl").exists()

    if out is not None:
        if holds_run(Path(out)):
            raise ValueError(f"run folder {out} already holds a run; choose another --out")
        return Path(out)
    base = Path("runs/pretrain")
    candidate, n = base, 1
    while holds_run(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def load_tokens_from_text(text: str, tokenizer):
    import numpy as np

    return np.asarray(tokenizer.encode(text, allowed_special={"<|endoftext|>"}), dtype=np.int64)


def train_loop(model, optimizer, train_loader, val_loader, tokenizer, device, out: Path, args) -> None:
    from tqdm import tqdm

    from gpt.checkpoint import save_checkpoint
    from gpt.training import calc_loss_batch, calc_loss_loader, generate_sample, perplexity

    best_val = float("inf")
    batches = iter(train_loader)
    metrics = open(out / "metrics.jsonl", "a")
    bar = tqdm(range(args.steps), desc="pretrain", dynamic_ncols=True, file=sys.stdout)
    t_last, tokens_since = time.perf_counter(), 0
    model.train()
    for step in bar:
        try:
            x, y = next(batches)
        except StopIteration:  # next epoch
            batches = iter(train_loader)
            x, y = next(batches)
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = calc_loss_batch(x, y, model, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; the last good checkpoint "
                                     f"is {out / 'ckpt-last.pt'}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        tokens_since += x.numel()
        now = time.perf_counter()
        row = {"step": step + 1, "train_loss": round(loss.item(), 5), "lr": lr,
               "tokens_per_s": round(tokens_since / max(now - t_last, 1e-9), 1)}
        t_last, tokens_since = now, 0
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            model.eval()
            val = calc_loss_loader(val_loader, model, device, num_batches=args.eval_batches)
            row["val_loss"] = round(val, 5)
            sample = generate_sample(model, tokenizer, device, args.prompt, max_new_tokens=30)
            model.train()
            tqdm.write(f"step {step + 1}: train loss {loss.item():.3f}, val loss {val:.3f} "
                       f"(perplexity {perplexity(val):.1f})\n  sample: {sample}", file=sys.stdout)
            save_checkpoint(out / "ckpt-last.pt", model, optimizer=optimizer, step=step + 1)
            if val < best_val:
                best_val = val
                save_checkpoint(out / "ckpt-best.pt", model, step=step + 1, rng=False)
            t_last = time.perf_counter()  # evaluation time is not training throughput
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
    metrics.close()
    print(f"done: best val loss {best_val:.3f}; run folder {out}")


def cli(argv=None) -> int:
    from gpt.checkpoint import CheckpointError
    from gpt.data import DataError
    from gpt.tokenizer import TokenizerError
    from gpt.weights import WeightsError

    try:
        return main(argv)
    except (DataError, CheckpointError, WeightsError, TokenizerError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
