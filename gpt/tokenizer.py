"""GPT-2's byte-pair encoding through tiktoken, offline-friendly.

tiktoken fetches the BPE files once and caches them in ``TIKTOKEN_CACHE_DIR``; with that variable
pointing at a filled cache (CI uses ``../shared/tiktoken_cache``) nothing is downloaded. A folder
holding the original ``encoder.json`` + ``vocab.bpe`` works too (``GPT2_BPE_DIR`` or ``bpe_dir=``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256


class TokenizerError(RuntimeError):
    """The GPT-2 encoding could not be loaded (offline without a cache)."""


@functools.lru_cache(maxsize=4)
def get_tokenizer(bpe_dir: str | None = None):
    """Return tiktoken's ``gpt2`` encoding (50,257 tokens, ``<|endoftext|>`` = 50256)."""
    import tiktoken

    bpe_dir = bpe_dir or os.environ.get("GPT2_BPE_DIR")
    if bpe_dir:
        return _from_bpe_files(Path(bpe_dir))
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
        raise TokenizerError(
            "cannot load the GPT-2 tokenizer: tiktoken needs its BPE files and could not download them "
            f"({type(e).__name__}). Point TIKTOKEN_CACHE_DIR at a tiktoken cache (now: {cache}) or "
            "GPT2_BPE_DIR at a folder with encoder.json and vocab.bpe."
        ) from None


def _from_bpe_files(folder: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    enc_json, vocab_bpe = folder / "encoder.json", folder / "vocab.bpe"
    if not enc_json.is_file() or not vocab_bpe.is_file():
        raise TokenizerError(f"{folder} must hold encoder.json and vocab.bpe (the GPT-2 BPE files)")
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(enc_json))
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={ENDOFTEXT: EOT_ID})


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
