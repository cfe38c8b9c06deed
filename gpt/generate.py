"""Text generation: greedy, temperature, top-k, top-p, end-of-text stop, seeded sampling.

``generate`` works with any model whose forward maps ``idx (B, T)`` to logits ``(B, T, V)`` (or an
object with ``.logits``, as Hugging Face models return). Prompts longer than the model's context are
cropped to the last ``context_length`` tokens at every step (sliding window), as in the book.
"""

from __future__ import annotations

from numbers import Integral

import torch
from torch import nn

from .decoder import Decoder


def context_length_of(model: nn.Module) -> int | None:
    """The model's maximum sequence length, from ``cfg``, a HF ``config`` or the position embedding."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return cfg["context_length"] if isinstance(cfg, dict) else cfg.context_length
    hf = getattr(model, "config", None)
    if hf is not None and getattr(hf, "n_positions", None):
        return int(hf.n_positions)
    pos = getattr(model, "pos_emb", None)
    return pos.num_embeddings if isinstance(pos, nn.Embedding) else None


#: The smallest temperature sampling takes (the smallest normal fp32): below it ``1 / temperature``
#: overflows fp32. Temperature 0 is greedy.
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """ValueError unless ``temperature`` is 0 or finite and >= ``MIN_TEMPERATURE``, ``top_k`` a positive
    int and ``top_p`` in (0, 1]."""
    t = float(temperature)
    if not (t == 0.0 or MIN_TEMPERATURE <= t < float("inf")):
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:.3g}, "
                         f"got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from ``logits (B, V)``; returns ``(B, 1)``. Temperature 0 is greedy."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # max 0: no inf - inf at tiny T
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already cover top_p (the first token always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    return getattr(out, "logits", out)


def supports_kv_cache(model: nn.Module) -> bool:
    return getattr(model, "supports_kv_cache", False)


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             cuda_graph: bool | None = None) -> torch.Tensor:
    """Append up to ``max_new_tokens`` tokens to ``idx (B, T)`` and return ``(B, T + n)``.

    Generation stops at the step where every row has produced ``eos_id``; that step is not appended
    (for one row this is the book's rule: the end-of-text token is not returned). In a batch, rows
    that finish early are padded with ``eos_id`` until the last one finishes. ``use_cache`` uses a
    preallocated KV cache on models that support one (``gpt.GPTModel``); other models recompute the
    window each step. Both paths give the same tokens. ``cuda_graph`` replays the cached decode step
    from a CUDA graph (default: on for CUDA models, off elsewhere).
    """
    for token in stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_id=eos_id, use_cache=use_cache, generator=generator, cuda_graph=cuda_graph):
        idx = torch.cat((idx, token), dim=1)  # (B, T+1)
    return idx


def stream(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
           use_cache: bool = True, generator: torch.Generator | None = None, cuda_graph: bool | None = None):
    """Yield the new tokens ``(B, 1)`` one step at a time (the CLI prints them as they come). Bad
    arguments raise here, before the first token."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError("idx must be a (batch, tokens) tensor of token ids (torch.long)")
    if idx.shape[1] == 0:
        raise ValueError("idx must hold at least one prompt token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    return _stream(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, cuda_graph)


# The package binds ``gpt.generate`` to the function ``generate``, which hides this submodule behind it; so
# that the documented ``gpt.generate.stream(...)`` works either way, the function carries ``stream`` too
# (the same function as this module's ``stream``; ``from gpt.generate import ...`` reaches the module).
generate.stream = stream


@torch.no_grad()
def _stream(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, cuda_graph):
    was_training = model.training
    model.eval()
    try:
        if cuda_graph and idx.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA model, got inputs on {idx.device}")
        if use_cache and supports_kv_cache(model):
            graph = idx.device.type == "cuda" if cuda_graph is None else cuda_graph
            next_logits = Decoder(model, idx.shape[0], cuda_graph=graph, strict=cuda_graph is not None).step
        else:
            ctx = context_length_of(model)

            def next_logits(seq):
                return _logits(model, seq if ctx is None else seq[:, -ctx:])[:, -1, :]  # (B, V)

        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            token = sample_next_token(next_logits(idx), temperature=temperature, top_k=top_k, top_p=top_p,
                                      generator=generator)  # (B, 1)
            if eos_id is not None:
                token = token.masked_fill(finished.unsqueeze(1), eos_id)  # finished rows: pad
                finished |= token.squeeze(1) == eos_id
                if bool(finished.all()):  # this step's tokens are all eos_id: stop, not yielded
                    return
            idx = torch.cat((idx, token), dim=1)
            yield token
    finally:
        model.train(was_training)


if __name__ == "__main__":  # python -m gpt.generate: the CLI lives in gpt/cli/generate.py (imported only here)
    from gpt.cli.generate import main

    raise SystemExit(main())
