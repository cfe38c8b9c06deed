"""Loading pretrained weights: Hugging Face GPT-2 checkpoints, model names, and this project's checkpoints.

Hugging Face's GPT-2 stores its linear layers as ``Conv1D`` with weights ``(in, out)`` — transposed
with respect to ``nn.Linear`` — and a fused ``c_attn`` holding query, key and value side by side. Its
output head is tied to the token embedding (``lm_head.weight`` is usually not in the file).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import load_checkpoint
from .config import HF_MODEL_NAMES, GPTConfig
from .lora import merge_adapters, state_dict_fingerprint

# GPT-2 releases: head count for an embedding width (a bare .safetensors file has no config).
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}
_IGNORED_HF = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # causal-mask buffers of old checkpoints


class WeightsError(ValueError):
    """Pretrained weights cannot be found, downloaded or mapped onto the model."""


def hf_config_to_gpt(hf: dict, **overrides) -> GPTConfig:
    """Translate a Hugging Face ``GPT2Config`` dict into a ``GPTConfig`` (biases on, dropout off)."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise WeightsError(f"unsupported activation_function {act!r}: GPT-2 uses the tanh GELU ('gelu_new')")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise WeightsError(f"unsupported layer_norm_epsilon {eps}: this model uses 1e-5")
    # Attention scaling options that change the logits: refused (this model scales by 1/sqrt(head_dim)).
    # reorder_and_upcast_attn=True is accepted: it only computes HF's scores/softmax in fp32 with the
    # scale applied first, and this model's attention always accumulates scores and softmax in fp32.
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise WeightsError("unsupported scale_attn_by_inverse_layer_idx=True: this model scales attention "
                           "scores by 1/sqrt(head_dim) only, not also by 1/(layer index + 1)")
    if not hf.get("scale_attn_weights", True):
        raise WeightsError("unsupported scale_attn_weights=False: this model always scales attention scores "
                           "by 1/sqrt(head_dim)")
    try:
        cfg = GPTConfig(
            vocab_size=int(hf["vocab_size"]),
            context_length=int(hf.get("n_positions", hf.get("n_ctx"))),
            emb_dim=int(hf["n_embd"]),
            n_heads=int(hf["n_head"]),
            n_layers=int(hf["n_layer"]),
            drop_rate=0.0,
            qkv_bias=bool(hf.get("qkv_bias", True)),  # false only in gpt.export's folders (zero biases)
        )
    except (KeyError, TypeError) as e:
        raise WeightsError(f"config.json is missing GPT-2 key {e}") from None
    return cfg.replace(**overrides) if overrides else cfg


def _strip_prefix(sd: dict) -> dict:
    return {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in sd.items()}


def infer_config_from_hf_state_dict(sd: dict, **overrides) -> GPTConfig:
    """Config of a bare .safetensors file, from tensor shapes (head count from the GPT-2 widths)."""
    sd = _strip_prefix(sd)
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        raise WeightsError("not a GPT-2 checkpoint: no 'wte.weight' / 'wpe.weight' tensors")
    vocab, emb = sd["wte.weight"].shape
    ctx = sd["wpe.weight"].shape[0]
    layers = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))), default=-1)
    n_heads = overrides.pop("n_heads", None) or _HEADS_BY_WIDTH.get(emb)
    if n_heads is None:
        raise WeightsError(f"cannot infer the number of heads for width {emb}: put a config.json next to "
                           "the .safetensors file or pass n_heads=...")
    return GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=emb, n_heads=n_heads, n_layers=layers,
                     drop_rate=0.0, qkv_bias=True).replace(**overrides)


