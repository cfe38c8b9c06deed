"""train.py's LoRA (--lora-rank/--lora-alpha on classify, instruct, dpo), dpo and pretrain --eval-hellaswag
from the command line: small checkpoints that record their base, the merged model from from_pretrained and
gpt.export (checked against transformers), the base checked on --resume, SIGTERM and kill -9 then --resume
bit-exact (tests/test_train_faults.py's helpers), and bad flags / bad data as one line and exit 2.

A micro model with GPT-2's vocabulary (one 16-wide layer) keeps a step at milliseconds; the data is the
shipped data/preference-data.json (also read as Alpaca instructions)."""

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.config import GPTConfig
from gpt.finetune.dpo import preferences_from_instructions
from gpt.lora import replace_linear_with_lora
from gpt.model import GPTModel
from gpt.reference import GPTModel as RefModel
from tests.test_train_faults import check_checkpoints, cli, metric_rows, popen, wait_for

pytestmark = pytest.mark.usefixtures("fallback_path")

ROOT = Path(__file__).resolve().parents[1]
PREFS = ROOT / "data" / "preference-data.json"
SAMPLE = ROOT / "data" / "hellaswag-sample.jsonl"
CFG = GPTConfig(vocab_size=50257, context_length=96, emb_dim=16, n_heads=1, n_layers=1, drop_rate=0.0)
STEPS = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    save_checkpoint(d / "base.pt", RefModel(CFG))
    return d / "base.pt"


def dpo_args(base, out, *extra):
    return ["dpo", "--init", base, "--data", PREFS, "--steps", STEPS, "--batch-size", 2, "--eval-every", 3,
            "--eval-batches", 1, "--lr", 1e-3, "--warmup", 1, "--out", out, *extra]


def assert_same_weights(a, b):
    """Bit-exact model (what the checkpoint holds) and optimizer state at the last step."""
    wa, wb = (torch.load(x / "ckpt-last.pt", weights_only=True) for x in (a, b))
    assert wa["step"] == wb["step"] == STEPS and wa["model"].keys() == wb["model"].keys()
    for name, t in wa["model"].items():
        assert torch.equal(t, wb["model"][name]), name
    for i, state in wa["optimizer"]["state"].items():
        for k, t in state.items():
            assert torch.equal(t, wb["optimizer"]["state"][i][k]), (i, k)


def one_error_line(capsys, needle):
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


@pytest.fixture(scope="module")
def references(base, tmp_path_factory):
    """Uninterrupted DPO runs (full and LoRA) every interrupted one must equal."""
    outs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        for name, extra in (("full", []), ("lora", ["--lora-rank", 2, "--lora-alpha", 4])):
            outs[name] = tmp_path_factory.mktemp(name) / "run"
            assert cli(*dpo_args(base, outs[name], "--save-every", 100, *extra)) == 0
    return outs


def test_shipped_preference_file_is_built_as_documented():
    shipped = json.loads(PREFS.read_text())
    assert len(shipped) == 50 and all(e["chosen"] == e["output"] for e in shipped)
    assert shipped[0]["rejected"] == shipped[1]["output"] and shipped[-1]["rejected"] == shipped[0]["output"]
    instructions = json.loads((ROOT / "data" / "instruction-data.json").read_text())
    assert preferences_from_instructions(instructions, 50) == shipped


