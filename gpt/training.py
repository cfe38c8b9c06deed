"""Training helpers with the book's names (chapter 5): batch/loader loss, evaluation, sampling."""

from __future__ import annotations

import math

import torch
from torch import nn

from .generate import context_length_of, generate
from .tokenizer import text_to_token_ids, token_ids_to_text


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch: logits (b, T, V) vs targets (b, T)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


@torch.no_grad()
def calc_loss_loader(data_loader, model: nn.Module, device, num_batches: int | None = None) -> float:
    """Average loss over the first ``num_batches`` batches (all by default); NaN for an empty loader."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


def evaluate_model(model: nn.Module, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    """(train loss, validation loss) over ``eval_iter`` batches each, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    finally:
        model.train(was_training)
    return train_loss, val_loss


def generate_sample(model: nn.Module, tokenizer, device, start_context: str, max_new_tokens: int = 50,
                    **sampling) -> str:
    """Continue ``start_context`` with the model and return the whole text (one line)."""
    ctx = context_length_of(model) or max_new_tokens
    encoded = text_to_token_ids(start_context, tokenizer)[:, -ctx:].to(device)  # (1, T)
    token_ids = generate(model, encoded, max_new_tokens, use_cache=False, **sampling)
    return token_ids_to_text(token_ids, tokenizer).replace("\n", " ")


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
