"""Export to the Hugging Face GPT-2 layout: ``save_pretrained``, ``export_state_dict`` (and the CLI
``python -m gpt.export SOURCE OUT_DIR``, in ``gpt/cli/export.py``).

The folder holds what ``transformers.GPT2LMHeadModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``
read: ``config.json``, ``model.safetensors`` (the ``transformer.`` names, ``Conv1D`` weights ``(in, out)``,
query/key/value side by side in ``c_attn``), ``vocab.json`` + ``merges.txt`` (GPT-2's BPE files:
``encoder.json`` and ``vocab.bpe`` under their Hugging Face names), ``tokenizer_config.json``,
``special_tokens_map.json`` and ``generation_config.json``. Only ``safetensors`` is needed to write it.

* The book's model has its own ``out_head``: it is exported untied (``tie_word_embeddings: false``,
  ``lm_head.weight`` in the file). A head equal to the token embedding (GPT-2's tying) is exported tied.
* ``qkv_bias=False`` (the book's default) has no query/key/value bias; Hugging Face's ``c_attn`` always has
  one, so zeros are written and ``config.json`` records ``"qkv_bias": false``: ``from_pretrained`` gives the
  model back without the biases while they are still zero.
* A classifier (``out_head`` with ``num_classes`` outputs, the book's chapter 6) is exported as
  ``GPT2ForSequenceClassification``. Its ``score`` layer has no bias, so the head's bias is folded into
  ``ln_f.bias`` (``W @ (shift + d) = W @ shift + b`` with ``d`` the least-norm solution of ``W d = b``;
  ``ln_f`` feeds only the head). The book reads the logits of the *last position* even when it is padding;
  Hugging Face reads the last token that is not ``pad_token_id``, so ``pad_token_id`` is set to -1 (never an
  input id): both read the same position and predict the same labels.
* Files are written to a temporary folder beside ``OUT_DIR`` and moved in when complete: an error leaves
  nothing half-written. A non-empty ``OUT_DIR`` is refused unless ``force=True`` (``--force``), which replaces
  the export's files there and removes other weight or tokenizer files that transformers could pick instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import tokenizer as _tokenizer
from .checkpoint import load_checkpoint, unwrap_model
from .config import GPTConfig
from .weights import checkpoint_state_dict, read_pretrained, resolve_source

GPT2_VOCAB = 50257  # token ids of the GPT-2 tokenizer; a model's vocab_size may be larger (padded)
EOT, EOT_ID = _tokenizer.ENDOFTEXT, _tokenizer.EOT_ID
QKV = ("W_query", "W_key", "W_value")
# Files that transformers would read instead of (or next to) ours if an old export left them behind.
STALE = ("pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json", "tf_model.h5",
         "flax_model.msgpack", "tokenizer.json", "added_tokens.json")


# A train.py run folder: its config.json holds the run's arguments, which an export would replace.
RUN_FILES = ("ckpt-last.pt", "metrics.jsonl", ".lock")


class ExportError(ValueError):
    """The model or the target folder cannot be exported to the Hugging Face layout."""


# ---------------------------------------------------------------------------------------------------
# Tensors and config
# ---------------------------------------------------------------------------------------------------

def is_tied(sd: dict) -> bool:
    """Whether the output head equals the token embedding (same tensor or same values)."""
    head, emb = sd["out_head.weight"], sd["tok_emb.weight"]
    return head.shape == emb.shape and "out_head.bias" not in sd and torch.equal(head, emb)


def _expected_keys(cfg: GPTConfig, n_out_bias: bool) -> set[str]:
    keys = {"tok_emb.weight", "pos_emb.weight", "final_norm.scale", "final_norm.shift", "out_head.weight"}
    if n_out_bias:
        keys.add("out_head.bias")
    for i in range(cfg.n_layers):
        q = f"trf_blocks.{i}."
        for name in QKV:
            keys.add(q + f"att.{name}.weight")
            if cfg.qkv_bias:
                keys.add(q + f"att.{name}.bias")
        for name in ("att.out_proj", "ff.layers.0", "ff.layers.2"):
            keys |= {q + name + ".weight", q + name + ".bias"}
        keys |= {q + "norm1.scale", q + "norm1.shift", q + "norm2.scale", q + "norm2.shift"}
    return keys


def check_state_dict(sd: dict, cfg: GPTConfig) -> None:
    """Clear error when ``sd`` is not this project's GPT state_dict for ``cfg``."""
    sd = {k: v for k, v in sd.items() if not k.endswith(".att.mask")}  # the book's derived mask buffer
    expected = _expected_keys(cfg, "out_head.bias" in sd)
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ExportError(f"the state_dict does not match the GPT config: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    if tuple(sd["tok_emb.weight"].shape) != (cfg.vocab_size, cfg.emb_dim):
        raise ExportError(f"tok_emb.weight has shape {tuple(sd['tok_emb.weight'].shape)}, config says "
                          f"{(cfg.vocab_size, cfg.emb_dim)}")
    for k, v in sd.items():
        if not v.is_floating_point():
            raise ExportError(f"tensor {k!r} has dtype {v.dtype}; expected a floating-point tensor")
        if not torch.isfinite(v).all():
            raise ExportError(f"tensor {k!r} holds NaN or inf values; refusing to export a broken model")


def to_hf_state_dict(sd: dict, cfg: GPTConfig, *, tied: bool | None = None) -> dict:
    """This project's state_dict -> Hugging Face GPT-2 tensors (``transformer.`` names, Conv1D layout).

    A classifier head (``out_head`` with fewer rows than ``vocab_size``) becomes ``score.weight`` with its
    bias folded into ``ln_f.bias``; an LM head is ``lm_head.weight`` unless ``tied``."""
    check_state_dict(sd, cfg)
    E = cfg.emb_dim
    head = sd["out_head.weight"]
    classifier = head.shape[0] != cfg.vocab_size
    tied = (not classifier and is_tied(sd)) if tied is None else tied
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"]}
    for i in range(cfg.n_layers):
        p, q = f"transformer.h.{i}.", f"trf_blocks.{i}."
        w = torch.cat([sd[q + f"att.{n}.weight"] for n in QKV])  # 3 x (E, E) -> (3E, E) as nn.Linear (out, in)
        out[p + "attn.c_attn.weight"] = w.t()  # Conv1D (in, out) = (E, 3E)
        zeros = torch.zeros(E, dtype=w.dtype, device=w.device)
        out[p + "attn.c_attn.bias"] = torch.cat([sd.get(q + f"att.{n}.bias", zeros) for n in QKV])  # (3E,)
        out[p + "attn.c_proj.weight"] = sd[q + "att.out_proj.weight"].t()
        out[p + "attn.c_proj.bias"] = sd[q + "att.out_proj.bias"]
        out[p + "mlp.c_fc.weight"] = sd[q + "ff.layers.0.weight"].t()
        out[p + "mlp.c_fc.bias"] = sd[q + "ff.layers.0.bias"]
        out[p + "mlp.c_proj.weight"] = sd[q + "ff.layers.2.weight"].t()
        out[p + "mlp.c_proj.bias"] = sd[q + "ff.layers.2.bias"]
        out[p + "ln_1.weight"], out[p + "ln_1.bias"] = sd[q + "norm1.scale"], sd[q + "norm1.shift"]
        out[p + "ln_2.weight"], out[p + "ln_2.bias"] = sd[q + "norm2.scale"], sd[q + "norm2.shift"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["final_norm.scale"], sd["final_norm.shift"]
    if classifier:
        out["score.weight"] = head
        if "out_head.bias" in sd:
            out["transformer.ln_f.bias"] = _fold_bias(head, sd["out_head.bias"], sd["final_norm.shift"])
    elif "out_head.bias" in sd:
        raise ExportError("out_head has a bias: GPT2LMHeadModel's lm_head has none")
    elif not tied:
        out["lm_head.weight"] = head
    # Own, contiguous CPU copies: safetensors refuses shared or strided storage.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def _fold_bias(weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``shift + d`` with ``weight @ d = bias`` (least norm, fp64), so a bias-free head gives the same logits."""
    w, b = weight.double().cpu(), bias.double().cpu()  # (C, E), (C,)
    d = torch.linalg.pinv(w) @ b  # (E,)
    if (w @ d - b).abs().max() > 1e-6 * (1.0 + b.abs().max()):
        raise ExportError("cannot export this classifier: GPT2ForSequenceClassification's score layer has no "
                          f"bias, and the head's bias is not reachable through ln_f ({weight.shape[0]} classes "
                          f"on width {weight.shape[1]}, rank-deficient head)")
    return (shift.double().cpu() + d).to(shift.dtype)


def hf_config(cfg: GPTConfig, *, tied: bool, dtype: torch.dtype = torch.float32,
              labels: list[str] | None = None) -> dict:
    """``config.json`` of a ``GPT2LMHeadModel`` (or ``GPT2ForSequenceClassification`` with ``labels``)."""
    pdrop = float(cfg.drop_rate)
    out = {
        "architectures": ["GPT2ForSequenceClassification" if labels else "GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": pdrop,
        "embd_pdrop": pdrop,
        "attn_pdrop": pdrop,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "tie_word_embeddings": bool(tied and not labels),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.vocab_size > EOT_ID:
        out["bos_token_id"] = out["eos_token_id"] = EOT_ID
    if not cfg.qkv_bias:
        out["qkv_bias"] = False  # read back by gpt.weights: the zero c_attn biases are not parameters
    if labels:
        out["id2label"] = {str(i): str(label) for i, label in enumerate(labels)}
        out["label2id"] = {str(label): i for i, label in enumerate(labels)}
        out["pad_token_id"] = -1  # the book reads the last position, padding or not (module docstring)
        out["problem_type"] = "single_label_classification"
    return out


# ---------------------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------------------

def _bpe_folder() -> Path | None:
    """A folder with GPT-2's ``encoder.json`` + ``vocab.bpe``: ``GPT2_BPE_DIR`` or the package's copy."""
    for folder in (os.environ.get("GPT2_BPE_DIR"), getattr(_tokenizer, "ASSETS", None)):
        if folder and (Path(folder) / "encoder.json").is_file() and (Path(folder) / "vocab.bpe").is_file():
            return Path(folder)
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable alphabet: printable bytes map to themselves, the other 68 to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _bpe_split(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """Byte-pair merge ``token`` using only merges ranked below it (tiktoken's educational ``bpe``)."""
    max_rank = ranks[token]
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return parts
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]


def bpe_files_from_ranks(ranks: dict[bytes, int]) -> tuple[str, str]:
    """``(vocab.json, merges.txt)`` text rebuilt from tiktoken's mergeable ranks (when no BPE files ship)."""
    alphabet = _bytes_to_unicode()
    show = lambda b: "".join(alphabet[x] for x in b)
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {show(tok): rank for tok, rank in by_rank}
    vocab[EOT] = EOT_ID
    merges = ["#version: 0.2"]
    for tok, _rank in by_rank:
        if len(tok) > 1:
            parts = _bpe_split(ranks, tok)
            if len(parts) != 2:
                raise ExportError(f"cannot rebuild the BPE merges: token {tok!r} is not one merge of two tokens")
            merges.append(f"{show(parts[0])} {show(parts[1])}")
    return json.dumps(vocab, ensure_ascii=False), "\n".join(merges) + "\n"


def tokenizer_files(*, classifier: bool = False, model_max_length: int = 1024) -> dict[str, str | bytes]:
    """Every tokenizer file of the export, by name."""
    folder = _bpe_folder()
    if folder is not None:
        vocab, merges = (folder / "encoder.json").read_bytes(), (folder / "vocab.bpe").read_bytes()
    else:
        vocab, merges = bpe_files_from_ranks(_tokenizer.get_tokenizer()._mergeable_ranks)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    if classifier:
        special["pad_token"] = EOT  # pad like the book: <|endoftext|> on the right
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        "added_tokens_decoder": {str(EOT_ID): {"content": EOT, "lstrip": False, "normalized": True,
                                               "rstrip": False, "single_word": False, "special": True}},
        **special,
    }
    return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(special, indent=2)}


# ---------------------------------------------------------------------------------------------------
# Writing the folder
# ---------------------------------------------------------------------------------------------------

def export_state_dict(sd: dict, cfg: GPTConfig | dict, folder: str | os.PathLike, *,
                      labels: list[str] | None = None, tokenizer: bool = True, force: bool = False) -> Path:
    """Write ``sd`` (this project's names) as a Hugging Face GPT-2 folder; returns the folder.

    ``labels`` names a classifier's classes (default ``LABEL_0``...); ``tokenizer=False`` leaves out the
    tokenizer files (needed when ``vocab_size`` < 50257); ``force`` replaces an earlier export in ``folder``."""
    cfg = GPTConfig.coerce(cfg)
    out = check_target(folder, force)
    hf_sd = to_hf_state_dict(sd, cfg)
    n_out = sd["out_head.weight"].shape[0]
    classifier = n_out != cfg.vocab_size
    if classifier:
        labels = [str(x) for x in labels] if labels else [f"LABEL_{i}" for i in range(n_out)]
        if len(labels) != n_out:
            raise ExportError(f"labels has {len(labels)} names but the classifier head has {n_out} outputs")
    elif labels:
        raise ExportError(f"labels given but out_head has vocab_size={cfg.vocab_size} outputs (a language model)")
    if tokenizer and cfg.vocab_size < GPT2_VOCAB:
        raise ExportError(f"vocab_size {cfg.vocab_size} is smaller than GPT-2's {GPT2_VOCAB} tokens: the GPT-2 "
                          "tokenizer does not fit this model; export without it (tokenizer=False / --no-tokenizer)")
    dtype = sd["tok_emb.weight"].dtype
    files: dict[str, str | bytes] = {
        "config.json": json.dumps(hf_config(cfg, tied="lm_head.weight" not in hf_sd, dtype=dtype,
                                            labels=labels if classifier else None), indent=2),
    }
    if not classifier:
        gen = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID} if cfg.vocab_size > EOT_ID else {}
        files["generation_config.json"] = json.dumps(gen, indent=2)
    if tokenizer:
        files.update(tokenizer_files(classifier=classifier, model_max_length=cfg.context_length))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(hf_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, content in files.items():
            data = content if isinstance(content, bytes) else content.encode("utf-8")
            (tmp / name).write_bytes(data)
        _normal_permissions(tmp)
        _move_into_place(tmp, out, tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _normal_permissions(folder: Path) -> None:
    """The modes a plain ``mkdir`` / ``open(..., "w")`` would give (0777 / 0666 less the umask), not
    ``mkdtemp``'s private 0700 and whatever the writer chose: an export is meant to be shared."""
    umask = os.umask(0o022)
    os.umask(umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)
    folder.chmod(0o777 & ~umask)


def check_target(folder: str | os.PathLike, force: bool) -> Path:
    """``folder`` can receive an export (new, empty, or an earlier export with ``force``): ExportError if not."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"output folder {out} is not empty; choose a new folder or pass --force "
                          "(force=True) to replace the export files in it")
    run = [n for n in RUN_FILES if (out / n).exists()]
    if run:  # --force would overwrite the run's config.json (its stored arguments): no --resume after
        raise ExportError(f"output folder {out} holds a training run ({run[0]}); export it into another folder")
    return out


def _move_into_place(tmp: Path, out: Path, tokenizer: bool) -> None:
    """An absent or empty ``out``: one rename. Otherwise (``force``) file by file, stale weights removed."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)  # rename(2) onto an empty folder replaces it
        return
    stale = [out / n for n in STALE if tokenizer or not n.startswith(("tokenizer", "added"))]
    stale += [p for p in out.glob("model-*.safetensors")]
    for p in stale:
        if p.is_file():
            p.unlink()
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike, *, labels: list[str] | None = None,
                    tokenizer: bool = True, force: bool = False) -> Path:
    """``model.save_pretrained(folder)``: the model (either class, any device/dtype) as a Hugging Face
    GPT-2 folder (config.json, model.safetensors, tokenizer files, generation config) that
    ``transformers`` and ``from_pretrained`` load. A classifier head (``num_classes`` outputs) exports as ``GPT2ForSequenceClassification``."""
    model = unwrap_model(model)
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "out_head"):
        raise TypeError(f"model must be a gpt GPTModel, got {type(model).__name__}")
    return export_state_dict(model.state_dict(), cfg, folder, labels=labels, tokenizer=tokenizer, force=force)


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------

def load_source(source: str | os.PathLike) -> tuple[dict, GPTConfig, list[str] | None]:
    """``(state_dict, config, labels)`` of anything ``from_pretrained`` takes, read as tensors (no model is
    built: converting gpt2-xl allocates its 1.5B parameters once, as the file's tensors); a classify run's
    checkpoint gives its head and labels (``from_pretrained`` itself builds only language models)."""
    kind, path = resolve_source(source)
    if kind != "checkpoint":
        sd, cfg = read_pretrained(path)
        return sd, cfg, None
    ckpt = load_checkpoint(path)
    if not ckpt.get("config"):
        raise ExportError(f"{path} has no model config")
    extra = ckpt.get("extra") or {}
    labels = extra.get("labels") if extra.get("task") == "classify" else None
    return checkpoint_state_dict(ckpt, path), GPTConfig.from_dict(ckpt["config"]), labels


if __name__ == "__main__":  # python -m gpt.export: the CLI lives in gpt/cli/export.py (imported only here)
    from gpt.cli.export import main

    raise SystemExit(main())
