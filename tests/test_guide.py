"""docs/guide.md, executed: every ```python block runs, and every `python train.py` / `python -m gpt.generate` /
`python -m gpt.eval` line of a ```bash block runs as a subprocess, so the guide cannot rot.

Rules the guide follows (see its introduction):
- ``## `` headings split it into sections; a section's python blocks share one namespace, in order.
- All sections share one working folder (a temp dir): later sections use what earlier ones wrote
  (``runs/verdict``, ``gpt2-random``). Running one section alone runs the sections before it first.
- A ```text block right after a code block is that block's expected output: each of its lines must match
  a line of the real output, in order. ``...`` matches anything and ``~12.3`` matches any number (measured
  values: losses, timings); everything else must match exactly (runs of whitespace are loose).
- The guide runs from the repository root: its ``data/...`` paths are the sample data the repository
  ships (``data/README.md``), copied into the working folder. Nothing outside the clone is read.
- Kernels run as a user's CPU would run them: the pure-PyTorch fallback (``TRITON_INTERPRET=0``); the
  Triton interpreter path is covered by the kernel and model tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.utils import (
    Block,
    Section,
    check_output,
    command_lines,
    parse_markdown,
    run_command,
    run_python,
    user_environment,
    user_workdir,
)

# These test the CLIs and the pipeline, not the kernels (tests/test_attention.py etc. do that):
# run the fused model on its PyTorch fallback, in-process and in subprocesses, to keep CI fast.
pytestmark = pytest.mark.usefixtures("fallback_path")

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
RUNNABLE = (["python", "train.py"], ["python", "-m", "gpt.generate"], ["python", "-m", "gpt.eval"])


def commands(block: Block) -> list[list[str]]:
    """The guide's runnable commands in a shell block (`python train.py`, `python -m gpt.generate`)."""
    return [argv for argv in command_lines(block) if any(argv[:len(p)] == p for p in RUNNABLE)]


def runnable(section: Section) -> bool:
    return any(b.lang == "python" or commands(b) for b in section.blocks)


def run_section(section: Section, workdir: Path) -> None:
    ns: dict = {"__name__": "__guide__"}
    with user_environment(workdir):
        for block in section.blocks:
            where = f"{GUIDE.name}:{block.line} ({section.title})"
            if block.lang == "python":
                output = run_python(block, ns, GUIDE, where)
            else:
                cmds = commands(block)
                if not cmds:
                    continue  # not ours to run (pip, bench, ...)
                output = "\n".join(run_command(c, where) for c in cmds)
            if block.expected is not None:
                check_output(output, block.expected, where)


SECTIONS = [s for s in parse_markdown(GUIDE.read_text(encoding="utf-8")) if runnable(s)] if GUIDE.is_file() else []


class GuideRunner:
    """Runs the sections in guide order, each once; a section's test first runs any earlier section
    that has not run yet (so ``-k`` on one section still has the files it needs)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.done: dict[int, BaseException | None] = {}

    def run(self, index: int) -> None:
        for j in range(index + 1):
            if j in self.done:
                continue
            try:
                run_section(SECTIONS[j], self.workdir)
                self.done[j] = None
            except (Exception, pytest.fail.Exception) as e:
                self.done[j] = e  # re-raised by that section's own test
        if self.done[index] is not None:
            raise self.done[index]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return GuideRunner(user_workdir(tmp_path_factory.mktemp("guide")))


@pytest.mark.parametrize("index", range(len(SECTIONS)), ids=[s.title.split(".")[0].strip() + "-" +
                                                               re.sub(r"\W+", "-", s.title).strip("-").lower()
                                                               for s in SECTIONS])
def test_guide_section(runner, index):
    runner.run(index)


def test_guide_walks_the_whole_pipeline():
    text = GUIDE.read_text(encoding="utf-8")
    for needle in ("create_dataloader_v1", "simple_self_attention", "SelfAttention_v1", "CausalAttention",
                   "MultiHeadAttentionWrapper", "kernels.flash_attention", "kernels.CausalSelfAttention",
                   "gpt.reference", "from_pretrained", "python train.py --preset tiny", "python train.py classify",
                   "python train.py instruct", "python -m gpt.generate", "use_cache=True",
                   "python -m bench --quick", "measured on 2-core CPU"):
        assert needle in text, f"docs/guide.md no longer shows {needle!r}"
    assert len(SECTIONS) >= 8
    assert "docs/guide.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_docs_and_tests_use_only_files_in_the_clone():
    """A user's clone has nothing beside it: no document, test or CI step may read a sibling ``shared``
    folder (the sample data ships in ``data/``)."""
    files = [ROOT / "README.md", ROOT / ".ci" / "run", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "tests").glob("*.py")), ROOT / "train.py"]
    needle = "../" + "shared"  # spelled apart so that this file does not match itself
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in files if f.is_file()
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if needle in line]
    assert not hits, f"{needle} is outside a user's clone: {hits}"


def test_expected_output_matching_can_fail():
    check_output("step 15: train loss 7.81\n", "step 15: train loss ~9.99", "self-test")  # ~ is any number
    check_output("a\r  b  c\nd", "b c\n...d", "self-test")
    with pytest.raises(pytest.fail.Exception):
        check_output("step 14: train loss 7.81\n", "step 15: train loss ~7.81", "self-test")
    with pytest.raises(pytest.fail.Exception):
        check_output("second\nfirst\n", "first\nsecond", "self-test")  # order matters
