"""Data: the book's sliding-window dataset, text readers, llm.c token shards, an embedded corpus, the
training batches' order (``EpochBatches``) and the documents of a window (``document_spans``, ``--doc-mask``).

``python -m gpt.data prepare INPUT... --out DIR`` turns corpora too large for memory into llm.c shards
(streaming, in parallel; the code is in ``gpt/prepare.py``); ``ShardWindowDataset`` reads them
memory-mapped.

Windows follow the book (chapter 2): input ``tokens[i : i+max_length]``, target shifted by one, for
``i`` in ``range(0, len(tokens) - max_length, stride)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .tokenizer import ENDOFTEXT, get_tokenizer

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


class DataError(ValueError):
    """Input data is missing, empty, malformed or too short."""


class TokenWindowDataset(Dataset):
    """Sliding ``(input, target)`` windows over a 1-D token sequence, built lazily (no copies)."""

    def __init__(self, tokens, max_length: int, stride: int):
        if max_length <= 0 or stride <= 0:
            raise ValueError(f"max_length and stride must be positive, got {max_length} and {stride}")
        self.tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))  # (N,)
        self.max_length = max_length
        self.stride = stride
        n = len(self.tokens)
        if n <= max_length:
            raise DataError(f"corpus has {n} tokens, fewer than one window of {max_length} + 1 tokens")
        self._starts = range(0, n - max_length, stride)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, idx: int):
        i = self._starts[idx]
        return self.tokens[i:i + self.max_length], self.tokens[i + 1:i + self.max_length + 1]  # (T,), (T,)


class GPTDatasetV1(TokenWindowDataset):
    """The book's dataset: tokenize ``txt`` (``<|endoftext|>`` allowed) and cut sliding windows."""

    def __init__(self, txt: str, tokenizer, max_length: int, stride: int):
        token_ids = tokenizer.encode(txt, allowed_special={ENDOFTEXT})
        super().__init__(token_ids, max_length, stride)
        self.input_ids = _WindowView(self, 0)
        self.target_ids = _WindowView(self, 1)


class _WindowView(Sequence):
    """``dataset.input_ids[i]`` / ``dataset.target_ids[i]`` as in the book, computed on demand."""

    def __init__(self, ds: TokenWindowDataset, which: int):
        self.ds, self.which = ds, which

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i][self.which]


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                         tokenizer=None, generator: torch.Generator | None = None) -> DataLoader:
    """The book's dataloader over ``GPTDatasetV1`` (GPT-2 tokenizer unless one is given)."""
    dataset = GPTDatasetV1(txt, tokenizer or get_tokenizer(), max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


# --------------------------------------------------------------------------------------------- text
def list_text_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively: .txt/.md/.rst/.text files, sorted; hidden files and
    folders such as ``.git`` or ``.ipynb_checkpoints`` skipped, as ``prepare`` does) into a file list."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"folder {p} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"data path not found: {p}")
    return files


def read_text(paths: str | os.PathLike | Iterable[str | os.PathLike], separator: str = ENDOFTEXT) -> str:
    """Read text files/folders into one string, documents joined by ``<|endoftext|>``."""
    docs = []
    for f in list_text_files(paths):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{f} is not UTF-8 text") from None
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError("the data files are empty")
    return separator.join(docs)


def default_corpus() -> str:
    """An English corpus every Python has, no download: CPython's pydoc topics (about 465k characters
    of the Python reference manual, shipped in ``pydoc_data``)."""
    from pydoc_data.topics import topics  # lazy: a 0.5 MB module, read only for this corpus

    def tidy(text: str) -> str:  # runs of indentation spaces teach a small model little
        return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()

    return ENDOFTEXT.join(tidy(topics[k]) for k in sorted(topics))