def test_dpo_run_logs_rewards(references):  # (the margin growing: the next test and tests/test_dpo.py)
    rows = metric_rows(references["full"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["reward_margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"], abs=2e-6)
    assert rows[0]["reward_margin"] == 0  # the policy starts as the reference
    assert rows[-1]["reward_margin"] != 0 and "val_reward_margin" in rows[-1]
    ckpt = load_checkpoint(references["full"] / "ckpt-last.pt")
    assert ckpt["extra"]["task"] == "dpo" and ckpt["extra"]["beta"] == 0.1


def test_dpo_cli_grows_the_reward_margin_on_a_learnable_set(base, tmp_path):
    """From the command line, on a toy set the micro model can learn (the chosen response is always "Yes.",
    the rejected one always "No."): the logged train margin rises from 0 and the held-out margin ends
    positive. (The shipped file's pairs are too hard for a 16-wide model to show a trend in a few steps.)"""
    prefs = tmp_path / "toy.json"
    prefs.write_text(json.dumps([{"instruction": f"Question {i}: is the sky up?", "input": "", "output": "Yes.",
                                  "chosen": "Yes.", "rejected": "No."} for i in range(40)]))
    out = tmp_path / "run"
    assert cli("dpo", "--init", base, "--data", prefs, "--steps", 12, "--batch-size", 4, "--eval-every", 12,
               "--eval-batches", 2, "--lr", 3e-3, "--warmup", 1, "--beta", 0.5, "--out", out) == 0
    rows = metric_rows(out)
    margins = [r["reward_margin"] for r in rows]
    assert margins[0] == pytest.approx(0, abs=1e-6)  # the policy starts as the reference
    assert margins[-1] > 0.4 and all(b > a for a, b in zip(margins, margins[1:])), margins  # rises every step
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_reward_margin"] > 0.3, rows[-1]


def test_dpo_sigterm_then_resume_is_bit_exact(base, references, tmp_path, capsys):
    out = tmp_path / "run"
    proc = popen(*dpo_args(base, out, "--save-every", 100), pause=0.2)
    try:
        wait_for(lambda: len(metric_rows(out)) >= 2, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    stopped = check_checkpoints(out)["ckpt-last.pt"]
    assert 2 <= stopped < STEPS
    assert cli("dpo", "--out", out, "--resume") == 0
    assert [r for r in metric_rows(out)] == [r | {"tokens_per_s": r2["tokens_per_s"]} for r, r2 in
                                             zip(metric_rows(references["full"]), metric_rows(out))]
    assert_same_weights(references["full"], out)


def test_lora_dpo_kill_9_then_resume_is_bit_exact_with_small_checkpoints(base, references, tmp_path):
    out = tmp_path / "run"
    proc = popen(*dpo_args(base, out, "--save-every", 1, "--lora-rank", 2, "--lora-alpha", 4), pause=1.0)
    try:  # killed while the second checkpoint sits in its temp file
        wait_for(lambda: (out / "ckpt-last.pt").exists() and any(".tmp" in p.name for p in out.iterdir()), proc)
        proc.kill()
    finally:
        proc.kill()
        proc.communicate()
    assert cli("dpo", "--out", out, "--resume") == 0
    assert [r["train_loss"] for r in metric_rows(out)] == [r["train_loss"] for r in metric_rows(references["lora"])]
    assert_same_weights(references["lora"], out)
    ckpt = load_checkpoint(out / "ckpt-last.pt")
    assert ckpt["model"] and all(k.endswith((".lora.A", ".lora.B")) for k in ckpt["model"])
    assert ckpt["extra"]["lora"]["base"] == str(base) and ckpt["extra"]["lora"]["rank"] == 2
    assert (out / "ckpt-last.pt").stat().st_size * 5 < base.stat().st_size


def test_lora_instruct_from_pretrained_and_export_give_the_merged_model(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("instruct", "--init", base, "--data", PREFS, "--steps", 4, "--batch-size", 2, "--eval-every", 4,
               "--eval-batches", 1, "--lr", 1e-2, "--lora-rank", 2, "--lora-alpha", 3, "--max-new-tokens", 2,
               "--out", out) == 0
    assert "LoRA rank 2, alpha 3: " in capsys.readouterr().out
    ckpt = load_checkpoint(out / "ckpt-last.pt")
    # the adapted model, built here from the base and the saved adapters
    adapted = replace_linear_with_lora(RefModel.from_pretrained(base), 2, 3.0)
    adapted.load_state_dict(ckpt["model"], strict=False)
    assert any(v.abs().sum() > 0 for k, v in ckpt["model"].items() if k.endswith(".B"))  # it trained
    idx = torch.randint(0, CFG.vocab_size, (2, 17))
    with torch.no_grad():
        expect = adapted(idx)
        for cls in (RefModel, GPTModel):
            merged = cls.from_pretrained(out)
            assert not any("lora" in k for k in merged.state_dict())
            torch.testing.assert_close(merged(idx), expect, atol=1e-4, rtol=1e-4)
    from transformers import GPT2LMHeadModel

    from gpt.cli.export import main as export_main

    assert export_main([str(out), str(tmp_path / "hf")]) == 0
    with torch.no_grad():
        hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf(idx).logits, expect, atol=1e-4, rtol=1e-4)


def test_lora_resume_checks_its_base(base, tmp_path, capsys):
    own = tmp_path / "base.pt"
    shutil.copy(base, own)
    out = tmp_path / "run"
    args = ["instruct", "--init", own, "--data", PREFS, "--steps", 2, "--batch-size", 2, "--eval-every", 2,
            "--eval-batches", 1, "--lora-rank", 2, "--max-new-tokens", 1, "--out", out]
    assert cli(*args) == 0
    capsys.readouterr()
    changed = RefModel.from_pretrained(own)
    with torch.no_grad():
        changed.tok_emb.weight[0, 0] += 1
    save_checkpoint(own, changed)
    assert cli("instruct", "--out", out, "--resume", "--steps", 3) == 2
    one_error_line(capsys, "has changed since the LoRA run")
    own.unlink()
    assert cli("instruct", "--out", out, "--resume", "--steps", 3) == 2
    one_error_line(capsys, "which cannot be loaded")
    with pytest.raises(ValueError, match="base model .* cannot be loaded"):
        RefModel.from_pretrained(out)


def test_lora_classify_trains_adapters_and_the_head(base, tmp_path, capsys):
    tsv = tmp_path / "t.tsv"
    rows = [f"ham\thello friend number {i}, see you at lunch" for i in range(20)]
    rows += [f"spam\tWIN a free prize {i} now, reply YES" for i in range(20)]
    tsv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert cli("classify", "--init", base, "--data", tsv, "--steps", 3, "--batch-size", 4, "--eval-every", 3,
               "--eval-batches", 1, "--lora-rank", 2, "--out", out) == 0
    keys = set(load_checkpoint(out / "ckpt-last.pt")["model"])
    assert {"out_head.weight", "out_head.bias"} <= keys
    assert all(k.startswith("trf_blocks.") and k.endswith((".lora.A", ".lora.B")) for k in keys - {"out_head.weight",
                                                                                                  "out_head.bias"})
    capsys.readouterr()
    assert cli("classify", "--init", out, "--predict", "WIN a prize") == 0
    assert capsys.readouterr().out.strip() in ("ham", "spam")


@pytest.mark.parametrize("argv,needle", [
    (["instruct", "--lora-rank", "0"], "--lora-rank"),
    (["instruct", "--lora-rank", "2", "--lora-alpha", "nan"], "--lora-alpha"),
    (["instruct", "--data", str(PREFS), "--lora-rank", "2"], "needs --init"),
    (["pretrain", "--lora-rank", "2"], "--lora-rank"),
    (["classify", "--data", str(SAMPLE), "--lora-rank", "2"], ""),
    (["dpo", "--data", str(PREFS)], "needs --init"),
    (["dpo", "--beta", "0"], "--beta"),
    (["pretrain", "--eval-hellaswag", ""], "--eval-hellaswag"),
])
def test_bad_flags_are_one_line_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli(*argv, "--steps", 1)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    one_error_line(capsys, needle)
    assert not (tmp_path / "runs").exists()


def test_bad_data_is_one_line_exit_2_and_writes_nothing(base, tmp_path, capsys):
    prefs = json.loads(PREFS.read_text())
    del prefs[3]["rejected"]
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(prefs))
    assert cli("dpo", "--init", base, "--data", bad, "--out", tmp_path / "a") == 2
    one_error_line(capsys, "entry 3 has no 'rejected' field")
    hs = tmp_path / "h.jsonl"
    hs.write_text(SAMPLE.read_text().splitlines()[0] + "\n{\"ctx\": 1}\n")
    assert cli("pretrain", "--init", base, "--eval-hellaswag", hs, "--steps", 1, "--out", tmp_path / "b") == 2
    one_error_line(capsys, "line 2")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pretrain_eval_hellaswag_logs_accuracy(base, tmp_path, capsys):
    out = tmp_path / "run"
    text = tmp_path / "t.txt"
    text.write_text("Every effort moves you forward. " * 200)
    assert cli("pretrain", "--init", base, "--data", text, "--eval-hellaswag", SAMPLE, "--steps", 2, "--batch-size",
               2, "--eval-every", 2, "--eval-batches", 1, "--out", out) == 0
    row = metric_rows(out)[-1]
    assert 0 <= row["hellaswag_acc"] <= 1 and 0 <= row["hellaswag_acc_norm"] <= 1
    assert (row["hellaswag_acc_norm"] * 10) == pytest.approx(round(row["hellaswag_acc_norm"] * 10))  # 10 examples
    assert "hellaswag acc norm" in capsys.readouterr().out
