"""docs/guide.md, executed: every ```python block runs, and every `python train.py` / `python -m gpt.generate`
line of a ```bash block runs as a subprocess, so the guide cannot rot.

Rules the guide follows (see its introduction):
- ``## `` headings split it into sections; a section's python blocks share one namespace, in order.
- All sections share one working folder (a temp dir): later sections use what earlier ones wrote
  (``runs/verdict``, ``gpt2-random``). Running one section alone runs the sections before it first.
- A ```text block right after a code block is that block's expected output: each of its lines must match
  a line of the real output, in order. ``...`` matches anything and ``~12.3`` matches any number (measured
  values: losses, timings); everything else must match exactly (runs of whitespace are loose).
- ``../shared/data`` is the shared data folder; sections that mention it skip cleanly when it is absent.
- Kernels run as a user's CPU would run them: the pure-PyTorch fallback (``TRITON_INTERPRET=0``); the
  Triton interpreter path is covered by the kernel and model tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# These test the CLIs and the pipeline, not the kernels (tests/test_attention.py etc. do that):
# run the fused model on its PyTorch fallback, in-process and in subprocesses, to keep CI fast.
pytestmark = pytest.mark.usefixtures("fallback_path")

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
DATA_REF = "../shared/data"
RUNNABLE = ("python train.py", "python -m gpt.generate")
NUMBER = r"[-+]?(?:\d[\d,]*\.?\d*(?:e[-+]?\d+)?|nan|inf)"
TIMEOUT_S = 300


@dataclass
class Block:
    lang: str
    code: str
    line: int  # line of the first code line in the guide (1-based)
    expected: str | None = None


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def needs_data(self) -> bool:
        return any(DATA_REF in b.code for b in self.blocks)

    @property
    def runnable(self) -> bool:
        return any(b.lang == "python" or commands(b) for b in self.blocks)


def parse_guide(text: str) -> list[Section]:
    sections = [Section("introduction")]
    lines = text.splitlines()
    i = 0
    last_code: Block | None = None
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            sections.append(Section(line[3:].strip()))
            last_code = None
        elif line.startswith("```"):
            lang = line[3:].strip()
            start = i + 1
            i = start
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            body = "\n".join(lines[start:i]) + "\n"
            if lang == "text":
                if last_code is not None and last_code.expected is None:
                    last_code.expected = body
                last_code = None
            else:
                last_code = Block(lang, body, start + 1)
                sections[-1].blocks.append(last_code)
        i += 1
    return sections


def commands(block: Block) -> list[str]:
    """The runnable command lines of a bash/console block (continuations joined, prompts dropped)."""
    if block.lang not in ("bash", "console", "sh", "shell"):
        return []
    joined = block.code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        if line.startswith(RUNNABLE):
            out.append(line)
    return out


def expected_patterns(expected: str) -> list[tuple[str, re.Pattern]]:
    pats = []
    for line in expected.splitlines():
        line = line.strip()
        if not line:
            continue
        regex = []
        for part in re.split(r"(\.\.\.|~[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?)", line):
            if part == "...":
                regex.append(".*")
            elif part.startswith("~"):
                regex.append(NUMBER)
            else:
                regex.append(r"\s*".join(re.escape(w) for w in re.split(r"\s+", part)))
        pats.append((line, re.compile("".join(regex))))
    return pats


def check_output(output: str, expected: str, where: str) -> None:
    actual = [s.strip() for s in re.split(r"[\r\n]+", output) if s.strip()]
    pos = 0
    for line, pat in expected_patterns(expected):
        while pos < len(actual) and not pat.fullmatch(actual[pos]):
            pos += 1
        if pos == len(actual):
            tail = "\n".join(actual[-40:])
            pytest.fail(f"{where}: expected output line not found (in order):\n  {line}\nactual output:\n{tail}")
        pos += 1


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_command(cmd: str, data: Path | None, where: str) -> str:
    if data is not None:
        cmd = cmd.replace(DATA_REF, str(data))
    argv = shlex.split(cmd, comments=True)
    if argv[1] == "train.py":
        argv = [sys.executable, str(ROOT / "train.py"), *argv[2:]]
    else:
        argv = [sys.executable, *argv[1:]]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=subprocess_env())
    output = r.stdout + "\n" + r.stderr
    if r.returncode != 0:
        pytest.fail(f"{where}: `{cmd}` exited {r.returncode}:\n{output[-4000:]}")
    return output


def run_python(block: Block, ns: dict, data: Path | None, where: str) -> str:
    code = block.code if data is None else block.code.replace(DATA_REF, str(data))
    compiled = compile("\n" * (block.line - 1) + code, str(GUIDE), "exec")  # tracebacks point into the guide
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compiled, ns)
    print(f"--- {where}\n{buf.getvalue()}")  # shown by pytest on failure
    return buf.getvalue()


@contextlib.contextmanager
def user_environment(workdir: Path):
    old_cwd, old_interp = Path.cwd(), os.environ.get("TRITON_INTERPRET")
    os.chdir(workdir)
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_interp is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_interp


def run_section(section: Section, workdir: Path, data: Path | None) -> None:
    ns: dict = {"__name__": "__guide__"}
    with user_environment(workdir):
        for block in section.blocks:
            where = f"{GUIDE.name}:{block.line} ({section.title})"
            if block.lang == "python":
                output = run_python(block, ns, data, where)
            else:
                cmds = commands(block)
                if not cmds:
                    continue  # not ours to run (pip, bench, ...)
                output = "\n".join(run_command(c, data, where) for c in cmds)
            if block.expected is not None:
                check_output(output, block.expected, where)


SECTIONS = [s for s in parse_guide(GUIDE.read_text(encoding="utf-8")) if s.runnable] if GUIDE.is_file() else []


class GuideRunner:
    """Runs the sections in guide order, each once; a section's test first runs any earlier section
    that has not run yet (so ``-k`` on one section still has the files it needs)."""

    def __init__(self, workdir: Path, data: Path | None):
        self.workdir, self.data = workdir, data
        self.done: dict[int, BaseException | None] = {}

    def run(self, index: int) -> None:
        for j in range(index + 1):
            if j in self.done:
                continue
            section = SECTIONS[j]
            if section.needs_data and self.data is None:
                self.done[j] = pytest.skip.Exception("../shared/data is not present")
                continue
            try:
                run_section(section, self.workdir, self.data)
                self.done[j] = None
            except (Exception, pytest.fail.Exception, pytest.skip.Exception) as e:
                self.done[j] = e  # re-raised by that section's own test
        if self.done[index] is not None:
            raise self.done[index]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    from tests.conftest import DATA

    return GuideRunner(tmp_path_factory.mktemp("guide"), DATA if DATA.is_dir() else None)


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


def test_expected_output_matching_can_fail():
    check_output("step 15: train loss 7.81\n", "step 15: train loss ~9.99", "self-test")  # ~ is any number
    check_output("a\r  b  c\nd", "b c\n...d", "self-test")
    with pytest.raises(pytest.fail.Exception):
        check_output("step 14: train loss 7.81\n", "step 15: train loss ~7.81", "self-test")
    with pytest.raises(pytest.fail.Exception):
        check_output("second\nfirst\n", "first\nsecond", "self-test")  # order matters
