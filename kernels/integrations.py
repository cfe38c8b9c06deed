"""The kernels inside models this project did not write: Hugging Face attention, module replacement.

Importing this file (and ``kernels``) never imports ``transformers``: ``register_hf_attention`` imports it
when called, and ``replace_modules`` only recognizes transformers' GELU classes when the model's code has
already imported them.

``register_hf_attention(name, fallback=True)`` adds ``hf_flash_attention`` to transformers'
``AttentionInterface`` and ``hf_attention_mask`` to its ``AttentionMaskInterface`` under ``name``. A model
loaded with ``attn_implementation=name`` then runs our kernels, never SDPA, for causal self-attention:

* grouped-query / multi-query heads: k/v go to the kernels as ``(B, Hk, Tk, D)`` (no ``repeat_kv`` copy);
* no padding: ``kernels.flash_attention`` (causal bottom-right, so a dynamic cache's Tq < Tk is right);
* padding: the mask function hands over the 2-D key padding mask (transformers' flash-attention way) and
  the call is unpadded into one ``kernels.flash_attention_varlen`` (left, right or mixed padding; padding
  queries get zeros, as in transformers' flash-attention integration);
* the layer's ``sliding_window`` (W keys, itself included: transformers' ``kv > q - W``) and ``softcap``.

The mask function recognizes transformers' plain causal and sliding-window causal patterns structurally
(same code, equal captured values); anything else (packed sequences from ``position_ids``, or/and mask
overlays, bidirectional blocks, chunked attention, static caches) gets SDPA's 4-D mask, which the kernels
serve only when it is exactly the causal pattern. A call the kernels cannot serve (such a mask,
non-causal or cross-attention, head_dim outside 16..128, other dtypes, ``position_bias``, sinks,
``output_attentions``, a sliding window over a row with padding between its tokens) goes, with
``fallback=True``, to transformers' ``sdpa_attention_forward`` with the exact mask the kernels would have
applied (plain PyTorch when ``softcap`` is set: SDPA has none); with ``fallback=False`` it raises
NotImplementedError naming why. Dropout applies only while ``module.training``.

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
import torch.nn.functional as F
from torch import nn

from .attention import MAX_HEAD_DIM, MIN_HEAD_DIM, flash_attention, flash_attention_varlen
from .gelu import GELU
from .glu import GatedMLP
from .layernorm import LayerNorm
from .rmsnorm import RMSNorm

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Attention features the kernels do not implement: any of these set is a call they cannot serve.
UNSUPPORTED_KWARGS = ("position_bias", "s_aux", "sinks", "output_attentions")
BUILTIN_NAMES = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")


# ---------------------------------------------------------------------------------------------------
# Attention: the mask transformers builds for us
# ---------------------------------------------------------------------------------------------------

def _same_function(f, g) -> bool:
    """Whether two mask functions are the same code over equal captured values (closures compared cell by
    cell, recursively): how a mask function built by transformers' own factories is recognized."""
    if f is g:
        return True
    code = getattr(f, "__code__", None)
    if code is None or code is not getattr(g, "__code__", None):
        return False
    cf, cg = f.__closure__ or (), g.__closure__ or ()
    return len(cf) == len(cg) and all(_same_value(a.cell_contents, b.cell_contents) for a, b in zip(cf, cg))


def _same_value(a, b) -> bool:
    if callable(a) and hasattr(a, "__code__"):
        return _same_function(a, b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_same_value, a, b))
    return type(a) is type(b) and isinstance(a, (int, float, str, bool, type(None))) and a == b


