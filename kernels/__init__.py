"""Hand-written Triton kernels for GPT-2, importable on their own (no import of ``gpt``).

Public API (DESIGN.md): ``flash_attention``, ``decode_attention``, ``layer_norm``, ``add_layer_norm``,
``gelu`` and the drop-in modules ``LayerNorm``, ``GELU``, ``CausalSelfAttention``.
"""

from .attention import CausalSelfAttention, flash_attention
from .decode import decode_attention
from .gelu import GELU, gelu
from .layernorm import LayerNorm, add_layer_norm, layer_norm

__all__ = [
    "flash_attention", "decode_attention", "CausalSelfAttention",
    "layer_norm", "add_layer_norm", "LayerNorm", "gelu", "GELU",
]
