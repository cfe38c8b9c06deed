"""python -m gpt.data prepare: a mixed corpus in, llm.c shards out, intact, ordered, deterministic;
train.py on the prepared folder; bad input."""

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt import data as D
from gpt import prepare as P
from gpt.cli.prepare import main as prepare_cli
from gpt.tokenizer import _tiktoken_has_cache, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EOT = 50256


@pytest.fixture(scope="module")
def ref():
    """tiktoken's own gpt2 encoding (from its cache) when present: an oracle independent of our loader."""
    import tiktoken

    return tiktoken.get_encoding("gpt2") if _tiktoken_has_cache() else get_tokenizer()


def long_doc(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    words = ["the", "model", "learns", "naïve", "café", "数据", "tokens", "🙂", "don't", "it's", "  spaced",
             "42", "3.14", "end.", "(paren)", "—", "\ttab"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(lines)) + "\n"


def make_corpus(root: Path) -> list[str]:
    """Write the mixed corpus; return its documents in the order prepare must emit them."""
    (root / "b" / "d").mkdir(parents=True)
    docs = []
    a = "Hello, world!\n\n\nThis is the first document.\n"
    (root / "a.txt").write_text(a, encoding="utf-8")
    docs.append(a)
    c1, c2 = "Ünïcödé 🙂 text — 你好，世界 ", "second doc in c.md\r\nwith CRLF\r\n\r\n"
    (root / "b" / "c.md").write_bytes(f"{c1}<|endoftext|>   \n\n<|endoftext|>{c2}<|endoftext|>".encode())
    docs += [c1, c2.replace("\r\n", "\n")]  # text files: universal newlines, as read_text
    e = ['{"text": "json doc one", "id": 1}', "", '{"text": "<|endoftext|> literal stays text"}',
         '{"text": ""}', '{"text": null}', '{"text": "  tabs\\tand\\nnewlines  "}']
    (root / "b" / "d" / "e.jsonl").write_text("\n".join(e) + "\n", encoding="utf-8")
    docs += ["json doc one", "<|endoftext|> literal stays text", "  tabs\tand\nnewlines  "]
    f = ["gzipped ✓ doc", long_doc(1, 60)]
    with gzip.open(root / "b" / "f.jsonl.gz", "wt", encoding="utf-8") as g:
        g.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in f)
    docs += f
    z = long_doc(2, 400)
    (root / "c.txt").write_text(z, encoding="utf-8")
    docs.append(z)
    (root / "b" / "skip.bin").write_bytes(b"\xff\x00 not an input")  # unknown suffix in a folder: ignored
    return docs


def read_stream(out: Path) -> tuple[list[int], list[str]]:
    m = json.loads((out / "prepare.json").read_text())
    names = m["val_shards"] + m["train_shards"]
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(names)
    return np.concatenate([np.asarray(D.read_shard(out / n)) for n in names]).tolist(), names


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    root, _ = corpus
    outs = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(P, "READ_CHARS", 97)
    mp.setattr(P, "PIECE_CHARS", 150)
    mp.setattr(P, "BATCH_CHARS", 400)
    try:
        for w in (1, 2):
            outs[w] = tmp_path_factory.mktemp(f"out{w}")
            P.prepare([root], outs[w], val_tokens=300, shard_tokens=700, workers=w, progress=False,
                      overwrite=True)
    finally:
        mp.undo()
    return outs


