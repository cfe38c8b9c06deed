"""README.md, executed: every ```python block runs, and every command of every shell block either runs
(as written, or with the small, reviewed overrides of ``OVERRIDES`` that shorten a long run or replace
a network download) or is listed in ``SKIP`` with the reason. A new README command that is in neither
table fails ``test_every_readme_command_is_run_or_skipped``; so does a table entry the README no longer
shows. The machinery is tests/utils.py's, shared with tests/test_guide.py.

All blocks run in README order in one working folder laid out like the repository root (a copy of
``data/``): later commands use the run folders earlier ones wrote (``runs/pretrain``, ``runs/verdict``,
``runs/classify``). A command shown twice runs once. Kernels run on the PyTorch fallback, as on a
user's CPU.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.utils import command_lines, parse_markdown, run_command, run_python, user_environment, user_workdir

pytestmark = pytest.mark.usefixtures("fallback_path")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# A short run of the documented path: the same command, entry point and data, with the flags that make it
# long replaced (argparse takes the last value of a flag) or the network source replaced by a local run.
SHORT = "--batch-size 2 --eval-every 2 --eval-batches 1"
OVERRIDES: dict[str, dict] = {
    # the main job: 300 steps (2:17 on an idle 2-core machine) -> 2
    "python train.py": {"append": f"--steps 2 {SHORT}"},
    "python train.py --data data/the-verdict.txt --steps 200 --out runs/verdict": {"append": f"--steps 2 {SHORT}"},
    # --resume extends the run to --steps: 2 -> 3 instead of 200 -> 400 (the stored flags are reused)
    "python train.py --out runs/verdict --steps 400 --resume": {"replace": {"--steps 400": "--steps 3"}},
    # --init gpt2 / gpt2-medium download OpenAI's weights: start from the local runs/verdict instead
    "python train.py classify --data data/sms_spam.tsv --init gpt2": {
        "replace": {"--init gpt2": "--init runs/verdict"}, "append": f"--steps 2 {SHORT}"},
    "python train.py instruct --data data/instruction-data.json --init gpt2-medium --mask-prompt": {
        "replace": {"--init gpt2-medium": "--init runs/verdict"}, "append": f"--steps 2 {SHORT} --max-new-tokens 4"},
}
RUN_AS_WRITTEN = {
    'python -m gpt.generate --init runs/pretrain --prompt "The function" --max-new-tokens 50 --temperature 0.8 '
    '--top-k 40 --seed 1',
    "python -m gpt.generate --init runs/pretrain --prompts-file data/prompts.txt --out completions.jsonl "
    "--batch-size 32",
    'python train.py classify --init runs/classify --predict "You won a free cruise! Reply WIN"',
}
SKIP: dict[str, str] = {
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu": "installs from the network",
    'pip install -e ".[dev]"': "installs (done before the tests run)",
    "python -m pytest -q": "the test suite itself",
    "python -m pytest -q -m slow": "the slow test budgets (run separately)",
    "bash .ci/run": "CI itself (creates a venv, installs from the network)",
    "ruff check .": "the linter (.ci/run runs it on the repository)",
    "python -m gpt.data prepare fineweb/*.parquet --out data/fineweb --val-tokens 10000000":
        "needs a FineWeb parquet download and pyarrow; prepare is tested by tests/test_prepare.py",
    "python -m gpt.data prepare books/ notes.jsonl.gz --out data/mix --workers 8 --shard-tokens 100000000":
        "the user's own corpus files; prepare on folders and jsonl.gz is tested by tests/test_prepare.py",
    "python train.py --preset gpt2-small --data data/fineweb --dtype bf16 --compile":
        "a GPU-sized run on the prepared FineWeb shards",
    "python train.py --preset gpt2-small --data corpus/ --batch-size 16 --grad-accum 4 --dtype bf16 --compile":
        "a GPU-sized run on the user's corpus/ (these flags are tested by tests/test_train*.py)",
    "torchrun --nproc_per_node=8 train.py --preset gpt2-small --data shards/":
        "8 processes (DDP is tested with 2 gloo processes by tests/test_train.py)",
    "python -m bench": "the full benchmark suite, long (a GPU's job; tests/test_bench.py runs its smoke)",
    "python -m bench --quick": "minutes on CPU; tests/test_bench.py runs the CPU smoke",
    "python -m bench.prepare": "a 16 MB throughput benchmark; tests/test_bench.py covers bench.prepare",
    "pytest bench --benchmark-only": "CPU benchmarks (timings, minutes)",
    "python train.py instruct --data data/instruction-data.json --init gpt2-medium --lora-rank 16":
        "downloads gpt2-medium; LoRA on instruct/classify/dpo is run by tests/test_finetune_cli.py",
    "python train.py dpo --data data/preference-data.json --init runs/instruct --beta 0.1":
        "needs an instruct run; DPO end to end (kill -9, SIGTERM, resume) is run by tests/test_finetune_cli.py",
    "python train.py --preset gpt2-small --data shards/ --eval-hellaswag hellaswag_val.jsonl":
        "a GPU-sized run on the user's shards and HellaSwag download; --eval-hellaswag is run by tests/test_finetune_cli.py",
    "python -m gpt.eval hellaswag --init gpt2 --data hellaswag_val.jsonl --batch-size 16 --out preds.jsonl":
        "downloads gpt2 and HellaSwag's validation set; the CLI is run by tests/test_eval.py",
    "python -m gpt.eval hellaswag --init runs/pretrain --data data/hellaswag-sample.jsonl":
        "the CLI on the shipped sample is run by tests/test_eval.py and docs/guide.md's test",
}


def _argv(cmd: str) -> tuple[str, ...]:
    return tuple(shlex.split(cmd))


def readme_items():
    """(kind, payload, where) in README order: ("python", block) or ("command", argv)."""
    items = []
    for section in parse_markdown(README.read_text(encoding="utf-8")):
        for block in section.blocks:
            where = f"{README.name}:{block.line} ({section.title})"
            if block.lang == "python":
                items.append(("python", block, where))
            for argv in command_lines(block):
                items.append(("command", tuple(argv), where))
    return items


def resolved(argv: tuple[str, ...]) -> list[str] | None:
    """The argv to run for a documented command (overrides applied), or None where it is skipped."""
    cmd = shlex.join(argv)
    for key, spec in OVERRIDES.items():
        if _argv(key) == argv:
            for old, new in spec.get("replace", {}).items():
                assert old in cmd, f"override {old!r} does not occur in `{cmd}`"
                cmd = cmd.replace(old, new)
            return shlex.split(cmd) + shlex.split(spec.get("append", ""))
    if argv in {_argv(c) for c in RUN_AS_WRITTEN}:
        return list(argv)
    if argv in {_argv(c) for c in SKIP}:
        return None
    raise AssertionError(f"README command `{cmd}` is neither run (OVERRIDES, RUN_AS_WRITTEN) nor in SKIP")


def test_every_readme_command_is_run_or_skipped():
    shown = {argv for kind, argv, _ in readme_items() if kind == "command"}
    for argv in shown:
        resolved(argv)  # raises for a command in no table
    tables = [*OVERRIDES, *RUN_AS_WRITTEN, *SKIP]
    stale = [c for c in tables if _argv(c) not in shown]
    assert not stale, f"table entries the README no longer shows: {stale}"
    assert len(tables) == len({_argv(c) for c in tables}), "a command is in two tables"
    assert any(kind == "python" for kind, _, _ in readme_items())


def test_readme_runs(tmp_path):
    """Every python block and every run command, in README order, in one folder."""
    workdir = user_workdir(tmp_path / "repo")
    ns: dict = {"__name__": "__readme__"}
    ran: set[tuple[str, ...]] = set()
    with user_environment(workdir):
        for kind, payload, where in readme_items():
            if kind == "python":
                run_python(payload, ns, README, where)
                continue
            argv = resolved(payload)
            if argv is None or payload in ran:
                continue
            ran.add(payload)
            run_command(argv, where)
        # what the commands documented to write
        for path in ("runs/pretrain/ckpt-best.pt", "runs/verdict/ckpt-last.pt", "runs/classify/accuracy.json",
                     "runs/instruct/responses.json", "completions.jsonl"):
            assert (workdir / path).is_file(), f"{path} was not written"
    assert len(ran) == len(OVERRIDES) + len(RUN_AS_WRITTEN)


def test_generate_stream_is_reachable_every_documented_way():
    """README: `gpt.generate(model, idx, n)` returns the ids and `gpt.generate.stream(...)` yields them;
    the package's `generate` (a function) once hid the submodule and `gpt.generate.stream` raised."""
    import subprocess
    import sys

    import torch

    import gpt
    import gpt.generate as G
    import gpt.reference
    from gpt import generate
    from gpt.generate import stream

    assert gpt.generate is generate and generate.stream is stream is G.stream
    torch.manual_seed(0)
    model = gpt.reference.GPTModel(gpt.GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2,
                                                 n_layers=1, drop_rate=0.0, qkv_bias=False)).eval()
    idx = torch.tensor([[1, 2, 3]])
    steps = list(gpt.generate.stream(model, idx, 5))
    assert len(steps) == 5 and all(t.shape == (1, 1) for t in steps)
    assert torch.equal(torch.cat([idx, *steps], dim=1), gpt.generate(model, idx, 5))
    r = subprocess.run([sys.executable, "-m", "gpt.generate", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "--prompts-file" in r.stdout, r.stderr[-2000:]
