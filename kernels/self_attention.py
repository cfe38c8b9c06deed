"""``CausalSelfAttention``: the book's ``MultiHeadAttention`` on the fused flash-attention kernel.

One weight for the three projections (gpt-fast's ``wqkv``): ``wqkv = nn.Linear(d_in, 3 * d_out,
bias=qkv_bias)`` whose output rows are ``[q | k | v]``, so every forward (training, prefill, each
CUDA-graph decode step) is one GEMM on a parameter, never a concatenation of weights. Its output is
viewed as q, k, v ``(b, H, T, D)`` without a copy.

The state_dict is the book's, both ways: ``state_dict()`` writes ``W_query.weight``, ``W_key.weight``,
``W_value.weight`` (+ ``.bias`` with ``qkv_bias``) and ``out_proj.*`` in the book's order, as views of
``wqkv``'s rows (no copy; they alias the parameter as any state_dict entry does); loading those keys
fills ``wqkv``. The rules, for any module wrapping ``wqkv`` too (``gpt.lora.LinearWithLoRA``):

* a ``weight``/``bias`` leaf of ``wqkv`` (also ``linear.weight``/``linear.bias`` under a wrapper) is
  saved as three book keys, one per third of its rows; loading concatenates the three;
* a per-part leaf ``wqkv.lora.<i>.<x>`` (LoRA's adapter of part ``i``) is saved as
  ``W_query|W_key|W_value.lora.<x>``: a fused LoRA model's state_dict equals the reference model's
  with the book's ``replace_linear_with_lora``;
* anything else under ``wqkv.`` keeps its fused name; the fused names (``wqkv.weight`` ...) are also
  accepted on load (giving a tensor in both forms is an error);
* the book's ``mask`` buffer key is accepted on load and dropped (the kernel needs no mask);
* missing and unexpected keys are reported with the book's names (a missing ``W_key.weight`` is
  reported as that; with ``strict=False`` the given thirds load and the missing one keeps its values),
  a wrongly shaped third is a size-mismatch error naming its book key.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ._utils import check_tensor
from .attention import check_head_dim, flash_attention

QKV_NAMES = ("W_query", "W_key", "W_value")  # the book's projections, in wqkv's row order
FUSED = "wqkv"
_SPLIT_LEAF = re.compile(r"(?:linear\.)?(?:weight|bias)")  # leaves stored as three book keys
_PART_LEAF = re.compile(r"lora\.([0-2])\.(.+)")  # a per-part adapter of a parts=3 wrapper


class CausalSelfAttention(nn.Module):
    """Drop-in for the book's ``MultiHeadAttention`` on the fused kernel.

    Same constructor (``d_in, d_out, context_length, dropout, num_heads, qkv_bias=False``) and state_dict
    keys (``W_query``, ``W_key``, ``W_value``, ``out_proj``; see the module docstring); the parameters are
    ``wqkv`` (``nn.Linear(d_in, 3 d_out)``, rows q, k, v) and ``out_proj``.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        if num_heads <= 0 or d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        check_head_dim("CausalSelfAttention", d_out // num_heads)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.context_length = context_length
        self.dropout_p = float(dropout)
        self.wqkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)  # rows [q | k | v]
        self.out_proj = nn.Linear(d_out, d_out)
        self._register_state_dict_hook(_save_book_keys)
        self.register_load_state_dict_post_hook(_report_book_keys)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``x (b, T, d_in)`` to q, k, v ``(b, H, T, D)``: strided views of one GEMM's output."""
        b, T, _ = x.shape
        qkv = self.wqkv(x)  # (b, T, 3 d_out)
        qkv = qkv.view(b, T, 3, self.num_heads, self.head_dim)  # (b, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (b, H, T, D), no copy
        return q, k, v

    def merge(self, ctx: torch.Tensor) -> torch.Tensor:
        """``(b, H, T, D)`` attention output -> heads merged and projected, ``(b, T, d_out)``."""
        b, _, T, _ = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(b, T, self.d_out)  # (b, T, H, D) -> (b, T, d_out); a view
        return self.out_proj(ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3)
        if x.shape[1] > self.context_length:
            raise ValueError(f"sequence length {x.shape[1]} exceeds context_length {self.context_length}")
        q, k, v = self.qkv(x)
        dropout_p = self.dropout_p if self.training else 0.0
        return self.merge(flash_attention(q, k, v, causal=True, dropout_p=dropout_p))

    # ------------------------------------------------------------------------------- state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "mask", None)  # the book's causal-mask buffer
        self._load_prefix = prefix  # for _report_book_keys, which runs after wqkv has loaded
        _fuse_book_keys(self, state_dict, prefix, missing_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _book_keys(rest: str) -> list[str] | None:
    """The book's keys for ``wqkv.<rest>`` (three for a split leaf, one for a part's adapter), else None."""
    if _SPLIT_LEAF.fullmatch(rest):
        return [f"{n}.{rest}" for n in QKV_NAMES]
    m = _PART_LEAF.fullmatch(rest)
    return [f"{QKV_NAMES[int(m[1])]}.lora.{m[2]}"] if m else None


def _save_book_keys(module: CausalSelfAttention, destination: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: ``wqkv.*`` entries -> the book's keys, in the book's order (q, k, v, out_proj)."""
    own = {*module._modules, *module._parameters, *module._buffers}
    keys = [k for k in destination if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] in own]
    items = [(k, destination.pop(k)) for k in keys]
    fused = prefix + FUSED + "."
    parts: list[list] = [[], [], []]
    kept = []
    for k, v in items:
        if not k.startswith(fused):
            continue
        rest = k[len(fused):]
        names = _book_keys(rest)
        if names is None:
            kept.append((k, v))
        elif len(names) == 3:
            for i, (name, third) in enumerate(zip(names, v.chunk(3, dim=0))):  # (3 d_out, ...) -> 3 x (d_out, ...)
                parts[i].append((prefix + name, third))
        else:
            parts[int(_PART_LEAF.fullmatch(rest)[1])].append((prefix + names[0], v))
    book = [*parts[0], *parts[1], *parts[2], *kept]
    for k, v in items:
        if k.startswith(fused):
            destination.update(book)  # all of wqkv's entries in place of its first one
            book = []
        else:
            destination[k] = v


def _target(module: CausalSelfAttention, rest: str) -> torch.Tensor | None:
    """The tensor ``wqkv.<rest>`` names in the module, or None."""
    obj = module.wqkv
    for attr in rest.split("."):
        obj = getattr(obj, attr, None)
    return obj if isinstance(obj, torch.Tensor) else None


@torch.no_grad()
def _fuse_book_keys(module: CausalSelfAttention, state_dict: dict, prefix: str, missing_keys: list,
                    error_msgs: list) -> None:
    """Load pre-step: the book's ``W_query/W_key/W_value.<rest>`` keys -> ``wqkv.<rest>`` (in place)."""
    groups: dict[str, dict[int, str]] = {}
    for k in list(state_dict):
        for i, n in enumerate(QKV_NAMES):
            if k.startswith(f"{prefix}{n}."):
                groups.setdefault(k[len(prefix) + len(n) + 1:], {})[i] = k
    for rest, given in groups.items():
        if rest.startswith("lora."):  # a part's adapter: W_key.lora.A -> wqkv.lora.1.A
            for i, k in given.items():
                _put(state_dict, f"{prefix}{FUSED}.lora.{i}.{rest[5:]}", state_dict.pop(k), error_msgs)
            continue
        if not _SPLIT_LEAF.fullmatch(rest):
            continue  # not ours: reported unexpected
        target = _target(module, rest)
        if target is None:
            continue  # a tensor the module does not have (biases without qkv_bias): reported unexpected
        thirds = [state_dict.pop(given[i]) if i in given else None for i in range(3)]
        current = target.chunk(3, dim=0)  # 3 x (d_out, ...)
        for i, t in enumerate(thirds):
            if t is not None and t.shape != current[i].shape:
                error_msgs.append(f"size mismatch for {given[i]}: copying a param with shape {t.shape} from "
                                  f"checkpoint, the shape in current model is {current[i].shape}.")
                thirds[i] = None
            elif t is None:
                missing_keys.append(f"{prefix}{QKV_NAMES[i]}.{rest}")
        if any(t is None for t in thirds):  # keep the current values of what is missing
            thirds = [current[i] if t is None else t.to(current[i]) for i, t in enumerate(thirds)]
        _put(state_dict, f"{prefix}{FUSED}.{rest}", torch.cat(thirds), error_msgs)  # 3 x (d_out, ...) -> (3 d_out, ...)


def _put(state_dict: dict, key: str, value: torch.Tensor, error_msgs: list) -> None:
    if key in state_dict:
        error_msgs.append(f"{key} is given both fused and as the book's per-projection keys")
    state_dict[key] = value


def _report_book_keys(module: CausalSelfAttention, incompatible_keys) -> None:
    """load_state_dict post hook: missing/unexpected ``wqkv.*`` keys named as the book's keys."""
    prefix = getattr(module, "_load_prefix", "")
    fused = prefix + FUSED + "."
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        out = []
        for k in keys:
            names = _book_keys(k[len(fused):]) if k.startswith(fused) else None
            out += [prefix + n for n in names] if names else [k]
        keys[:] = out
