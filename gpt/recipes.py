"""The recipes of ``train.py``: one command (pretrain, classify, instruct) from its parsed options.

``run(args)`` does what ``python train.py COMMAND ...`` does once its flags are parsed
(``gpt.cli.train.parse_args``): it reads and checks everything (data, model, run folder, resume) before the
run folder is touched, writes ``config.json``, and runs ``gpt.training.train`` under the folder's lock. The
recipe builders return ``(TrainSpec, info line, finish)``: ``pretrain_spec`` here, ``classify_spec`` and
``instruct_spec`` in ``gpt.finetune``. Errors are exceptions (``ValueError`` and its subclasses,
``TrainingDiverged``, ``Interrupted``); the CLI turns them into exit codes.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, load_checkpoint, trainable_state_dict
from .config import GPTConfig
from .data import (
    DataError,
    ShardWindowDataset,
    TokenWindowDataset,
    default_corpus,
    document_spans,
    load_tokens,
    split_shards,
    train_val_split,
)
from .eval import evaluate_hellaswag, read_hellaswag
from .finetune.classify import classify_spec, classify_text, make_classifier, read_tsv
from .finetune.dpo import dpo_recipe, read_preferences
from .finetune.instruct import instruct_spec, read_instructions
from .lora import count_parameters, replace_linear_with_lora, state_dict_fingerprint
from .reference import GPTModel as ReferenceGPT
from .run import (
    NOT_STORED,
    check_device,
    choose_run_folder,
    holds_run,
    lock_run_folder,
    remove_stale_temp_files,
    resume_args,
    stored_form,
    write_json_atomic,
)
from .tokenizer import get_tokenizer
from .training import (
    LoopConfig,
    TrainSpec,
    autocast_context,
    calc_loss_batch,
    calc_loss_loader,
    generate_sample,
    init_distributed,
    perplexity,
    to_device,
    train,
)
from .weights import checkpoint_state_dict, load_state_dict_checked, read_pretrained, resolve_source

try:  # the fused model needs the kernels package (always present in this repository; a stripped build may lack it)
    from .model import GPTModel as FusedGPT
except ImportError:  # pragma: no cover
    FusedGPT = None

DEFAULT_STEPS = 300
DEFAULT_EPOCHS = {"classify": 5, "instruct": 2, "dpo": 1}  # (pretrain: DEFAULT_STEPS)
DEFAULT_LORA_ALPHA = 16.0  # the book's Appendix E (rank 16, alpha 16)


def model_class(backend: str | None):
    """(model class, backend name) for ``--backend`` (``None``: fused when available)."""
    if backend in (None, "fused") and FusedGPT is not None:
        return FusedGPT, "fused"
    if backend == "fused":
        raise ValueError("--backend fused is not available in this build; use --backend reference")
    return ReferenceGPT, "reference"


def _stack(items):
    return tuple(torch.stack(t) for t in zip(*items))  # (b, T), (b, T)


def _resume_checkpoint(args):
    """The checkpoint --resume continues from (validated: a model config, this command's task)."""
    path = args.out_path / "ckpt-last.pt"
    ckpt = load_checkpoint(path)  # validates the file before anything runs
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} holds no model config; it cannot be resumed")
    task = ckpt["extra"].get("task")
    if task not in (None, args.command):
        raise CheckpointError(f"{path} is a checkpoint of a {task} run, not {args.command}")
    if bool(ckpt["extra"].get("lora")) != (args.lora_rank is not None):
        raise CheckpointError(f"{path} is {'a' if ckpt['extra'].get('lora') else 'not a'} LoRA checkpoint, but the "
                              f"run's arguments say {'no ' if args.lora_rank is None else ''}--lora-rank")
    return ckpt