def _plain_causal_pattern(mask_function, local_size) -> bool:
    """Whether transformers asks for the plain causal pattern, or the causal sliding-window one of
    ``create_sliding_window_causal_mask`` (W = ``local_size``), with no overlay (packed sequences from
    ``position_ids``, ``or_mask_function``/``and_mask_function``, bidirectional blocks, chunks)."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    if mask_function is causal_mask_function:
        return True
    return (isinstance(local_size, int) and local_size >= 1
            and _same_function(mask_function, sliding_window_causal_mask_function(local_size)))


def hf_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                      mask_function=None, attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                      **kwargs) -> torch.Tensor | None:
    """transformers' ``AttentionMaskInterface`` signature. For the plain causal (or sliding-window causal)
    pattern: ``None`` when no key is padding, else the bool padding mask ``(batch_size, kv_length)`` of the
    keys the layer sees (True = a token), as transformers' flash-attention mask does (the window itself comes
    from the layer's ``sliding_window`` argument). Anything else (an overlay on the pattern, or a static
    cache, whose keys outnumber the tokens seen) gets SDPA's 4-D bool mask, which the attention serves only
    when it is exactly causal."""
    from transformers.masking_utils import sdpa_mask

    # Tokens seen so far, padding included: the keys must be the last kv_length of them (a static cache's
    # keys run past them into empty slots that only a 4-D mask hides).
    seen = q_offset + q_length if attention_mask is None else attention_mask.shape[-1]
    if (mask_function is not None and _plain_causal_pattern(mask_function, local_size)
            and isinstance(seen, int) and seen == kv_offset + kv_length
            and (attention_mask is None or attention_mask.dim() == 2)):
        if attention_mask is None:
            return None
        keys = attention_mask[:, seen - kv_length:].to(torch.bool)
        return None if bool(keys.all()) else keys
    # Never None for a causal pattern: SDPA reads None as its top-left is_causal, the kernels as bottom-right.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Attention: the call
# ---------------------------------------------------------------------------------------------------

def _dense_mask(mask: torch.Tensor | None, q_len: int, k_len: int, window: int | None,
                device: torch.device) -> torch.Tensor:
    """The bool mask ``(B or 1, 1, Tq, Tk)`` (True = attend) of bottom-right causal attention with an
    optional window, and the 2-D key padding mask when given: what the kernels compute, for SDPA."""
    pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    key = torch.arange(k_len, device=device)[None, :]
    allowed = key <= pos
    if window is not None:
        allowed = allowed & (key > pos - window)
    allowed = allowed[None, None]
    if mask is not None and mask.dim() == 2:
        allowed = allowed & mask[:, None, None, :].to(torch.bool)
    return allowed


def _window(kwargs) -> int | None:
    w = kwargs.get("sliding_window")
    return None if w is None else int(w)


def _softcap(kwargs) -> float:
    c = kwargs.get("softcap")
    return 0.0 if c is None else float(c)


def _kernel_reason(module, query, key, value, attention_mask, is_causal, kwargs) -> str | None:
    """Why the kernels cannot serve this call (None when they can)."""
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None and kwargs.get(name) is not False:
            return f"{name} is not implemented by the kernels"
    if kwargs.get("cache") is not None:
        return "a cache object handed to the attention (paged attention)"
    w, c = kwargs.get("sliding_window"), kwargs.get("softcap")
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
        return f"sliding_window must be None or an int >= 1, got {w!r}"
    if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0):
        return f"softcap must be None or a float >= 0, got {c!r}"
    if not is_causal:
        return "not causal (cross-attention or an encoder): the kernels serve causal self-attention"
    if query.dtype not in SUPPORTED_DTYPES or not (query.dtype == key.dtype == value.dtype):
        return f"dtype {query.dtype}/{key.dtype}/{value.dtype} (the kernels take fp32, fp16, bf16, all the same)"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or key.shape != value.shape:
        return "query/key/value shapes (B, H, T, D) with key and value alike"
    if not (query.shape[-1] == key.shape[-1] == value.shape[-1]):
        return "different query and value head sizes"
    if not MIN_HEAD_DIM <= query.shape[-1] <= MAX_HEAD_DIM:
        return f"head_dim {query.shape[-1]} outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0 or query.shape[0] != key.shape[0]:
        return f"{query.shape[1]} query heads cannot share {key.shape[1]} key/value heads"
    B, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    if q_len > k_len:
        return f"more queries ({q_len}) than keys ({k_len})"
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (B, k_len):
            return f"a 2-D mask of shape {tuple(attention_mask.shape)} for {B} rows of {k_len} keys"
        return None
    if not _is_causal_mask(attention_mask, q_len, k_len, _window(kwargs)):
        return ("a 4-D attention mask that is not the causal (sliding-window) pattern: a custom mask, an "
                "overlay on the causal one (packed sequences in position_ids, or/and_mask_function, "
                "bidirectional blocks, chunked attention) or a static cache")
    return None


def _is_causal_mask(mask: torch.Tensor, q_len: int, k_len: int, window: int | None) -> bool:
    """Whether a 4-D mask (bool: True = attend; float: 0 = attend) is exactly the bottom-right causal
    pattern (within ``window``) for every batch row and head. Reads the mask (a device sync)."""
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, k_len) or torch.compiler.is_compiling():
        return False
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        return False  # an additive bias, not a mask
    return bool((allowed == _dense_mask(None, q_len, k_len, window, mask.device)).all())


def _eager_softcap(module, query, key, value, mask, scaling, dropout, softcap):
    """Attention with softcap and a bool mask in plain PyTorch (SDPA has no softcap): the fallback only."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    s = (query @ key.transpose(-1, -2)).float() * scale
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    p = torch.nn.functional.dropout(s.softmax(-1), p=dropout, training=module.training).to(value.dtype)
    return (p @ value).transpose(1, 2).contiguous()


