"""GPT-2 on the fused Triton kernels, with exactly the reference model's state_dict.

Differences from ``gpt.reference`` are in how, never in what: one QKV GEMM feeding flash attention
through strided views (no copies, no T×T mask, no saved attention matrix), each block's shortcut add
fused with the next LayerNorm (``add_layer_norm``: one pass over memory instead of two), the Triton
GELU, and a KV-cached inference path (prefill with ``flash_attention``, decode with
``decode_attention``) whose cache the caller owns (``gpt.kv_cache.KVCache``).

Residual stream, with ``LN_next`` the next block's ``norm1`` (or ``final_norm`` after the last block)::

    normed, resid = LN1(x), x
    per block:  a = att(normed);   normed, resid = add_layer_norm(drop(a), resid, norm2)
                f = ff(normed);    normed, resid = add_layer_norm(drop(f), resid, LN_next)
    logits = out_head(normed)

which is the book's ``x = x + drop(att(norm1(x))); x = x + drop(ff(norm2(x)))`` reassociated.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import (
    GELU,
    CausalSelfAttention,
    add_layer_norm,
    decode_attention,
    flash_attention,
    flash_attention_varlen,
    layer_norm,
    linear_cross_entropy,
)

from . import export, weights
from .config import GPTConfig
from .kv_cache import KVCache, PackedPrefill


class LayerNorm(nn.Module):
    """The book's LayerNorm (``scale``/``shift``, eps 1e-5) on the fused kernel."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.scale, self.shift, self.eps)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(approximate="tanh"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Attention(CausalSelfAttention):
    """``kernels.CausalSelfAttention`` (the book's ``MultiHeadAttention`` names, one QKV GEMM, flash
    attention) plus the KV-cached inference step."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.emb_dim, cfg.emb_dim, cfg.context_length, cfg.drop_rate, cfg.n_heads,
                         qkv_bias=cfg.qkv_bias)

    def forward_cached(self, x: torch.Tensor, cache: KVCache | PackedPrefill, layer: int,
                       positions: torch.Tensor, seqlens: torch.Tensor | None,
                       kv_len: int | None = None) -> torch.Tensor:
        """Inference with the cache. Decode (``seqlens (b,)``): write k/v at ``positions`` and attend
        with ``decode_attention`` over each row's cache prefix. Prefill at any offset (``seqlens`` None,
        consecutive ``positions (T,)`` ending at ``kv_len - 1``): write k/v, then flash attention of the
        T queries over the cache's ``0..kv_len-1`` (causal bottom-right: the cached prefix and the
        chunk's own earlier tokens). A ``PackedPrefill`` (x ``(1, total, C)``): its sequences at once,
        ``flash_attention_varlen`` over each one's cache row."""
        q, k, v = self.qkv(x)  # 3 x (b, H, T, D)
        if isinstance(cache, PackedPrefill):
            keys, values = cache.update(layer, k[0].transpose(0, 1), v[0].transpose(0, 1))  # (total_k, H, D)
            ctx = flash_attention_varlen(q[0].transpose(0, 1), keys, values, cache.cu_seqlens_q,
                                         cache.cu_seqlens_k, cache.max_seqlen_q, cache.max_seqlen_k,
                                         causal=True)  # (total_q, H, D)
            return self.merge(ctx.transpose(0, 1).unsqueeze(0))  # (1, H, total_q, D)
        k_cache, v_cache = cache.update(layer, positions, k, v)
        if seqlens is None:
            ctx = flash_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], causal=True)
        else:
            ctx = decode_attention(q, k_cache, v_cache, seqlens)
        return self.merge(ctx)

    def forward_varlen(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Causal attention within spans of the flattened ``b * T`` tokens (``cu_seqlens`` int32 ``(n+1,)``
        prefix sums, each span at most ``max_seqlen`` long): no token attends across a span boundary
        (``--doc-mask``: the documents of each window)."""
        b, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = (t.transpose(1, 2).reshape(b * T, H, D) for t in self.qkv(x))  # (b, H, T, D) -> (b*T, H, D)
        dropout_p = self.dropout_p if self.training else 0.0
        ctx = flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                     dropout_p=dropout_p)  # (b*T, H, D)
        return self.merge(ctx.view(b, T, H, D).transpose(1, 2))  # (b, T, H, D) -> (b, H, T, D)


class TransformerBlock(nn.Module):
    """The book's block (``att``, ``ff``, ``norm1``, ``norm2``, ``drop_shortcut``). The model drives the
    fused residual stream; ``forward`` alone is the book's block for use on its own."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = Attention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        normed, x = add_layer_norm(self.drop_shortcut(self.att(normed)), x, self.norm2.scale, self.norm2.shift)
        return x + self.drop_shortcut(self.ff(normed))


class GPTModel(nn.Module):
    """GPT-2 on the fused kernels; ``model(idx)`` maps ``(b, T)`` token ids to logits ``(b, T, vocab)``."""

    supports_kv_cache = True  # gpt.generate uses prefill/decode with a KVCache

    def __init__(self, cfg: GPTConfig | dict, *, tie_weights: bool = False):
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if tie_weights:  # GPT-2's tying; the state_dict keeps both keys (same tensor)
            self.out_head.weight = self.tok_emb.weight

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))  # (b, T, emb_dim)

    def _next_norm(self, i: int) -> LayerNorm:
        return self.trf_blocks[i + 1].norm1 if i + 1 < len(self.trf_blocks) else self.final_norm

    def forward(self, in_idx: torch.Tensor, *, targets: torch.Tensor | None = None, ignore_index: int = -100,
                reduction: str = "mean", cache: KVCache | None = None, positions: torch.Tensor | None = None,
                seqlens: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """Logits ``(b, T, vocab)``; with ``targets`` the token loss instead (see ``loss``).

        With ``cache``: ``positions (T,)`` (or per row ``(b, T)``) are the tokens' absolute positions
        (written into the cache); ``seqlens (b,)`` int32 switches to decode attention. Without ``seqlens``
        it is a prefill at any offset: consecutive ``positions (T,)`` (default ``0..T-1``), attending over
        the cached prefix too (gpt/decoder.py drives it); a ``cache.packed(...)`` view prefills several
        sequences packed in ``in_idx (1, total)`` and returns each one's last logits ``(1, n, vocab)``.

        ``cu_seqlens`` int32 ``(n+1,)`` (no cache): attention stays within those spans of the flattened
        ``b * T`` tokens, each at most ``max_seqlen`` (default ``T``) long; ``positions`` then gives each
        token's position (``gpt.data.document_spans``: per document)."""
        _, T = in_idx.shape
        if cu_seqlens is not None and cache is not None:
            raise ValueError("cu_seqlens (document-masked attention) is for training; it excludes a KV cache")
        if T > self.cfg.context_length and cache is None and (positions is None or cu_seqlens is not None):
            raise ValueError(f"sequence length {T} exceeds context_length {self.cfg.context_length}")
        kv_len = None  # a prefill's keys: cache positions 0..kv_len-1
        if isinstance(cache, PackedPrefill):  # (its rows, starts and lengths were checked against its cache)
            positions, kv_len = cache.positions.view(1, -1), cache.max_seqlen_k  # (1, total)
        elif cache is not None and seqlens is None:
            if positions is None:
                positions = torch.arange(T, device=in_idx.device)
            if positions.dim() != 1 or positions.shape[0] != T:
                raise ValueError(f"a cached prefill takes positions (T,) = ({T},), got {tuple(positions.shape)}")
            kv_len = int(positions[-1]) + 1 if T else 0  # one host read per prefill, none per layer
            if kv_len > cache.max_len:
                raise ValueError(f"a prefill up to position {kv_len} does not fit the cache of {cache.max_len}")
        if kv_len is not None and kv_len > self.cfg.context_length:
            raise ValueError(f"a prefill up to position {kv_len} exceeds context_length {self.cfg.context_length}")
        if positions is None:
            positions = torch.arange(T, device=in_idx.device)
        x = self._embed(in_idx, positions)
        first = self.trf_blocks[0].norm1
        normed, resid = layer_norm(x, first.scale, first.shift, first.eps), x
        for i, block in enumerate(self.trf_blocks):
            if cu_seqlens is not None:
                a = block.att.forward_varlen(normed, cu_seqlens, T if max_seqlen is None else max_seqlen)
            elif cache is None:
                a = block.att(normed)
            else:
                a = block.att.forward_cached(normed, cache, i, positions, seqlens, kv_len)
            normed, resid = add_layer_norm(block.drop_shortcut(a), resid, block.norm2.scale, block.norm2.shift)
            nxt = self._next_norm(i)
            normed, resid = add_layer_norm(block.drop_shortcut(block.ff(normed)), resid, nxt.scale, nxt.shift)
        if targets is not None:  # the head fused with the loss: no (b, T, vocab) logits
            return linear_cross_entropy(normed, self.out_head.weight, targets, self.out_head.bias,
                                        ignore_index=ignore_index, reduction=reduction)
        if isinstance(cache, PackedPrefill):  # only each sequence's last token: (1, n, emb_dim)
            normed = normed[:, cache.last]
        return self.out_head(normed)  # (b, T, vocab_size)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             reduction: str = "mean") -> torch.Tensor:
        """Mean next-token cross-entropy of ``targets (b, T)`` over the positions not equal to
        ``ignore_index`` (0 if there are none), computed by ``kernels.linear_cross_entropy`` on the final
        hidden states without materializing the logits. ``reduction="sum"`` sums, ``"none"`` gives the
        ``(b, T)`` fp32 token losses (0 where ignored). Same as ``model(idx, targets=targets)``, the form
        to use through DDP / ``torch.compile`` wrappers."""
        return self(idx, targets=targets, ignore_index=ignore_index, reduction=reduction)

    # Weights I/O lives in functions over state dicts (gpt.weights, gpt.export); these are their methods.
    from_pretrained = classmethod(weights.from_pretrained)
    save_pretrained = export.save_pretrained
