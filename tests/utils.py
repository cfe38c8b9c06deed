"""Test helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch


def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-5,
                            rtol: float = 1e-5, max_print: int = 5, name: str = "tensor") -> None:
    """Like torch.testing.assert_close but reports where and by how much values differ (Liger idiom)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_mismatch = torch.isnan(a) ^ torch.isnan(e)
    diff = (a - e).abs()
    bad = (diff > atol + rtol * e.abs()) | nan_mismatch
    bad &= ~(torch.isnan(a) & torch.isnan(e))
    if not bad.any():
        return
    idx = bad.nonzero()
    lines = [f"{name}: {int(bad.sum())} / {a.numel()} elements differ (atol={atol}, rtol={rtol}); "
             f"max abs diff {diff[~torch.isnan(diff)].max().item() if (~torch.isnan(diff)).any() else 'nan'}"]
    for i in idx[:max_print].tolist():
        t = tuple(i)
        lines.append(f"  at {t}: actual={a[t].item():.6g} expected={e[t].item():.6g}")
    raise AssertionError("\n".join(lines))


def book_named(named) -> dict:
    """``{name: tensor}`` (e.g. ``(n, p.grad) for n, p in model.named_parameters()``) under the book's names:
    the fused attention's ``X.wqkv.<w>`` (``<w>``: ``weight``, ``bias``, ``linear.weight``, ``linear.bias``)
    becomes ``X.W_query.<w>``, ``X.W_key.<w>``, ``X.W_value.<w>`` (thirds of its rows), ``X.wqkv.lora.<i>.<x>``
    becomes ``X.<W_query|W_key|W_value>.lora.<x>``; other names are kept. Written here, independent of the
    module's state_dict hooks, so the tests compare parameters by name against the reference model."""
    books = ("W_query", "W_key", "W_value")
    out = {}
    for name, t in dict(named).items():
        head, sep, rest = name.partition("wqkv.")
        if not sep or (head and not head.endswith(".")):
            out[name] = t
        elif rest in ("weight", "bias", "linear.weight", "linear.bias"):
            for b, third in zip(books, (None,) * 3 if t is None else t.chunk(3, dim=0)):
                out[f"{head}{b}.{rest}"] = third
        elif re.fullmatch(r"lora\.[0-2]\..+", rest):
            out[f"{head}{books[int(rest[5])]}.lora.{rest[7:]}"] = t
        else:
            out[name] = t
    return out


# ------------------------------------------------------------------ executable docs (guide, README)
# tests/test_guide.py runs docs/guide.md and tests/test_readme.py runs README.md with these helpers.

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = ("bash", "console", "sh", "shell")
NUMBER = r"[-+]?(?:\d[\d,]*\.?\d*(?:e[-+]?\d+)?|nan|inf)"


@dataclass
class Block:
    lang: str
    code: str
    line: int  # line of the first code line in the document (1-based)
    expected: str | None = None


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


def parse_markdown(text: str) -> list[Section]:
    """The fenced code blocks of a Markdown document, grouped by its ``## `` sections. A ```text block
    right after a code block is that block's expected output."""
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


def command_lines(block: Block) -> list[list[str]]:
    """Every command of a shell block as its argv: continuations joined, ``$ `` prompts, comments and
    blank lines dropped, and ``a && b`` split into its commands."""
    if block.lang not in SHELL_LANGS:
        return []
    out: list[list[str]] = []
    for line in block.code.replace("\\\n", " ").splitlines():
        argv: list[str] = []
        for token in shlex.split(line.strip().removeprefix("$ "), comments=True) + ["&&"]:
            if token == "&&":
                if argv:
                    out.append(argv)
                argv = []
            else:
                argv.append(token)
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
    """Each line of ``expected`` must match a line of ``output``, in order (``...`` is anything, ``~1.5`` any
    number, runs of whitespace are loose)."""
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
    """A user's CPU run of this checkout: the kernels' PyTorch fallback, this tree's packages."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_command(argv: list[str], where: str, timeout: float = 900) -> str:
    """Run a documented ``python ...`` command in the current folder (``python train.py`` is this
    checkout's train.py); fail with its output unless it exits 0. The timeout only turns a hang into a
    failure: a busy 2-core machine (load 20) took over 300 s for the guide's 20-step run."""
    cmd = shlex.join(argv)
    if argv[0] != "python":
        raise ValueError(f"{where}: only `python ...` commands run here, not {cmd!r}")
    if argv[1] == "train.py":
        argv = [sys.executable, str(ROOT / "train.py"), *argv[2:]]
    else:
        argv = [sys.executable, *argv[1:]]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=subprocess_env())
    output = r.stdout + "\n" + r.stderr
    if r.returncode != 0:
        pytest.fail(f"{where}: `{cmd}` exited {r.returncode}:\n{output[-4000:]}")
    return output


def run_python(block: Block, ns: dict, source: Path, where: str) -> str:
    """Execute a python block in ``ns``; tracebacks point at the block's lines in ``source``."""
    compiled = compile("\n" * (block.line - 1) + block.code, str(source), "exec")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compiled, ns)
    print(f"--- {where}\n{buf.getvalue()}")  # shown by pytest on failure
    return buf.getvalue()


@contextlib.contextmanager
def user_environment(workdir: Path):
    """cwd = ``workdir`` and the kernels' PyTorch fallback (a user's CPU), both restored afterwards."""
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


def user_workdir(path: Path) -> Path:
    """A folder laid out like the repository root for the documented commands: a copy of the sample data
    the repository ships (``data/``; a copy, since commands write under ``data/`` too)."""
    (path / "data").mkdir(parents=True, exist_ok=True)
    for f in (ROOT / "data").iterdir():
        if f.is_file():  # the tracked samples, not a prepare output folder a user left there
            shutil.copyfile(f, path / "data" / f.name)
    return path
