"""A preallocated, static KV cache (gpt-fast style): fixed shapes, positions passed explicitly.

Nothing is stored on the model: the cache is an object the caller owns and passes to each forward,
so two generations never share state, and the decode step has static shapes (capturable in a CUDA graph).
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value buffers ``(B, H, max_len, D)`` in the model dtype."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int, *,
                 device=None, dtype: torch.dtype = torch.float32):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg = model.cfg
        param = model.tok_emb.weight
        return cls(cfg.n_layers, batch_size, cfg.n_heads, max_len or cfg.context_length, cfg.head_dim,
                   device=param.device, dtype=param.dtype)

    def rows(self, start: int, stop: int) -> KVCache:
        """The cache of batch rows ``start:stop``: views of these buffers, so writes land here too."""
        view = KVCache.__new__(KVCache)
        view.k = [k[start:stop] for k in self.k]  # (stop - start, H, max_len, D) views
        view.v = [v[start:stop] for v in self.v]
        view.batch_size, view.max_len = stop - start, self.max_len
        return view

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write ``k, v (B, H, T, D)`` at ``positions`` of layer ``layer``: ``(T,)`` the same for every
        row, or ``(B, T)`` per row (ragged batches). Returns the full buffers."""
        if positions.dim() == 2:
            index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, H, T, D)
            self.k[layer].scatter_(2, index, k.to(self.k[layer].dtype))
            self.v[layer].scatter_(2, index, v.to(self.v[layer].dtype))
        else:
            self.k[layer].index_copy_(2, positions, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, positions, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def packed(self, rows: list[int], starts: list[int], lengths: list[int]) -> PackedPrefill:
        """A view for one prefill of several sequences packed into one ``(1, total)`` input: sequence i
        goes to cache row ``rows[i]`` at positions ``starts[i] .. starts[i] + lengths[i] - 1``."""
        return PackedPrefill(self, rows, starts, lengths)


class PackedPrefill:
    """Where a packed prefill's tokens go and which keys they see (``KVCache.packed``).

    Sequence i's ``lengths[i]`` tokens are written to cache row ``rows[i]`` at positions
    ``starts[i]..``, and attend to that row's keys ``0 .. starts[i] + lengths[i] - 1`` (its cached
    prefix and itself): ``flash_attention_varlen`` over ``cu_seqlens_q`` / ``cu_seqlens_k``. The index
    tensors are built once here and shared by every layer.
    """

    def __init__(self, cache: KVCache, rows: list[int], starts: list[int], lengths: list[int]):
        if not (len(rows) == len(starts) == len(lengths)) or not rows:
            raise ValueError("rows, starts and lengths must be non-empty lists of one length")
        if len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= cache.batch_size:
            raise ValueError(f"rows must be distinct cache rows in [0, {cache.batch_size}), got {rows}")
        if min(starts) < 0 or min(lengths) <= 0:
            raise ValueError(f"starts must be >= 0 and lengths > 0, got {starts}, {lengths}")
        ends = [s + n for s, n in zip(starts, lengths)]
        if max(ends) > cache.max_len:
            raise ValueError(f"a prefill up to position {max(ends)} does not fit the cache of {cache.max_len}")
        self.cache, self.rows, self.starts, self.lengths, self.ends = cache, rows, starts, lengths, ends
        device = cache.k[0].device

        def cat(pieces):
            return torch.cat([torch.as_tensor(p, dtype=torch.long) for p in pieces]).to(device)

        # each written token (total_q,) and each key read (total_k,): its cache row and position
        self.q_rows = cat([[r] * n for r, n in zip(rows, lengths)])
        self.positions = cat([range(s, e) for s, e in zip(starts, ends)])
        self.k_rows = cat([[r] * e for r, e in zip(rows, ends)])
        self.k_positions = cat([range(e) for e in ends])
        self.cu_seqlens_q = cat([[0], lengths]).cumsum(0).to(torch.int32)  # (n + 1,)
        self.cu_seqlens_k = cat([[0], ends]).cumsum(0).to(torch.int32)  # (n + 1,)
        self.last = (self.cu_seqlens_q[1:] - 1).long()  # (n,) each sequence's last token in the packing
        self.max_seqlen_q, self.max_seqlen_k = max(lengths), max(ends)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the packed ``k, v (total_q, H, D)`` into their rows and positions; return every
        sequence's keys and values, packed ``(total_k, H, D)`` (cached prefix, then the new ones)."""
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]  # (B, H, L, D)
        k_cache[self.q_rows, :, self.positions] = k.to(k_cache.dtype)  # (total_q, H, D) slots
        v_cache[self.q_rows, :, self.positions] = v.to(v_cache.dtype)
        return k_cache[self.k_rows, :, self.k_positions], v_cache[self.k_rows, :, self.k_positions]
