"""The kernels inside models this project did not write: Hugging Face attention, module replacement.

Importing this file (and ``kernels``) never imports ``transformers``: ``register_hf_attention`` imports it
when called, and ``replace_modules`` only recognizes transformers' GELU classes when the model's code has
already imported them.

``register_hf_attention(name)`` adds ``hf_flash_attention`` to transformers' ``AttentionInterface`` under
``name`` (and transformers' SDPA mask builder to ``AttentionMaskInterface``, so padding still reaches the
attention: transformers hands a custom attention with no mask builder no mask at all). A model loaded with
``attn_implementation=name`` then runs ``kernels.flash_attention`` wherever the attention is plain causal
self-attention — no mask tensor, or one that is exactly the causal pattern — and transformers'
``sdpa_attention_forward`` for everything else:

* a padding (or any other) mask, cross-attention or non-causal modules (``module.is_causal`` false),
* head_dim outside 16..128, different query/value head sizes, dtypes other than fp32/fp16/bf16,
* ``softcap``, ``sliding_window``, ``position_bias``, attention sinks, paged caches, ``output_attentions``.

Grouped-query attention repeats the key/value heads. Dropout follows eager attention: ``dropout`` applies
only while ``module.training``. A single query (decoding) attends to every key; a prefill whose keys
extend past the queries with no mask (a static cache's empty slots) keeps the first Tq keys, as SDPA does.

``replace_modules(model)`` swaps ``torch.nn.LayerNorm`` for ``kernels.LayerNorm`` (the same Parameter
objects, eps, elementwise_affine) and ``torch.nn.GELU`` for ``kernels.GELU`` (same ``approximate``);
exact types only, so subclasses with their own behaviour are left alone. When transformers' activations
are loaded its GELU classes are swapped too: ``NewGELUActivation``, ``GELUTanh`` and ``FastGELUActivation``
(the tanh form) and ``GELUActivation`` (erf). No class or function of torch or transformers is patched;
hooks registered on a replaced module stay with the old module.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .attention import MAX_HEAD_DIM, MIN_HEAD_DIM, flash_attention
from .gelu import GELU
from .layernorm import LayerNorm

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Attention features the kernel does not implement: any of these set sends the call to SDPA.
UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "position_bias", "s_aux", "sinks", "output_attentions")
BUILTIN_NAMES = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------

def _is_causal_mask(mask: torch.Tensor, q_len: int, k_len: int) -> bool:
    """Whether a 4-D mask (bool: True = attend; float: 0 = attend) is exactly the bottom-right causal
    pattern for every batch row and head. Reads the mask (a device sync): only masks that arrive anyway."""
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, k_len) or torch.compiler.is_compiling():
        return False
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        return False  # an additive bias, not a mask
    rows = torch.arange(q_len, device=mask.device)[:, None] + (k_len - q_len)
    causal = rows >= torch.arange(k_len, device=mask.device)[None, :]  # (Tq, Tk)
    return bool((allowed == causal).all())


def _kernel_reason(module, query, key, value, attention_mask, is_causal, kwargs) -> str | None:
    """Why the kernel cannot serve this call (None when it can)."""
    if any(kwargs.get(k) not in (None, False) for k in UNSUPPORTED_KWARGS) or kwargs.get("cache") is not None:
        return "unsupported option"
    if not is_causal:
        return "not causal (cross-attention or an encoder)"
    if query.dtype not in SUPPORTED_DTYPES or not (query.dtype == key.dtype == value.dtype):
        return "dtype"
    if query.dim() != 4 or not (query.shape[-1] == key.shape[-1] == value.shape[-1]):
        return "head sizes"
    if not MIN_HEAD_DIM <= query.shape[-1] <= MAX_HEAD_DIM:
        return "head_dim"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0:
        return "heads"
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is not None and not _is_causal_mask(attention_mask, q_len, k_len):
        return "mask"
    return None


def hf_flash_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q ``(B, H, Tq, D)``, k/v ``(B, Hkv, Tk, D)`` ->
    ``(attn_output (B, Tq, H, D), None)``; ``kernels.flash_attention`` or SDPA (module docstring)."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if _kernel_reason(module, query, key, value, attention_mask, is_causal, kwargs) is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    B, H, q_len, D = query.shape
    k_len = key.shape[2]
    if attention_mask is None and 1 < q_len < k_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]  # empty static-cache slots (SDPA's top-left rule)
    n_rep = H // key.shape[1]
    if n_rep > 1:  # grouped-query attention: (B, Hkv, Tk, D) -> (B, H, Tk, D)
        key = key[:, :, None].expand(B, key.shape[1], n_rep, *key.shape[2:]).reshape(B, H, -1, D)
        value = value[:, :, None].expand(B, value.shape[1], n_rep, *value.shape[2:]).reshape(B, H, -1, D)
    p = float(dropout) if module.training else 0.0
    out = flash_attention(query, key, value, causal=q_len > 1, softmax_scale=scaling, dropout_p=p)  # (B, H, Tq, D)
    return out.transpose(1, 2), None  # (B, Tq, H, D), contiguous: the kernel stores it that way


def register_hf_attention(name: str = "triton_attention") -> str:
    """Register ``kernels.flash_attention`` with transformers as ``attn_implementation=name``; returns ``name``.

    ``AutoModel*.from_pretrained(..., attn_implementation=name)`` (or ``model.set_attn_implementation``)
    then runs the kernel for causal self-attention without padding and transformers' SDPA otherwise.
    transformers reads any implementation name containing "flash" as a flash-attn package (and fails to
    load it), a "/" as a Hub kernel repository and "|" as a paged variant: such names are refused."""
    if not isinstance(name, str) or not name or any(c in name for c in "/|:") or name.strip() != name:
        raise ValueError(f"name must be a plain non-empty string without '/', '|' or ':', got {name!r}")
    if name in BUILTIN_NAMES:
        raise ValueError(f"name {name!r} is one of transformers' own attention implementations; choose another")
    if "flash" in name.lower():
        raise ValueError(f"name {name!r} contains 'flash': transformers would treat it as the flash-attn package "
                         "and refuse to load the model; choose another name (default 'triton_attention')")
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError as e:
        raise ImportError(f"register_hf_attention needs transformers (pip install transformers): {e}") from None
    AttentionInterface.register(name, hf_flash_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


# ---------------------------------------------------------------------------------------------------
# Module replacement
# ---------------------------------------------------------------------------------------------------

def _hf_gelu_classes() -> dict[type, str]:
    """transformers' GELU activation classes -> ``approximate``, when its activations module is loaded."""
    acts = sys.modules.get("transformers.activations")
    if acts is None:
        return {}
    table = {"NewGELUActivation": "tanh", "GELUTanh": "tanh", "FastGELUActivation": "tanh"}
    out = {getattr(acts, n): a for n, a in table.items() if isinstance(getattr(acts, n, None), type)}
    if isinstance(getattr(acts, "GELUActivation", None), type):
        out[acts.GELUActivation] = "none"
    return out