def train_val_split(data, train_ratio: float = 0.9):
    """Split text or a token array at ``train_ratio`` (the book splits the characters 90/10)."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    split = int(train_ratio * len(data))
    return data[:split], data[split:]


def document_spans(idx: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The documents of a batch of windows ``idx (b, T)``, for document-masked attention (``--doc-mask``):
    a document ends with its ``<|endoftext|>`` (``eot_id``) and the next token starts the next one; each
    window row starts one too, so no document spans two rows. Returns ``(cu_seqlens, positions,
    max_seqlen)``: int32 ``(n+1,)`` prefix sums over the ``b * T`` flattened tokens (``GPTModel``'s
    ``cu_seqlens``), each token's position within its document ``(b, T)`` (0 at a document's first token,
    as if the document were run alone), and a Python int bounding the lengths. On the CPU, where the
    loaders' batches are, ``n`` and ``max_seqlen`` are exact (host memory is read); on an accelerator
    nothing is read back: the spans are padded with empty ones to ``b * T + 1`` and ``max_seqlen`` is ``T``."""
    b, T = idx.shape
    n_tok = b * T
    starts = torch.ones((b, T), dtype=torch.bool, device=idx.device)
    starts[:, 1:] = idx[:, :-1] == eot_id  # the token after an <|endoftext|> starts a document
    starts = starts.reshape(n_tok)  # (b*T,)
    ar = torch.arange(n_tok, device=idx.device)
    first = torch.where(starts, ar, 0).cummax(0).values  # (b*T,) the index of each token's document start
    positions = (ar - first).view(b, T)
    end = torch.full((1,), n_tok, dtype=ar.dtype, device=idx.device)
    if idx.device.type == "cpu":
        cu = torch.cat((ar[starts], end)).to(torch.int32)  # (n+1,)
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if n_tok else 0
    else:  # every start first, then n_tok: empty spans
        cu = torch.cat((torch.where(starts, ar, n_tok).sort().values, end)).to(torch.int32)  # (b*T+1,)
        max_seqlen = T
    return cu, positions, max_seqlen


class EpochBatches:
    """Deterministic batches: epoch ``e`` is a permutation seeded by ``seed + e``; global batch ``pos``
    is a contiguous slice of it, split across DDP ranks. Any position can be recomputed (exact resume)."""

    def __init__(self, n_items: int, batch_size: int, *, seed: int, shuffle: bool = True, rank: int = 0,
                 world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle, self.rank, self.world = (
            n_items, batch_size, seed, shuffle, rank, world)
        self.global_batch = batch_size * world
        self.per_epoch = n_items // self.global_batch
        self._perm_epoch, self._perm = None, None

    def indices(self, pos: int) -> list[int]:
        epoch, i = divmod(pos, self.per_epoch)
        if self._perm_epoch != epoch:
            self._perm = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                          if self.shuffle else torch.arange(self.n))
            self._perm_epoch = epoch
        start = i * self.global_batch + self.rank * self.batch_size
        return self._perm[start:start + self.batch_size].tolist()


# -------------------------------------------------------------------------------- llm.c token shards
def write_shard(path: str | os.PathLike, tokens) -> Path:
    """Write tokens as an llm.c ``.bin`` shard: 256 int32 header (magic, version, count) + uint16 tokens."""
    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise DataError(f"tokens must be 1-D, got shape {toks.shape}")
    if toks.size and (toks.min() < 0 or toks.max() >= 2**16):
        raise DataError("token ids must fit in uint16 (0..65535) for an llm.c shard")
    if toks.size >= 2**31:
        raise DataError(f"{toks.size:,} tokens do not fit one llm.c shard (its header count is an int32)")
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, toks.size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype("<u2").tobytes())
    os.replace(tmp, path)
    return path


def read_shard(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Read an llm.c ``.bin`` shard, checking magic, version and that the count matches the file size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard not found: {path}")
    size = path.stat().st_size
    if size < SHARD_HEADER_INTS * 4:
        raise DataError(f"{path} is too small for an llm.c shard header ({size} bytes)")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic number {header[0]} (expected {SHARD_MAGIC}); not an llm.c shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    n = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + 2 * n
    if size != expected:
        raise DataError(f"{path}: header says {n} tokens ({expected} bytes) but the file has {size} bytes")
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(n,))
    return np.fromfile(path, dtype="<u2", offset=SHARD_HEADER_INTS * 4, count=n)