def hf_to_state_dict(hf_sd: dict, cfg: GPTConfig) -> dict:
    """Map Hugging Face GPT-2 tensors (with or without ``transformer.``) onto this project's names."""
    sd = {k: v for k, v in _strip_prefix(hf_sd).items() if not _IGNORED_HF.search(k)}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise WeightsError(f"tensor {key!r} is missing from the checkpoint")
        used.add(key)
        return sd[key]

    emb = cfg.emb_dim
    out = {"tok_emb.weight": take("wte.weight"), "pos_emb.weight": take("wpe.weight")}
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"trf_blocks.{i}."
        c_attn_w, c_attn_b = take(p + "attn.c_attn.weight"), take(p + "attn.c_attn.bias")
        if c_attn_w.shape != (emb, 3 * emb):
            raise WeightsError(f"tensor '{p}attn.c_attn.weight' has shape {tuple(c_attn_w.shape)}, "
                               f"expected {(emb, 3 * emb)} (Conv1D layout)")
        # Conv1D (in, 3*out) -> three nn.Linear weights (out, in)
        for name, w, b in zip(("W_query", "W_key", "W_value"), c_attn_w.split(emb, dim=1), c_attn_b.split(emb)):
            out[q + f"att.{name}.weight"] = w.t()
            if cfg.qkv_bias:
                out[q + f"att.{name}.bias"] = b
            elif b.any():
                raise WeightsError(f"tensor '{p}attn.c_attn.bias' is not zero but the config says qkv_bias=False")
        out[q + "att.out_proj.weight"] = take(p + "attn.c_proj.weight").t()
        out[q + "att.out_proj.bias"] = take(p + "attn.c_proj.bias")
        out[q + "ff.layers.0.weight"] = take(p + "mlp.c_fc.weight").t()
        out[q + "ff.layers.0.bias"] = take(p + "mlp.c_fc.bias")
        out[q + "ff.layers.2.weight"] = take(p + "mlp.c_proj.weight").t()
        out[q + "ff.layers.2.bias"] = take(p + "mlp.c_proj.bias")
        out[q + "norm1.scale"], out[q + "norm1.shift"] = take(p + "ln_1.weight"), take(p + "ln_1.bias")
        out[q + "norm2.scale"], out[q + "norm2.shift"] = take(p + "ln_2.weight"), take(p + "ln_2.bias")
    out["final_norm.scale"], out["final_norm.shift"] = take("ln_f.weight"), take("ln_f.bias")
    # Tied head: GPT-2 reuses the token embedding as the output projection.
    out["out_head.weight"] = take("lm_head.weight") if "lm_head.weight" in sd else sd["wte.weight"]
    unused = sorted(set(sd) - used - {"lm_head.weight"})
    if unused:
        raise WeightsError(f"unexpected tensor(s) in the checkpoint: {unused[:5]}"
                           f"{' ...' if len(unused) > 5 else ''} (does its config match? n_layers={cfg.n_layers})")
    return out


def load_state_dict_checked(model: torch.nn.Module, sd: dict) -> None:
    """``load_state_dict(strict=True)`` with a clear error naming the first tensor whose shape differs."""
    expected = model.state_dict()
    for key, value in sd.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise WeightsError(f"shape mismatch for {key!r}: checkpoint has {tuple(value.shape)}, "
                               f"model expects {tuple(expected[key].shape)}")
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"state_dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(sd, strict=True)


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"cannot read {path}: {e}") from None