def _swap_layer_norm(old: nn.LayerNorm) -> nn.Module:
    w = old.weight
    if w is not None and w.dtype not in SUPPORTED_DTYPES:
        return old  # float64 and friends: the kernel has no such path
    new = LayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                    bias=old.bias is not None, device="meta")
    new.weight, new.bias = old.weight, old.bias  # the same Parameter objects (optimizers keep working)
    return new.train(old.training)


def replace_modules(model: nn.Module, *, layer_norm: bool = True, gelu: bool = True) -> nn.Module:
    """Replace ``torch.nn.LayerNorm`` and ``torch.nn.GELU`` submodules of ``model`` (and transformers'
    GELU activations) with ``kernels.LayerNorm`` / ``kernels.GELU``, in place; returns ``model``.

    Parameters are the same objects, settings (``eps``, ``elementwise_affine``, ``approximate``) and
    train/eval mode carry over; a module shared by several parents stays shared. ``model`` itself is
    never replaced (wrap it in a container to swap a bare ``LayerNorm``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layer_norm, bool) or not isinstance(gelu, bool):
        raise TypeError("layer_norm and gelu must be bools")
    gelus = {nn.GELU: None, **_hf_gelu_classes()} if gelu else {}
    swapped: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in swapped:
                if layer_norm and type(child) is nn.LayerNorm:
                    swapped[id(child)] = _swap_layer_norm(child)
                elif type(child) in gelus:
                    approx = gelus[type(child)] or child.approximate
                    swapped[id(child)] = GELU(approximate=approx).train(child.training)
                else:
                    continue
            setattr(parent, child_name, swapped[id(child)])
    return model
