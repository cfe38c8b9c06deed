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
``torch.nn.RMSNorm`` and the RMSNorm modules of transformers' Llama, Mistral, Qwen2/3 and Gemma 1/2/3
for ``kernels.RMSNorm`` (the same weight, eps; Gemma's ``1 + weight`` as ``offset=1``) and those
families' gated MLPs for ``kernels.GatedMLP`` (the same Linear modules, the fused SiLU/GELU gate);
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
from .glu import GatedMLP
from .layernorm import LayerNorm
from .rmsnorm import RMSNorm

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


# The Llama family's modules that ``replace_modules`` swaps, by transformers module: its RMSNorm classes
# (attribute holding eps; the offset of ``offset + weight``) and its gated MLP classes
# (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``). Looked up only among already-imported modules.
_HF_FAMILIES = {
    "llama": ("LlamaRMSNorm", "LlamaMLP", "variance_epsilon", 0.0),
    "mistral": ("MistralRMSNorm", "MistralMLP", "variance_epsilon", 0.0),
    "qwen2": ("Qwen2RMSNorm", "Qwen2MLP", "variance_epsilon", 0.0),
    "qwen3": ("Qwen3RMSNorm", "Qwen3MLP", "variance_epsilon", 0.0),
    "gemma": ("GemmaRMSNorm", "GemmaMLP", "eps", 1.0),
    "gemma2": ("Gemma2RMSNorm", "Gemma2MLP", "eps", 1.0),
    "gemma3": ("Gemma3RMSNorm", "Gemma3MLP", "eps", 1.0),
}


def _hf_family_classes() -> tuple[dict[type, tuple[str, float]], set[type]]:
    """``({RMSNorm class: (eps attribute, offset)}, {gated MLP class})`` of the loaded transformers models."""
    norms: dict[type, tuple[str, float]] = {}
    mlps: set[type] = set()
    for family, (norm_name, mlp_name, eps_attr, offset) in _HF_FAMILIES.items():
        mod = sys.modules.get(f"transformers.models.{family}.modeling_{family}")
        if mod is None:
            continue
        if isinstance(getattr(mod, norm_name, None), type):
            norms[getattr(mod, norm_name)] = (eps_attr, offset)
        if isinstance(getattr(mod, mlp_name, None), type):
            mlps.add(getattr(mod, mlp_name))
    return norms, mlps


def _gated_activation_of(act: nn.Module, gelus: dict[type, str]) -> str | None:
    """``GatedMLP``'s activation name for an MLP's ``act_fn`` module (None: not one we fuse)."""
    acts = sys.modules.get("transformers.activations")
    if type(act) is nn.SiLU or (acts is not None and type(act) is getattr(acts, "SiLUActivation", None)):
        return "silu"
    if type(act) is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if type(act) in gelus:
        return "gelu_tanh" if gelus[type(act)] == "tanh" else "gelu"
    return None


def _swap_rms_norm(old: nn.Module, eps, offset: float) -> nn.Module:
    w = old.weight
    if w is not None and w.dtype not in SUPPORTED_DTYPES:
        return old  # float64 and friends: the kernel has no such path
    shape = getattr(old, "normalized_shape", None) or tuple(w.shape)
    new = RMSNorm(shape, eps=eps, offset=offset, elementwise_affine=w is not None, device="meta")
    new.weight = old.weight  # the same Parameter object (optimizers keep working)
    return new.train(old.training)


def _swap_gated_mlp(old: nn.Module, gelus: dict[type, str]) -> nn.Module:
    parts = [getattr(old, n, None) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    if any(not isinstance(p, nn.Module) for p in parts):
        return old
    activation = _gated_activation_of(parts[3], gelus)
    if activation is None:
        return old  # an activation without a fused kernel: left alone
    return GatedMLP(*parts[:3], activation=activation).train(old.training)


def replace_modules(model: nn.Module, *, layer_norm: bool = True, gelu: bool = True, rms_norm: bool = True,
                    mlp: bool = True) -> nn.Module:
    """Replace submodules of ``model`` with the Triton-kernel ones, in place; returns ``model``.

    * ``layer_norm``: ``torch.nn.LayerNorm`` -> ``kernels.LayerNorm``;
    * ``gelu``: ``torch.nn.GELU`` and transformers' GELU activations -> ``kernels.GELU``;
    * ``rms_norm``: ``torch.nn.RMSNorm`` and the RMSNorm of transformers' Llama, Mistral, Qwen2, Qwen3
      (``q_norm``/``k_norm`` included), Gemma, Gemma2 and Gemma3 (offset 1) -> ``kernels.RMSNorm``;
    * ``mlp``: those families' gated MLPs (``gate_proj``/``up_proj``/``down_proj`` with a SiLU or GELU
      ``act_fn``) -> ``kernels.GatedMLP`` holding the same Linear modules.

    Parameters are the same objects, settings (``eps``, ``elementwise_affine``, ``approximate``, the
    activation) and train/eval mode carry over, state_dict keys are unchanged; a module shared by several
    parents stays shared. Exact types only: subclasses and unrecognized modules are left alone, and so
    are modules with float64 parameters. ``model`` itself is never replaced (wrap it in a container to
    swap a bare module). No class or function of torch or transformers is patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, flag in (("layer_norm", layer_norm), ("gelu", gelu), ("rms_norm", rms_norm), ("mlp", mlp)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    hf_gelus = _hf_gelu_classes()
    gelus = {nn.GELU: None, **hf_gelus} if gelu else {}
    hf_norms, hf_mlps = _hf_family_classes()
    swapped: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in swapped:
                kind = type(child)
                if layer_norm and kind is nn.LayerNorm:
                    swapped[id(child)] = _swap_layer_norm(child)
                elif kind in gelus:
                    approx = gelus[kind] or child.approximate
                    swapped[id(child)] = GELU(approximate=approx).train(child.training)
                elif rms_norm and kind is nn.RMSNorm:
                    swapped[id(child)] = _swap_rms_norm(child, child.eps, 0.0)
                elif rms_norm and kind in hf_norms:
                    eps_attr, offset = hf_norms[kind]
                    swapped[id(child)] = _swap_rms_norm(child, float(getattr(child, eps_attr)), offset)
                elif mlp and kind in hf_mlps:
                    swapped[id(child)] = _swap_gated_mlp(child, hf_gelus)
                else:
                    continue
            setattr(parent, child_name, swapped[id(child)])
    return model
