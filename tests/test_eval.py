"""HellaSwag (gpt.eval): accuracy and per-example predictions against an independent computation with
transformers' GPT2LMHeadModel on the exported model (written here the way build-nanogpt's hellaswag.py
scores, one example at a time), the context cut, bad data, and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.cli.eval import main
from gpt.config import GPTConfig
from gpt.data import DataError
from gpt.eval import evaluate_hellaswag, read_hellaswag, render_example, summary_path
from gpt.model import GPTModel
from gpt.reference import GPTModel as RefModel
from gpt.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "hellaswag-sample.jsonl"
CFG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = RefModel(CFG)
    with torch.no_grad():  # a less uniform model: larger logits, clear preferences
        model.out_head.weight.mul_(20)
    folder = tmp_path_factory.mktemp("hs") / "model"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def independent(exported):
    return _independent(exported, read_hellaswag(SAMPLE))


def _independent(folder, examples):
    """build-nanogpt's loop on transformers' model: per example, 4 rows, masked summed / mean loss."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder).eval().double()
    tok = get_tokenizer()
    out = []
    for ex in examples:
        ctx = tok.encode(ex["ctx"])
        rows = [ctx + tok.encode(" " + e) for e in ex["endings"]]
        sums, means = [], []
        for row in rows:
            with torch.no_grad():
                logits = hf(torch.tensor([row])).logits[0]  # (T, V)
            logp = torch.log_softmax(logits, -1)
            lp = [logp[t - 1, row[t]].item() for t in range(len(ctx), len(row))]
            sums.append(sum(lp))
            means.append(sum(lp) / len(lp))
        out.append({"label": ex["label"], "pred": max(range(4), key=lambda i: sums[i]),
                    "pred_norm": max(range(4), key=lambda i: means[i]), "sum": sums, "mean": means})
    return out


@pytest.mark.parametrize("cls", [GPTModel, RefModel], ids=["fused", "reference"])
def test_matches_transformers_on_the_exported_model(exported, independent, cls, fallback_path):
    examples = read_hellaswag(SAMPLE)
    expect = independent
    model = cls.from_pretrained(exported)
    summary, preds = evaluate_hellaswag(model, examples, get_tokenizer(), batch_size=3)  # 3, 3, 3, 1
    assert [p["pred"] for p in preds] == [e["pred"] for e in expect]
    assert [p["pred_norm"] for p in preds] == [e["pred_norm"] for e in expect]
    for p, e in zip(preds, expect):
        assert p["sum_logprob"] == pytest.approx(e["sum"], rel=1e-4, abs=1e-3)
        assert p["mean_logprob"] == pytest.approx(e["mean"], rel=1e-4, abs=1e-4)
    n = len(examples)
    assert summary == {"acc": sum(e["pred"] == e["label"] for e in expect) / n,
                       "acc_norm": sum(e["pred_norm"] == e["label"] for e in expect) / n, "n": n}
    assert len({p["pred"] for p in preds}) > 1  # (a degenerate model would make the check weak)


def test_context_is_cut_from_the_left_to_fit():
    tok = get_tokenizer()
    ex = {"ctx": " ".join(["word"] * 80), "endings": ["a b c", "d", "e f", "g h i j"], "label": 0}
    tokens, mask, label = render_example(ex, tok, context_length=32)
    assert tokens.shape[1] == 32 and label == 0
    for i, e in enumerate(ex["endings"]):
        end = tok.encode(" " + e)
        row = tokens[i][mask[i].bool()].tolist()
        assert row == end
    full, _, _ = render_example(ex, tok)
    n_ctx = 32 - len(tok.encode(" g h i j"))
    assert tokens[3, :n_ctx].tolist() == full[3, 80 - n_ctx:80].tolist()


def test_ctx_a_ctx_b_and_bad_lines(tmp_path):
    good = json.loads(SAMPLE.read_text().splitlines()[0])
    no_ctx = {k: v for k, v in good.items() if k != "ctx"}
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(no_ctx) + "\n\n" + json.dumps({**good, "label": "2"}) + "\n")
    ex = read_hellaswag(path)
    assert ex[0]["ctx"] == good["ctx"] and ex[1]["label"] == 2
    for bad, msg in [("{not json", "not valid JSON"), (json.dumps({**good, "endings": ["a", "b"]}), "4 non-empty"),
                     (json.dumps({**good, "label": 4}), "'label'"), (json.dumps({"endings": good["endings"]}), "'ctx'")]:
        path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(DataError, match=f"line 3: .*{msg}"):
            read_hellaswag(path)
    assert len(read_hellaswag(SAMPLE, limit=4)) == 4


def test_cli_prints_and_writes(exported, tmp_path, capsys, fallback_path):
    out = tmp_path / "preds.jsonl"
    assert main(["hellaswag", "--init", str(exported), "--data", str(SAMPLE), "--limit", "7", "--batch-size", "2",
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expect, preds = evaluate_hellaswag(GPTModel.from_pretrained(exported), read_hellaswag(SAMPLE, 7), get_tokenizer())
    assert summary == expect and summary["n"] == 7
    assert [json.loads(line)["pred_norm"] for line in out.read_text().splitlines()] == [p["pred_norm"] for p in preds]
    assert json.loads(summary_path(out).read_text()) == summary


def test_cli_errors_are_one_line_exit_2(exported, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(SAMPLE.read_text().splitlines()[0] + "\n[1, 2]\n")
    cases = [(["--init", str(exported), "--data", str(tmp_path / "missing.jsonl")], "not found"),
             (["--init", str(tmp_path / "nope"), "--data", str(SAMPLE)], "nope"),
             (["--init", str(exported), "--data", str(SAMPLE), "--batch-size", "0"], "batch-size"),
             (["--init", str(exported), "--data", str(SAMPLE), "--limit", "x"], "limit"),
             (["--init", str(exported), "--data", str(SAMPLE), "--out", str(tmp_path)], "folder"),
             (["--data", str(SAMPLE)], "--init")]
    for args, needle in cases:
        try:
            rc = main(["hellaswag", *args])
        except SystemExit as e:  # argparse errors
            rc = e.code
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, err)
    # the module as users run it: a malformed line is one line naming its number, exit 2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "gpt.eval", "hellaswag", "--init", str(exported), "--data", str(bad)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {bad}: line 2: expected a JSON object, got list"
