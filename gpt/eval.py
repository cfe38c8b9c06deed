"""HellaSwag evaluation, scored as llm.c and build-nanogpt score it (karpathy/build-nanogpt
``hellaswag.py``, commit 6104ab1, Jun 2024; llm.c ``dev/data/hellaswag.py`` is the same).

Each example is a context and four endings; every ending is tokenized as ``" " + ending`` after the
context's tokens, and scored by the log-probabilities of its own tokens given everything before them:
``acc`` picks the ending with the largest *sum* of log-probabilities (build-nanogpt's ``pred``, the
smallest summed loss), ``acc_norm`` the largest *mean* per token (``pred_norm``). GPT-2 124M scores acc
0.2859 / acc_norm 0.2955 on the 10,042 validation examples with this method (build-nanogpt's numbers;
llm.c reports 29.4% for GPT-2 124M and 29.9% for its reproduction).

Differences in how, not what: examples are batched (all four endings of ``batch_size`` examples in one
forward pass, rows padded on the right, which causal attention never sees), and on the fused model
the log-probabilities come from its head fused with the loss (``linear_cross_entropy(...,
reduction="none")``), without ``(rows, T, vocab)`` logits. A context that does not fit the model's
window together with the longest ending is cut from the left (a 1024-token GPT-2 never needs this on
HellaSwag; the tiny preset's 128 tokens sometimes does).

The data (``hellaswag_val.jsonl``, 10,042 lines) is HellaSwag's own release, not shipped here: see
the README. Each line is a JSON object with ``ctx`` (or ``ctx_a`` and ``ctx_b``), ``endings`` (four
strings) and ``label`` (0-3). ``python -m gpt.eval hellaswag --init SOURCE --data FILE.jsonl`` runs it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .data import DataError
from .training import calc_token_logprobs

N_ENDINGS = 4


def parse_example(obj, where: str) -> dict:
    """``{"ctx", "endings", "label"}`` from one HellaSwag record; ``DataError`` naming ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    ctx = obj.get("ctx")
    if ctx is None:
        if not isinstance(obj.get("ctx_a"), str):
            raise DataError(f"{where}: no 'ctx' (or 'ctx_a' and 'ctx_b') field")
        ctx = (obj["ctx_a"] + " " + obj.get("ctx_b", "")).strip() if obj.get("ctx_b") else obj["ctx_a"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise DataError(f"{where}: 'ctx' must be a non-empty string")
    endings = obj.get("endings")
    if (not isinstance(endings, list) or len(endings) != N_ENDINGS
            or not all(isinstance(e, str) and e.strip() for e in endings)):
        raise DataError(f"{where}: 'endings' must be a list of {N_ENDINGS} non-empty strings")
    label = obj.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise DataError(f"{where}: 'label' must be 0-{N_ENDINGS - 1}, got {label!r}")
    return {"ctx": ctx, "endings": endings, "label": label}


def read_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The first ``limit`` (all by default) examples of a HellaSwag jsonl file. Blank lines are skipped;
    a malformed line is a ``DataError`` naming the file and the line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(examples) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
                examples.append(parse_example(obj, f"{path}: line {n}"))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    if not examples:
        raise DataError(f"{path} holds no HellaSwag examples")
    return examples


def render_example(example: dict, tokenizer, context_length: int | None = None):
    """build-nanogpt's ``render_example``: ``(tokens (4, T), mask (4, T), label)``, row ``i`` the context
    then ``" " + endings[i]``, zero-padded; ``mask`` is 1 on the ending's tokens. With
    ``context_length`` the context is cut from the left so the longest row fits."""
    ctx_tokens = tokenizer.encode(example["ctx"])
    end_tokens = [tokenizer.encode(" " + e) for e in example["endings"]]
    longest = max(len(e) for e in end_tokens)
    if context_length is not None:
        if longest >= context_length:
            raise ValueError(f"an ending of {longest} tokens does not fit the context of {context_length}")
        ctx_tokens = ctx_tokens[max(0, len(ctx_tokens) + longest - context_length):]
    max_len = len(ctx_tokens) + longest
    tokens = torch.zeros((N_ENDINGS, max_len), dtype=torch.long)
    mask = torch.zeros((N_ENDINGS, max_len), dtype=torch.long)
    for i, end in enumerate(end_tokens):
        row = ctx_tokens + end
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(ctx_tokens):len(row)] = 1
    return tokens, mask, example["label"]


