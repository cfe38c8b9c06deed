"""LoRA, low-rank adaptation (the book's Appendix E): ``LoRALayer``, ``LinearWithLoRA``,
``replace_linear_with_lora``, plus ``merge_lora`` and the state-dict helpers train.py's small LoRA
checkpoints need.

Semantics are the printed book's: ``A`` ``(in_dim, rank)`` kaiming-uniform with ``a=√5``, ``B``
``(rank, out_dim)`` zeros, output ``alpha · (x @ A @ B)`` added to the frozen linear's output, so an
adapted model starts with exactly the base model's outputs. (Followed: rasbt/LLMs-from-scratch
``appendix-E/01_main-chapter-code/appendix-E.ipynb``, whose online version, as of its commit 1c9f49c
of Dec 2025, scales by ``alpha / rank`` instead of the printed ``alpha``: pass ``alpha / rank`` here to
get that.) Merging folds an adapter into its linear: ``W' = W + alpha · (A @ B)ᵀ``, same outputs.

Fused projections. The fused model reads some weights directly instead of calling the layer: its head
passes ``out_head.weight`` to ``linear_cross_entropy``. ``LinearWithLoRA.weight`` is therefore the
*effective* weight ``W + alpha · (A @ B)ᵀ`` (differentiable in ``A`` and ``B``; ``bias`` is the
linear's), so such code trains the adapters exactly as the book's forward does. A single fused QKV
``nn.Linear`` (named ``wqkv`` or ``c_attn``, output ``[q | k | v]``; the fused model's attention has
``wqkv``) is adapted as the book adapts Q, K and V: ``LinearWithLoRA(linear, rank, alpha, parts=3)``
holds one rank-``rank`` adapter per third of the output (``lora.0`` / ``lora.1`` / ``lora.2``), never
one adapter shared by the three. ``kernels.CausalSelfAttention`` saves ``wqkv.lora.<i>.A``/``B`` as the
book's ``W_query|W_key|W_value.lora.A``/``B`` (and ``wqkv.linear.*`` as ``W_query.linear.*`` ...), so
the fused LoRA model's state dict is the reference model's and ``merge_adapters`` serves both.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

# Children with these names are fused projections whose output is this many equal parts, each adapted
# on its own (see the module docstring).
FUSED_PARTS = {"wqkv": 3, "c_attn": 3}


def _check_rank_alpha(rank, alpha) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")


class LoRALayer(nn.Module):
    """The book's low-rank update: ``alpha · (x @ A @ B)`` with ``A (in_dim, rank)``, ``B (rank, out_dim)``."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float):
        super().__init__()
        _check_rank_alpha(rank, alpha)
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # like nn.Linear's weight initialization
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update in ``nn.Linear``'s weight layout: ``alpha · (A @ B)ᵀ``, ``(out_dim, in_dim)``."""
        return self.alpha * (self.A @ self.B).T


