"""One config source for every model: the book's keys as a dataclass, with named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

# The book's configuration dict (chapter 4), kept under its name for readers following along.
GPT_CONFIG_124M = {
    "vocab_size": 50257,  # GPT-2 BPE vocabulary
    "context_length": 1024,  # maximum sequence length
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

_SIZES = {  # (emb_dim, n_layers, n_heads) of the four GPT-2 releases
    "gpt2-small": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}

# Hugging Face repository names of the pretrained releases.
HF_MODEL_NAMES = {"gpt2": "gpt2-small", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large",
                  "gpt2-xl": "gpt2-xl"}


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 hyperparameters with the book's names. Models accept this or the book's plain dict."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False

    def __post_init__(self):
        for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{key} must be a positive int, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= float(self.drop_rate) < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def presets(cls) -> list[str]:
        return ["tiny", *_SIZES]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """``tiny`` (a 4-layer, 128-wide model with context 128 for CPU runs and tests) or a GPT-2 size
        (``gpt2-small`` = the book's ``GPT_CONFIG_124M``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``)."""
        if name == "tiny":
            base = cls(context_length=128, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0)
        elif name in _SIZES:
            emb_dim, n_layers, n_heads = _SIZES[name]
            base = cls(emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads)
        else:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(cls.presets())}")
        return base.replace(**overrides) if overrides else base

    @classmethod
    def from_dict(cls, d: Mapping) -> GPTConfig:
        """Build from the book's dict; unknown keys are an error (a typo would otherwise pass silently)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown GPT config key(s) {unknown}; expected keys: {sorted(fields)}")
        return cls(**dict(d))

    @classmethod
    def coerce(cls, cfg: GPTConfig | Mapping) -> GPTConfig:
        """Accept a GPTConfig or the book's plain dict."""
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, Mapping):
            return cls.from_dict(cfg)
        raise TypeError(f"cfg must be a GPTConfig or a dict with the book's keys, got {type(cfg).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> GPTConfig:
        return dataclasses.replace(self, **changes)
