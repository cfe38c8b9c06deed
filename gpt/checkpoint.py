"""Training checkpoints: model, optimizer, step, RNG states and config in one file, written atomically.

The file is a ``torch.save`` dict readable with ``weights_only=True`` (no pickled code):
``{"format": "gpt-triton-checkpoint", "version": 1, "model": state_dict, "config": dict, "step": int,
"optimizer": state_dict | None, "rng": {...}, "extra": dict}``.
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMAT = "gpt-triton-checkpoint"
VERSION = 1
# Fault-injection tests only: seconds to hold each written temp file before the rename, so a test can
# kill the process in the middle of a checkpoint write.
PAUSE_ENV = "GPT_TEST_CHECKPOINT_PAUSE"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or not written by this project."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module behind DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def get_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors/ints (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``: a crash
    mid-write never leaves a truncated file where a good checkpoint was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(PAUSE_ENV):
            time.sleep(float(os.environ[PAUSE_ENV]))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _tensors(obj, prefix: str):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def first_non_finite(model: nn.Module, optimizer=None) -> str | None:
    """The name of the first weight (or optimizer state tensor) holding a NaN or infinity, else None."""
    named = [(f"weight {n}", t) for n, t in unwrap_model(model).state_dict().items()]
    if optimizer is not None:
        named += [(f"optimizer state {n}", t) for n, t in _tensors(optimizer.state_dict()["state"], "")]
    named = [(n, t) for n, t in named if t.is_floating_point() or t.is_complex()]
    if not named:
        return None
    device = named[0][1].device  # (AdamW keeps its step counts on the CPU)
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named]).cpu()  # one sync
    return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]


def trainable_state_dict(model: nn.Module) -> dict:
    """The entries of ``model.state_dict()`` that are trainable parameters (``requires_grad``) or views of
    one (``kernels.CausalSelfAttention`` saves its fused ``wqkv`` as the book's three keys): what a LoRA
    run (or any run with a frozen base) needs to save."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()
            if id(v) in trainable or (v._base is not None and id(v._base) in trainable)}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, optimizer=None, step: int = 0,
                    config=None, extra: dict | None = None, rng: bool = True,
                    only_trainable: bool = False) -> Path:
    """Save model (unwrapped from DDP/compile), optimizer, step, RNG states and config atomically.
    ``only_trainable``: only the trainable parameters (``trainable_state_dict``; the frozen base is
    not written and must be supplied on load).

    Refuses (``ValueError``) weights or optimizer state holding NaN/inf, so a checkpoint on disk is always
    one to go back to; a failed write (``CheckpointError``, "disk full" for ENOSPC) keeps the old file."""
    model = unwrap_model(model)
    bad = first_non_finite(model, optimizer)
    if bad is not None:
        raise ValueError(f"refusing to write {path}: {bad} holds NaN or infinite values")
    if config is None:
        config = getattr(model, "cfg", None)
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": trainable_state_dict(model) if only_trainable else model.state_dict(),
        "config": dict(config) if config is not None else None,
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": get_rng_state() if rng else None,
        "extra": extra or {},
    }
    try:
        return atomic_torch_save(payload, path)
    except OSError as e:
        why = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise CheckpointError(f"cannot write checkpoint {path}: {why}; the previous "
                              f"{Path(path).name} (if any) is kept") from None


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, *, optimizer=None,
                    map_location="cpu", restore_rng: bool = False, strict: bool = True,
                    only_trainable: bool = False) -> dict:
    """Read a checkpoint (clear ``CheckpointError`` if missing or corrupt), optionally restoring
    ``model``, ``optimizer`` and the RNG states into place. Returns the checkpoint dict.
    ``only_trainable``: the file holds exactly ``model``'s trainable parameters (as saved with
    ``only_trainable=True``); the other weights are left as they are."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or not a torch "
                              f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by this project (no '{FORMAT}' header)")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt['version']}; this code reads up to {VERSION}")
    try:
        if model is not None and only_trainable:
            want = set(trainable_state_dict(unwrap_model(model)))
            missing, extra = sorted(want - set(ckpt["model"])), sorted(set(ckpt["model"]) - want)
            if missing or extra:
                raise CheckpointError(f"{path} does not fit the model's trainable parameters: "
                                      + (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"))
            unwrap_model(model).load_state_dict(ckpt["model"], strict=False)
        elif model is not None:
            unwrap_model(model).load_state_dict(ckpt["model"], strict=strict)
        if optimizer is not None:
            if ckpt.get("optimizer") is None:
                raise CheckpointError(f"{path} holds no optimizer state")
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} does not fit the model: {str(e).strip().splitlines()[-1].strip()}") from None
    if restore_rng and ckpt.get("rng") is not None:
        set_rng_state(ckpt["rng"])
    return ckpt


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Cheap test whether ``path`` looks like a torch checkpoint file (zip container)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
