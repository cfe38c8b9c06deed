"""The book's GPT-2 in plain PyTorch (chapter 4), with the book's module and parameter names.

This is the oracle every fused piece is checked against, and the ``--backend reference`` of train.py.
State-dict keys: ``tok_emb, pos_emb, trf_blocks.{i}.att.{W_query,W_key,W_value,out_proj},
trf_blocks.{i}.ff.layers.{0,2}, trf_blocks.{i}.norm{1,2}.{scale,shift}, final_norm, out_head``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import export, weights
from .attention import MultiHeadAttention
from .config import GPTConfig


class LayerNorm(nn.Module):
    """LayerNorm with the book's parameter names ``scale`` and ``shift`` (biased variance, eps 1e-5)."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    """GPT-2's tanh approximation of GELU, written out as in the book."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            num_heads=cfg.n_heads,
            dropout=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x  # (b, T, emb_dim)
        x = self.norm1(x)
        x = self.att(x)
        x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        return x + shortcut


class GPTModel(nn.Module):
    """The book's GPT-2. ``model(idx)`` with idx ``(b, T)`` token ids returns logits ``(b, T, vocab_size)``."""

    def __init__(self, cfg: GPTConfig | dict):
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def forward(self, in_idx: torch.Tensor, *, targets: torch.Tensor | None = None,
                ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
        """Logits ``(b, T, vocab_size)``; with ``targets`` the token loss instead (see ``loss``)."""
        batch_size, seq_len = in_idx.shape
        if seq_len > self.cfg.context_length:
            raise ValueError(f"sequence length {seq_len} exceeds context_length {self.cfg.context_length}")
        tok_embeds = self.tok_emb(in_idx)  # (b, T, emb_dim)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))  # (T, emb_dim)
        x = tok_embeds + pos_embeds
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        logits = self.out_head(x)  # (b, T, vocab_size)
        if targets is not None:
            return self._loss(logits, targets, ignore_index, reduction)
        return logits

    @staticmethod
    def _loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str = "mean") -> torch.Tensor:
        """The book's ``cross_entropy`` (in fp32) over the non-ignored positions; mean (0 if there are
        none), sum, or per token ``(b, T)`` (0 where ignored)."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                           ignore_index=ignore_index, reduction="none" if reduction == "none" else "sum")
        if reduction == "none":
            return loss.view(targets.shape)
        return loss if reduction == "sum" else loss / (targets != ignore_index).sum().clamp(min=1)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             reduction: str = "mean") -> torch.Tensor:
        """Mean next-token cross-entropy of ``targets (b, T)`` over the positions not equal to
        ``ignore_index``: plain ``cross_entropy`` on the logits; ``reduction`` ``"sum"`` or ``"none"``
        (``(b, T)``, 0 where ignored) as the fused model. Same as ``model(idx, targets=targets)``."""
        return self(idx, targets=targets, ignore_index=ignore_index, reduction=reduction)

    # Weights I/O lives in functions over state dicts (gpt.weights, gpt.export); these are their methods.
    from_pretrained = classmethod(weights.from_pretrained)
    save_pretrained = export.save_pretrained
