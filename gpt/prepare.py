"""``python -m gpt.data prepare``: text corpora -> llm.c token shards, streaming and in parallel.

    python -m gpt.data prepare INPUT... --out DIR [--val-tokens N] [--shard-tokens N] [--workers N]
                                        [--text-field NAME] [--prefix NAME] [--overwrite]

INPUT: files and folders. A file named on the command line is read whatever its suffix: ``.jsonl`` /
``.jsonl.gz`` (one JSON object per line, the document in ``--text-field``, default ``text``), ``.parquet``
(a ``--text-field`` column; needs ``pyarrow``, the ``parquet`` extra), anything else as UTF-8 text. A
folder is walked recursively (files in sorted path order, hidden files and folders skipped) and only
these files in it are read: text (``.txt .md .rst .text``), ``.jsonl``, ``.jsonl.gz``, ``.parquet``;
other files are skipped: a one-line notice on stderr counts them by suffix (not with ``--quiet``), and
``prepare.json`` records the count.

Documents. A jsonl record or parquet row is one document, encoded as ordinary text (a literal
``<|endoftext|>`` in web text stays text). A text file is one document, or several where it holds the
literal ``<|endoftext|>`` (TinyStories-style files; ``train.py --data FILE`` reads them the same way).
As in llm.c, every document is preceded by ``<|endoftext|>`` (id 50256), so every shard stream starts
with it and the model learns to begin a document after it. Whitespace-only documents (and null text
values) are skipped and counted.

Output. ``<prefix>_val_000000.bin ...`` then ``<prefix>_train_000000.bin ...`` in llm.c's format
(``gpt.data.write_shard``): the token stream is cut at exact counts, the first ``--val-tokens`` tokens
into the validation split, then the training split, ``--shard-tokens`` per shard (the last one of each
split shorter), plus ``prepare.json`` (counts, inputs, arguments). Shards are written under
``DIR/.partial/`` and moved into ``DIR`` only when the whole run succeeded, ``prepare.json`` last: a
killed run leaves no shard in ``DIR`` looking complete (``train.py`` reads only ``DIR/*.bin``). A
non-empty ``DIR`` is refused unless ``--overwrite``, which replaces a previous prepare output (its
``.bin`` shards, ``prepare.json``, ``.partial/``) once the new one is complete, and still refuses a
folder holding anything else.

Streaming and determinism. The main process reads documents (large ones in pieces of about 1 MiB,
cut only where tokenization provably does not cross: after a newline between two non-space
characters) into batches; ``--workers`` processes encode batches with tiktoken's ``encode_ordinary``
(one call per piece: ``encode_ordinary_batch`` is the same encoder behind a thread pool, which at one
thread per process only added overhead, 15-25% measured); at most two batches per worker are in flight and results are taken in
submission order (``Pool.imap`` would read the whole corpus ahead), so memory stays bounded and the
shards are byte-identical whatever ``--workers`` is.

Stopping. Ctrl-C exits 130, SIGTERM 143 (to this process or its whole process group), each with one
line ``interrupted: nothing written``; a tokenizer worker that dies exits 1 with one ``error:`` line. In
every case the workers are gone within about a second (they ignore Ctrl-C, die silently on SIGTERM, and
what is left is SIGKILLed after a bounded wait), ``DIR/.partial/`` is removed and a previous output in
``DIR`` is kept; no worker ever prints a traceback.

Bad input, one line on stderr and exit 2: no input path, a folder with no readable files, a corpus
with no text or with no token left for training after ``--val-tokens``, a file that is not UTF-8, a
malformed JSON line, a record without ``--text-field`` (usually a wrong field name: failing beats
silently dropping the corpus), parquet without ``pyarrow``. Skipped and counted: empty documents.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data import TEXT_SUFFIXES, DataError, write_shard
from .prepare_workers import (  # noqa: F401 (IN_FLIGHT_PER_WORKER, encoded: part of this module's API)
    IN_FLIGHT_PER_WORKER,
    WorkerError,
    _Workers,
    encode_batch,
    encoded,
)
from .tokenizer import ENDOFTEXT, EOT_ID

PIECE_CHARS = 1 << 20  # a long document is encoded in pieces of about this many characters
BATCH_CHARS = 1 << 20  # characters per worker task
READ_CHARS = 1 << 20
MAX_SHARD_TOKENS = 2**31 - 1
MANIFEST = "prepare.json"
STAGING = ".partial"
_SAFE_CUT = re.compile(r"\S\n(?=\S)")


def kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _readable(f: Path) -> bool:
    return kind_of(f) != "text" or f.suffix.lower() in TEXT_SUFFIXES


def list_inputs(inputs, skipped: dict[str, int] | None = None) -> list[Path]:
    """Expand files and folders (recursively, sorted; text, jsonl(.gz), parquet files) into a file list.

    Files in a folder with another suffix are left out; ``skipped`` (if given) counts them by suffix."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            visible = [f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts)]  # not hidden
            found = sorted(f for f in visible if _readable(f))
            if skipped is not None:
                for f in visible:
                    if not _readable(f):
                        suffix = f.suffix.lower() or "(no suffix)"
                        skipped[suffix] = skipped.get(suffix, 0) + 1
            if not found:
                raise DataError(f"folder {p} holds no readable files ({', '.join(TEXT_SUFFIXES)}, .jsonl, "
                                ".jsonl.gz, .parquet)")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input not found: {p}")
    if not files:
        raise DataError("no input given")
    return files


