"""GPT-2 from scratch: config, the book's reference model, tokenizer, data, weights, generation."""

from .config import GPT_CONFIG_124M, GPTConfig
from .generate import generate

__all__ = ["GPTConfig", "GPT_CONFIG_124M", "generate"]
