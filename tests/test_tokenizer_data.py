"""Tokenizer ids, the book's dataloader windows, text readers, llm.c shards and splits."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt import data as D
from gpt.tokenizer import TokenizerError, get_tokenizer, text_to_token_ids, token_ids_to_text

BOOK_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
BOOK_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617,
            34680, 27271, 13]  # the book, chapter 2


@pytest.fixture(scope="module")
def tok():
    try:
        return get_tokenizer()
    except TokenizerError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def verdict(data_dir):
    return (data_dir / "the-verdict.txt").read_text(encoding="utf-8")


def test_exact_token_ids(tok):
    ids = text_to_token_ids(BOOK_TEXT, tok)
    assert ids.shape == (1, len(BOOK_IDS)) and ids.dtype == torch.long
    assert ids[0].tolist() == BOOK_IDS
    assert token_ids_to_text(ids, tok) == BOOK_TEXT
    assert token_ids_to_text(BOOK_IDS, tok) == BOOK_TEXT


def test_tokenizer_from_bpe_files_matches_tiktoken(tok, data_dir):
    own = get_tokenizer(str(Path(D.__file__).parent / "assets" / "gpt2"))  # the BPE files the package ships
    text = (data_dir / "the-verdict.txt").read_text()[:3000] + " <|endoftext|>"
    assert own.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_missing_bpe_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="encoder.json and vocab.bpe"):
        get_tokenizer(str(tmp_path))


UNICODE_SAMPLE = ("Ünïcödé café — naïve 你好，世界 🙂👍🏽 \u00a0nbsp\ttab\r\nCRLF  spaces   "
                  "don't it's 3.14159 <|endoftext|> ok\n\n\n")


def test_offline_with_no_setup_uses_the_shipped_bpe_files(tmp_path, tok):
    """A child process with an empty tiktoken cache, no network and no GPT2_BPE_DIR still gets the
    encoding (the files shipped in the package) and its tokens equal tiktoken's (run in a subprocess:
    tiktoken caches encodings per process)."""
    import os
    import subprocess
    import sys

    from gpt import tokenizer as T

    env = {k: v for k, v in os.environ.items() if k not in ("GPT2_BPE_DIR", "DATA_GYM_CACHE_DIR")}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    code = ("import importlib.util, json, sys\n"  # gpt/tokenizer.py alone: no kernels to import
            f"spec = importlib.util.spec_from_file_location('tok', {str(T.__file__)!r})\n"
            "T = importlib.util.module_from_spec(spec); spec.loader.exec_module(T)\n"
            "print(json.dumps(T.get_tokenizer().encode(sys.argv[1], allowed_special='all')))\n")
    out = subprocess.run([sys.executable, "-c", code, UNICODE_SAMPLE], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == tok.encode(UNICODE_SAMPLE, allowed_special="all")
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or written into the cache


def test_shipped_bpe_files_are_gpt2s(tmp_path, monkeypatch):
    """The shipped files carry the sha256 tiktoken pins for gpt2, and tiktoken's own loader (with its
    vocab.bpe <-> encoder.json consistency check) builds exactly our ranks from them."""
    import hashlib
    import inspect

    import tiktoken.load
    import tiktoken_ext.openai_public as op

    from gpt import tokenizer as T

    src = inspect.getsource(op.gpt2)
    for name in ("encoder.json", "vocab.bpe"):
        assert hashlib.sha256((T.ASSETS / name).read_bytes()).hexdigest() in src
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken: read the local paths, cache nothing
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(T.ASSETS / "vocab.bpe"), str(T.ASSETS / "encoder.json"))
    own = T._from_bpe_files(T.ASSETS, check_hash=True)
    assert own._mergeable_ranks == ranks and own.n_vocab == 50257
    assert own.encode(UNICODE_SAMPLE, allowed_special="all") == get_tokenizer().encode(UNICODE_SAMPLE,
                                                                                      allowed_special="all")
    damaged = tmp_path / "gpt2"
    damaged.mkdir()
    (damaged / "vocab.bpe").write_bytes((T.ASSETS / "vocab.bpe").read_bytes())
    (damaged / "encoder.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(TokenizerError, match="damaged"):
        T._from_bpe_files(damaged, check_hash=True)
    with pytest.raises(TokenizerError, match="byte-pair ranks"):
        get_tokenizer(str(damaged))


def test_verdict_windows_match_tiktoken(tok, verdict):
    import tiktoken

    ref = tiktoken.get_encoding("gpt2").encode(verdict)
    assert len(ref) == 5145
    max_length, stride = 4, 4
    loader = D.create_dataloader_v1(verdict, batch_size=8, max_length=max_length, stride=stride, shuffle=False)
    ds = loader.dataset
    assert len(ds) == len(range(0, len(ref) - max_length, stride))
    x, y = next(iter(loader))
    assert x.shape == y.shape == (8, 4)
    assert x[0].tolist() == ref[0:4] and y[0].tolist() == ref[1:5] and x[1].tolist() == ref[4:8]
    # the book's attributes, and the last window
    assert ds.input_ids[0].tolist() == [40, 367, 2885, 1464]
    last = len(ds) - 1
    i = range(0, len(ref) - max_length, stride)[last]
    assert ds.input_ids[last].tolist() == ref[i:i + 4] and ds.target_ids[last].tolist() == ref[i + 1:i + 5]


def test_overlapping_windows_and_batches(tok, verdict):
    loader = D.create_dataloader_v1(verdict, batch_size=2, max_length=256, stride=128, shuffle=False,
                                    drop_last=False)
    batches = list(loader)
    x0 = batches[0][0]
    assert torch.equal(x0[0, 128:], x0[1, :128])  # stride half the window: halves overlap
    n_windows = len(range(0, 5145 - 256, 128))
    assert sum(b[0].shape[0] for b in batches) == n_windows


def test_too_short_corpus_is_an_error(tok):
    with pytest.raises(D.DataError, match="fewer than one window"):
        D.GPTDatasetV1("just a few words", tok, max_length=32, stride=32)


def test_text_readers(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "b" / "c.md").write_text("second doc")
    (tmp_path / "b" / "skip.bin").write_bytes(b"\0\1")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders and files: skipped, as prepare does
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("stale copy")
    (tmp_path / "b" / ".notes.txt").write_text("hidden")
    files = D.list_text_files(tmp_path)
    assert [f.name for f in files] == ["a.txt", "c.md"]
    (tmp_path / ".git" / "d").mkdir(parents=True)  # a hidden folder given by name is read
    (tmp_path / ".git" / "d" / "x.txt").write_text("given")
    assert [f.name for f in D.list_text_files(tmp_path / ".git")] == ["x.txt"]
    (tmp_path / ".git" / "d" / "x.txt").unlink()
    assert D.read_text(tmp_path) == "first doc<|endoftext|>second doc"
    with pytest.raises(D.DataError, match="not found"):
        D.read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(D.DataError, match="empty"):
        D.read_text(tmp_path / "empty.txt")
    (tmp_path / "e").mkdir()
    with pytest.raises(D.DataError, match="no text files"):
        D.read_text(tmp_path / "e")


def test_default_corpus_and_split(tok):
    text = D.default_corpus()
    assert len(text) > 100_000 and "<|endoftext|>" in text
    train, val = D.train_val_split(text, 0.9)
    assert train + val == text and len(val) == len(text) - int(0.9 * len(text))
    tiny_ctx = 128  # the tiny preset: the validation split holds several windows
    assert len(tok.encode(val, allowed_special="all")) > 4 * tiny_ctx
    with pytest.raises(ValueError):
        D.train_val_split(text, 1.0)


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1001)
    path = D.write_shard(tmp_path / "s.bin", tokens)
    assert path.stat().st_size == 256 * 4 + 2 * 1001
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, 1001]
    back = D.read_shard(path)
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert np.array_equal(D.read_shard(path, mmap=False), tokens)
    both = D.load_tokens([path, D.write_shard(tmp_path / "t.bin", tokens[:5])])
    assert both.tolist() == tokens.tolist() + tokens[:5].tolist()
    assert D.load_tokens(tmp_path).tolist() == both.tolist()  # a folder of shards


@pytest.mark.parametrize("damage,match", [
    ("magic", "bad magic"), ("version", "version"), ("truncate", "file has"), ("tiny", "too small"),
])
def test_corrupt_shard(tmp_path, damage, match):
    path = D.write_shard(tmp_path / "s.bin", np.arange(100))
    raw = bytearray(path.read_bytes())
    if damage == "magic":
        raw[0:4] = np.int32(1234).tobytes()
    elif damage == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif damage == "truncate":
        raw = raw[:-3]
    else:
        raw = raw[:100]
    path.write_bytes(bytes(raw))
    with pytest.raises(D.DataError, match=match):
        D.read_shard(path)


def test_shard_rejects_out_of_range_tokens(tmp_path):
    with pytest.raises(D.DataError, match="uint16"):
        D.write_shard(tmp_path / "x.bin", [1, 70000])


def test_token_window_dataset_on_shard_tokens():
    ds = D.TokenWindowDataset(np.arange(20), max_length=5, stride=3)
    x, y = ds[2]
    assert x.tolist() == [6, 7, 8, 9, 10] and y.tolist() == [7, 8, 9, 10, 11]
    assert len(ds) == len(range(0, 15, 3))