# ------------------------------------------------------------------------------------------- reading
@dataclass
class Stats:
    files: int = 0
    docs: int = 0
    skipped_empty: int = 0
    bytes: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


def safe_cut(text: str, limit: int) -> int:
    """Largest cut ``c <= limit`` with ``text[c-2:c+1]`` = non-space, newline, non-space (0: none).

    GPT-2's pre-tokenizer never joins a newline with a following non-space character nor a non-space
    character with a following newline, so ``encode(text) == encode(text[:c]) + encode(text[c:])``."""
    last = 0
    for m in _SAFE_CUT.finditer(text, 0, limit + 1):
        last = m.end()
    return last


def _text_docs(path: Path, stats: Stats) -> Iterator[tuple[str, bool]]:
    """Yield ``(piece, starts_document)`` from a text file: documents split at the literal <|endoftext|>,
    long documents in safe pieces. Whitespace-only documents are skipped (counted); an empty tail
    after a final <|endoftext|> is no document."""
    buf, started, at_marker = "", False, False  # started: the current document already yielded a piece
    with open(path, encoding="utf-8", newline=None) as f:
        while True:
            try:
                block = f.read(READ_CHARS)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); convert or "
                                "remove it") from None
            buf += block
            while (i := buf.find(ENDOFTEXT)) >= 0 or not block:
                if i < 0 and not buf and at_marker:  # end of file right after a marker
                    return
                doc, buf = (buf[:i], buf[i + len(ENDOFTEXT):]) if i >= 0 else (buf, "")
                if started or doc.strip():
                    stats.docs += not started
                    yield doc, not started
                else:
                    stats.skipped_empty += 1
                started, at_marker = False, i >= 0
                if i < 0:
                    return
            while len(buf) > 2 * PIECE_CHARS and (cut := safe_cut(buf, PIECE_CHARS)):
                stats.docs += not started
                yield buf[:cut], not started
                buf, started = buf[cut:], True


def _jsonl_docs(path: Path, text_field: str, stats: Stats) -> Iterator[tuple[str, bool]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{n}: not UTF-8 text") from None
                except ValueError as e:
                    raise DataError(f"{path}:{n}: not a JSON line ({e})") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}:{n}: no field {text_field!r} (found: {keys}); choose the "
                                    "field with --text-field")
                yield from _record(record[text_field], f"{path}:{n}", text_field, stats)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; EOFError: truncated .gz
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _parquet_docs(path: Path, text_field: str, stats: Stats) -> Iterator[tuple[str, bool]]:
    try:
        import pyarrow.parquet as pq  # optional (the parquet extra): only for .parquet inputs
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install 'gpt-triton[parquet]' "
                        "(or pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types
        raise DataError(f"{path}: not a parquet file ({type(e).__name__})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (found: {', '.join(names)}); choose it with "
                        "--text-field")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for n, value in enumerate(batch.column(0).to_pylist()):
            yield from _record(value, f"{path}: row {n}", text_field, stats)


