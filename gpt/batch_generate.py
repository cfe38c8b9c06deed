"""Generation for many prompts at once: ragged batches, a stop per row, continuous refill.

``generate_batch(model, prompts, max_new_tokens, ...)`` returns the new token ids of every prompt (any
lengths, in prompt order). ``batch_size`` slots run together. When a row stops (at ``eos_id``, which is
not returned, or after ``max_new_tokens``), the next waiting prompt takes its slot.

Fused model (``supports_kv_cache``): the slots share one ``gpt.decoder.Decoder`` (a static
``KVCache (B, H, L, D)``). The prompts that enter slots in a step are prefilled together into their
slots' rows in one packed model call (``flash_attention_varlen``, positions 0..T-1 of each, the logits
of ``generate``'s prefill). Then every step decodes all slots together: one token per row at its own
position, ``decode_attention`` over its own ``cache_seqlens``; padding never enters attention. The
decode step has static shapes (token, positions ``(B, 1)``, per-row lengths computed on the device), so
on CUDA it is replayed from a CUDA graph. Slots with nothing to decode this step (empty, or prefilled
this step) decode a dummy token at position 0 before their prefill overwrites it.

Past ``context_length`` a row does what ``generate`` does for it alone: once its tokens no longer fit,
it re-prefills its last ``context_length`` tokens every step (positions restart at 0 in the window).

Other models (the reference model, Hugging Face models, any ``idx -> logits`` module): every step runs
the active rows' windows right-padded to one length and reads each row's logits at its last real
token. For a causal model the pads come after every token that counts, so this is exact.

Greedy rows equal ``generate`` on each prompt alone, token for token (up to float rounding of batched
vs single matmuls, which only matters at exact logit ties). Seeded sampling draws one ``(B, V)``
sample per step for all ``B`` slots (empty slots included) from ``generator``, so the tokens are
reproducible for the same model (weights, dtype, device, kernel path), prompts (contents and order),
``max_new_tokens``, ``eos_id``, ``batch_size``, sampling settings and generator state; they differ from
``generate``'s sampled tokens for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from numbers import Integral

import torch
from torch import nn

from .decoder import Decoder
from .generate import _logits, check_sampling, context_length_of, sample_next_token, supports_kv_cache

#: Slots when ``batch_size`` is None (fewer when there are fewer prompts).
DEFAULT_BATCH_SIZE = 32


def _device_of(model) -> torch.device:
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return param.device if param is not None else torch.device("cpu")


def _vocab_size(model) -> int | None:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    return int(vocab) if vocab else None


def _as_token_lists(prompts, vocab: int | None) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of token-id sequences (lists or 1-D tensors), got "
                        f"{type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            if p.dim() != 1 or p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
                raise ValueError(f"prompts[{i}] must be a 1-D integer tensor, got {p.dtype} {tuple(p.shape)}")
            ids = p.tolist()
        elif isinstance(p, (list, tuple)) and all(isinstance(t, Integral) and not isinstance(t, bool) for t in p):
            ids = [int(t) for t in p]
        else:
            raise TypeError(f"prompts[{i}] must be a list of ints or a 1-D tensor of token ids, "
                            f"got {type(p).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        lo, hi = min(ids), max(ids)
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ValueError(f"prompts[{i}] holds token id {lo if lo < 0 else hi} outside [0, {vocab})")
        out.append(ids)
    return out


class _RecomputedLogits:
    """Next-token logits without a cache: the active rows' windows right-padded, one forward per step."""

    def __init__(self, model, batch_size: int, device: torch.device):
        self.model, self.ctx, self.B, self.device = model, context_length_of(model), batch_size, device

    def __call__(self, seqs: list[list[int] | None], fresh: list[bool]) -> torch.Tensor:
        active = [b for b, s in enumerate(seqs) if s is not None]
        windows = [seqs[b] if self.ctx is None else seqs[b][-self.ctx:] for b in active]
        width = max(len(w) for w in windows)
        idx = torch.zeros(len(active), width, dtype=torch.long)  # (n, width); pads only after a row's end
        for i, w in enumerate(windows):
            idx[i, :len(w)] = torch.tensor(w)
        out = _logits(self.model, idx.to(self.device))  # (n, width, V)
        last = torch.tensor([len(w) - 1 for w in windows], device=out.device)
        rows = out[torch.arange(len(active), device=out.device), last]  # (n, V)
        logits = rows.new_zeros(self.B, rows.shape[-1])
        logits[torch.tensor(active, device=out.device)] = rows
        return logits


