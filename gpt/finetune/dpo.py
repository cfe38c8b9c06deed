"""Direct preference optimization (DPO), following the book's chapter 7 bonus notebook
``ch07/04_preference-tuning-with-dpo/dpo-from-scratch.ipynb`` of rasbt/LLMs-from-scratch (version of
commit be5e2a3, Feb 2026): the book's preference format, ``PreferenceDataset``, ``custom_collate_fn``
(prompt and padding masked out of the selection mask), ``compute_logprobs`` (the *mean* log-probability
of the selected tokens), ``compute_dpo_loss`` (``-logsigmoid(beta * ((πc - πr) - (refc - refr)))``,
rewards ``π - ref``, batch means) and ``compute_dpo_loss_batch`` with a frozen reference model.

One difference in how, not what: ``sequence_logprobs`` computes ``compute_logprobs(model(x), x, mask)``
from the models' per-token loss (``model(x, targets=..., reduction="none")``), so on the fused model
the head runs fused with the cross-entropy (``kernels.linear_cross_entropy``) and no ``(b, T, V)``
logits exist; and the policy scores chosen and rejected responses in one forward pass (they share the
padded length), the book in two.

Training (``dpo_spec``) plugs into ``gpt.training.train``: the loss is the DPO loss; each step logs
``chosen_reward``, ``rejected_reward`` and ``reward_margin`` (batch means) to ``metrics.jsonl`` and the
progress bar; evaluation gives the same on the validation split (``val_loss`` is its DPO loss).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import DataError
from ..training import TrainSpec, calc_token_logprobs, to_device
from .instruct import PAD_ID, format_input, read_json_list, split

FIELDS = ("instruction", "chosen", "rejected")  # required; "input" may be absent (""), "output" is unused


def read_preferences(path: str | os.PathLike) -> list[dict]:
    """The book's preference JSON: a list of ``{"instruction", "input", "output", "chosen", "rejected"}``
    (``input`` may be empty or absent; ``output`` is not used). A missing field is a ``DataError``
    naming the entry and the field."""
    path = Path(path)
    data = read_json_list(path, "preference entries")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is not a JSON object")
        for name in FIELDS:
            if name not in entry:
                raise DataError(f"{path}: entry {i} has no '{name}' field (needs {', '.join(FIELDS)})")
        entry.setdefault("input", "")
        for name in (*FIELDS, "input"):
            if not isinstance(entry[name], str):
                raise DataError(f"{path}: entry {i}: '{name}' must be a string, got {type(entry[name]).__name__}")
    return data


def preferences_from_instructions(entries: list[dict], n: int | None = None) -> list[dict]:
    """A toy preference set from Alpaca-style instruction data, as shipped in
    ``data/preference-data.json`` (the first 50 entries of the book's ``instruction-data.json``): entry
    ``i`` keeps its ``instruction``, ``input`` and ``output``; ``chosen`` is its own ``output`` and
    ``rejected`` the ``output`` of entry ``i + 1`` (the next one, cyclically): a fluent answer to
    another instruction. (The book's ``instruction-data-with-preference.json`` instead asks a larger
    model for a polite and an impolite answer; this needs no model and no download.)"""
    entries = entries[:n] if n is not None else list(entries)
    if len(entries) < 2:
        raise ValueError("preferences_from_instructions needs at least 2 entries")
    out = []
    for i, e in enumerate(entries):
        out.append({"instruction": e["instruction"], "input": e.get("input", ""), "output": e["output"],
                    "chosen": e["output"], "rejected": entries[(i + 1) % len(entries)]["output"]})
    return out


class PreferenceDataset(Dataset):
    """The book's dataset: token ids of the prompt, and of prompt + ``"\\n\\n### Response:\\n"`` + the
    chosen / rejected response."""

    def __init__(self, data: list[dict], tokenizer):
        self.data = data
        self.encoded_texts = []
        for entry in data:
            prompt = format_input(entry)
            self.encoded_texts.append({
                "prompt": tokenizer.encode(prompt),
                "chosen": tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['chosen']}"),
                "rejected": tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['rejected']}"),
            })

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id: int = PAD_ID, allowed_max_length: int | None = None,
                      mask_prompt_tokens: bool = True, device="cpu") -> dict:
    """The book's collate: ``chosen``/``rejected`` padded with ``pad_token_id`` to one common length (the
    longest + 1), cut to ``allowed_max_length``; ``chosen_mask``/``rejected_mask`` are False on padding
    and, with ``mask_prompt_tokens``, on the prompt and the two newline tokens after it."""
    batch_data = {"prompt": [], "chosen": [], "rejected": [], "rejected_mask": [], "chosen_mask": []}
    max_length_common = 0
    if batch:
        for key in ("chosen", "rejected"):
            max_length_common = max(max_length_common, max(len(item[key]) + 1 for item in batch))
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        batch_data["prompt"].append(prompt)
        for key in ("chosen", "rejected"):
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded)).bool()
            mask[len(sequence):] = False  # padding
            if mask_prompt_tokens:
                mask[:prompt.shape[0] + 2] = False  # the prompt and the "\n\n" before "### Response"
            batch_data[key].append(torch.tensor(padded))
            batch_data[f"{key}_mask"].append(mask)
    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        tensor_stack = torch.stack(batch_data[key])  # (b, T)
        if allowed_max_length is not None:
            tensor_stack = tensor_stack[:, :allowed_max_length]
        batch_data[key] = to_device(tensor_stack, device)  # CUDA: pinned, asynchronous (no host sync)
    return batch_data


def compute_logprobs(logits: torch.Tensor, labels: torch.Tensor, selection_mask: torch.Tensor | None = None):
    """The book's ``compute_logprobs``: mean log-probability ``(b,)`` of ``labels[:, 1:]`` under
    ``logits[:, :-1]`` over the positions where ``selection_mask[:, 1:]`` is true (all without a mask)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected_log_probs = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    if selection_mask is not None:
        mask = selection_mask[:, 1:].clone()
        selected_log_probs = selected_log_probs * mask
        return selected_log_probs.sum(-1) / mask.sum(-1)
    return selected_log_probs.mean(-1)