def _record(value, where: str, text_field: str, stats: Stats) -> Iterator[tuple[str, bool]]:
    if value is None or (isinstance(value, str) and not value.strip()):
        stats.skipped_empty += 1
        return
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
    stats.docs += 1
    yield from _pieces(value)


def _pieces(doc: str) -> Iterator[tuple[str, bool]]:
    first = True
    while len(doc) > 2 * PIECE_CHARS and (cut := safe_cut(doc, PIECE_CHARS)):
        yield doc[:cut], first
        doc, first = doc[cut:], False
    yield doc, first


def iter_pieces(files: list[Path], text_field: str, stats: Stats) -> Iterator[tuple[str, bool]]:
    """Every document of every file, in order, as ``(piece, starts_document)``."""
    for path in files:
        kind = kind_of(path)
        if kind == "jsonl":
            yield from _jsonl_docs(path, text_field, stats)
        elif kind == "parquet":
            yield from _parquet_docs(path, text_field, stats)
        else:
            yield from _text_docs(path, stats)
        stats.files += 1


def iter_batches(pieces: Iterator[tuple[str, bool]], batch_chars: int = BATCH_CHARS):
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Cut a token stream into ``<prefix>_val_*`` then ``<prefix>_train_*`` shards at exact counts."""

    def __init__(self, folder: Path, prefix: str, val_tokens: int, shard_tokens: int):
        self.folder, self.prefix, self.val_tokens, self.shard_tokens = folder, prefix, val_tokens, shard_tokens
        self.buf = np.empty(min(shard_tokens, 1 << 27), dtype=np.uint16)  # grows up to shard_tokens
        self.fill = 0
        self.fill_split = "val"
        self.total = 0
        self.shards: dict[str, list[str]] = {"val": [], "train": []}
        self.counts = {"val": 0, "train": 0}

    def _split(self) -> str:
        return "val" if self.total < self.val_tokens else "train"

    def _room(self) -> int:  # tokens until the current shard is full (or the val split ends)
        room = self.shard_tokens - self.fill
        if self.total < self.val_tokens:
            room = min(room, self.val_tokens - self.total)
        return room

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(self._room(), tokens.size)
            if self.fill + take > self.buf.size:
                self.buf = np.resize(self.buf, min(self.shard_tokens, max(2 * self.buf.size, self.fill + take)))
            split = self.fill_split = self._split()
            self.buf[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            self.total += take
            tokens = tokens[take:]
            if self.fill == self.shard_tokens or self._split() != split:
                self._flush(split)

    def _flush(self, split: str) -> None:
        if not self.fill:
            return
        name = f"{self.prefix}_{split}_{len(self.shards[split]):06d}.bin"
        write_shard(self.folder / name, self.buf[:self.fill])
        self.shards[split].append(name)
        self.counts[split] += self.fill
        self.fill = 0

    def close(self) -> None:
        self._flush(self.fill_split)


# ------------------------------------------------------------------------------------------- the run
def _check_out(out: Path, overwrite: bool) -> list[Path]:
    """The previous prepare output to replace (empty for a new folder); refuse anything else."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    present = sorted(out.iterdir())
    if not present:
        return []
    if not overwrite:
        raise DataError(f"--out {out} is not empty ({len(present)} entries); pass --overwrite to replace a "
                        "previous prepare output, or choose an empty folder")
    foreign = [p.name for p in present if not (p.name in (MANIFEST, STAGING) or p.suffix == ".bin")]
    if foreign:
        raise DataError(f"--out {out} holds files prepare did not write ({', '.join(foreign[:3])}); "
                        "--overwrite replaces only .bin shards and prepare.json")
    return present


