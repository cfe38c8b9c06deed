"""train.py broken on purpose: kill -9 (also mid checkpoint write), SIGTERM/SIGINT, two runs on one folder,
NaN gradients, a failing checkpoint write (disk full), a changed run on --resume, bad flags.

Every case checks that nothing already on disk is lost and that every checkpoint on disk loads with finite
weights. Runs use a micro model (vocabulary 256, one 16-wide layer) on an llm.c shard so a step costs
milliseconds; the reference run and most runs are in-process (``gpt.cli.train.cli``, what train.py runs), only the processes that get
killed are subprocesses. The randomized kill loop is ``@pytest.mark.slow``.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.cli.train import cli as train_cli
from gpt.cli.train import parse_args
from gpt.run import choose_run_folder, resume_args

pytestmark = pytest.mark.usefixtures("fallback_path")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8




@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro model (--init) and a learnable llm.c shard of small token ids."""
    from gpt.checkpoint import save_checkpoint
    from gpt.config import GPTConfig
    from gpt.data import write_shard
    from gpt.reference import GPTModel

    d = tmp_path_factory.mktemp("micro")
    torch.manual_seed(0)
    save_checkpoint(d / "micro.pt", GPTModel(GPTConfig(vocab_size=256, context_length=16, emb_dim=16, n_heads=1,
                                                       n_layers=1, drop_rate=0.0)))
    write_shard(d / "data.bin", (torch.arange(4000) * 7 % 251).numpy())
    return d


def common(micro):
    return ["--init", micro / "micro.pt", "--data", micro / "data.bin", "--steps", STEPS, "--batch-size", 2,
            "--eval-every", 4, "--eval-batches", 1, "--warmup", 2]


def cli(*args) -> int:
    return train_cli([str(a) for a in args])


def popen(*args, pause: float | None = None):
    env = {**os.environ}
    if pause is not None:
        env["GPT_TEST_CHECKPOINT_PAUSE"] = str(pause)
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def wait_for(predicate, proc, timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError("timed out")


def metric_rows(folder):
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(folder):
    return [(r["step"], r["train_loss"], r["lr"]) for r in metric_rows(folder)]


def temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name) if folder.is_dir() else []


