"""Run folders of ``train.py``: one process per folder (``.lock``), the run's arguments in ``config.json``,
the checks that make ``--resume`` continue exactly the run it names, and atomic small writes.

A run folder holds ``config.json`` (the model and the run's arguments), ``metrics.jsonl``, ``ckpt-last.pt``
(atomic), ``ckpt-best.pt``, ``loss.png`` and ``.lock`` while a process trains in it. Errors are
``ValueError`` with one line naming the flag or the folder (``train.py`` prints it and exits 2).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import torch

LOCK_NAME = ".lock"
# Arguments never stored in config.json (where the run lives, how it was launched).
NOT_STORED = {"given", "out_path", "out", "resume", "predict"}
# Flags a resumed run may change; every other flag is part of the run and fixed by its first launch.
RESUMABLE = {"steps", "epochs", "eval_every", "eval_batches", "save_every", "save_every_minutes", "device",
             "compile", "prompt", "max_new_tokens", "eval_hellaswag"}


def check_device(arg: str | None) -> None:
    if arg is None:
        return
    try:
        device = torch.device(arg)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {arg!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {arg}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {arg}: only cpu and cuda devices are supported")


def holds_run(p: Path) -> bool:
    """A folder holds a run once it has a checkpoint or logged a step (config.json alone does not)."""
    return (p / "ckpt-last.pt").exists() or (p / "metrics.jsonl").exists()


def check_folder(path: Path) -> None:
    """``path`` can be a run folder: not a file, not locked by a running process (checked again under
    the lock before anything is written)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder")
    if (path / LOCK_NAME).is_file():
        lock_run_folder(path, create=False).close()


def in_use_error(path: Path, f) -> ValueError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    return ValueError(f"run folder {path} is in use by process {holder} (it holds {path / LOCK_NAME}); "
                      "wait for it to finish or choose another --out")


def choose_run_folder(out: str | None, command: str) -> Path:
    """A new run's folder; never one holding a run (an explicit --out holding one is an error)."""
    if out is not None:
        path = Path(out)
        check_folder(path)
        if holds_run(path):
            raise ValueError(f"run folder {out} already holds a run; pass --resume or choose another --out")
        return path
    base = candidate = Path(f"runs/{command}")
    n = 1
    while holds_run(candidate) or (candidate / "config.json").exists() or candidate.is_file():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def stored_form(name: str, value):
    """An argument as config.json stores it: data and local --init paths absolute."""
    if name == "data" and value is not None:
        return [os.path.abspath(v) for v in value]
    if name in ("init", "eval_hellaswag") and value is not None and os.path.exists(value):
        return os.path.abspath(value)
    return value


def resume_args(args, path: Path, world: int = 1):
    """The run's stored arguments, with the flags a resumed run may change taken from the command line."""
    check_folder(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        if not (path / "ckpt-last.pt").is_file():
            raise ValueError(f"nothing to resume: {path} holds no run (no config.json or ckpt-last.pt)")
        return args  # a run folder without config.json: the command line's arguments
    try:
        stored = json.loads(config_path.read_text())
        saved = stored["args"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot resume: {config_path} is unreadable or holds no 'args' ({e})") from None
    if stored.get("command") != args.command:
        raise ValueError(f"{path} holds a {stored.get('command')} run, not {args.command}; resume it with "
                         f"`train.py {stored.get('command')} --resume --out {path}`")
    if stored.get("world_size", world) != world:  # the global batch and the data order depend on it
        raise ValueError(f"the run in {path} used {stored['world_size']} processes, this is {world}; resume it "
                         f"with {stored['world_size']}")
    for name in sorted(args.given - RESUMABLE - NOT_STORED):
        new, old = stored_form(name, getattr(args, name)), saved.get(name)
        if new != old:
            flag = "--" + name.replace("_", "-")
            had = f"no {flag} (its default)" if old is None else f"{flag} {old}"
            raise ValueError(f"{flag} cannot change on --resume (the run in {path} has {had}, got {new}); "
                             f"only {', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE))} may")
    merged = {**vars(args), **{k: v for k, v in saved.items() if k in vars(args) and k not in NOT_STORED}}
    merged.update({k: getattr(args, k) for k in args.given & RESUMABLE})
    if args.given & {"steps", "epochs"}:  # a new length replaces the stored one
        merged["epochs" if "steps" in args.given else "steps"] = None
    return type(args)(**merged)  # (an argparse.Namespace from the CLI)


def lock_run_folder(path: Path, create: bool = True):
    """Create ``path`` and hold an exclusive lock on ``path/.lock`` (released by the OS when the process
    dies); an open file to keep for the run's lifetime. A folder locked by another process is an error."""
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        f = open(path / LOCK_NAME, "a+" if create else "r")
    except OSError as e:
        raise ValueError(f"cannot use {path} as the run folder: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise in_use_error(path, f) from None
    if not create:
        return f
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def remove_stale_temp_files(path: Path) -> None:
    """Temp files of writes killed mid-way (``.ckpt-last.pt.*.tmp``, a full checkpoint each)."""
    for p in path.iterdir():
        if p.name.startswith(".") and ".tmp" in p.name and p.is_file():
            p.unlink()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(tmp, path)