def test_documents_arrive_intact_and_in_order(corpus, prepared, ref):
    _, docs = corpus
    stream, names = read_stream(prepared[1])
    expected = [t for doc in docs for t in [EOT, *ref.encode_ordinary(doc)]]
    assert stream == expected  # every token, in order, one <|endoftext|> before each document
    cuts = [i for i, t in enumerate(stream) if t == EOT] + [len(stream)]
    back = [ref.decode(stream[i + 1:j]) for i, j in zip(cuts, cuts[1:])]
    assert back == docs
    m = json.loads((prepared[1] / "prepare.json").read_text())
    assert names[0] == "data_val_000000.bin" and names[1] == "data_train_000000.bin"
    assert m["val_tokens"] == 300 and m["train_tokens"] == len(stream) - 300 and m["tokens"] == len(stream)
    sizes = [len(D.read_shard(prepared[1] / n)) for n in names]
    assert sizes[0] == 300 and all(s == 700 for s in sizes[1:-1]) and 0 < sizes[-1] <= 700
    assert m["documents"] == len(docs) and m["skipped_empty_documents"] == 3 and m["files"] == 5


def test_byte_identical_whatever_workers(prepared):
    one, two = prepared[1], prepared[2]
    names = sorted(p.name for p in one.glob("*.bin"))
    assert names == sorted(p.name for p in two.glob("*.bin")) and len(names) > 3
    for n in names:
        assert (one / n).read_bytes() == (two / n).read_bytes(), n
    assert not (one / ".partial").exists() and not (two / ".partial").exists()


def test_default_piece_sizes_give_the_same_stream(corpus, prepared, tmp_path):
    root, _ = corpus
    P.prepare([root], tmp_path / "o", val_tokens=300, shard_tokens=700, workers=1, progress=False)
    assert read_stream(tmp_path / "o")[0] == read_stream(prepared[1])[0]


TEXT = st.lists(st.sampled_from(list("ab 1.'\n\r\t\u00a0é🙂-") + ["\n\n", "  ", "'s", " \n"]),
                max_size=40).map("".join)