def prepare(inputs, out, *, val_tokens: int = 1_000_000, shard_tokens: int = 100_000_000, workers: int = 1,
            text_field: str = "text", prefix: str = "data", overwrite: bool = False,
            progress: bool | None = None) -> dict:
    """Tokenize ``inputs`` into llm.c shards in ``out``; returns the manifest (also ``out/prepare.json``)."""
    for name, value, low in (("val_tokens", val_tokens, 0), ("shard_tokens", shard_tokens, 1), ("workers", workers, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if shard_tokens > MAX_SHARD_TOKENS:  # llm.c's header holds the count as an int32
        raise ValueError(f"shard_tokens must be at most {MAX_SHARD_TOKENS:,} (an llm.c shard's int32 token "
                         f"count), got {shard_tokens:,}")
    if not prefix or not re.fullmatch(r"[\w.-]+", prefix):
        raise ValueError(f"prefix must be a plain file-name part, got {prefix!r}")
    skipped: dict[str, int] = {}
    files = list_inputs(inputs, skipped)
    if skipped and progress is not False:
        print(f"note: {skipped_note(skipped)} in the input folders skipped (prepare reads "
              f"{' '.join(TEXT_SUFFIXES)} .jsonl .jsonl.gz .parquet)", file=sys.stderr)
    out = Path(out)
    old = _check_out(out, overwrite)
    staging = out / STAGING
    stats = Stats()
    try:  # (a Ctrl-C right after the mkdir must remove it too)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        writer = _run(files, staging, stats, val_tokens=val_tokens, shard_tokens=shard_tokens,
                      workers=workers, text_field=text_field, prefix=prefix, progress=progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not old:
            _rmdir_if_empty(out)
        raise
    for p in old:  # the new output is complete: replace the previous one
        if p.name != STAGING:
            p.unlink()
    for split in ("val", "train"):
        for name in writer.shards[split]:
            os.replace(staging / name, out / name)
    seconds = time.perf_counter() - stats.started
    manifest = {
        "format": "llm.c shards: 256 int32 header (20240520, 1, count), uint16 tokens",
        "tokenizer": "gpt2", "eot_id": EOT_ID, "eot": "before each document",
        "inputs": [str(p) for p in inputs], "files": stats.files, "documents": stats.docs,
        "skipped_empty_documents": stats.skipped_empty, "skipped_files": dict(sorted(skipped.items())), "bytes": stats.bytes, "tokens": writer.total,
        "val_tokens": writer.counts["val"], "train_tokens": writer.counts["train"],
        "val_shards": writer.shards["val"], "train_shards": writer.shards["train"],
        "args": {"val_tokens": val_tokens, "shard_tokens": shard_tokens, "text_field": text_field,
                 "prefix": prefix, "workers": workers},
        "seconds": round(seconds, 3),
    }
    tmp = staging / MANIFEST
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    staging.rmdir()
    return manifest


def skipped_note(skipped: dict[str, int]) -> str:
    """``3 files (.csv 2, .py 1)``: files a folder held with a suffix prepare does not read."""
    parts = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    n = sum(skipped.values())
    return f"{n} file{'s' * (n != 1)} ({parts})"


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _run(files, staging, stats, *, val_tokens, shard_tokens, workers, text_field, prefix, progress):
    writer = ShardWriter(staging, prefix, val_tokens, shard_tokens)
    # the workers fork first, before the progress bar's monitor thread and before any input is opened
    with _Workers(workers) if workers > 1 else contextlib.nullcontext() as pool:
        bar = tqdm(unit=" docs", disable=(None if progress is None else not progress), file=sys.stderr,
                   desc="prepare", dynamic_ncols=True)
        with bar:
            batches = iter_batches(iter_pieces(files, text_field, stats))
            for tokens, n_bytes in (pool.map(batches) if pool else map(encode_batch, batches)):
                writer.add(tokens)
                stats.bytes += n_bytes
                bar.n = stats.docs
                elapsed = max(time.perf_counter() - stats.started, 1e-9)
                bar.set_postfix_str(f"{writer.total:,} tokens, {stats.bytes / elapsed / 1e6:.2f} MB/s",
                                    refresh=True)
    writer.close()
    if writer.total == 0:
        raise DataError(f"no text found in {len(files)} input file(s) "
                        f"({stats.skipped_empty} empty documents skipped)")
    if writer.counts["train"] == 0:
        raise DataError(f"the corpus has {writer.total:,} tokens, all taken by the validation split "
                        f"(--val-tokens {val_tokens:,}): lower --val-tokens")
    return writer