def iter_batch(model, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
               batch_size: int | None = None, use_cache: bool = True,
               cuda_graph: bool | None = None) -> Iterator[tuple[int, list[int]]]:
    """``generate_batch`` one prompt at a time: yields ``(prompt index, new token ids)`` as each row
    finishes (finishing order). Bad arguments raise here, before any generation."""
    vocab = _vocab_size(model)
    prompts = _as_token_lists(prompts, vocab)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, Integral)
                                   or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, Integral)):
        raise ValueError(f"eos_id must be an int or None, got {eos_id!r}")
    check_sampling(temperature, top_k, top_p)
    device = _device_of(model)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA model, got a model on {device}")
    B = max(1, min(len(prompts), batch_size or DEFAULT_BATCH_SIZE))
    return _iter_batch(model, prompts, int(max_new_tokens), B, device, temperature, top_k, top_p, eos_id,
                       generator, use_cache, cuda_graph)


@torch.no_grad()
def _iter_batch(model, prompts, max_new_tokens, B, device, temperature, top_k, top_p, eos_id, generator,
                use_cache, cuda_graph):
    if max_new_tokens == 0 or not prompts:
        yield from ((i, []) for i in range(len(prompts)))
        return
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    try:
        if use_cache and supports_kv_cache(model):
            ctx = model.cfg.context_length
            max_len = min(ctx, max(len(p) for p in prompts) + max_new_tokens)  # longest position + 1
            graph = device.type == "cuda" if cuda_graph is None else cuda_graph
            next_logits = Decoder(model, B, max_len, cuda_graph=graph, strict=cuda_graph is not None).step_rows
        else:
            next_logits = _RecomputedLogits(model, B, device)
        waiting = iter(range(len(prompts)))
        rows: list[int | None] = [next(waiting, None) for _ in range(B)]  # prompt index per slot
        seqs = [None if r is None else list(prompts[r]) for r in rows]  # prompt + new tokens per slot
        news: list[list[int]] = [[] for _ in range(B)]
        fresh = [r is not None for r in rows]  # entered this step: prefill
        while any(r is not None for r in rows):
            logits = next_logits(seqs, fresh)  # (B, V)
            tokens = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                       generator=generator).view(B).tolist()
            for b, (r, t) in enumerate(zip(rows, tokens)):
                if r is None:
                    continue
                fresh[b] = False
                if t != eos_id:
                    seqs[b].append(t)
                    news[b].append(t)
                if t == eos_id or len(news[b]) == max_new_tokens:
                    yield r, news[b]
                    rows[b] = next(waiting, None)
                    seqs[b] = None if rows[b] is None else list(prompts[rows[b]])
                    news[b], fresh[b] = [], rows[b] is not None
    finally:
        if was_training is not None:
            model.train(was_training)


def generate_batch(model, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
                   batch_size: int | None = None, use_cache: bool = True,
                   cuda_graph: bool | None = None) -> list[list[int]]:
    """New token ids for every prompt in ``prompts`` (lists of ints or 1-D tensors, any lengths), in
    prompt order. Each row stops at its own ``eos_id`` (not included) or after ``max_new_tokens``.

    ``batch_size`` rows run at once (default ``min(len(prompts), 32)``); a finished row's slot takes the
    next prompt. Temperature 0 is greedy: every row equals ``generate`` on that prompt alone. Sampled
    tokens are reproducible for the same model, prompts, settings, ``batch_size`` and generator state
    (the module docstring lists what they depend on). ``cuda_graph``: replay the fused model's decode
    step from a CUDA graph (default: on for CUDA models). ``use_cache=False`` takes the recompute path
    on every model.
    """
    it = iter_batch(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=eos_id, generator=generator, batch_size=batch_size, use_cache=use_cache,
                    cuda_graph=cuda_graph)
    out: list[list[int] | None] = [None] * len(prompts)  # (validated: a sequence or a 2-D tensor)
    for i, ids in it:
        out[i] = ids
    return out