def download_pretrained(name: str, cache_dir: str | None = None) -> Path:
    """Download ``config.json`` + ``model.safetensors`` of a GPT-2 release; return the folder."""
    try:
        from huggingface_hub import (
            snapshot_download,  # optional (the hub extra): only to download a model name
        )
    except ImportError:
        raise WeightsError(f"downloading {name!r} needs huggingface_hub: pip install huggingface_hub "
                           "(or pass a local folder / .safetensors file)") from None
    repo = name if "/" in name else f"openai-community/{name}"
    try:
        return Path(snapshot_download(repo_id=repo, allow_patterns=["config.json", "model.safetensors"],
                                      cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001 - offline, DNS, HTTP errors all end here
        raise WeightsError(f"cannot download {name!r} from the Hugging Face Hub (offline? {type(e).__name__}); "
                           "pass a local folder with config.json + model.safetensors instead") from None


def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """Classify ``source`` as ("hf-folder" | "safetensors" | "checkpoint", path); names are downloaded."""
    path = Path(source)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return "hf-folder", path
        for name in ("ckpt-best.pt", "ckpt-last.pt"):
            if (path / name).is_file():
                return "checkpoint", path / name
        raise WeightsError(f"{path} holds neither model.safetensors nor ckpt-best.pt/ckpt-last.pt")
    if path.is_file():
        return ("safetensors", path) if path.suffix == ".safetensors" else ("checkpoint", path)
    if str(source) in HF_MODEL_NAMES or str(source).startswith("openai-community/"):
        return "hf-folder", download_pretrained(str(source))
    raise WeightsError(f"pretrained source {str(source)!r} is not a file, a folder or a model name "
                       f"({', '.join(HF_MODEL_NAMES)})")


def checkpoint_state_dict(ckpt: dict, path: str | os.PathLike) -> dict:
    """The full model state dict of a checkpoint of this project. A LoRA run's checkpoint holds only what
    it trained (``extra["lora"]``: rank, alpha, its ``base`` source and that base's fingerprint): the
    base is read (``read_pretrained``), checked against the fingerprint and the adapters merged into it
    (``gpt.lora.merge_adapters``). A missing or changed base is a ``WeightsError``."""
    lora = (ckpt.get("extra") or {}).get("lora")
    if not lora:
        return ckpt["model"]
    base = lora.get("base")
    try:
        base_sd, _ = read_pretrained(base)
    except (ValueError, OSError) as e:  # (WeightsError and CheckpointError are ValueErrors)
        raise WeightsError(f"{path} holds LoRA adapters for the base model {base}, which cannot be loaded: "
                           f"{' '.join(str(e).split())}") from None
    if lora.get("base_fingerprint") and state_dict_fingerprint(base_sd) != lora["base_fingerprint"]:
        raise WeightsError(f"{path} holds LoRA adapters for the base model {base}, whose weights have changed "
                           "since the run (fingerprint mismatch)")
    return merge_adapters(base_sd, ckpt["model"], float(lora["alpha"]))


def read_pretrained(source: str | os.PathLike, **overrides) -> tuple[dict, GPTConfig]:
    """``(state_dict, config)`` of a pretrained source, with this project's names and no model built: a
    Hugging Face GPT-2 folder (config.json + model.safetensors), a bare ``.safetensors`` file, a checkpoint
    of this project (file or run folder), or a model name (``gpt2``, ``gpt2-medium``, ``gpt2-large``,
    ``gpt2-xl``; downloaded when online). ``overrides`` change config fields that do not affect shapes."""
    kind, path = resolve_source(source)
    if kind == "checkpoint":
        ckpt = load_checkpoint(path)
        if not ckpt.get("config"):
            raise WeightsError(f"{path} has no model config")
        cfg = GPTConfig.from_dict(ckpt["config"]).replace(**overrides)
        sd = checkpoint_state_dict(ckpt, path)  # (a LoRA run: merged into its base)
        head = sd.get("out_head.weight")
        extra = ckpt.get("extra") or {}
        if extra.get("task") == "classify" or (head is not None and head.shape[0] != cfg.vocab_size):
            labels = extra.get("labels") or [f"{head.shape[0]} classes"]
            raise WeightsError(
                f"{source} is a classifier (train.py classify: {', '.join(map(str, labels))}), not a language "
                f"model: it predicts labels, not text; use `python train.py classify --init {source} "
                "--predict TEXT`, or `python -m gpt.export` for Hugging Face")
        return sd, cfg
    if kind == "hf-folder":
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise WeightsError(f"{path} has model.safetensors but no config.json")
        hf_sd = _read_safetensors(path / "model.safetensors")
        cfg = hf_config_to_gpt(json.loads(cfg_path.read_text()), **overrides)
    else:
        hf_sd = _read_safetensors(path)
        side_cfg = path.parent / "config.json"
        cfg = (hf_config_to_gpt(json.loads(side_cfg.read_text()), **overrides) if side_cfg.is_file()
               else infer_config_from_hf_state_dict(hf_sd, **overrides))
    if not cfg.qkv_bias and any(v.any() for k, v in hf_sd.items() if k.endswith("attn.c_attn.bias")):
        cfg = cfg.replace(qkv_bias=True)  # biases trained since the export: keep them
    return hf_to_state_dict(hf_sd, cfg), cfg


def from_pretrained(cls, source: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
                    **overrides):
    """``GPTModel.from_pretrained(source)`` (either GPTModel, ``cls``): the model built from a Hugging Face
    GPT-2 folder (config.json + model.safetensors), a bare ``.safetensors`` file, a checkpoint of this
    project (file or run folder), or a model name (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``;
    downloaded when online) — see ``read_pretrained``. ``overrides`` change config fields that do not
    affect shapes (e.g. ``drop_rate``). Moved to ``device`` / ``dtype``; returned in eval mode."""
    sd, cfg = read_pretrained(source, **overrides)
    model = cls(cfg)
    load_state_dict_checked(model, sd)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()