class ShardWindowDataset(Dataset):
    """Sliding ``(input, target)`` windows over memory-mapped llm.c shards: nothing is copied into RAM
    but the windows asked for. Windows stay inside one shard (as llm.c's loader reads shards)."""

    def __init__(self, shards: Sequence[str | os.PathLike], max_length: int, stride: int):
        if max_length <= 0 or stride <= 0:
            raise ValueError(f"max_length and stride must be positive, got {max_length} and {stride}")
        self.shards = [read_shard(p) for p in shards]  # np.memmap each
        self.max_length, self.stride = max_length, stride
        counts = [len(range(0, len(s) - max_length, stride)) if len(s) > max_length else 0 for s in self.shards]
        self._ends = np.cumsum(counts)  # window index -> shard by binary search
        self.n_tokens = sum(len(s) for s in self.shards)
        if not len(self):
            raise DataError(f"the shards ({', '.join(Path(p).name for p in shards)}) hold no window of "
                            f"{max_length} + 1 tokens")

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, idx: int):
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        k = int(np.searchsorted(self._ends, idx, side="right"))
        i = (idx - (int(self._ends[k - 1]) if k else 0)) * self.stride
        window = torch.from_numpy(self.shards[k][i:i + self.max_length + 1].astype(np.int64))  # (T + 1,)
        return window[:-1], window[1:]  # (T,), (T,)


def _split_of(path: Path) -> str | None:
    """``train``/``val``: the last name part that is one (``interval_train_000000.bin`` is train);
    else a name merely holding one of them."""
    parts = [w for w in re.split(r"[\W_]+", path.stem.lower()) if w in ("train", "val")]
    if parts:
        return parts[-1]
    return "train" if "train" in path.name else "val" if "val" in path.name else None


def split_shards(paths) -> tuple[list[Path], list[Path]] | None:
    """``(train, val)`` shard lists when ``paths`` is one folder of prepared shards (names holding
    ``train`` / ``val``, as ``python -m gpt.data prepare`` writes them); else None."""
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if len(paths) != 1 or not Path(paths[0]).is_dir():
        return None
    bins = sorted(Path(paths[0]).glob("*.bin"))
    train = [p for p in bins if _split_of(p) == "train"]
    val = [p for p in bins if _split_of(p) == "val"]
    if not train and not val:
        return None
    if not train or not val:
        raise DataError(f"{paths[0]} holds {'val' if val else 'train'} shards but no "
                        f"{'train' if val else 'val'} shards")
    return train, val


def max_text_bytes() -> int:
    """Text that ``load_tokens`` tokenizes in memory at most: a sixteenth of the available RAM (the
    text, tiktoken's list of Python ints and the int64 array take about 12 bytes per text byte)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 8 << 30
    return avail // 16


def load_tokens(paths: str | os.PathLike | Iterable[str | os.PathLike], tokenizer=None,
                max_bytes: int | None = None) -> np.ndarray:
    """Tokens of the given data: ``.bin`` shards are read as is, text files/folders are tokenized (up to
    ``max_bytes`` of text, default ``max_text_bytes()``; more gets a DataError pointing to prepare)."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    expanded: list[Path] = []
    for p in map(Path, paths):  # a folder of .bin shards counts as its shards, in name order
        bins = sorted(p.glob("*.bin")) if p.is_dir() else []
        expanded.extend(bins or [p])
    paths = expanded
    shards = [p for p in paths if p.suffix == ".bin"]
    if shards and len(shards) != len(paths):
        raise DataError("mix of .bin shards and text files: pass one kind")
    if shards:
        arrays = [np.asarray(read_shard(p)) for p in shards]
        return np.concatenate(arrays).astype(np.int64)
    limit = max_text_bytes() if max_bytes is None else max_bytes
    size = sum(f.stat().st_size for f in list_text_files(paths))
    if size > limit:
        raise DataError(f"{size / 1e6:,.0f} MB of text is too large to tokenize in memory here (limit "
                        f"{limit / 1e6:,.0f} MB): prepare shards once with `python -m gpt.data prepare "
                        f"{' '.join(map(str, paths))} --out DIR` and pass --data DIR")
    text = read_text(paths)
    tokenizer = tokenizer or get_tokenizer()
    return np.asarray(tokenizer.encode(text, allowed_special={ENDOFTEXT}), dtype=np.int64)


if __name__ == "__main__":  # python -m gpt.data prepare ...: the CLI lives in gpt/cli/prepare.py (imported only here)
    from gpt.cli.prepare import main

    raise SystemExit(main())