@torch.no_grad()
def score_endings(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, mean)`` log-probability ``(rows,)`` of the masked tokens of each row of ``tokens (rows, T)``
    (a masked token is scored given everything before it)."""
    targets = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    logp = calc_token_logprobs(model, tokens[:, :-1], targets).double()  # (rows, T-1), 0 off the mask
    total = logp.sum(-1)
    return total, total / mask[:, 1:].sum(-1).to(total.dtype)


def _context_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "context_length", None)


@torch.no_grad()
def evaluate_hellaswag(model: nn.Module, examples: list[dict], tokenizer, *, batch_size: int = 8,
                       device=None, progress: bool = False, desc: str = "hellaswag") -> tuple[dict, list[dict]]:
    """``({"acc", "acc_norm", "n"}, predictions)``: one prediction per example (``index``, ``label``,
    ``pred`` by summed and ``pred_norm`` by mean log-probability, the four ``sum_logprob`` and
    ``mean_logprob``). The model runs in eval mode (restored after), ``batch_size`` examples (4 rows
    each) per forward pass."""
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not examples:
        raise ValueError("examples is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ctx_len = _context_length(model)
    was_training = model.training
    model.eval()
    preds: list[dict] = []
    try:
        with tqdm(total=len(examples), desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True,
                  mininterval=1.0) as bar:  # closed on an exception too (before the caller's message)
            for start in range(0, len(examples), batch_size):
                rendered = [render_example(e, tokenizer, ctx_len) for e in examples[start:start + batch_size]]
                width = max(t.shape[1] for t, _, _ in rendered)
                tokens = torch.zeros((len(rendered) * N_ENDINGS, width), dtype=torch.long)
                mask = torch.zeros_like(tokens)
                for j, (t, m, _) in enumerate(rendered):
                    tokens[j * N_ENDINGS:(j + 1) * N_ENDINGS, :t.shape[1]] = t
                    mask[j * N_ENDINGS:(j + 1) * N_ENDINGS, :m.shape[1]] = m
                total, mean = score_endings(model, tokens.to(device), mask.to(device))
                total, mean = total.view(-1, N_ENDINGS).cpu(), mean.view(-1, N_ENDINGS).cpu()
                for j, (_, _, label) in enumerate(rendered):
                    preds.append({"index": start + j, "label": label, "pred": int(total[j].argmax()),
                                  "pred_norm": int(mean[j].argmax()), "sum_logprob": total[j].tolist(),
                                  "mean_logprob": mean[j].tolist()})
                bar.update(len(rendered))
                n = len(preds)
                bar.set_postfix(acc_norm=f"{sum(p['pred_norm'] == p['label'] for p in preds) / n:.4f}", refresh=False)
    finally:
        model.train(was_training)
    n = len(preds)
    summary = {"acc": sum(p["pred"] == p["label"] for p in preds) / n,
               "acc_norm": sum(p["pred_norm"] == p["label"] for p in preds) / n, "n": n}
    return summary, preds


def summary_path(out: str | os.PathLike) -> Path:
    """Where predictions written to ``preds.jsonl`` put their summary: ``preds.summary.json`` next to it."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


def write_predictions(out: str | os.PathLike, preds: list[dict], summary: dict) -> Path:
    """``out``: one prediction per line; ``summary_path(out)``: the summary. Each written atomically."""
    out = Path(out)
    for path, text in ((out, "".join(json.dumps(r) + "\n" for r in preds)),
                       (summary_path(out), json.dumps(summary) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return out


if __name__ == "__main__":  # python -m gpt.eval: the CLI lives in gpt/cli/eval.py (imported only here)
    from gpt.cli.eval import main

    raise SystemExit(main())
