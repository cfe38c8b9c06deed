"""GPT-2's byte-pair encoding through tiktoken, offline out of the box.

``get_tokenizer()`` returns tiktoken's ``gpt2`` encoding. Its source, in order: a folder holding
``encoder.json`` + ``vocab.bpe`` (``bpe_dir=`` or ``GPT2_BPE_DIR``); tiktoken's own cached copy when its
cache (``TIKTOKEN_CACHE_DIR``, else tiktoken's default folder) already holds the files; otherwise the
copy of GPT-2's public BPE files shipped in this package (``gpt/assets/gpt2``, sha256-checked against
the hashes tiktoken pins). It never downloads: the shipped files are the very files tiktoken would
fetch, so every source gives the same encoding, and a machine without internet needs no setup.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import tiktoken
import torch
from tiktoken_ext.openai_public import r50k_pat_str

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
ASSETS = Path(__file__).resolve().parent / "assets" / "gpt2"
_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
SHA256 = {  # tiktoken_ext.openai_public.gpt2's pinned hashes
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


class TokenizerError(RuntimeError):
    """The GPT-2 encoding could not be loaded (bad BPE folder or a damaged install)."""


@functools.lru_cache(maxsize=4)
def get_tokenizer(bpe_dir: str | None = None):
    """Return tiktoken's ``gpt2`` encoding (50,257 tokens, ``<|endoftext|>`` = 50256), offline."""
    bpe_dir = bpe_dir or os.environ.get("GPT2_BPE_DIR")
    if bpe_dir:
        return _from_bpe_files(Path(bpe_dir))
    if _tiktoken_has_cache():
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:  # noqa: BLE001 - a damaged cache: the shipped copy is the same encoding
            pass
    return _from_bpe_files(ASSETS, check_hash=True)


def _tiktoken_has_cache() -> bool:
    """Whether tiktoken would find both gpt2 files in its cache (its rule: sha1 of the URL as the name)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache is None:
        cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return bool(cache) and all(
        os.path.isfile(os.path.join(cache, hashlib.sha1((_URL + name).encode()).hexdigest())) for name in SHA256)


def _from_bpe_files(folder: Path, check_hash: bool = False):
    """The gpt2 encoding from GPT-2's ``encoder.json`` (+ ``vocab.bpe`` beside it), read locally.

    ``encoder.json`` maps each token, written in GPT-2's printable byte alphabet, to its rank; tiktoken
    checks it equals the ranks replayed from ``vocab.bpe``'s merges, so the ranks come from it alone."""
    enc_json, vocab_bpe = folder / "encoder.json", folder / "vocab.bpe"
    if not enc_json.is_file() or not vocab_bpe.is_file():
        raise TokenizerError(f"{folder} must hold encoder.json and vocab.bpe (the GPT-2 BPE files)")
    raw = enc_json.read_bytes()
    if check_hash and hashlib.sha256(raw).hexdigest() != SHA256["encoder.json"]:
        raise TokenizerError(f"{enc_json} is damaged (sha256 differs from GPT-2's); reinstall the package")
    try:
        encoder = json.loads(raw)
        ranks = {_data_gym_bytes(k): v for k, v in encoder.items() if k not in (ENDOFTEXT, "<|startoftext|>")}
    except (ValueError, KeyError, AttributeError) as e:
        raise TokenizerError(f"{enc_json} is not GPT-2's encoder.json ({type(e).__name__})") from None
    if len(ranks) != EOT_ID or sorted(ranks.values()) != list(range(EOT_ID)):
        raise TokenizerError(f"{enc_json} does not hold GPT-2's {EOT_ID} byte-pair ranks")
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={ENDOFTEXT: EOT_ID})


@functools.lru_cache(maxsize=1)
def _data_gym_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable character table (printable bytes map to themselves, the other 68
    bytes to chr(256 + n) in byte order), as tiktoken's ``data_gym_to_mergeable_bpe_ranks`` builds it."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in printable]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _data_gym_bytes(token: str) -> bytes:
    table = _data_gym_alphabet()
    return bytes(table[c] for c in token)


def text_to_token_ids(text: str, tokenizer=None) -> torch.Tensor:
    """Encode ``text`` to a ``(1, T)`` long tensor (the book's helper; ``<|endoftext|>`` allowed)."""
    tokenizer = tokenizer or get_tokenizer()
    encoded = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    return torch.tensor(encoded, dtype=torch.long).unsqueeze(0)  # (T,) -> (1, T)


def token_ids_to_text(token_ids, tokenizer=None) -> str:
    """Decode a ``(1, T)`` or ``(T,)`` tensor or a list of ids back to text."""
    tokenizer = tokenizer or get_tokenizer()
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.squeeze(0).tolist()  # (1, T) -> (T,)
    return tokenizer.decode(list(token_ids))
