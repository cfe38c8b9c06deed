"""Classification finetuning (the book's chapter 6): spam or any labelled TSV ``label<TAB>text``.

The GPT's output head is replaced by ``num_classes`` outputs and trained on the last token's logits;
by default only the last transformer block, the final norm and the new head are trainable.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data import DataError
from ..run import write_json_atomic
from ..tokenizer import EOT_ID
from ..training import TrainSpec, to_device

PAD_ID = EOT_ID  # <|endoftext|> pads the batches


def read_tsv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(label, text)`` rows of a ``label<TAB>text`` file (the SMS Spam Collection format, no header)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or not label.strip() or not text.strip():
            raise DataError(f"{path}:{n}: expected 'label<TAB>text', got {line[:60]!r}")
        rows.append((label.strip(), text))
    if not rows:
        raise DataError(f"{path} holds no rows")
    if len({label for label, _ in rows}) < 2:
        raise DataError(f"{path} has a single label; classification needs at least two")
    return rows


def balance_and_split(rows: list[tuple[str, str]], seed: int = 123, fractions=(0.7, 0.1)):
    """Undersample every label to the rarest label's count, shuffle with ``seed`` and split 70/10/20
    (the book's ``create_balanced_dataset`` + ``random_split``). Returns (train, val, test, labels)."""
    labels = sorted({label for label, _ in rows})
    g = torch.Generator().manual_seed(seed)
    by_label = {lab: [r for r in rows if r[0] == lab] for lab in labels}
    n_min = min(len(v) for v in by_label.values())
    balanced = []
    for lab in labels:
        group = by_label[lab]
        keep = torch.randperm(len(group), generator=g)[:n_min].tolist()
        balanced += [group[i] for i in sorted(keep)]
    order = torch.randperm(len(balanced), generator=g).tolist()
    balanced = [balanced[i] for i in order]
    n_train = int(len(balanced) * fractions[0])
    n_val = int(len(balanced) * fractions[1])
    return balanced[:n_train], balanced[n_train:n_train + n_val], balanced[n_train + n_val:], labels


class ClassificationDataset(Dataset):
    """Token ids padded with ``<|endoftext|>`` to one length, as the book's ``SpamDataset``: ``max_length``
    if given (truncating longer texts; validation and test use the training set's length, since the
    last token's position changes the prediction), else the longest text, capped at ``limit``."""

    def __init__(self, rows, labels: list[str], tokenizer, max_length: int | None = None, pad_id: int = PAD_ID,
                 *, limit: int | None = None):
        index = {lab: i for i, lab in enumerate(labels)}
        encoded = [tokenizer.encode(text) for _, text in rows]
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        longest = max((len(e) for e in encoded), default=1)
        self.max_length = max_length if max_length is not None else min(longest, limit or longest)
        self.inputs = torch.tensor([e[:self.max_length] + [pad_id] * (self.max_length - len(e[:self.max_length]))
                                    for e in encoded], dtype=torch.long)  # (N, max_length)
        self.targets = torch.tensor([index[label] for label, _ in rows], dtype=torch.long)  # (N,)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.inputs[i], self.targets[i]


def collate(items):
    xs, ys = zip(*items)
    return torch.stack(xs), torch.stack(ys)  # (b, T), (b,)


def make_classifier(model: nn.Module, num_classes: int, train_all: bool = False) -> nn.Module:
    """Swap the output head for ``num_classes`` outputs; freeze all but the last block, final norm and head."""
    emb_dim = model.out_head.in_features
    if not train_all:
        for p in model.parameters():
            p.requires_grad_(False)
    model.out_head = nn.Linear(emb_dim, num_classes).to(model.tok_emb.weight.device)
    for p in [*model.trf_blocks[-1].parameters(), *model.final_norm.parameters(), *model.out_head.parameters()]:
        p.requires_grad_(True)
    return model


def loss_fn(model: nn.Module, batch, device) -> torch.Tensor:
    x, y = (to_device(t, device) for t in batch)  # CUDA: pinned, asynchronous (no host sync)
    logits = model(x)[:, -1, :]  # (b, num_classes): the last token sees the whole text
    return nn.functional.cross_entropy(logits.float(), y)


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, dataset: Dataset, device, batch_size: int = 8,
                      max_batches: int | None = None) -> tuple[float, float]:
    """(accuracy, mean loss) of the last-token prediction over ``dataset`` (its first batches); NaN for
    an empty dataset."""
    correct = total = 0
    loss_sum, n_batches = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        if max_batches is not None and n_batches >= max_batches:
            break
        x, y = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        x, y = x.to(device), y.to(device)
        logits = model(x)[:, -1, :].float()
        loss_sum += nn.functional.cross_entropy(logits, y).item()
        correct += (logits.argmax(-1) == y).sum().item()
        total += len(y)
        n_batches += 1
    return (correct / total if total else float("nan")), (loss_sum / n_batches if n_batches else float("nan"))