def compute_dpo_loss(model_chosen_logprobs: torch.Tensor, model_rejected_logprobs: torch.Tensor,
                     reference_chosen_logprobs: torch.Tensor, reference_rejected_logprobs: torch.Tensor,
                     beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The book's DPO loss (Eq. 7 of Rafailov et al. 2023): ``(loss, chosen_rewards, rejected_rewards)``,
    each the mean over the batch; the rewards are detached ``policy - reference`` log-probabilities."""
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    logits = model_logratios - reference_logratios
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = (model_rejected_logprobs - reference_rejected_logprobs).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def sequence_logprobs(model: nn.Module, tokens: torch.Tensor, selection_mask: torch.Tensor | None = None,
                      ignore_index: int = -100) -> torch.Tensor:
    """``compute_logprobs(model(tokens), tokens, selection_mask)`` without the ``(b, T, V)`` logits on
    models with a fused head (see ``gpt.training.calc_token_logprobs``): the mean log-probability of the
    selected next tokens, ``(b,)`` fp32."""
    targets = tokens[:, 1:]
    if selection_mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    else:
        mask = selection_mask[:, 1:].bool()
    logp = calc_token_logprobs(model, tokens[:, :-1], targets.masked_fill(~mask, ignore_index), ignore_index)
    return logp.sum(-1) / mask.sum(-1)


def compute_dpo_loss_batch(batch: dict, policy_model: nn.Module, reference_model: nn.Module, beta: float):
    """The book's ``compute_dpo_loss_batch``: ``(loss, chosen_rewards, rejected_rewards)`` of one collated
    batch; the reference model runs without gradients. Chosen and rejected go through each model as
    one ``(2b, T)`` batch."""
    b = batch["chosen"].shape[0]
    both = torch.cat((batch["chosen"], batch["rejected"]))  # (2b, T)
    mask = torch.cat((batch["chosen_mask"], batch["rejected_mask"]))
    policy = sequence_logprobs(policy_model, both, mask)
    with torch.no_grad():
        reference = sequence_logprobs(reference_model, both, mask)
    return compute_dpo_loss(policy[:b], policy[b:], reference[:b], reference[b:], beta=beta)


def has_response_tokens(item: dict, allowed_max_length: int | None) -> bool:
    """Whether the chosen and the rejected response keep at least one scored token after the prompt mask
    and the cut to ``allowed_max_length`` (else the book's mean over zero tokens is NaN)."""
    start = len(item["prompt"]) + 2
    limit = allowed_max_length if allowed_max_length is not None else 1 << 62
    return all(min(len(item[k]), limit) > start for k in ("chosen", "rejected"))


def dpo_spec(train_ds: PreferenceDataset, val_ds: PreferenceDataset, reference_model: nn.Module, *,
             beta: float, allowed_max_length: int | None, batch_size: int, eval_batches: int, device,
             pad_token_id: int = PAD_ID, extra: dict | None = None):
    """The ``gpt.training.TrainSpec`` of a DPO run: DPO loss on ``train_ds``, rewards logged each step,
    validation DPO loss and rewards on ``val_ds``. ``reference_model`` must be frozen and on ``device``."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    reference_model.eval()
    for p in reference_model.parameters():
        p.requires_grad_(False)

    def collate(items):
        return custom_collate_fn(items, pad_token_id=pad_token_id, allowed_max_length=allowed_max_length)

    def stats(loss, chosen, rejected) -> dict:
        return {"chosen_reward": chosen.item(), "rejected_reward": rejected.item(),
                "reward_margin": (chosen - rejected).item()}

    def loss_fn(model, batch, dev):
        batch = {k: to_device(v, dev) for k, v in batch.items() if k != "prompt"}
        loss, chosen, rejected = compute_dpo_loss_batch(batch, model, reference_model, beta)
        chosen, rejected = chosen.detach(), rejected.detach()  # device tensors: the loop reads them once a step
        return loss, {"chosen_reward": chosen, "rejected_reward": rejected, "reward_margin": chosen - rejected}

    def evaluate(model):
        n = min(len(val_ds), eval_batches * batch_size)
        rows = []
        for s in range(0, n, batch_size):
            batch = collate([val_ds[i] for i in range(s, min(s + batch_size, n))])
            batch = {k: to_device(v, device) for k, v in batch.items() if k != "prompt"}
            loss, chosen, rejected = compute_dpo_loss_batch(batch, model, reference_model, beta)
            rows.append({"val_loss": loss.item(), **{f"val_{k}": v for k, v in stats(loss, chosen, rejected).items()}})
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}

    return TrainSpec(train_data=train_ds, collate=collate, loss_fn=loss_fn, evaluate=evaluate,
                     extra={"task": "dpo", "beta": beta, **(extra or {})}, show=("reward_margin",))


def filter_scorable(ds: PreferenceDataset, allowed_max_length: int | None) -> tuple[PreferenceDataset, int]:
    """``ds`` without the entries whose responses are cut away entirely by ``allowed_max_length`` (the
    number dropped is returned too)."""
    keep = [i for i, item in enumerate(ds.encoded_texts) if has_response_tokens(item, allowed_max_length)]
    dropped = len(ds) - len(keep)
    if dropped:
        ds.data = [ds.data[i] for i in keep]
        ds.encoded_texts = [ds.encoded_texts[i] for i in keep]
    return ds, dropped


# ------------------------------------------------------------------------------ the train.py recipe
def dpo_recipe(args, model, cfg, tokenizer, device, data, reference_model):
    """The dpo recipe of ``train.py``: (TrainSpec, info line, None) for the book's 85/5/10 split of the
    preference ``data`` (as instruct's), DPO against the frozen ``reference_model`` (the ``--init`` model)
    with ``--beta``; entries whose responses do not fit the context are left out (counted in the info)."""
    train_data, val_data, test_data = split(data)
    train_ds, dropped = filter_scorable(PreferenceDataset(train_data, tokenizer), cfg.context_length)
    val_ds, dropped_val = filter_scorable(PreferenceDataset(val_data, tokenizer), cfg.context_length)
    if len(train_ds) == 0:
        raise DataError(f"no training entry of {args.data[0]} has response tokens within the context of "
                        f"{cfg.context_length} tokens")
    spec = dpo_spec(train_ds, val_ds, reference_model.to(device), beta=args.beta,
                    allowed_max_length=cfg.context_length, batch_size=args.batch_size,
                    eval_batches=args.eval_batches, device=device)
    info = (f"data: {len(data)} preference entries, split {len(train_data)}/{len(val_data)}/{len(test_data)}"
            + (f" ({dropped + dropped_val} left out: no response token within the context)"
               if dropped + dropped_val else "") + f"; beta {args.beta}, frozen reference: {args.init}")
    return spec, info, None
