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