def _fallback(module, query, key, value, attention_mask, scaling, dropout, is_causal, kwargs):
    """transformers' SDPA (plain PyTorch when softcap is set) with the mask the kernels would apply."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    if is_causal and (attention_mask is None or attention_mask.dim() == 2):
        attention_mask = _dense_mask(attention_mask, q_len, k_len, _window(kwargs), query.device)
    elif attention_mask is not None and attention_mask.dim() == 2:  # padding only
        attention_mask = attention_mask[:, None, None, :].to(torch.bool)
    softcap = kwargs.get("softcap")
    if softcap:
        mask = attention_mask
        if mask is None:
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
        elif mask.dtype != torch.bool:
            mask = mask == 0
        return _eager_softcap(module, query, key, value, mask, scaling, dropout, float(softcap)), None
    n_rep = query.shape[1] // max(key.shape[1], 1)
    if n_rep > 1 and getattr(module, "num_key_value_groups", 1) != n_rep:  # SDPA reads the groups off the module
        key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    rest = {k: v for k, v in kwargs.items() if k not in ("softcap", "sliding_window")}
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **rest)


def _unpadded_attention(query, key, value, keys_mask, scale, dropout_p, window, softcap):
    """Padded batch -> one varlen call over the tokens (FlashAttention's unpadding): q ``(B, H, Tq, D)``,
    k/v ``(B, Hk, Tk, D)``, ``keys_mask`` ``(B, Tk)`` bool with the queries on its last Tq columns.
    Returns ``(B, Tq, H, D)`` with zeros at padding queries. Causal bottom-right alignment per row is the
    padded one because the queries are the row's last tokens; a window is the padded one only when each
    row's tokens are contiguous: otherwise returns None (the caller's reason)."""
    B, H, q_len, D = query.shape
    Hk, k_len = key.shape[1], key.shape[2]
    queries_mask = keys_mask[:, k_len - q_len:]
    k_lens = keys_mask.sum(-1, dtype=torch.int32)
    q_lens = queries_mask.sum(-1, dtype=torch.int32)
    starts = (keys_mask & ~F.pad(keys_mask[:, :-1], (1, 0), value=False)).sum(-1)  # runs of tokens per row
    max_q, max_k, runs = torch.stack([q_lens.max(), k_lens.max(), starts.max().to(torch.int32)]).tolist()
    if window is not None and window < k_len and runs > 1:
        return None  # padding between tokens: the window would count the gaps
    idx_q = queries_mask.reshape(-1).nonzero().squeeze(1)
    idx_k = keys_mask.reshape(-1).nonzero().squeeze(1)
    q = query.transpose(1, 2).reshape(B * q_len, H, D).index_select(0, idx_q)
    k = key.transpose(1, 2).reshape(B * k_len, Hk, D).index_select(0, idx_k)
    v = value.transpose(1, 2).reshape(B * k_len, Hk, D).index_select(0, idx_k)
    cu_q = F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, softmax_scale=scale,
                                 dropout_p=dropout_p, window_size=window, softcap=softcap)
    full = out.new_zeros(B * q_len, H, D).index_copy(0, idx_q, out)
    return full.view(B, q_len, H, D)


def hf_flash_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       is_causal: bool | None = None, *, fallback: bool = True,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q ``(B, H, Tq, D)``, k/v ``(B, Hk, Tk, D)`` ->
    ``(attn_output (B, Tq, H, D), None)`` on ``kernels.flash_attention`` (no padding) or
    ``kernels.flash_attention_varlen`` (a 2-D padding mask from ``hf_attention_mask``), with the layer's
    ``sliding_window`` and ``softcap``. A call the kernels cannot serve goes to SDPA with the same mask
    (plain PyTorch when softcap is set) when ``fallback``, else raises NotImplementedError naming why."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    reason = _kernel_reason(module, query, key, value, attention_mask, is_causal, kwargs)
    out = None
    if reason is None:
        p = float(dropout) if module.training else 0.0
        window, softcap = _window(kwargs), _softcap(kwargs)
        if attention_mask is not None and attention_mask.dim() == 2 and query.numel() and key.numel():
            out = _unpadded_attention(query, key, value, attention_mask.to(torch.bool), scaling, p, window, softcap)
            if out is None:
                reason = ("a sliding window over rows with padding between tokens (right padding before "
                          "generated tokens): unpadding would change which keys the window holds")
        else:
            out = flash_attention(query, key, value, causal=True, softmax_scale=scaling, dropout_p=p,
                                  window_size=window, softcap=softcap).transpose(1, 2)
    if reason is None:
        return out, None  # (B, Tq, H, D)
    if not fallback:
        raise NotImplementedError(f"the Triton attention kernels cannot serve this call: {reason} "
                                  "(register_hf_attention(fallback=True) sends such calls to SDPA)")
    return _fallback(module, query, key, value, attention_mask, scaling, dropout, is_causal, kwargs)


def register_hf_attention(name: str = "triton_attention", *, fallback: bool = True) -> str:
    """Register the kernels with transformers as ``attn_implementation=name``; returns ``name``.

    Adds ``hf_flash_attention`` to ``AttentionInterface`` and ``hf_attention_mask`` to
    ``AttentionMaskInterface`` under ``name``. ``AutoModel*.from_pretrained(..., attn_implementation=name)``
    (or ``model.set_attn_implementation(name)``) then runs ``kernels.flash_attention`` /
    ``kernels.flash_attention_varlen`` for causal self-attention: grouped-query heads, padding masks,
    ``sliding_window``, ``softcap``, dynamic caches. A call the kernels cannot serve goes to SDPA when
    ``fallback`` (the default), else raises NotImplementedError naming why.
    transformers reads any implementation name containing "flash" as a flash-attn package (and fails to
    load it), a "/" as a Hub kernel repository and "|" as a paged variant: such names are refused."""
    if not isinstance(name, str) or not name or any(c in name for c in "/|:") or name.strip() != name:
        raise ValueError(f"name must be a plain non-empty string without '/', '|' or ':', got {name!r}")
    if name in BUILTIN_NAMES:
        raise ValueError(f"name {name!r} is one of transformers' own attention implementations; choose another")
    if "flash" in name.lower():
        raise ValueError(f"name {name!r} contains 'flash': transformers would treat it as the flash-attn package "
                         "and refuse to load the model; choose another name (default 'triton_attention')")
    if not isinstance(fallback, bool):
        raise TypeError(f"fallback must be a bool, got {type(fallback).__name__}")
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as e:
        raise ImportError(f"register_hf_attention needs transformers (pip install transformers): {e}") from None

    def attention(module, query, key, value, attention_mask, **kwargs):
        return hf_flash_attention(module, query, key, value, attention_mask, fallback=fallback, **kwargs)

    attention.__name__ = attention.__qualname__ = f"hf_flash_attention_{'fallback' if fallback else 'strict'}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, hf_attention_mask)
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
