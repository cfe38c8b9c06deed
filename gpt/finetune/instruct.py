"""Instruction finetuning (the book's chapter 7): Alpaca-format JSON, the book's prompt and collate."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..batch_generate import iter_batch
from ..data import DataError
from ..generate import generate
from ..tokenizer import EOT_ID, text_to_token_ids, token_ids_to_text
from ..training import TrainSpec, calc_loss_batch, calc_loss_loader, to_device

PAD_ID = EOT_ID  # <|endoftext|> pads the batches and stops generation
IGNORE_INDEX = -100


def format_input(entry: dict) -> str:
    """The Alpaca prompt exactly as in the book."""
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def format_response(entry: dict) -> str:
    return f"\n\n### Response:\n{entry['output']}"


def read_json_list(path: Path, what: str) -> list:
    """The non-empty JSON list in ``path`` (UTF-8), or a ``DataError`` in one line saying what is wrong."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{path} must hold a non-empty JSON list of {what}")
    return data


def read_instructions(path: str | os.PathLike) -> list[dict]:
    """A JSON list of ``{"instruction", "input", "output"}`` entries (``input`` may be empty)."""
    path = Path(path)
    data = read_json_list(path, "instruction entries")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not {"instruction", "output"} <= set(entry):
            raise DataError(f"{path}: entry {i} needs 'instruction' and 'output' keys")
        entry.setdefault("input", "")
    return data


def split(data: list, train: float = 0.85, test: float = 0.10):
    """The book's split: first 85% train, next 10% test, the remaining 5% validation."""
    n_train, n_test = int(len(data) * train), int(len(data) * test)
    return data[:n_train], data[n_train + n_test:], data[n_train:n_train + n_test]  # train, val, test


class InstructionDataset(Dataset):
    """Pre-tokenized prompt + response; remembers the prompt length for ``--mask-prompt``."""

    def __init__(self, data: list[dict], tokenizer):
        self.items = []
        for entry in data:
            prompt = tokenizer.encode(format_input(entry))
            response = tokenizer.encode(format_response(entry))
            self.items.append((prompt + response, len(prompt)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def custom_collate_fn(batch, pad_token_id: int = PAD_ID, ignore_index: int = IGNORE_INDEX,
                      allowed_max_length: int | None = None, mask_prompt: bool = False, device="cpu"):
    """The book's collate: pad with ``<|endoftext|>``, targets shifted by one, every padding target but the
    first set to ``ignore_index``; ``mask_prompt`` also ignores the prompt's targets."""
    items = [b if isinstance(b, tuple) else (b, 0) for b in batch]
    batch_max_length = max(len(ids) + 1 for ids, _ in items)
    inputs_lst, targets_lst = [], []
    for ids, prompt_len in items:
        padded = ids + [pad_token_id] + [pad_token_id] * (batch_max_length - len(ids) - 1)
        inputs = torch.tensor(padded[:-1])  # (T,)
        targets = torch.tensor(padded[1:])  # (T,) shifted by one
        mask = targets == pad_token_id
        pad_positions = torch.nonzero(mask).squeeze(-1)
        if pad_positions.numel() > 1:
            targets[pad_positions[1:]] = ignore_index  # keep the first end-of-text as a target
        if mask_prompt and prompt_len > 1:
            targets[:prompt_len - 1] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return to_device(torch.stack(inputs_lst), device), to_device(torch.stack(targets_lst), device)  # (b, T), (b, T)


def extract_response(generated_text: str, prompt: str) -> str:
    """The model's answer: what follows the prompt, without the ``### Response:`` header."""
    return generated_text[len(prompt):].replace("### Response:", "").strip()


def generate_responses(model, entries: list[dict], tokenizer, max_new_tokens: int, *,
                       batch_size: int | None = None, progress: bool = False) -> list[str]:
    """The model's greedy answer to every entry (as ``extract_response`` cuts it), all generated together
    with ``gpt.generate_batch`` (ragged prompts, each row stops at end-of-text); each answer equals
    generating for that entry alone."""
    prompts = [text_to_token_ids(format_input(e), tokenizer)[0] for e in entries]  # 1-D each
    answers = [""] * len(entries)
    rows = iter_batch(model, prompts, max_new_tokens, eos_id=PAD_ID, batch_size=batch_size)
    for i, ids in tqdm(rows, total=len(entries), desc="responses", file=sys.stdout, disable=not progress):
        answers[i] = tokenizer.decode(ids).replace("### Response:", "").strip()
    return answers


# ------------------------------------------------------------------------------ the train.py recipe
def instruct_spec(args, model, cfg, tokenizer, device, data):
    """The instruct recipe of ``train.py``: (TrainSpec, info line, finish) for the book's 85/5/10 split of
    ``data``; ``finish`` writes the test split's ``responses.json`` into the run folder."""
    train_data, val_data, test_data = split(data)
    train_ds, val_ds = InstructionDataset(train_data, tokenizer), InstructionDataset(val_data, tokenizer)

    def collate(items):
        return custom_collate_fn(items, allowed_max_length=cfg.context_length, mask_prompt=args.mask_prompt)

    val_loader = DataLoader(val_ds, batch_size=args.batch_size, shuffle=False, collate_fn=collate)

    def evaluate(m):
        return {"val_loss": calc_loss_loader(val_loader, m, device, args.eval_batches)} if len(val_ds) else {}

    def respond(m, entry) -> str:
        prompt = format_input(entry)
        ids = generate(m, text_to_token_ids(prompt, tokenizer)[:, -cfg.context_length:].to(device),
                       args.max_new_tokens, eos_id=PAD_ID, use_cache=True)
        return extract_response(token_ids_to_text(ids, tokenizer), prompt)

    def finish(m, out: Path):
        m.eval()
        start = time.perf_counter()
        answers = generate_responses(m, test_data, tokenizer, args.max_new_tokens, progress=True)
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