def check_checkpoints(folder) -> dict:
    """Every checkpoint in ``folder`` loads and holds only finite weights (and optimizer state)."""
    from gpt.checkpoint import load_checkpoint

    steps = {}
    for path in sorted(folder.glob("*.pt")):
        ckpt = load_checkpoint(path)
        tensors = list(ckpt["model"].values())
        if ckpt["optimizer"] is not None:
            tensors += [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path
        steps[path.name] = ckpt["step"]
    return steps


def assert_same_weights(a, b):
    wa = torch.load(a / "ckpt-last.pt", weights_only=True)
    wb = torch.load(b / "ckpt-last.pt", weights_only=True)
    assert wa["step"] == wb["step"] == STEPS
    for name, t in wa["model"].items():
        assert torch.equal(t, wb["model"][name]), name  # bit-exact
    for i, state in wa["optimizer"]["state"].items():
        for k, t in state.items():
            assert torch.equal(t, wb["optimizer"]["state"][i][k]), (i, k)


@pytest.fixture(scope="module")
def reference(micro, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("ref") / "run"
    with pytest.MonkeyPatch.context() as mp:  # (module scope: set up before the fallback_path fixture)
        mp.setenv("TRITON_INTERPRET", "0")
        assert cli(*common(micro), "--save-every", 100, "--out", out) == 0
    assert [s for s, _, _ in losses(out)] == list(range(1, STEPS + 1))
    return out


# ------------------------------------------------------------------------------ kill -9, signals, lock
def test_kill_9_during_a_checkpoint_write_then_resume_is_bit_exact(micro, reference, tmp_path):
    out = tmp_path / "run"
    proc = popen(*common(micro), "--save-every", 1, "--out", out, pause=1.0)
    try:  # the first checkpoint is on disk; kill while the second sits in its temp file
        wait_for(lambda: (out / "ckpt-last.pt").exists() and temp_files(out), proc)
        proc.kill()
    finally:
        proc.kill()
        proc.communicate()
    assert temp_files(out) and temp_files(out)[0].startswith(".ckpt-last.pt.")
    before = check_checkpoints(out)
    assert before["ckpt-last.pt"] >= 1
    assert (out / ".lock").read_text().strip() == str(proc.pid)  # the dead holder's lock is free again
    assert cli("--out", out, "--resume") == 0  # the stored arguments; the stale temp file goes
    assert temp_files(out) == []
    assert losses(out) == losses(reference)
    assert_same_weights(reference, out)
    check_checkpoints(out)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143),
                                      pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_signal_saves_and_resume_is_bit_exact_and_the_folder_is_locked(micro, reference, tmp_path, capsys,
                                                                         sig, code):
    out = tmp_path / "run"
    proc = popen(*common(micro), "--save-every", 100, "--out", out, pause=0.2)
    try:
        wait_for(lambda: len(metric_rows(out)) >= 2, proc)
        # A second run on the same folder, fresh or resumed, is refused while the first holds it.
        # (a checkpoint's temp file may be renamed into place meanwhile: only finished files are compared)
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if ".tmp" not in p.name}
        for extra in ([], ["--resume"]):
            assert cli(*common(micro), "--out", out, *extra) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"in use by process {proc.pid}" in err[0], err
        assert proc.poll() is None, "the first run must still be running for the lock check to mean anything"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    assert set(before) <= {p.name for p in out.iterdir()}
    stopped = check_checkpoints(out)["ckpt-last.pt"]
    assert 2 <= stopped < STEPS and metric_rows(out)[-1]["step"] == stopped
    assert cli("--out", out, "--resume") == 0
    assert f"resumed from {out / 'ckpt-last.pt'} at step {stopped}" in capsys.readouterr().out
    assert losses(out) == losses(reference)
    assert_same_weights(reference, out)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_one_signal_finishes_the_step_and_saves_a_second_aborts(tmp_path, sig, code):
    from gpt.config import GPTConfig
    from gpt.reference import GPTModel
    from gpt.training import Interrupted, LoopConfig, TrainSpec, train

    model = GPTModel(GPTConfig(vocab_size=32, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    data = [(torch.randint(0, 32, (8,)), torch.randint(0, 32, (8,))) for _ in range(8)]
    for times, saved in ((1, {"ckpt-last.pt": 3}), (2, {})):
        calls = {"n": 0}

        def loss_fn(m, batch, device, times=times, calls=calls):
            calls["n"] += 1
            if calls["n"] == 3:  # in the middle of step 3
                for _ in range(times):
                    os.kill(os.getpid(), sig)
            return torch.nn.functional.cross_entropy(m(batch[0]).flatten(0, 1), batch[1].flatten())

        spec = TrainSpec(train_data=data, collate=lambda items: tuple(torch.stack(t) for t in zip(*items)),
                         loss_fn=loss_fn, evaluate=lambda m: {"val_loss": 1.0})
        out = tmp_path / str(times)
        out.mkdir()
        handler = signal.getsignal(sig)
        with pytest.raises(Interrupted) as e:
            train(model, spec, LoopConfig(steps=6, batch_size=2, save_every=100, eval_every=100), out,
                  torch.device("cpu"), log=lambda *a: None)
        assert e.value.exit_code == code and signal.getsignal(sig) is handler  # the handler is restored
        assert check_checkpoints(out) == saved


# ------------------------------------------------------------------------------ NaN, disk full
def test_exploding_run_never_saves_non_finite_weights(micro, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli(*common(micro), "--lr", 1000, "--warmup", 1, "--save-every", 1, "--steps", 30, "--clip", 0,
               "--out", out)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert any(s in err[0] for s in ("non-finite", "is nan", "is inf")), err
    saved = check_checkpoints(out)  # whatever was written loads, finite
    json.loads("[" + ",".join((out / "metrics.jsonl").read_text().splitlines()) + "]",
               parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))  # strict JSON (null, no NaN)
    if "ckpt-last.pt" in saved:
        assert f"the last good checkpoint is {out / 'ckpt-last.pt'}" in err[0]
        assert saved["ckpt-last.pt"] < metric_rows(out)[-1]["step"] + 1


def test_disk_full_keeps_the_old_checkpoint(micro, tmp_path, capsys, monkeypatch):
    import gpt.checkpoint

    out = tmp_path / "run"
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the third checkpoint write hits a full disk
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(gpt.checkpoint.os, "fsync", fsync)
    assert cli(*common(micro), "--save-every", 1, "--eval-every", 100, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0] and "ckpt-last.pt" in err[0], err
    assert check_checkpoints(out) == {"ckpt-last.pt": 2}
    assert temp_files(out) == []


def test_nan_gradient_with_a_finite_loss_stops_before_the_step(tmp_path):
    from gpt.config import GPTConfig
    from gpt.reference import GPTModel
    from gpt.training import LoopConfig, TrainingDiverged, TrainSpec, train

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=32, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    data = [(torch.randint(0, 32, (8,)), torch.randint(0, 32, (8,))) for _ in range(8)]
    calls = {"n": 0}

    def loss_fn(m, batch, device):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(m(batch[0]).flatten(0, 1), batch[1].flatten())
        if calls["n"] >= 3:  # sqrt'(0) = inf: the loss stays finite, the gradient is NaN
            loss = loss + (m.tok_emb.weight.sum() * 0).sqrt()
        return loss

    spec = TrainSpec(train_data=data, collate=lambda items: tuple(torch.stack(t) for t in zip(*items)),
                     loss_fn=loss_fn, evaluate=lambda m: {"val_loss": 1.0})
    for clip in (1.0, 0.0):
        out = tmp_path / f"clip{clip}"
        out.mkdir()
        calls["n"] = 0
        cfg = LoopConfig(steps=5, batch_size=2, save_every=1, eval_every=100, lr=1e-3, clip=clip)
        with pytest.raises(TrainingDiverged, match="gradient norm is nan at step 3.*last good checkpoint"):
            train(model, spec, cfg, out, torch.device("cpu"), log=lambda *a: None)
        assert check_checkpoints(out) == {"ckpt-last.pt": 2}
        assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied


def test_save_every_minutes_saves_between_step_saves(tmp_path):
    from gpt.config import GPTConfig
    from gpt.reference import GPTModel
    from gpt.training import LoopConfig, TrainingDiverged, TrainSpec, train

    model = GPTModel(GPTConfig(vocab_size=32, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    data = [(torch.randint(0, 32, (8,)), torch.randint(0, 32, (8,))) for _ in range(8)]
    calls = {"n": 0}

    def loss_fn(m, batch, device):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(m(batch[0]).flatten(0, 1), batch[1].flatten())
        return loss * float("nan") if calls["n"] >= 4 else loss

    spec = TrainSpec(train_data=data, collate=lambda items: tuple(torch.stack(t) for t in zip(*items)),
                     loss_fn=loss_fn, evaluate=lambda m: {"val_loss": 1.0})
    for minutes, expected in ((None, {}), (1e-9, {"ckpt-last.pt": 3})):
        out = tmp_path / str(minutes)
        out.mkdir()
        calls["n"] = 0
        cfg = LoopConfig(steps=6, batch_size=2, save_every=100, save_every_minutes=minutes, eval_every=100)
        with pytest.raises(TrainingDiverged, match="loss is nan at step 4"):
            train(model, spec, cfg, out, torch.device("cpu"), log=lambda *a: None)
        assert check_checkpoints(out) == expected


def test_save_checkpoint_refuses_non_finite_values(tmp_path):
    from gpt.checkpoint import first_non_finite, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert first_non_finite(model, opt) is None
    save_checkpoint(tmp_path / "good.pt", model, optimizer=opt)
    before = (tmp_path / "good.pt").read_bytes()
    opt.state[model.weight]["exp_avg_sq"][0, 0] = float("inf")
    assert first_non_finite(model, opt) == "optimizer state 0.exp_avg_sq"
    with pytest.raises(ValueError, match="optimizer state 0.exp_avg_sq holds NaN"):
        save_checkpoint(tmp_path / "good.pt", model, optimizer=opt)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(ValueError, match="weight bias holds NaN"):
        save_checkpoint(tmp_path / "good.pt", model)
    assert (tmp_path / "good.pt").read_bytes() == before and temp_files(tmp_path) == []


# ------------------------------------------------------------------------------ --resume is the same run
@pytest.mark.parametrize("flag,value", [("--batch-size", 4), ("--seed", 7), ("--lr", 0.5), ("--preset", "tiny"),
                                        ("--data", "other.bin"), ("--warmup", 0), ("--backend", "reference")])
def test_resume_refuses_a_changed_run(micro, reference, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli("--out", out, "--resume", "--steps", STEPS + 2, flag, value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} cannot change on --resume" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_extends_the_run_with_its_stored_arguments(micro, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    # The same values as stored are fine; --steps extends; no --data: the stored data, not the default corpus.
    assert cli("--out", out, "--resume", "--steps", STEPS + 2, "--batch-size", 2, "--data", micro / "data.bin") == 0
    stdout = capsys.readouterr().out
    assert str(micro / "data.bin") in stdout and f"resumed from {out / 'ckpt-last.pt'} at step {STEPS}" in stdout
    assert [r["step"] for r in metric_rows(out)] == list(range(1, STEPS + 3))
    assert losses(out)[:STEPS] == losses(reference)
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == STEPS + 2 and config["args"]["steps"] == STEPS + 2
    assert check_checkpoints(out)["ckpt-last.pt"] == STEPS + 2


def test_resume_of_another_command_or_a_broken_checkpoint(micro, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cases = [(["classify", "--out", out, "--resume"], "holds a pretrain run"),
             (["--out", tmp_path / "nothing", "--resume"], "nothing to resume")]
    for args, match in cases:
        assert cli(*args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="used 1 processes, this is 2"):
        resume_args(parse_args(["--resume"]), out, world=2)
    ckpt = torch.load(out / "ckpt-last.pt", weights_only=True)
    for name, broken, match in [("shape", lambda c: c["model"].update(
            {"tok_emb.weight": torch.zeros(3, 16)}), "does not fit the model"),
            ("no-config", lambda c: c.update(config=None), "holds no model config")]:
        bad = dict(ckpt, model=dict(ckpt["model"]))
        broken(bad)
        torch.save(bad, out / "ckpt-last.pt")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert cli("--out", out, "--resume") == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_that_crashed_before_its_first_checkpoint_is_not_stuck(micro, reference, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reference / "config.json", out / "config.json")
    assert choose_run_folder(str(out), "pretrain") == out  # config.json alone: a fresh run may reuse it
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metric_rows(reference)[:2]))
    assert cli(*common(micro), "--out", out) == 2  # logged steps: not overwritten by a fresh run ...
    assert "already holds a run" in capsys.readouterr().err
    assert cli("--out", out, "--resume") == 0  # ... but resumed from step 0 with the stored arguments
    assert "has no checkpoint yet" in capsys.readouterr().out
    assert losses(out) == losses(reference)
    assert_same_weights(reference, out)


# ------------------------------------------------------------------------------ bad input: one line, exit 2
def test_bad_input_exits_2_and_writes_nothing(micro, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    from gpt.data import write_shard

    write_shard(tmp_path / "big-ids.bin", [1, 2, 300] * 200)
    cases = [
        (["--out", a_file], "is a file"),
        (["--out", "/sys/gpt-run"], "cannot use /sys/gpt-run as the run folder"),
        (["--device", "nonsense", "--out", tmp_path / "o"], "is not a device"),
        (["--device", "cuda:7", "--out", tmp_path / "o"], "--device cuda:7"),
        (["--data", tmp_path / "big-ids.bin", "--out", tmp_path / "o"], "token id 300"),
        (["--dtype", "fp16", "--out", tmp_path / "o"], "fp16 needs a CUDA device"),
        (["--batch-size", 1000, "--out", tmp_path / "o"], "fewer than one global batch"),
    ]
    for extra, match in cases:
        assert cli(*common(micro), *extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], (extra, err)
        assert not (tmp_path / "o").exists()
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("argv", [
    ["--lr", "0"], ["--lr", "nan"], ["--lr", "-1e-3"], ["--context-length", "0"], ["--warmup", "-1"],
    ["--clip", "-1"], ["--clip", "inf"], ["--weight-decay", "-0.1"], ["--epochs", "0"], ["--epochs", "-2"],
    ["--seed", "-1"], ["--steps", "0"], ["--save-every-minutes", "0"], ["--batch-size", "x"],
    ["instruct", "--max-new-tokens", "-1"], ["classify", "--context-length", "64"], ["bogus"], ["--out", ""],
    ["--preset", ""],
])
def test_numeric_flags_are_validated_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


def test_zero_means_zero():
    args = parse_args(["--warmup", "0", "--clip", "0", "--weight-decay", "0", "--seed", "0", "--lr", "2e-3"])
    assert (args.warmup, args.clip, args.weight_decay, args.seed, args.lr) == (0, 0.0, 0.0, 0, 2e-3)
    assert args.given == {"warmup", "clip", "weight_decay", "seed", "lr"}


@pytest.mark.parametrize("command,has,lacks", [
    (None, ["train.py [pretrain|classify|instruct|dpo]", "--context-length", "--prompt", "--eval-hellaswag"],
     ["--train-all", "--beta"]),
    ("classify", ["usage: train.py classify", "--train-all", "--predict"], ["--mask-prompt", "--prompt PROMPT"]),
    ("instruct", ["usage: train.py instruct", "--mask-prompt", "--max-new-tokens", "--lora-rank", "--lora-alpha"],
     ["--train-all", "--beta"]),
    ("dpo", ["usage: train.py dpo", "--beta", "--lora-rank", "frozen reference"], ["--train-all", "--mask-prompt"]),
    ("pretrain", ["usage: train.py pretrain", "--context-length"], ["--predict"]),
])
def test_each_command_has_its_own_help(command, has, lacks, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(s in text for s in has) and not any(s in text for s in lacks), text
    assert "--save-every-minutes" in text and "SIGTERM" in text and "may be given with a new value" in text


# ------------------------------------------------------------------------------ slow: random kills
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_random_kill_9_then_resume_until_done_is_bit_exact(micro, reference, tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "run"
    args = [*common(micro), "--save-every", rng.choice([1, 2, 3]), "--out", out]
    kills = 0
    for _ in range(4):
        proc = popen(*args, pause=rng.choice([None, 0.3]))
        try:
            if rng.random() < 0.5:  # in a checkpoint write
                wait_for(lambda: temp_files(out), proc, timeout=120)
            else:  # after a random number of logged steps
                n = len(metric_rows(out)) + rng.randint(0, 3)
                wait_for(lambda n=n: len(metric_rows(out)) >= n, proc, timeout=120)
            proc.kill()
        except AssertionError:
            pass  # it finished first
        finally:
            proc.kill()
            proc.communicate()
        check_checkpoints(out)
        kills += proc.returncode == -signal.SIGKILL
        if proc.returncode == 0:
            break
        if (out / "config.json").exists():  # (killed before it was written: start afresh)
            args = ["--out", out, "--resume"]
    assert kills >= 1
    assert cli("--out", out, "--resume") == 0  # (a no-op when the last process finished the run)
    assert losses(out) == losses(reference)
    assert_same_weights(reference, out)


def test_tokens_per_s_leaves_out_checkpoint_writes(tmp_path, monkeypatch):
    """Checkpoint writes (and the loss plot), like evaluations, are no training throughput: a slow save
    or evaluation must not show up as a slow next step in metrics.jsonl. The loop's clock is a fake one
    that only the test moves (no wall-clock bound): each micro-batch takes 1 s, each checkpoint write 100 s
    and each evaluation 1000 s, so every step's throughput must be exactly 16 tokens / 1 s."""
    from types import SimpleNamespace

    import gpt.training as T
    from gpt.config import GPTConfig
    from gpt.reference import GPTModel

    clock = [0.0]
    monkeypatch.setattr(T, "time", SimpleNamespace(perf_counter=lambda: clock[0], monotonic=lambda: clock[0]))

    def advance(seconds, fn):
        def wrapped(*a, **k):
            clock[0] += seconds
            return fn(*a, **k)
        return wrapped

    model = GPTModel(GPTConfig(vocab_size=32, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    data = [(torch.randint(0, 32, (8,)), torch.randint(0, 32, (8,))) for _ in range(8)]
    spec = T.TrainSpec(train_data=data, collate=lambda items: tuple(torch.stack(t) for t in zip(*items)),
                       loss_fn=advance(1.0, lambda m, b, dev: torch.nn.functional.cross_entropy(
                           m(b[0]).flatten(0, 1), b[1].flatten())),
                       evaluate=advance(1000.0, lambda m: {"val_loss": 1.0}))
    monkeypatch.setattr(T, "save_checkpoint", advance(100.0, T.save_checkpoint))
    T.train(model, spec, T.LoopConfig(steps=6, batch_size=2, save_every=2, eval_every=3), tmp_path,
            torch.device("cpu"), log=lambda *a: None)
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert clock[0] == 6 * 1.0 + 4 * 100.0 + 2 * 1000.0  # 6 steps, ckpt-last at 2, 4, 6 and ckpt-best at 3, 2 evals
    assert [r["tokens_per_s"] for r in rows] == [16.0] * 6  # 2 x 8 tokens per 1 s step, after saves and evals


def test_resume_refuses_fewer_steps_than_done(micro, reference, tmp_path, capsys):
    """--resume --steps N below the checkpoint's step did nothing, said "done" (exit 0) and rewrote
    config.json to N steps while ckpt-last.pt stayed at step 8: a run record that lies."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    config = (out / "config.json").read_text()
    assert cli("--out", out, "--resume", "--steps", STEPS - 3) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"at step {STEPS}" in err[0], err
    assert (out / "config.json").read_text() == config
    assert cli("--out", out, "--resume", "--steps", STEPS) == 0  # the same length: nothing left to do