def build_model(args, device, extra_cfg=None):
    """(model, cfg, backend, checkpoint): from --resume's checkpoint config, --init weights, or a preset."""
    cls, backend = model_class(args.backend)
    if args.resume and (args.out_path / "ckpt-last.pt").is_file():
        ckpt = _resume_checkpoint(args)
        try:
            cfg = GPTConfig.from_dict(ckpt["config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{args.out_path / 'ckpt-last.pt'} holds an invalid model config ({e})") from None
        return cls(cfg), cfg, backend, ckpt
    if args.init:
        if args.preset is not None:  # the weights decide the architecture
            print(f"warning: --preset {args.preset} is ignored: --init {args.init} sets the model's size",
                  file=sys.stderr)
        model = cls.from_pretrained(args.init, **(extra_cfg or {}))
        return model, model.cfg, backend, None
    preset = args.preset if args.preset is not None else ("gpt2-small" if device.type == "cuda" else "tiny")
    cfg = GPTConfig.from_preset(preset, **(extra_cfg or {}))
    return cls(cfg), cfg, backend, None


def build_lora_base(args):
    """(model, cfg, backend, checkpoint, base fingerprint) of a LoRA run: the --init base model, always
    (a LoRA checkpoint holds only what was trained). On --resume the base must still load and hold the
    weights the run started from (``gpt.lora.state_dict_fingerprint``)."""
    if not args.init:
        raise ValueError("--lora-rank needs --init: the base model the adapters apply to")
    cls, backend = model_class(args.backend)
    ckpt = _resume_checkpoint(args) if args.resume and (args.out_path / "ckpt-last.pt").is_file() else None
    try:
        sd, cfg = read_pretrained(args.init)
    except ValueError as e:  # WeightsError, CheckpointError
        if ckpt is None:
            raise
        raise ValueError(f"the LoRA run in {args.out_path} applies to the base model {args.init}, which cannot be "
                         f"loaded: {' '.join(str(e).split())}") from None
    fingerprint = state_dict_fingerprint(sd)
    if ckpt is not None and ckpt["extra"]["lora"].get("base_fingerprint") != fingerprint:
        raise ValueError(f"the base model {args.init} has changed since the LoRA run in {args.out_path} started "
                         "(its weights' fingerprint differs); the adapters only apply to the base they were trained on")
    model = cls(cfg)
    load_state_dict_checked(model, sd)
    return model, cfg, backend, ckpt, fingerprint


def apply_lora(model, args) -> dict:
    """Freeze ``model`` and add the book's LoRA adapters (``--lora-rank``, ``--lora-alpha``): to every
    linear layer (the output head included, as the book does), or for classify to the transformer blocks
    with the new classification head trained in full. Returns the ``extra["lora"]`` record (without the
    base)."""
    alpha = args.lora_alpha if args.lora_alpha is not None else DEFAULT_LORA_ALPHA
    for p in model.parameters():
        p.requires_grad_(False)
    if args.command == "classify":
        replace_linear_with_lora(model.trf_blocks, args.lora_rank, alpha)
        model.out_head.requires_grad_(True)
    else:
        replace_linear_with_lora(model, args.lora_rank, alpha)
    return {"rank": args.lora_rank, "alpha": alpha}


def steps_for(args, n_items: int, world: int, default_epochs: float | None) -> int:
    if args.steps is not None:
        return args.steps
    per_epoch = n_items // (args.batch_size * world * args.grad_accum)
    if per_epoch == 0:
        raise ValueError(f"the training split holds {n_items} examples, fewer than one step's "
                         f"{args.batch_size * world * args.grad_accum}: use more data or a smaller --batch-size")
    epochs = args.epochs if args.epochs is not None else default_epochs
    if epochs is None:
        return DEFAULT_STEPS
    return max(1, round(epochs * per_epoch))



# ---------------------------------------------------------------------------------------- recipes
def check_token_ids(arrays, vocab_size: int, source: str) -> None:
    """Token ids the model cannot embed (llm.c shards of another tokenizer) fail before training."""
    top = max((int(a.max()) for a in arrays if len(a)), default=-1)  # streams through memory-mapped shards
    if top >= vocab_size:
        raise DataError(f"{source} holds token id {top}, outside the model's vocabulary of {vocab_size}")


def doc_masked_loss(model, batch, device, eot_id: int):
    """``--doc-mask``'s loss of a ``(input, target)`` batch: attention within the documents of each window
    (``gpt.data.document_spans``, computed on the loader's CPU tensors: no device sync), positions
    counted from each document's start."""
    cu_seqlens, positions, max_seqlen = document_spans(batch[0], eot_id)
    return model(to_device(batch[0], device), targets=to_device(batch[1], device),
                 positions=to_device(positions, device), cu_seqlens=to_device(cu_seqlens, device),
                 max_seqlen=max_seqlen)


def pretrain_spec(args, model, cfg, tokenizer, device):
    """The pretrain recipe: (TrainSpec, info line, None) for text files/folders or llm.c shards (split 90/10),
    a prepared folder (its *train* / *val* shards) or the embedded corpus."""
    if getattr(args, "doc_mask", False) and (FusedGPT is None or not isinstance(model, FusedGPT)):
        raise ValueError("--doc-mask needs the fused model: the reference backend has no document-masked attention")
    ctx = cfg.context_length if args.context_length is None else args.context_length
    if ctx > cfg.context_length:
        raise ValueError(f"--context-length {ctx} exceeds the model's context_length {cfg.context_length}")
    shards = split_shards(args.data) if args.data else None
    if shards:  # a `python -m gpt.data prepare` folder: memory-mapped *train* / *val* shards
        train_ds, val_ds = (ShardWindowDataset(files, ctx, ctx) for files in shards)
        n_train, n_val, source = train_ds.n_tokens, val_ds.n_tokens, f"{args.data[0]} (prepared shards)"
    else:
        if args.data:
            tokens, source = load_tokens(args.data, tokenizer), " ".join(args.data)
        else:
            tokens = np.asarray(tokenizer.encode(default_corpus(), allowed_special={"<|endoftext|>"}), dtype=np.int64)
            source = "embedded corpus (CPython pydoc topics)"
        train_tokens, val_tokens = train_val_split(tokens, 0.9)
        train_ds = TokenWindowDataset(train_tokens, ctx, ctx)
        val_ds = TokenWindowDataset(val_tokens, ctx, ctx)
        n_train, n_val = len(train_tokens), len(val_tokens)
    check_token_ids([*train_ds.shards, *val_ds.shards] if shards else [tokens], cfg.vocab_size, source)
    prompt = args.prompt or ("The function" if not args.data else "Every effort moves you")

    val_loader = DataLoader(val_ds, batch_size=args.batch_size, shuffle=False, collate_fn=_stack)
    hellaswag = read_hellaswag(args.eval_hellaswag) if args.eval_hellaswag else None
    if hellaswag is not None and cfg.vocab_size < tokenizer.n_vocab:
        raise ValueError(f"--eval-hellaswag needs a model of GPT-2's vocabulary ({tokenizer.n_vocab} tokens); this "
                         f"one has {cfg.vocab_size}")

    if getattr(args, "doc_mask", False):
        def loss_fn(m, batch, dev):
            return doc_masked_loss(m, batch, dev, tokenizer.eot_token)
    else:
        def loss_fn(m, batch, dev):
            return calc_loss_batch(batch[0], batch[1], m, dev)

    def evaluate(m):
        val = calc_loss_loader(val_loader, m, device, args.eval_batches, loss_fn=loss_fn)
        metrics = {"val_loss": val, "val_ppl": perplexity(val)}
        if hellaswag is not None:
            scores, _ = evaluate_hellaswag(m, hellaswag, tokenizer, batch_size=args.batch_size, device=device)
            metrics.update(hellaswag_acc=scores["acc"], hellaswag_acc_norm=scores["acc_norm"])
        return metrics

    spec = TrainSpec(
        train_data=train_ds,
        collate=_stack,
        loss_fn=loss_fn,
        evaluate=evaluate,
        sample=(lambda m: generate_sample(m, tokenizer, device, prompt, max_new_tokens=30, temperature=0.8,
                                          top_k=40, generator=torch.Generator(device).manual_seed(args.seed)))
        if cfg.vocab_size >= tokenizer.n_vocab else None,  # (a model of a smaller vocabulary: no text sample)
        extra={"task": "pretrain"},
    )
    info = f"data: {source}: {n_train:,} train / {n_val:,} val tokens, context {ctx}" + (
        "; attention within documents (--doc-mask)" if getattr(args, "doc_mask", False) else "") + (
        f"; HellaSwag: {len(hellaswag)} examples of {args.eval_hellaswag}" if hellaswag is not None else "")
    return spec, info, None



def predict(args, device, tokenizer) -> str:
    """``train.py classify --predict TEXT --init RUN``: the label of ``TEXT``."""
    if not args.init:
        raise ValueError("--predict needs --init pointing at a classify run folder or checkpoint")
    kind, path = resolve_source(args.init)
    ckpt = load_checkpoint(path) if kind == "checkpoint" else None
    if ckpt is None or ckpt["extra"].get("task") != "classify":
        raise ValueError(f"{args.init} is not a checkpoint of a classify run")
    cls, _ = model_class(args.backend)
    model = make_classifier(cls(GPTConfig.from_dict(ckpt["config"])), len(ckpt["extra"]["labels"]))
    try:
        model.load_state_dict(checkpoint_state_dict(ckpt, path))  # (a LoRA run: merged into its base)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit its own config: {str(e).strip().splitlines()[-1].strip()}") from None
    model.to(device)
    return classify_text(model, args.predict, tokenizer, ckpt["extra"]["labels"], device, ckpt["extra"]["max_length"])


# ------------------------------------------------------------------------------------------- a run
def _run_folder(args, d):
    """(args, out, from_checkpoint): the run folder of a new run, or a resumed run's stored arguments."""
    if args.resume:
        out = Path(args.out or f"runs/{args.command}")
        args = resume_args(args, out, d.world)
    else:
        out = choose_run_folder(args.out, args.command) if d.main else None
        if d.world > 1:
            holder = [out]
            torch.distributed.broadcast_object_list(holder, src=0)
            out = holder[0]
    args.out_path = out
    return args, out, args.resume and (out / "ckpt-last.pt").is_file()


def _read_task_data(args):
    """The finetuning data (classify: TSV rows, instruct: Alpaca entries), read before anything is built."""
    if args.command == "classify":
        if not args.data:
            raise ValueError("classify needs --data FILE.tsv (label<TAB>text rows)")
        return read_tsv(args.data[0])
    if args.command == "instruct":
        if not args.data:
            raise ValueError("instruct needs --data FILE.json (Alpaca-format entries)")
        return read_instructions(args.data[0])
    if args.command == "dpo":
        if not args.data:
            raise ValueError("dpo needs --data FILE.json (preference entries: instruction, input, chosen, rejected)")
        data = read_preferences(args.data[0])
        if not args.init:
            raise ValueError("dpo needs --init: the model to tune, also the frozen reference (e.g. an instruct run)")
        return data
    return None


def _recipe(args, model, cfg, tokenizer, device, task_data, resume_ckpt):
    """(TrainSpec, info, finish) of ``args.command``; a classifier gets its head here."""
    if args.command == "classify":
        labels = (resume_ckpt["extra"]["labels"] if resume_ckpt else sorted({label for label, _ in task_data}))
        make_classifier(model, len(labels), train_all=args.train_all)
        return classify_spec(args, model, cfg, tokenizer, device, task_data)
    if args.command == "instruct":
        return instruct_spec(args, model, cfg, tokenizer, device, task_data)
    if args.command == "dpo":
        reference = model_class(args.backend)[0].from_pretrained(args.init)  # the frozen --init model
        fingerprint = state_dict_fingerprint(reference.state_dict())
        if resume_ckpt is not None and resume_ckpt["extra"].get("reference_fingerprint") not in (None, fingerprint):
            raise ValueError(f"the reference model {args.init} has changed since the DPO run in {args.out_path} "
                             "started (its weights' fingerprint differs)")
        if reference.cfg != cfg:
            raise ValueError(f"the reference model {args.init} does not match the run's model config")
        spec, info, finish = dpo_recipe(args, model, cfg, tokenizer, device, task_data, reference)
        spec.extra["reference_fingerprint"] = fingerprint
        return spec, info, finish
    return pretrain_spec(args, model, cfg, tokenizer, device)


def _load_resumed(model, ckpt, path: Path, trainable_only: bool = False) -> None:
    """A checkpoint that does not fit the model fails now, not mid-run (a LoRA run's: exactly the
    trainable parameters)."""
    if trainable_only:
        want, have = set(trainable_state_dict(model)), set(ckpt["model"])
        if want != have:
            raise CheckpointError(f"{path} does not hold the run's trainable parameters: missing "
                                  f"{sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]}")
    try:
        model.load_state_dict(ckpt["model"], strict=not trainable_only)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model: {str(e).strip().splitlines()[-1].strip()}") from None


def _loop_config(args, cfg, steps: int, device) -> LoopConfig:
    """The loop's settings from the flags and their defaults (learning rate, warm-up, dtype)."""
    finetune = args.command != "pretrain"
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    default_lr = 5e-6 if args.command == "dpo" else (5e-5 if finetune else (1e-3 if cfg.emb_dim <= 256 else 6e-4))
    lr = args.lr if args.lr is not None else default_lr
    return LoopConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr,
                      warmup=args.warmup if args.warmup is not None else max(1, steps // 20),
                      weight_decay=args.weight_decay, clip=args.clip, dtype=dtype, eval_every=args.eval_every,
                      save_every=args.save_every if args.save_every is not None else args.eval_every,
                      save_every_minutes=args.save_every_minutes, seed=args.seed, desc=args.command)


def _start_run_folder(args, out: Path, from_checkpoint: bool, record: dict) -> None:
    """Under the folder's lock: refuse a folder holding another run, clear stale temp files, write
    ``config.json`` (``record`` plus the run's arguments)."""
    if not args.resume and holds_run(out):
        raise ValueError(f"run folder {out} already holds a run; pass --resume or choose another --out")
    remove_stale_temp_files(out)
    if args.resume and not from_checkpoint:  # crashed before its first checkpoint: start over
        (out / "metrics.jsonl").unlink(missing_ok=True)
        print(f"{out} has no checkpoint yet: starting its run from step 0 with its stored arguments")
    saved = {k: stored_form(k, v) for k, v in vars(args).items() if k not in NOT_STORED}
    try:
        write_json_atomic(out / "config.json", {"command": args.command, **record, "args": saved})
    except OSError as e:
        raise ValueError(f"cannot write to the run folder {out}: {e.strerror or e}") from None


def run(args) -> None:
    """Run ``train.py``'s command ``args.command`` with the parsed options ``args`` (see the module docstring).
    Everything is read and checked before the run folder is touched: bad input leaves no files behind."""
    check_device(args.device)
    d, device = init_distributed(args.device)
    tokenizer = get_tokenizer()
    if args.command == "classify" and args.predict is not None:
        print(predict(args, device, tokenizer))
        return
    args, out, from_checkpoint = _run_folder(args, d)
    torch.manual_seed(args.seed)
    task_data = _read_task_data(args)
    if args.lora_rank is not None:
        if args.train_all:
            raise ValueError("--train-all and --lora-rank exclude each other (LoRA trains only the adapters)")
        model, cfg, backend, resume_ckpt, base_fingerprint = build_lora_base(args)
    else:
        model, cfg, backend, resume_ckpt = build_model(args, device)
    spec, info, finish = _recipe(args, model, cfg, tokenizer, device, task_data, resume_ckpt)
    if args.lora_rank is not None:
        lora = apply_lora(model, args)
        spec = replace(spec, trainable_only=True, extra={**spec.extra, "lora": {
            **lora, "base": stored_form("init", args.init), "base_fingerprint": base_fingerprint}})
        trainable, total = count_parameters(model)
        info += (f"\nLoRA rank {lora['rank']}, alpha {lora['alpha']:g}: {trainable:,} trainable of {total:,} "
                 f"parameters ({100 * trainable / total:.2f}%); checkpoints hold only those")
    if resume_ckpt is not None:
        _load_resumed(model, resume_ckpt, out / "ckpt-last.pt", spec.trainable_only)
    steps = steps_for(args, len(spec.train_data), d.world, DEFAULT_EPOCHS.get(args.command))
    if resume_ckpt is not None and steps < resume_ckpt["step"]:  # (config.json would then claim fewer steps)
        raise ValueError(f"the run in {out} is at step {resume_ckpt['step']}, past the {steps} steps asked for; "
                         f"give --steps (or --epochs) of at least {resume_ckpt['step']} to resume it")
    loop = _loop_config(args, cfg, steps, device)
    autocast_context(loop.dtype, device)  # (fp16 without CUDA is an error now, not after the folder is written)
    if len(spec.train_data) < args.batch_size * d.world:
        raise ValueError(f"the training split holds {len(spec.train_data)} examples, fewer than one global batch "
                         f"of {args.batch_size * d.world}: use more data or a smaller --batch-size")
    lock = None
    try:
        if d.main:
            lock = lock_run_folder(out)  # held until this process exits; the checks below run under it
            _start_run_folder(args, out, from_checkpoint, {
                "backend": backend, "model": cfg.to_dict(), "steps": steps, "lr": loop.lr, "dtype": loop.dtype,
                "world_size": d.world})
            n_params = sum(p.numel() for p in model.parameters())
            print(f"model: {backend} ({n_params / 1e6:.1f}M parameters, context {cfg.context_length}) on {device}, "
                  f"{loop.dtype}{', compiled' if args.compile else ''}"
                  f"{f', {d.world} processes' if d.world > 1 else ''}")
            print(info)
            print(f"run folder: {out}; {steps} steps of {args.batch_size * args.grad_accum * d.world} examples")
        train(model, spec, loop, out, device, resume=from_checkpoint, d=d, compile=args.compile)
        if finish is not None and d.main:
            finish(model, out)
    finally:
        if lock is not None:
            lock.close()
    if d.main:
        print(f"done: run folder {out}")