class LinearWithLoRA(nn.Module):
    """``linear(x) + lora(x)`` (the book's ``LinearWithLoRA``). ``parts > 1``: the output is ``parts``
    equal slices (a fused QKV projection), each with its own adapter in ``lora[i]``.

    ``weight`` / ``bias`` give the effective weight ``W + alpha · (A @ B)ᵀ`` and the linear's bias, for
    code that reads a layer's weight instead of calling it (the fused model's QKV GEMM and its fused
    head + loss)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, *, parts: int = 1):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(parts, bool) or not isinstance(parts, int) or parts <= 0 or linear.out_features % parts:
            raise ValueError(f"parts must be a positive divisor of out_features ({linear.out_features}), "
                             f"got {parts!r}")
        self.linear = linear
        self.parts = parts
        w = linear.weight
        if parts == 1:
            self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)
        else:
            self.lora = nn.ModuleList(LoRALayer(linear.in_features, linear.out_features // parts, rank, alpha)
                                      for _ in range(parts))
        self.lora.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def adapters(self) -> list[LoRALayer]:
        return [self.lora] if self.parts == 1 else list(self.lora)

    def delta_weight(self) -> torch.Tensor:
        """``alpha · (A @ B)ᵀ`` (per part, stacked along the output): ``(out_features, in_features)``."""
        return torch.cat([a.delta_weight() for a in self.adapters()], dim=0)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight + self.delta_weight().to(self.linear.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts == 1:
            return self.linear(x) + self.lora(x)
        return self.linear(x) + torch.cat([a(x) for a in self.lora], dim=-1)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Wrap every ``nn.Linear`` below ``model`` in ``LinearWithLoRA`` (the book's function; children
    named as in ``FUSED_PARTS`` get one adapter per part). Layers already wrapped are left alone. The
    book freezes the model first (``requires_grad = False``), so only the new ``A``/``B`` train.
    Returns ``model``."""
    _check_rank_alpha(rank, alpha)
    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):
            continue
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha, parts=FUSED_PARTS.get(name, 1)))
        else:
            replace_linear_with_lora(module, rank, alpha)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every ``LinearWithLoRA`` below ``model`` into a plain ``nn.Linear`` with weight
    ``W + alpha · (A @ B)ᵀ`` (same outputs; the linear's ``requires_grad`` kept). Returns ``model``."""
    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):
            old = module.linear
            new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            new.weight.copy_(module.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
            new.weight.requires_grad_(old.weight.requires_grad)
            if old.bias is not None:
                new.bias.requires_grad_(old.bias.requires_grad)
            setattr(model, name, new)
        else:
            merge_lora(module)
    return model


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters (``...lora.A``, ``...lora.B``, ``...lora.<i>.A`` ...)."""
    return [n for n, _ in model.named_parameters() if is_adapter_key(n)]


def is_adapter_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] in ("A", "B") and "lora" in parts[:-1]


def _adapter_prefixes(sd: dict) -> dict[str, list[str]]:
    """``{module prefix: [adapter prefixes in part order]}`` from ``X.lora.A`` / ``X.lora.<i>.A`` keys."""
    found: dict[str, dict[int, str]] = {}
    for k in sd:
        if not k.endswith(".A") or not is_adapter_key(k):
            continue
        head, _, _ = k.rpartition(".")  # X.lora or X.lora.<i>
        if head.endswith(".lora"):
            found.setdefault(head[: -len(".lora")], {})[0] = head
        else:
            module, _, idx = head.rpartition(".")
            if not module.endswith(".lora") or not idx.isdigit():
                raise ValueError(f"unexpected adapter key {k!r}")
            found.setdefault(module[: -len(".lora")], {})[int(idx)] = head
    return {m: [parts[i] for i in sorted(parts)] for m, parts in found.items()}


@torch.no_grad()
def merge_adapters(base_sd: dict, trained_sd: dict, alpha: float) -> dict:
    """The plain state dict of a LoRA model: ``base_sd`` (the base model's own keys) with every adapter
    of ``trained_sd`` (keys of the adapted model: ``X.lora.A``/``X.lora.B`` or per part
    ``X.lora.<i>.A``/``B``) folded into ``X.weight`` as ``W + alpha · (A @ B)ᵀ``, and the other trained
    tensors (a new classification head ``out_head.*``; ``X.linear.*`` as ``X.*``) replacing the base's."""
    out = dict(base_sd)
    prefixes = _adapter_prefixes(trained_sd)
    for k, v in trained_sd.items():
        if is_adapter_key(k):
            continue
        module, _, leaf = k.rpartition(".")
        if module.endswith(".linear") and module[: -len(".linear")] in prefixes:
            k = f"{module[: -len('.linear')]}.{leaf}"
        out[k] = v
    for module, heads in prefixes.items():
        key = f"{module}.weight"
        if key not in out:
            raise ValueError(f"the base has no {key} for the adapter {heads[0]}")
        w = out[key]
        delta = torch.cat([(trained_sd[f"{h}.A"].double() @ trained_sd[f"{h}.B"].double()).T for h in heads])
        if delta.shape != w.shape:
            raise ValueError(f"adapter {heads[0]} gives a {tuple(delta.shape)} update for {key} of shape "
                             f"{tuple(w.shape)}")
        out[key] = (w.double() + alpha * delta.to(w.device)).to(w.dtype)
    return out


def state_dict_fingerprint(sd: dict) -> str:
    """sha256 over the keys, shapes, dtypes and bytes of a state dict (which base a LoRA run applies to).
    Tensors shared by several keys (tied weights) are hashed under each key."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (each shared tensor once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