def classify_text(model: nn.Module, text: str, tokenizer, labels: list[str], device, max_length: int,
                  pad_id: int = PAD_ID) -> str:
    """The book's ``classify_review``: the label of one text."""
    ids = tokenizer.encode(text)[:max_length]
    ids = ids + [pad_id] * (max_length - len(ids))
    x = torch.tensor(ids, device=device).unsqueeze(0)  # (1, max_length)
    model.eval()
    with torch.no_grad():
        return labels[model(x)[0, -1, :].argmax().item()]


# ------------------------------------------------------------------------------ the train.py recipe
def classify_spec(args, model, cfg, tokenizer, device, rows):
    """The classify recipe of ``train.py``: (TrainSpec, info line, finish) for the balanced 70/10/20 split of
    ``rows``; ``finish`` writes ``accuracy.json`` into the run folder."""
    train_rows, val_rows, test_rows, labels = balance_and_split(rows, seed=args.seed)
    if not (train_rows and val_rows and test_rows):  # an empty split has no accuracy
        n = len(train_rows) + len(val_rows) + len(test_rows)
        raise DataError(f"{args.data[0]}: the {n} rows left after balancing the labels split 70/10/20 into "
                        f"{len(train_rows)}/{len(val_rows)}/{len(test_rows)}; every split needs a row "
                        "(at least 10 balanced rows)")
    # The book pads every split to the training set's length (the last token's position changes the logits).
    train_ds = ClassificationDataset(train_rows, labels, tokenizer, limit=cfg.context_length)
    val_ds = ClassificationDataset(val_rows, labels, tokenizer, max_length=train_ds.max_length)
    test_ds = ClassificationDataset(test_rows, labels, tokenizer, max_length=train_ds.max_length)

    def evaluate(m):
        train_acc, _ = accuracy_and_loss(m, train_ds, device, args.batch_size, args.eval_batches)
        val_acc, val_loss = accuracy_and_loss(m, val_ds, device, args.batch_size, args.eval_batches)
        return {"val_loss": val_loss, "train_acc": train_acc, "val_acc": val_acc}

    def finish(m, out: Path):
        m.eval()
        with torch.no_grad():
            acc = {name: accuracy_and_loss(m, ds, device, args.batch_size)[0]
                   for name, ds in (("train", train_ds), ("val", val_ds), ("test", test_ds))}
        write_json_atomic(out / "accuracy.json", acc)
        print("accuracy: " + ", ".join(f"{k} {v * 100:.1f}%" for k, v in acc.items()))

    spec = TrainSpec(train_data=train_ds, collate=collate, loss_fn=loss_fn, evaluate=evaluate,
                     extra={"task": "classify", "labels": labels, "max_length": train_ds.max_length})
    info = (f"data: {len(rows)} rows, labels {labels}; balanced split {len(train_rows)}/{len(val_rows)}/"
            f"{len(test_rows)}, {train_ds.max_length} tokens per text")
    return spec, info, finish

