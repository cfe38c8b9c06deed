"""Hand-written Triton kernels for GPT-2, importable on their own (no import of ``gpt``).

Public API (docs/design.md): ``flash_attention``, ``decode_attention``, ``layer_norm``, ``add_layer_norm``,
``gelu``, ``linear_cross_entropy``, ``rms_norm``, ``add_rms_norm``, ``swiglu``, ``geglu``, ``apply_rotary`` and the drop-in modules
``LayerNorm``, ``GELU``, ``CausalSelfAttention``, ``RMSNorm``, ``GatedMLP``;
``register_hf_attention`` and ``replace_modules`` put them into other models (transformers imported lazily).
"""

from .attention import CausalSelfAttention, flash_attention
from .cross_entropy import linear_cross_entropy
from .decode import decode_attention
from .gelu import GELU, gelu
from .glu import GatedMLP, geglu, swiglu
from .integrations import register_hf_attention, replace_modules
from .layernorm import LayerNorm, add_layer_norm, layer_norm
from .rmsnorm import RMSNorm, add_rms_norm, rms_norm
from .rotary import apply_rotary

__all__ = [
    "flash_attention", "decode_attention", "CausalSelfAttention",
    "layer_norm", "add_layer_norm", "LayerNorm", "gelu", "GELU", "linear_cross_entropy",
    "register_hf_attention", "replace_modules",
    "rms_norm", "add_rms_norm", "RMSNorm", "swiglu", "geglu", "GatedMLP", "apply_rotary",
]
