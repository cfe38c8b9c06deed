"""The one KV-cache driver of generation: prefill at any offset, decode B rows, the CUDA graph.

``Decoder(model, batch_size, max_len=None, cuda_graph=False, strict=True)`` owns a static
``KVCache (B, H, max_len, D)`` of a model with ``supports_kv_cache`` (``gpt.GPTModel``) and runs it:

* ``prefill(tokens (B, T), start=0)``: every row's tokens at positions ``start..start+T-1``; they
  attend over the cache's ``0..start+T-1`` (what earlier prefills left there, and themselves,
  causally), so a prompt fed in chunks gives the logits of feeding it whole.
* ``prefill_rows(seqs, rows)``: several sequences of any lengths into their cache rows in one model
  call, packed ``(1, total)``: one ``flash_attention_varlen`` per layer.
* ``decode(tokens (B, 1), positions (B, 1))``: one token per row at its own position, each row
  attending to its own cache prefix (``decode_attention``): static shapes, no host sync. With
  ``cuda_graph`` the step is captured in a CUDA graph on first use and replayed after. When the capture
  fails, ``strict`` raises (``cuda_graph=True`` asked for explicitly); otherwise a RuntimeWarning and
  eager decoding.
* ``step(idx)`` (``gpt.generate`` / ``stream``: rows of one length) and ``step_rows(seqs, fresh)``
  (``gpt.generate_batch`` / ``iter_batch``: ragged slots) schedule the two: the next-token logits
  ``(B, V)`` of each row. Past ``context_length`` a row re-prefills its last ``context_length`` tokens
  every step (positions restart at 0 in the window), which is what uncached generation computes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .kv_cache import KVCache


def decode_step(model: nn.Module, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
    """One decode step: row b's ``tokens (B, 1)`` at ``positions (B, 1)``, attending to its cache
    ``0..positions[b]``. Static shapes, no host sync. Logits ``(B, V)``."""
    seqlens = (positions[:, 0] + 1).to(torch.int32)  # (B,) valid cache length per row
    return model(tokens, cache=cache, positions=positions, seqlens=seqlens)[:, -1, :]


class _GraphedDecode:
    """``decode_step`` captured once in a CUDA graph and replayed every step (gpt-fast's trick).

    A decode step of GPT-2 small is ~100 small kernels; launched from Python they cost more than they
    compute at small batch. The graph records them once against static buffers (the tokens, the
    positions, the KV cache, the logits) and replays them with one launch. The step first runs eagerly
    on a side stream (Triton compilation and autotuning, allocator warm-up: nothing of it may happen
    during capture), then is captured; each decode step writes the same cache slots as its eager twin,
    so the warm-up leaves nothing stale.
    """

    def __init__(self, model: nn.Module, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor):
        self.tokens, self.positions = tokens.clone(), positions.clone()  # static inputs (B, 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                decode_step(model, self.tokens, cache, self.positions)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_step(model, self.tokens, cache, self.positions)  # static output (B, V)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is overwritten by the next replay


class Decoder:
    """A KV cache of ``batch_size`` rows and the steps that fill and read it (see the module docstring)."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int | None = None, *,
                 cuda_graph: bool = False, strict: bool = True):
        self.model, self.ctx, self.B = model, model.cfg.context_length, batch_size
        self.cache = KVCache.for_model(model, batch_size, max_len)
        self.max_len = min(self.ctx, self.cache.max_len)
        self.device = self.cache.k[0].device
        self.cuda_graph, self.strict = cuda_graph, strict
        self.graphed: _GraphedDecode | None = None
        self.pos: int | None = None  # step(): the rows' common length in the cache

    def _check_fits(self, start: int, length: int) -> None:
        if start < 0 or length < 1:
            raise ValueError(f"a prefill needs start >= 0 and at least one token, got start {start}, "
                             f"{length} tokens")
        if start + length > self.max_len:
            raise ValueError(f"a prefill of {length} tokens at offset {start} reaches position "
                             f"{start + length}, past context_length {self.ctx} or the cache's "
                             f"{self.cache.max_len} positions")

    def prefill(self, tokens: torch.Tensor, start: int = 0, *, all_logits: bool = False) -> torch.Tensor:
        """``tokens (B, T)`` into every cache row at positions ``start..start+T-1``, attending over the
        row's cache ``0..start+T-1``. Last logits ``(B, V)``, or every position's ``(B, T, V)``."""
        B, T = tokens.shape
        if B != self.B:
            raise ValueError(f"prefill takes one row per cache row ({self.B}), got {B}")
        self._check_fits(start, T)
        positions = torch.arange(start, start + T, device=self.device)  # (T,)
        logits = self.model(tokens, cache=self.cache, positions=positions)  # (B, T, V)
        return logits if all_logits else logits[:, -1, :]

    def prefill_rows(self, seqs: list[list[int]], rows: list[int],
                     starts: list[int] | None = None) -> torch.Tensor:
        """Sequence i (token ids) into cache row ``rows[i]`` at positions ``starts[i]..`` (default 0), all
        in one model call (packed, ``flash_attention_varlen``). Each sequence's last logits ``(n, V)``."""
        starts = [0] * len(seqs) if starts is None else list(starts)
        for s, start in zip(seqs, starts):
            self._check_fits(start, len(s))
        flat = [t for s in seqs for t in s]
        tokens = torch.tensor(flat, dtype=torch.long, device=self.device).view(1, -1)  # (1, total)
        packed = self.cache.packed(list(rows), starts, [len(s) for s in seqs])
        return self.model(tokens, cache=packed)[0]  # (n, V)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Row b's ``tokens (B, 1)`` at ``positions (B, 1)``; logits ``(B, V)``. Replayed from a CUDA graph
        when ``cuda_graph`` (captured on the first call; a failed capture raises when ``strict``, else
        warns once and decodes eagerly from then on)."""
        if self.cuda_graph and self.graphed is None:
            try:
                self.graphed = _GraphedDecode(self.model, self.cache, tokens, positions)
            except RuntimeError as e:  # asked for explicitly -> raise; automatic -> eager
                if self.strict:
                    raise
                warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding eagerly",
                              RuntimeWarning, stacklevel=2)
                self.cuda_graph = False
        if self.cuda_graph:
            return self.graphed(tokens, positions)
        return decode_step(self.model, tokens, self.cache, positions)

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, V)`` of ``idx (B, T)`` (rows of one length), which grows by one token
        per call: the first call (and every call past ``context_length``) prefills the last window,
        the others decode ``idx[:, -1:]``."""
        if self.pos is None or self.pos >= self.ctx:
            window = idx[:, -self.ctx:]  # (B, <=ctx)
            self.pos = window.shape[1]
            return self.prefill(window)
        positions = torch.full((idx.shape[0], 1), self.pos, device=idx.device)  # (B, 1)
        self.pos += 1
        return self.decode(idx[:, -1:], positions)

    def step_rows(self, seqs: list[list[int] | None], fresh: list[bool]) -> torch.Tensor:
        """Next-token logits ``(B, V)`` of the slots: ``seqs[b]`` row b's prompt and tokens so far (None:
        empty), ``fresh[b]`` True when it entered this step. Rows already in the cache decode together
        (the others decode a dummy token at position 0 first); the fresh rows and those past the
        context then prefill their windows in one packed call. Empty slots get zero logits."""
        decode = [s is not None and not f and len(s) <= self.ctx for s, f in zip(seqs, fresh)]
        logits = None
        if any(decode):
            tok = [s[-1] if d else 0 for s, d in zip(seqs, decode)]
            pos = [len(s) - 1 if d else 0 for s, d in zip(seqs, decode)]  # dummy rows: position 0
            tokens = torch.tensor(tok, device=self.device).view(self.B, 1)  # (B, 1)
            positions = torch.tensor(pos, device=self.device).view(self.B, 1)  # (B, 1)
            logits = self.decode(tokens, positions)  # (B, V)
        rows = [b for b, (s, d) in enumerate(zip(seqs, decode)) if s is not None and not d]
        if rows:
            new = self.prefill_rows([seqs[b][-self.ctx:] for b in rows], rows)  # (n, V)
            if logits is None:
                logits = new.new_zeros(self.B, new.shape[-1])
            logits[torch.tensor(rows, device=logits.device)] = new
        empty = [b for b, s in enumerate(seqs) if s is None]
        if empty:
            logits[torch.tensor(empty, device=logits.device)] = 0  # sampled but never used
        return logits
