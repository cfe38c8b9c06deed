"""Finetuning pieces: the book's prompt format and collate, the balanced split, the training loop's guards."""

import pytest
import torch

from gpt.cli.train import parse_args
from gpt.finetune import classify as C
from gpt.finetune import instruct as I

# These test the CLIs and the pipeline, not the kernels (tests/test_attention.py etc. do that):
# run the fused model on its PyTorch fallback, in-process and in subprocesses, to keep CI fast.
pytestmark = pytest.mark.usefixtures("fallback_path")


def test_format_input_is_the_books():
    entry = {"instruction": "Rewrite the sentence.", "input": "The cat sat.", "output": "It sat."}
    assert I.format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cat sat.")
    assert I.format_input({**entry, "input": ""}).endswith("### Instruction:\nRewrite the sentence.")
    assert I.format_response(entry) == "\n\n### Response:\nIt sat."


def test_custom_collate_fn_matches_the_book():
    inputs, targets = I.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    inputs, targets = I.custom_collate_fn([([10, 11, 12, 13], 2)], mask_prompt=True, allowed_max_length=3)
    assert inputs.tolist() == [[10, 11, 12]] and targets.tolist() == [[-100, 12, 13]]


def test_split_is_the_books():
    data = list(range(1100))
    train, val, test = I.split(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == data[:935] and test == data[935:1045] and val == data[1045:]


def test_balance_and_split():
    rows = [("ham", f"h{i}") for i in range(50)] + [("spam", f"s{i}") for i in range(10)]
    train, val, test, labels = C.balance_and_split(rows, seed=123)
    assert labels == ["ham", "spam"]
    allrows = train + val + test
    assert len(allrows) == 20 and sum(r[0] == "spam" for r in allrows) == 10
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert C.balance_and_split(rows, seed=123)[0] == train  # seeded
    assert C.balance_and_split(rows, seed=7)[0] != train


def test_classification_dataset_pads_to_longest():
    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

    ds = C.ClassificationDataset([("a", "xy"), ("b", "xyzw")], ["a", "b"], Tok())
    assert ds.max_length == 4
    assert ds[0][0].tolist() == [120, 121, 50256, 50256] and ds[1][1].item() == 1
    assert C.ClassificationDataset([("a", "xyzw")], ["a", "b"], Tok(), max_length=2)[0][0].tolist() == [120, 121]


def test_make_classifier_freezes_all_but_the_last_block():
    from gpt.config import GPTConfig
    from gpt.reference import GPTModel

    model = C.make_classifier(GPTModel(GPTConfig.from_preset("tiny", n_layers=2)), 3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert model.out_head.out_features == 3
    assert all(n.startswith(("trf_blocks.1.", "final_norm.", "out_head.")) for n in trainable)
    assert "trf_blocks.1.att.W_query.weight" in trainable and "out_head.bias" in trainable


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from gpt.config import GPTConfig
    from gpt.reference import GPTModel
    from gpt.training import LoopConfig, TrainingDiverged, TrainSpec, train

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=32, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    data = [(torch.randint(0, 32, (8,)), torch.randint(0, 32, (8,))) for _ in range(8)]
    calls = {"n": 0}

    def loss_fn(m, batch, device):
        calls["n"] += 1
        logits = m(batch[0])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[1].flatten())
        return loss * float("nan") if calls["n"] >= 3 else loss

    spec = TrainSpec(train_data=data, collate=lambda items: tuple(torch.stack(t) for t in zip(*items)),
                     loss_fn=loss_fn, evaluate=lambda m: {"val_loss": 1.0})
    cfg = LoopConfig(steps=5, batch_size=2, save_every=1, eval_every=100, lr=1e-3)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3"):
        train(model, spec, cfg, tmp_path, torch.device("cpu"), log=lambda *a: None)
    assert torch.load(tmp_path / "ckpt-last.pt", weights_only=True)["step"] == 2


def test_classification_dataset_pads_to_the_given_length_as_the_book():
    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

    ds = C.ClassificationDataset([("a", "xy"), ("b", "x")], ["a", "b"], Tok(), max_length=4)
    assert ds.max_length == 4 and ds[1][0].tolist() == [120, 50256, 50256, 50256]
    assert C.ClassificationDataset([("a", "xyzw")], ["a"], Tok(), limit=3).max_length == 3
    assert C.ClassificationDataset([("a", "xy")], ["a"], Tok(), limit=3).max_length == 2


class CharTok:
    def encode(self, text):
        return [ord(c) % 200 for c in text]


class LengthSensitive(torch.nn.Module):
    """Right (class 1 for texts starting with 's') only when the input has exactly ``length`` tokens: its
    accuracy depends on the padding, as a real GPT's last-token logits do."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length

    def forward(self, x):  # (b, T) -> (b, T, 2)
        spam = (x[:, :1] == ord("s")).float().expand(-1, x.shape[1]) if x.shape[1] == self.length \
            else torch.zeros(x.shape, dtype=torch.float32)
        return torch.stack([1 - spam, spam], dim=-1)


def test_classify_reports_accuracy_at_the_training_length(tmp_path):
    import json

    from gpt.config import GPTConfig

    g = torch.Generator().manual_seed(4)
    rows = [(label, label[0] + "x" * int(torch.randint(1, 30, (1,), generator=g)))
            for label in ("ham", "spam") for _ in range(30)]
    args = parse_args(["classify", "--batch-size", "4"])
    args.data = ["rows.tsv"]
    spec, _, finish = C.classify_spec(args, None, GPTConfig.from_preset("tiny"), CharTok(), "cpu", rows)
    train_rows, val_rows, test_rows, labels = C.balance_and_split(rows, seed=args.seed)
    length = max(len(t) for _, t in train_rows)  # independently: the longest training text
    assert spec.extra["max_length"] == length
    assert max(len(t) for _, t in val_rows + test_rows) < length  # (the case that matters)
    model = LengthSensitive(length)
    finish(model, tmp_path)
    assert json.loads((tmp_path / "accuracy.json").read_text()) == {"train": 1.0, "val": 1.0, "test": 1.0}
    # The predict path agrees, one text at a time.
    assert all(C.classify_text(model, t, CharTok(), labels, "cpu", length) == label for label, t in test_rows)


def test_classify_refuses_an_empty_split(tmp_path):
    path = tmp_path / "few.tsv"
    path.write_text("".join(f"{label}\t{label} text {i}\n" for label in ("ham", "spam") for i in range(4)))
    args = parse_args(["classify", "--data", str(path)])
    with pytest.raises(ValueError, match=r"split 70/10/20 into 5/0/3; every split needs a row"):
        C.classify_spec(args, None, None, CharTok(), "cpu", C.read_tsv(path))


def test_read_tsv_drops_a_byte_order_mark(tmp_path):
    """A BOM (a TSV saved by Excel/Notepad) made the first row's label a third class '\\ufeffham' of one
    row, and balancing then cut every class to that one row."""
    path = tmp_path / "sms.tsv"
    path.write_bytes("\ufeffham\thello there\nspam\twin money\nham\tsee you\n".encode())
    rows = C.read_tsv(path)
    assert rows == [("ham", "hello there"), ("spam", "win money"), ("ham", "see you")]


@pytest.mark.parametrize("reader,what", [("instruct", "instruction entries"), ("dpo", "preference entries")])
def test_json_readers_name_each_bad_file_in_one_line(tmp_path, reader, what):
    """Both finetuning readers (one shared JSON-list helper): missing, non-UTF-8, not JSON, not a list."""
    from gpt.data import DataError
    from gpt.finetune.dpo import read_preferences
    from gpt.finetune.instruct import read_instructions

    read = {"instruct": read_instructions, "dpo": read_preferences}[reader]
    cases = [(b"\xff\xfe[1]", "is not UTF-8 text"), (b"{not json", "is not valid JSON"),
             (b'{"a": 1}', f"non-empty JSON list of {what}"), (b"[]", f"non-empty JSON list of {what}")]
    for raw, msg in cases:
        path = tmp_path / "bad.json"
        path.write_bytes(raw)
        with pytest.raises(DataError, match=msg) as e:
            read(path)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="data file not found"):
        read(tmp_path / "missing.json")
