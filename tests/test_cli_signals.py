"""Ctrl-C and SIGTERM in the middle of ``python -m gpt.eval``, ``gpt.export`` and ``gpt.generate``: a real signal sent
to this process while the work runs (a patched step sends it), then one line on stderr, exit 130 / 143, nothing
written and no staging files left; the previous SIGTERM handler is back afterwards. (train.py and prepare have
their own signal tests: tests/test_train_faults.py, tests/test_prepare.py.)"""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from gpt.cli import eval as eval_cli
from gpt.cli import export as export_cli
from gpt.cli import generate as generate_cli
from gpt.cli.stopping import Terminated, exit_code, sigterm_raises
from gpt.config import GPTConfig
from gpt.reference import GPTModel as RefModel

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "hellaswag-sample.jsonl"
CFG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=16, n_heads=1, n_layers=1, drop_rate=0.0)
SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]


def _signal_self(signum):
    os.kill(os.getpid(), signum)
    time.sleep(5)  # the handler raises before this ends
    pytest.fail(f"signal {signum} did not interrupt")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return RefModel(CFG).save_pretrained(tmp_path_factory.mktemp("m") / "model")


def _one_line(capsys, needle):
    """One message, the last thing on stderr (after any progress bar, which tqdm redraws with \\r)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert lines == [lines[-1]] and needle in lines[-1] and "Traceback" not in err, err


@pytest.mark.parametrize("signum,code", SIGNALS, ids=["ctrl-c", "sigterm"])
def test_eval_interrupted_writes_nothing(model_dir, tmp_path, monkeypatch, capsys, signum, code):
    import gpt.eval as ev

    real = ev.score_endings
    calls = []

    def score_then_signal(*a, **k):  # the signal arrives inside the evaluation loop, after one batch
        calls.append(1)
        if len(calls) == 2:
            _signal_self(signum)
        return real(*a, **k)

    monkeypatch.setattr(ev, "score_endings", score_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "preds.jsonl"
    rc = eval_cli.main(["hellaswag", "--init", str(model_dir), "--data", str(SAMPLE), "--batch-size", "2",
                        "--out", str(out), "--device", "cpu", "--backend", "reference"])
    assert rc == code and len(calls) == 2
    _one_line(capsys, "interrupted: nothing written")
    assert list(tmp_path.iterdir()) == []  # no predictions, no summary, no temp file
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("signum,code", SIGNALS, ids=["ctrl-c", "sigterm"])
def test_export_interrupted_leaves_no_staging_folder(model_dir, tmp_path, monkeypatch, capsys, signum, code):
    import gpt.export as ex

    monkeypatch.setattr(ex, "save_file", lambda *a, **k: _signal_self(signum))  # while writing the weights
    out = tmp_path / "hf"
    assert export_cli.main([str(model_dir), str(out)]) == code
    _one_line(capsys, f"interrupted: {out} not written")
    assert list(tmp_path.iterdir()) == []  # neither the target nor its .tmp staging folder


def test_sigterm_raises_restores_the_handler_and_codes():
    seen = []
    old = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with pytest.raises(Terminated), sigterm_raises():
            _signal_self(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the caller's handler again
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)
    assert exit_code(Terminated()) == 143 and exit_code(KeyboardInterrupt()) == 130


@pytest.mark.parametrize("signum,code", SIGNALS, ids=["ctrl-c", "sigterm"])
def test_generate_prompts_file_interrupted_keeps_the_old_output(model_dir, tmp_path, monkeypatch, capsys, signum,
                                                                code):
    real = generate_cli.iter_batch

    def one_then_signal(*a, **k):  # the first prompt finishes, then the signal
        for n, item in enumerate(real(*a, **k)):
            if n == 1:
                _signal_self(signum)
            yield item

    monkeypatch.setattr(generate_cli, "iter_batch", one_then_signal)
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompts.write_text("Hello\nEvery effort\nThe sky\n")
    out.write_text("an earlier run's output\n")
    rc = generate_cli.main(["--init", str(model_dir), "--prompts-file", str(prompts), "--out", str(out),
                            "--max-new-tokens", "3", "--batch-size", "1", "--backend", "reference", "--device", "cpu"])
    assert rc == code
    _one_line(capsys, f"interrupted: {out} not written")
    assert out.read_text() == "an earlier run's output\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out.jsonl", "prompts.txt"]  # no temp file


@pytest.mark.parametrize("signum,code", SIGNALS, ids=["ctrl-c", "sigterm"])
def test_generate_stream_interrupted(model_dir, monkeypatch, capsys, signum, code):
    real = generate_cli.stream

    def two_then_signal(*a, **k):
        for n, token in enumerate(real(*a, **k)):
            if n == 2:
                _signal_self(signum)
            yield token

    monkeypatch.setattr(generate_cli, "stream", two_then_signal)
    rc = generate_cli.main(["--init", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "5",
                            "--backend", "reference", "--device", "cpu"])
    assert rc == code
    out = capsys.readouterr()
    assert out.out.startswith("Hello") and "Traceback" not in out.err
    assert [ln for ln in out.err.splitlines() if ln.strip()] == ["interrupted: the text so far is above"]