@settings(derandomize=True, max_examples=150, deadline=None)
@given(TEXT, TEXT, TEXT)
def test_safe_cut_never_changes_tokens(a, b, c):
    """Cutting where safe_cut says gives the tokens of the whole text (planting a cut after any newline,
    or before one, makes this fail)."""
    enc = get_tokenizer()
    text = a + "x\ny" + b + c  # at least one safe cut
    cut = P.safe_cut(text, len(a) + len(b) // 2 + 2)
    assert cut >= len(a) + 2
    assert enc.encode_ordinary(text[:cut]) + enc.encode_ordinary(text[cut:]) == enc.encode_ordinary(text)


def test_safe_cut_limits():
    assert P.safe_cut("abc def", 100) == 0
    assert P.safe_cut("a\nb\nc", 2) == 2 and P.safe_cut("a\nb\nc", 4) == 4 and P.safe_cut("a\nb\nc", 1) == 0
    assert P.safe_cut("a \nb", 100) == 0 and P.safe_cut("a\n b", 100) == 0


def test_train_py_trains_on_the_prepared_folder(prepared, fallback_path, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(prepared[2]), "--steps", "2",
                        "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--out", str(run)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(prepared shards)" in r.stdout and "val loss" in r.stdout
    train_n = json.loads((prepared[2] / "prepare.json").read_text())["train_tokens"]
    assert f"{train_n:,} train / 300 val tokens" in r.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and "val_loss" in rows[1]


def test_shard_window_dataset_is_memory_mapped(prepared):
    train, val = D.split_shards([prepared[1]])
    assert all("train" in p.name for p in train) and [p.name for p in val] == ["data_val_000000.bin"]
    ds = D.ShardWindowDataset(train, 128, 128)
    assert all(isinstance(s, np.memmap) for s in ds.shards)
    flat = [np.asarray(s) for s in ds.shards]
    expected = [(k, i) for k, s in enumerate(flat) for i in range(0, len(s) - 128, 128)]
    assert len(ds) == len(expected)
    for idx in (0, 1, len(ds) - 1):
        k, i = expected[idx]
        x, y = ds[idx]
        assert x.tolist() == flat[k][i:i + 128].tolist() and y.tolist() == flat[k][i + 1:i + 129].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(D.DataError, match="no window"):
        D.ShardWindowDataset(val, 512, 512)


def test_text_too_large_for_memory_points_to_prepare(corpus):
    root, _ = corpus
    with pytest.raises(D.DataError, match="python -m gpt.data prepare"):
        D.load_tokens([root / "c.txt"], max_bytes=1000)


# ------------------------------------------------------------------------------------------ bad input
def cli(capsys, *args):
    code = prepare_cli(["prepare", *map(str, args), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("case,match", [
    ("missing", "input not found"),
    ("no-files", "holds no readable files"),
    ("blank", "no text found"),
    ("latin1", "is not UTF-8"),
    ("field", "no field 'text' (found: body, id); choose the field with --text-field"),
    ("not-json", "e.jsonl:2: not a JSON line"),
    ("bad-gz", "cannot read"),
    ("all-val", "all taken by the validation split"),
    ("bad-flag", "shard_tokens must be an integer >= 1"),
    ("huge-shard", "shard_tokens must be at most 2,147,483,647"),  # the header's int32 count: it failed at
])                                                                   # the first flush, hours in, with a traceback
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, match):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "ok.txt").write_text("a good document comes first\n")
    extra = []
    if case == "missing":
        src = tmp_path / "nope"
    elif case == "no-files":
        (src / "ok.txt").unlink()
        (src / "data.csv").write_text("x,y\n")
    elif case == "blank":
        (src / "ok.txt").write_text(" \n\n")
        (src / "z.jsonl").write_text('{"text": "  "}\n')
    elif case == "latin1":
        (src / "z.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    elif case == "field":
        (src / "z.jsonl").write_text('{"body": "x", "id": 1}\n')
    elif case == "not-json":
        (src / "e.jsonl").write_text('{"text": "fine"}\n{"text": "trunc\n')
    elif case == "bad-gz":
        (src / "z.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 50)[:30])
    elif case == "all-val":
        extra = ["--val-tokens", 10_000]
    elif case == "huge-shard":
        extra = ["--shard-tokens", 2**31]
    else:
        extra = ["--shard-tokens", 0]
    code, err = cli(capsys, src, "--out", out, *extra)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert match in err[0]
    assert not out.exists()  # nothing left behind, not even an empty folder


def test_refuses_non_empty_out_and_keeps_the_old_output(corpus, prepared, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "out"
    P.prepare([root / "a.txt", root / "c.txt"], out, val_tokens=100, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = cli(capsys, root, "--out", out)
    assert code == 2 and "not empty" in err[0] and "--overwrite" in err[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("fine\n")
    (bad / "b.txt").write_bytes(b"\xff\xfe broken")
    code, err = cli(capsys, bad, "--out", out, "--overwrite", "--val-tokens", 1)
    assert code == 2 and "not UTF-8" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # a failed overwrite loses nothing
    (out / "notes.txt").write_text("mine")
    code, err = cli(capsys, root, "--out", out, "--overwrite")
    assert code == 2 and "did not write (notes.txt)" in err[0]
    (out / "notes.txt").unlink()
    code, _ = cli(capsys, root, "--out", out, "--overwrite", "--val-tokens", 300, "--shard-tokens", 700)
    assert code == 0
    assert read_stream(out)[0] == read_stream(prepared[1])[0]
    assert not list(out.glob("*_train_0000*.bin.tmp"))


def test_parquet(tmp_path, ref):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = ["parquet row one ✓", None, "row three\nwith a newline", long_doc(3, 50)]
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "content": docs}), tmp_path / "x.parquet", row_group_size=2)
    P.prepare([tmp_path / "x.parquet"], tmp_path / "o", text_field="content", val_tokens=5, workers=1,
              progress=False)
    stream, _ = read_stream(tmp_path / "o")
    assert stream == [t for d in docs if d for t in [EOT, *ref.encode_ordinary(d)]]
    with pytest.raises(D.DataError, match="no column 'text' \\(found: id, content\\)"):
        P.prepare([tmp_path / "x.parquet"], tmp_path / "o2", workers=1, progress=False)


def test_parquet_without_pyarrow(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet -> ImportError
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    code, err = cli(capsys, tmp_path / "x.parquet", "--out", tmp_path / "o")
    assert code == 2 and len(err) == 1 and "needs pyarrow: pip install 'gpt-triton[parquet]'" in err[0]


def test_cli_entry_point(tmp_path):
    """The real ``python -m gpt.data prepare``, in a subprocess, with 2 workers."""
    (tmp_path / "t.txt").write_text("a small document\n" * 20)
    r = subprocess.run([sys.executable, "-m", "gpt.data", "prepare", str(tmp_path / "t.txt"), "--out",
                        str(tmp_path / "o"), "--val-tokens", "10", "--workers", "2"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "1 documents" in r.stdout and "1 val shard(s), 10 tokens" in r.stdout
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["data_train_000000.bin",
                                                                  "data_val_000000.bin", "prepare.json"]


def test_bench_prepare_rows():
    """bench/prepare.py runs (tiny corpus): rows for all workers and per worker, the streams checked equal."""
    from bench import prepare as B

    rows = B.run(True, mb=0.1, workers=[1, 2])
    assert [r["name"] for r in rows] == ["prepare --workers 1", "prepare --workers 1, per worker",
                                         "prepare --workers 2", "prepare --workers 2, per worker"]
    assert all(r["unit"] == "tokens/s" and r["ours"] > 0 and r["achieved"] > 0 for r in rows)
    assert rows[3]["ours"] == pytest.approx(rows[2]["ours"] / 2)
    assert rows[0]["params"]["tokens"] > 20_000 and rows[0]["baselines"]["tiktoken loop"] > 0


def test_reading_stays_bounded_ahead_of_tokenizing():
    """Workers never pull the whole corpus: over an endless stream of batches, results come back in
    order while at most two batches per worker are read ahead (Pool.imap would read forever)."""
    import itertools

    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield [(f"document {i}", True)]

    out = itertools.islice(P.encoded(endless(), workers=2), 6)
    enc = get_tokenizer()
    for i, (tokens, n_bytes) in enumerate(out):
        assert tokens.tolist() == [EOT, *enc.encode_ordinary(f"document {i}")] and n_bytes == len(f"document {i}")
        assert len(pulled) <= i + 1 + P.IN_FLIGHT_PER_WORKER * 2


@pytest.mark.slow
def test_killed_prepare_leaves_no_shard_looking_complete(tmp_path):
    """SIGKILL in the middle of a run: DIR holds no .bin and no prepare.json (only .partial/), train.py
    refuses it, and --overwrite then succeeds."""
    import signal
    import time

    src = tmp_path / "big.txt"
    src.write_text(long_doc(5, 200_000))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gpt.data", "prepare", str(src), "--out", str(out), "--val-tokens", "1000",
           "--shard-tokens", "20000", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / ".partial").glob("*.bin"))) < 3:
            time.sleep(0.05)
        assert len(list((out / ".partial").glob("*.bin"))) >= 3, "prepare wrote no shard in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not list(out.glob("*.bin")) and not (out / "prepare.json").exists()
    assert D.split_shards([out]) is None
    r = subprocess.run([*cmd, "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert D.split_shards([out]) and not (out / ".partial").exists()


@pytest.mark.parametrize("prefix", ["interval", "trainval", "eval"])
def test_split_shards_reads_the_split_not_the_prefix(tmp_path, prefix):
    """A prefix holding 'val' or 'train' (interval, trainval, eval) must not put training shards in the
    validation split (val loss on training data) or the reverse."""
    for name in (f"{prefix}_val_000000.bin", f"{prefix}_train_000000.bin", f"{prefix}_train_000001.bin"):
        D.write_shard(tmp_path / name, np.arange(10, dtype=np.uint16))
    train, val = D.split_shards([tmp_path])
    assert [p.name for p in train] == [f"{prefix}_train_000000.bin", f"{prefix}_train_000001.bin"]
    assert [p.name for p in val] == [f"{prefix}_val_000000.bin"]
    for name in ("tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"):  # llm.c's own names
        D.write_shard(tmp_path / "llmc" / name, np.arange(10, dtype=np.uint16))
    train, val = D.split_shards([tmp_path / "llmc"])
    assert [p.name for p in train] == ["tiny_shakespeare_train.bin"] and [p.name for p in val] == ["tiny_shakespeare_val.bin"]


@pytest.mark.slow
def test_sigterm_stops_prepare_cleanly(tmp_path):
    """SIGTERM (a cluster's stop) as Ctrl-C: exit 143 with one line, .partial/ (shards of the run so far)
    removed, no worker traceback; it used to die at once, leaving .partial/ and workers' BrokenPipeError."""
    import signal
    import time

    src = tmp_path / "big.txt"
    src.write_text(long_doc(5, 200_000))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gpt.data", "prepare", str(src), "--out", str(out), "--quiet",
                             "--val-tokens", "1000", "--shard-tokens", "20000", "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / ".partial").glob("*.bin"))) < 3:
            time.sleep(0.05)
        assert len(list((out / ".partial").glob("*.bin"))) >= 3, "prepare wrote no shard in time"
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and err.strip().splitlines() == ["interrupted: nothing written"], err
    assert not out.exists()


def test_folder_skips_files_in_hidden_folders(tmp_path):
    """Hidden files were skipped but not files inside hidden folders (.ipynb_checkpoints copies, .git,
    .venv): they went into the corpus silently."""
    (tmp_path / "a.txt").write_text("kept")
    for hidden in (".ipynb_checkpoints/a-checkpoint.txt", ".venv/lib/LICENSE.txt", "sub/.cache/x.md", ".h.txt"):
        (tmp_path / hidden).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / hidden).write_text("hidden")
    (tmp_path / "sub" / "b.md").write_text("kept")
    assert P.list_inputs([tmp_path]) == [tmp_path / "a.txt", tmp_path / "sub" / "b.md"]
    assert P.list_inputs([tmp_path / ".venv" / "lib"]) == [tmp_path / ".venv" / "lib" / "LICENSE.txt"]  # asked for


# ------------------------------------------------------------------------- failures with workers (issue 22)
DRIVER = ROOT / "tests" / "prepare_fault_driver.py"
BAD = {"empty": "no text found", "blank": "no text found", "latin1": "is not UTF-8",
       "not-json": "e.jsonl:2: not a JSON line", "no-field": "no field 'text' (found: body)"}
SIGNALS = {"INT-group": 130, "INT-main": 130, "TERM-group": 143, "TERM-main": 143}


def run_faults(tmp_path, spec):
    """Run the fault driver (one process, many runs, a watchdog per run) and check every run: the exit
    code, exactly one line on stderr, no traceback anywhere, no worker left, .partial/ gone, the previous
    output kept. With multiprocessing.Pool, 2 workers were reported to hang in Pool.terminate (issue 22:
    4 runs of 10 on an empty file) and printed worker tracebacks; a Ctrl-C could be lost."""
    import json
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(DRIVER), str(tmp_path), json.dumps(spec)], capture_output=True,
                       text=True, timeout=900, cwd=ROOT, env=env, start_new_session=True)  # own process group
    assert r.returncode == 0, f"driver exit {r.returncode} (1: a run hung, stacks below)\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert "Traceback" not in r.stderr and "Exception" not in r.stderr, r.stderr[-6000:]
    runs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(runs) == sum(s.get("reps", 1) for s in spec)
    sections = r.stderr.split("@@run ")[1:]
    assert len(sections) == len(runs), r.stderr[-3000:]
    for run, section in zip(runs, sections):
        number, *err = section.strip().splitlines()
        assert int(number) == run["run"]
        if run["case"] in BAD:
            ok = run["rc"] == 2 and len(err) == 1 and err[0].startswith("error: ") and BAD[run["case"]] in err[0]
        else:
            ok = run["rc"] == SIGNALS[run["case"]] and err == ["interrupted: nothing written"]
        assert ok and run["kept"] and not run["staging"] and run["children"] == 0 and not run["late"], (run, err)


def test_failures_with_workers_end_promptly_with_one_line(tmp_path):
    """The bad-input cases with 1 worker, three of them 3 times with 2 and 8 workers (the others once
    with 2); Ctrl-C and SIGTERM to the whole process group and to the main process only, while the
    workers start (all four) and in the middle of the run (two)."""
    spec = [{"case": c, "workers": 1} for c in BAD]
    spec += [{"case": c, "workers": w, "reps": 3} for w in (2, 8) for c in ("empty", "latin1", "not-json")]
    spec += [{"case": c, "workers": 2} for c in ("blank", "no-field")]
    spec += [{"case": c, "workers": 2, "early": True} for c in SIGNALS]
    spec += [{"case": "INT-group", "workers": 8}, {"case": "TERM-main", "workers": 2}]
    run_faults(tmp_path, spec)


@pytest.mark.slow
def test_failures_with_workers_never_hang_repeated(tmp_path):
    """20 runs of every bad-input case and 5 of every signal case (early and mid-run), 1, 2 and 8 workers."""
    spec = [{"case": c, "workers": w, "reps": 20} for w in (1, 2, 8) for c in BAD]
    spec += [{"case": c, "workers": w, "reps": 5, "early": early}
             for w in (1, 2, 8) for c in SIGNALS for early in (True, False)]
    run_faults(tmp_path, spec)


def test_help_lists_prepare_and_exits_0(capsys):
    """``python -m gpt.data --help`` was a usage error (exit 2)."""
    assert prepare_cli(["--help"]) == 0 and prepare_cli(["-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m gpt.data prepare") and "\n  prepare " in out
    assert prepare_cli([]) == 2 and prepare_cli(["nonsense"]) == 2
    assert capsys.readouterr().err.startswith("usage: ")
    with pytest.raises(SystemExit) as e:
        prepare_cli(["prepare", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "only\nthese files in it are read" in out or "only these files in it are read" in out.replace("\n", " ")


def test_folder_reports_the_files_it_skips(tmp_path, capsys):
    """Files of other suffixes in a folder were ignored without a word: one notice counts them."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("kept text\n" * 5)
    for name in ("b.csv", "c.CSV", "d.py", "Makefile", ".hidden.csv"):
        (src / name).write_text("x,y\n")
    code = prepare_cli(["prepare", str(src), "--out", str(tmp_path / "o"), "--val-tokens", "1", "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 0
    assert err.splitlines() == ["note: 4 files (.csv 2, (no suffix) 1, .py 1) in the input folders skipped "
                                "(prepare reads .txt .md .rst .text .jsonl .jsonl.gz .parquet)"]
    assert "from 1 files, 4 files (.csv 2, (no suffix) 1, .py 1) skipped by suffix," in out
    manifest = json.loads((tmp_path / "o" / "prepare.json").read_text())
    assert manifest["skipped_files"] == {"(no suffix)": 1, ".csv": 2, ".py": 1}
    prepare_cli(["prepare", str(src), "--out", str(tmp_path / "o2"), "--val-tokens", "1", "--workers", "1", "--quiet"])
    assert capsys.readouterr().err == ""  # --quiet: no notice (the count stays in prepare.json)


def test_a_killed_worker_ends_the_run_with_one_error():
    """A worker killed from outside (the OOM killer) is an error naming it, not a wait for its result."""
    import os
    import signal

    with P._Workers(2) as pool:
        os.kill(pool.procs[1].pid, signal.SIGKILL)
        pool.procs[1].join(30)
        with pytest.raises(P.WorkerError, match="tokenizer worker 1 was killed by SIGKILL"):
            list(pool.map([[("a", True)], [("b", True)], [("c", True)]]))
    assert not any(p.is_alive() for p in pool.procs)
