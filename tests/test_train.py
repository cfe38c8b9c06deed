"""train.py: the main job's smoke run, the run folder, and clean exits on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# These test the CLIs and the pipeline, not the kernels (tests/test_attention.py etc. do that):
# run the fused model on its PyTorch fallback, in-process and in subprocesses, to keep CI fast.
pytestmark = pytest.mark.usefixtures("fallback_path")

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_main_job_smoke(tmp_path):
    out = tmp_path / "run"
    r = run_train("--steps", 4, "--batch-size", 2, "--eval-every", 2, "--eval-batches", 1, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "embedded corpus" in r.stdout and "sample:" in r.stdout and "val loss" in r.stdout
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "ckpt-last.pt", "ckpt-best.pt",
                                             "loss.png", ".lock"}
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"train_loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert "val_loss" in rows[1] and "val_loss" in rows[3] and "val_loss" not in rows[0]
    ckpt = torch.load(out / "ckpt-last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["n_layers"] == 4


def test_loss_decreases_on_the_verdict(tmp_path, data_dir):
    out = tmp_path / "verdict"
    r = run_train("--data", data_dir / "the-verdict.txt", "--steps", 12, "--batch-size", 4, "--lr", 2e-3,
                  "--warmup", 2, "--eval-every", 100, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0


@pytest.mark.parametrize("case", ["missing", "empty", "short", "preset", "corrupt-init"])
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    args = ["--steps", 1, "--out", tmp_path / "out"]
    if case == "missing":
        args += ["--data", tmp_path / "nope.txt"]
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        args += ["--data", tmp_path / "empty.txt"]
    elif case == "short":
        (tmp_path / "short.txt").write_text("far too short for one context window")
        args += ["--data", tmp_path / "short.txt"]
    elif case == "preset":
        args += ["--preset", "gpt-9"]
    else:
        (tmp_path / "bad.pt").write_bytes(b"garbage" * 100)
        args += ["--init", tmp_path / "bad.pt"]
    r = run_train(*args, timeout=120)
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_existing_run_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    r = run_train("--steps", 1, "--out", out, timeout=120)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def _losses(folder):
    return [(r["step"], r["train_loss"], r["lr"]) for r in
            (json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines())]


# Ctrl-C, SIGTERM, kill -9 and resume: tests/test_train_faults.py.


def test_resume_from_corrupt_checkpoint_exits_2_and_keeps_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt-last.pt").write_bytes(b"PK\x03\x04 broken zip" * 10)
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_train("--out", out, "--resume", timeout=120)
    assert r.returncode == 2 and "corrupt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_without_a_run_is_an_error(tmp_path):
    r = run_train("--out", tmp_path / "empty", "--resume", timeout=120)
    assert r.returncode == 2 and "nothing to resume" in r.stderr


def test_ddp_two_gloo_processes_match_one_process(tmp_path, data_dir):
    common = ["--data", data_dir / "the-verdict.txt", "--steps", 3, "--eval-every", 100, "--warmup", 1]
    one = tmp_path / "one"
    r1 = run_train(*common, "--batch-size", 4, "--out", one)
    assert r1.returncode == 0, r1.stderr[-2000:]
    two = tmp_path / "two"
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         str(ROOT / "train.py"), *map(str, common), "--batch-size", "2", "--out", str(two)],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "2 processes" in r2.stdout
    for (s1, l1, _), (s2, l2, _) in zip(_losses(one), _losses(two), strict=True):
        assert s1 == s2 and abs(l1 - l2) < 1e-4, (s1, l1, l2)


@pytest.fixture(scope="module")
def spam_subset(tmp_path_factory, data_dir):
    rows = (data_dir / "sms_spam.tsv").read_text(encoding="utf-8").splitlines()
    ham = [r for r in rows if r.startswith("ham\t")][:40]
    spam = [r for r in rows if r.startswith("spam\t")][:40]
    path = tmp_path_factory.mktemp("spam") / "subset.tsv"
    path.write_text("\n".join(ham + spam) + "\n", encoding="utf-8")
    return path


def test_classify_and_predict(tmp_path, spam_subset):
    out = tmp_path / "cls"
    r = run_train("classify", "--data", spam_subset, "--epochs", 1, "--batch-size", 8, "--eval-batches", 2,
                  "--eval-every", 3, "--lr", 1e-3, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    acc = json.loads((out / "accuracy.json").read_text())
    assert set(acc) == {"train", "val", "test"} and all(0.0 <= v <= 1.0 for v in acc.values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 7  # 80 balanced rows -> 56 train -> 7 batches of 8, one epoch
    assert "val_acc" in rows[2] and "train_acc" in rows[2]
    ckpt = torch.load(out / "ckpt-last.pt", weights_only=True)
    assert ckpt["extra"]["labels"] == ["ham", "spam"] and ckpt["model"]["out_head.weight"].shape[0] == 2
    # The reported test accuracy, recomputed independently: the saved model on each test text alone, padded
    # to the training length as the book does (val/test padded to their own longest text once gave 54% for 85%).
    from gpt.config import GPTConfig
    from gpt.finetune import classify as C
    from gpt.model import GPTModel
    from gpt.tokenizer import get_tokenizer

    _, _, test_rows, labels = C.balance_and_split(C.read_tsv(spam_subset), seed=123)
    model = C.make_classifier(GPTModel(GPTConfig.from_dict(ckpt["config"])), 2)
    model.load_state_dict(ckpt["model"])
    hits = sum(C.classify_text(model, text, get_tokenizer(), labels, "cpu", ckpt["extra"]["max_length"]) == label
               for label, text in test_rows)
    assert acc["test"] == hits / len(test_rows)
    r = run_train("classify", "--init", out, "--predict", "WINNER!! Claim your free prize now", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] in {"ham", "spam"}


def test_instruct_writes_responses(tmp_path, data_dir):
    data = json.loads((data_dir / "instruction-data.json").read_text())[:40]
    path = tmp_path / "instr.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "ins"
    r = run_train("instruct", "--data", path, "--steps", 2, "--batch-size", 4, "--eval-batches", 1,
                  "--max-new-tokens", 4, "--mask-prompt", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    responses = json.loads((out / "responses.json").read_text())
    assert len(responses) == 4  # the 10% test split of 40 entries
    assert responses[0]["instruction"] == data[34]["instruction"]
    assert all(isinstance(e["model_response"], str) for e in responses)


@pytest.mark.parametrize("command,content,match", [
    ("classify", "ham\tfine\nno tab here\n", "expected 'label<TAB>text'"),
    ("classify", "ham\tonly one label\nham\tstill one\n", "single label"),
    ("instruct", "{not json", "not valid JSON"),
    ("instruct", '[{"instruction": "x"}]', "needs 'instruction' and 'output'"),
])
def test_malformed_finetune_data(tmp_path, command, content, match):
    path = tmp_path / "bad.data"
    path.write_text(content)
    r = run_train(command, "--data", path, "--out", tmp_path / "o", timeout=120)
    assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_init_decides_the_size_preset_warns_and_resume_names_a_default(tmp_path, data_dir):
    """--init X --preset P used to ignore P without a word: now a warning says so, and the run has X's
    size. Resuming with a flag the run left at its default named the stored value as "None"."""
    from gpt.config import GPTConfig
    from gpt.reference import GPTModel

    small = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0)
    init = GPTModel(small).save_pretrained(tmp_path / "small-hf")
    common = ["--init", init, "--data", data_dir / "the-verdict.txt", "--steps", 1, "--batch-size", 1,
              "--context-length", 16, "--eval-every", 100]
    r = run_train(*common, "--preset", "gpt2-small", "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: --preset gpt2-small is ignored: --init" in r.stderr
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model"]["emb_dim"] == 32
    r = run_train(*common, "--out", tmp_path / "b")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-3000:]
    r = run_train("--out", tmp_path / "b", "--resume", "--preset", "gpt2-small", timeout=120)
    assert r.returncode == 2 and "None" not in r.stderr, r.stderr
    assert "the run in" in r.stderr and "has no --preset (its default), got gpt2-small" in r.stderr


def test_generating_from_a_classifier_is_a_clear_error(tmp_path, spam_subset):
    """A classify run predicts labels: generating from it said "shape mismatch for 'out_head.weight'"."""
    out = tmp_path / "cls"
    r = run_train("classify", "--data", spam_subset, "--steps", 1, "--batch-size", 2, "--eval-every", 100,
                  "--eval-batches", 1, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "gpt.generate", "--init", str(out), "--prompt", "Hi",
                        "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a classifier (train.py classify: ham, spam)" in lines[0], r.stderr
    assert "--predict" in lines[0] and "shape mismatch" not in lines[0]
