"""Training: the book's loss helpers (chapter 5) and one training loop shared by pretraining and the
finetuning recipes: AdamW, warm-up + cosine schedule, gradient accumulation and clipping, autocast,
periodic evaluation, atomic checkpoints, exact resume, Ctrl-C/SIGTERM and NaN handling, DDP.

Exact resume: the data order is a pure function of (seed, epoch) and the learning rate a pure function of
the step, so a checkpoint needs only the step, model, optimizer, grad scaler and RNG states; a resumed run
logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .checkpoint import first_non_finite, load_checkpoint, save_checkpoint
from .data import EpochBatches
from .generate import context_length_of, generate
from .metrics import plot_losses, read_metrics, write_row
from .tokenizer import text_to_token_ids, token_ids_to_text


# ------------------------------------------------------------------------------ the book's helpers
def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch: logits (b, T, V) vs targets (b, T); -100 is ignored.

    Models with a ``loss`` method (both GPTModels, also inside DDP / torch.compile wrappers) compute it
    as ``model(idx, targets=...)``: the fused model then never materializes the logits."""
    input_batch, target_batch = to_device(input_batch, device), to_device(target_batch, device)
    if _has_loss(model):
        return model(input_batch, targets=target_batch)
    logits = model(input_batch)
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor goes to CUDA through pinned memory, asynchronously: a copy from
    pageable memory would wait for the GPU's queue (a host sync per micro-batch)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def calc_token_logprobs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                        ignore_index: int = -100) -> torch.Tensor:
    """``(b, T)`` fp32 log-probability of each target token ``targets[:, t]`` given ``inputs[:, :t + 1]``,
    0 where the target is ``ignore_index``. Models with a ``loss`` method (both GPTModels) give it as
    ``-model(inputs, targets=..., reduction="none")``: the fused model then runs its head fused with the
    loss (``linear_cross_entropy``), never materializing ``(b, T, V)`` logits; other models through
    ``log_softmax`` of their logits."""
    if _has_loss(model):
        return -model(inputs, targets=targets, ignore_index=ignore_index, reduction="none")
    logits = model(inputs).float()  # (b, T, V)
    keep = targets != ignore_index
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.where(keep, 0).unsqueeze(-1)).squeeze(-1)
    return logp * keep


def _has_loss(model: nn.Module) -> bool:
    """Whether the model under any DDP (``.module``) / torch.compile (``._orig_mod``) wrappers has ``loss``."""
    for _ in range(4):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    return callable(getattr(model, "loss", None))


@torch.no_grad()
def calc_loss_loader(data_loader, model: nn.Module, device, num_batches: int | None = None, *,
                     loss_fn=None) -> float:
    """Average loss over the first ``num_batches`` batches (all by default); NaN for an empty loader.
    ``loss_fn(model, batch, device)`` replaces ``calc_loss_batch`` (e.g. ``--doc-mask``'s loss)."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        batch = (input_batch, target_batch)
        total += (calc_loss_batch(*batch, model, device) if loss_fn is None else loss_fn(model, batch, device)).item()
    return total / num_batches


def evaluate_model(model: nn.Module, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    """(train loss, validation loss) over ``eval_iter`` batches each, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    finally:
        model.train(was_training)
    return train_loss, val_loss


def generate_sample(model: nn.Module, tokenizer, device, start_context: str, max_new_tokens: int = 50,
                    **sampling) -> str:
    """Continue ``start_context`` with the model and return the whole text (one line)."""
    ctx = context_length_of(model) or max_new_tokens
    encoded = text_to_token_ids(start_context, tokenizer)[:, -ctx:].to(device)  # (1, T)
    token_ids = generate(model, encoded, max_new_tokens, use_cache=False, **sampling)
    return token_ids_to_text(token_ids, tokenizer).replace("\n", " ")


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


# ------------------------------------------------------------------------------------ optimization
def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW (fused on CUDA); no weight decay on biases, norm parameters and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------ distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str | None) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device_arg or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


# ----------------------------------------------------------------------------------- training loop
class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the weights became NaN or infinite."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainSpec:
    """What a recipe gives the loop: data, how to batch it, its loss, and its evaluation."""

    train_data: object  # a Dataset (indexable, len)
    collate: Callable[[list], tuple]
    loss_fn: Callable[[nn.Module, tuple, torch.device], torch.Tensor]  # or (loss, {name: value}): logged too
    evaluate: Callable[[nn.Module], dict]  # -> metrics; "val_loss" picks ckpt-best.pt
    sample: Callable[[nn.Module], str] | None = None
    extra: dict = field(default_factory=dict)  # stored in checkpoints (labels, task, ...)
    show: tuple = ()  # names of loss_fn statistics shown on the progress bar
    trainable_only: bool = False  # checkpoints hold only the trainable parameters (LoRA: the adapters)


@dataclass
class LoopConfig:
    steps: int
    batch_size: int
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int = 0
    weight_decay: float = 0.1
    clip: float = 1.0
    dtype: str = "fp32"
    eval_every: int = 100
    save_every: int = 100
    save_every_minutes: float | None = None  # also save when this much time passed since the last save
    seed: int = 123
    desc: str = "train"


class _StopFlag:
    """First Ctrl-C or SIGTERM (what SLURM and Kubernetes send before killing a job): finish the current
    step, save, stop. A second one: stop at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading_main():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, _frame):
        if self.requested:
            raise Interrupted("interrupted twice: stopped at once", 128 + signum)
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step (send it again to abort at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def autocast_context(dtype: str, device: torch.device):
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "fp16" and device.type != "cuda":
        raise ValueError("--dtype fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def last_good(out: Path) -> str:
    path = out / "ckpt-last.pt"
    return f"the last good checkpoint is {path}" if path.is_file() else "no checkpoint was written yet"


class _Loop:
    """The state of one training run and its pieces: restore, one optimizer step over the micro-batches,
    evaluation, checkpoints (never with non-finite values), the stop flag under DDP."""

    def __init__(self, model: nn.Module, spec: TrainSpec, cfg: LoopConfig, out: Path, device: torch.device,
                 d: Dist, log):
        self.model, self.spec, self.cfg, self.out, self.device, self.d, self.log = (
            model, spec, cfg, out, device, d, log)
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
        self.best_val = float("inf")
        self.metrics_path = out / "metrics.jsonl"
        self.amp = autocast_context(cfg.dtype, device)
        self.last_save = time.monotonic()
        self.stop_agreed = False  # (DDP) some rank was signalled, as of the last step's all-reduce
        self.sampler = EpochBatches(len(spec.train_data), cfg.batch_size, seed=cfg.seed, rank=d.rank,
                                    world=d.world)
        if self.sampler.per_epoch == 0:
            raise ValueError(f"the training split holds {len(spec.train_data)} examples, fewer than one global "
                             f"batch of {self.sampler.global_batch}: use more data or a smaller --batch-size")

    def restore(self) -> int:
        """Load ``ckpt-last.pt`` (model, optimizer, scaler, RNG states); the step to continue from."""
        ckpt = load_checkpoint(self.out / "ckpt-last.pt", self.model, optimizer=self.optimizer,
                               map_location=self.device, restore_rng=True, only_trainable=self.spec.trainable_only)
        start, self.best_val = ckpt["step"], ckpt["extra"].get("best_val", float("inf"))
        if ckpt["extra"].get("scaler"):
            self.scaler.load_state_dict(ckpt["extra"]["scaler"])
        if self.d.main:  # drop rows logged after the checkpoint (a crash between saves)
            rows = [r for r in read_metrics(self.metrics_path) if r["step"] <= start]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.log(f"resumed from {self.out / 'ckpt-last.pt'} at step {start}")
        return start

    def wrapped(self, compile: bool) -> nn.Module:
        """The model the steps run: compiled and/or in DDP (checkpoints always save ``self.model``)."""
        train_model = torch.compile(self.model) if compile else self.model
        if self.d.world > 1:
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return train_model

    def checkpoint(self, step: int, name: str = "ckpt-last.pt", with_optimizer: bool = True) -> None:
        optimizer = self.optimizer if with_optimizer else None
        bad = first_non_finite(self.model, optimizer)  # every rank: they stop alike
        if bad is not None:
            raise TrainingDiverged(f"{bad} became non-finite by step {step}; not saved ({last_good(self.out)})")
        if self.d.main:
            extra = {**self.spec.extra, "best_val": self.best_val,
                     "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
            save_checkpoint(self.out / name, self.model, optimizer=optimizer, step=step, extra=extra,
                            only_trainable=self.spec.trainable_only)
        if name == "ckpt-last.pt":
            self.last_save = time.monotonic()

    def stopping(self, stop: _StopFlag) -> bool:
        """Under DDP a signal on any rank stops every rank at the same step: the flag travels in the
        previous step's one all-reduce (``step_values``), so checking it costs no extra sync."""
        return stop.requested if self.d.world == 1 else self.stop_agreed

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg.steps, self.cfg.lr, self.cfg.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def accumulate(self, train_model: nn.Module, step: int) -> tuple[torch.Tensor, int, dict]:
        """Forward and backward of the step's micro-batches: (the loss summed on the device, input tokens of
        the global batch, device sums of the loss function's statistics, e.g. DPO's rewards); no sync."""
        cfg, d = self.cfg, self.d
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        tokens, stats = 0, {}
        for micro in range(cfg.grad_accum):
            batch = self.spec.collate([self.spec.train_data[i]
                                       for i in self.sampler.indices(step * cfg.grad_accum + micro)])
            tokens += _n_tokens(batch) * d.world  # input tokens of the global micro-batch
            sync = micro == cfg.grad_accum - 1 or d.world == 1
            ctx = train_model.no_sync() if not sync else contextlib.nullcontext()
            with ctx, self.amp:
                loss = self.spec.loss_fn(train_model, batch, self.device)
                if isinstance(loss, tuple):  # (loss, {name: value}): statistics logged with the step
                    loss, micro_stats = loss
                    for k, v in micro_stats.items():
                        v = (v.detach() if isinstance(v, torch.Tensor)  # a number: a fill, not a copy
                             else torch.full((), float(v), device=self.device))
                        stats[k] = stats.get(k, 0.0) + v.float() / cfg.grad_accum
                loss = loss / cfg.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        return loss_sum, tokens, stats

    def step_values(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor, stats: dict,
                    stop: _StopFlag) -> tuple[float, float, dict]:
        """The step's one host sync: (mean loss over the ranks, gradient norm, the statistics' means) read
        back together in one ``tolist``; under DDP one all-reduce carries the loss, the statistics and the
        stop flag (``stopping``)."""
        names, world = list(stats), self.d.world
        flag = torch.full((), float(stop.requested), device=self.device)  # (a fill: no copy from the host)
        values = torch.stack([loss_sum, *(stats[k] for k in names), flag])  # (2 + n_stats,) fp32
        if world > 1:
            dist.all_reduce(values)
        *means, flag, norm = torch.cat([values, grad_norm.detach().float().reshape(1)]).tolist()  # the sync
        self.stop_agreed = flag > 0
        means = [v / world for v in means]
        return means[0], norm, {k: round(v, 6) for k, v in zip(names, means[1:])}

    def apply(self, step: int, loss_sum: torch.Tensor, stats: dict, stop: _StopFlag) -> tuple[float, float, dict]:
        """Clip, check and apply the accumulated gradients: (loss, gradient norm before clipping, the
        statistics) from the step's one sync. A non-finite loss or gradient norm stops the run before the
        update."""
        self.scaler.unscale_(self.optimizer)  # (a no-op without fp16's grad scaler)
        clip = self.cfg.clip if self.cfg.clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # a device scalar
        loss_val, grad_norm, stats = self.step_values(loss_sum, grad_norm, stats, stop)
        if not math.isfinite(loss_val):
            raise TrainingDiverged(f"loss is {loss_val} at step {step + 1}; stopped without saving it "
                                   f"({last_good(self.out)})")
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():  # fp16: the scaler skips the step
            raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step + 1} (loss {loss_val:.4g}); "
                                   f"stopped before applying it ({last_good(self.out)})")
        self.scaler.step(self.optimizer)  # (fp16: fused AdamW on CUDA takes found_inf on the device, no sync)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_val, grad_norm, stats

    def evaluate(self, step: int, loss_val: float) -> dict:
        """Evaluate, print the metrics (and a sample), keep ``ckpt-best.pt`` for the best ``val_loss``."""
        metrics = run_eval(self.model, self.spec, self.amp)
        msg = f"step {step}: train loss {loss_val:.3f}" + "".join(
            f", {k.replace('_', ' ')} {v:.4g}" for k, v in metrics.items())
        if self.spec.sample is not None:
            msg += f"\n  sample: {self.spec.sample(self.model)}"
        if self.d.main:
            tqdm.write(msg, file=sys.stdout)
        val = metrics.get("val_loss", float("nan"))
        if math.isfinite(val) and val < self.best_val:
            self.best_val = val
            self.checkpoint(step, "ckpt-best.pt", with_optimizer=False)
        return metrics

    def save_due(self, step: int) -> bool:
        cfg = self.cfg
        due = step % cfg.save_every == 0 or step == cfg.steps
        if cfg.save_every_minutes is not None and self.d.main:  # only rank 0 writes: no need to agree
            due = due or time.monotonic() - self.last_save >= cfg.save_every_minutes * 60
        return due


def train(model: nn.Module, spec: TrainSpec, cfg: LoopConfig, out: Path, device: torch.device, *,
          resume: bool = False, d: Dist | None = None, compile: bool = False, log=print) -> dict:
    """Run the loop up to ``cfg.steps`` optimizer steps; returns the last evaluation's metrics.

    ``out`` receives ``ckpt-last.pt`` (every ``save_every`` steps or ``save_every_minutes``, at the end and
    on Ctrl-C/SIGTERM, never with non-finite values: the run stops instead),
    ``ckpt-best.pt`` (best ``val_loss``), ``metrics.jsonl`` and ``loss.png`` (rank 0 only).
    """
    d = d or Dist()
    model.to(device)
    loop = _Loop(model, spec, cfg, out, device, d, log)
    step = loop.restore() if resume else 0
    train_model = loop.wrapped(compile)
    metrics = open(loop.metrics_path, "a") if d.main else None
    last_eval: dict = {}
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.desc, dynamic_ncols=True, disable=not d.main,
               file=sys.stdout, mininterval=1.0)
    t_last = time.perf_counter()
    model.train()
    model.zero_grad(set_to_none=True)  # (gradients left by an earlier, failed call must not leak in)
    try:
        with _StopFlag() as stop:
            while step < cfg.steps:
                if loop.stopping(stop):
                    loop.checkpoint(step)
                    raise Interrupted(f"interrupted at step {step}; saved {out / 'ckpt-last.pt'}, continue with "
                                      "--resume", 128 + (stop.signum or signal.SIGINT))
                lr = loop.set_lr(step)
                loss_sum, tokens, stats = loop.accumulate(train_model, step)
                loss_val, grad_norm, stats = loop.apply(step, loss_sum, stats, stop)
                step += 1
                now = time.perf_counter()
                row = {"step": step, "train_loss": round(loss_val, 6), "lr": lr,
                       "grad_norm": round(grad_norm, 4) if math.isfinite(grad_norm) else None,
                       "tokens_per_s": round(tokens / max(now - t_last, 1e-9), 1), **stats}
                t_last = now
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.3f}", **{k: f"{v:.3g}" for k, v in stats.items() if k in spec.show},
                                tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                evaluated = step % cfg.eval_every == 0 or step == cfg.steps
                if evaluated:
                    last_eval = loop.evaluate(step, loss_val)
                    row.update(last_eval)
                    t_last = time.perf_counter()  # evaluation is not training throughput
                write_row(metrics, row)
                if loop.save_due(step):
                    loop.checkpoint(step)
                    if d.main and evaluated:  # (plotting takes a second)
                        plot_losses(out)
                    t_last = time.perf_counter()  # nor is writing the checkpoint or the plot
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return last_eval


def _n_tokens(batch) -> int:
    """Input tokens of a collated batch: a tuple's first tensor, or a dict's token-id tensors (DPO's
    ``chosen`` and ``rejected``; boolean masks and lists not counted)."""
    if isinstance(batch, dict):
        return sum(v.numel() for v in batch.values() if isinstance(v, torch.Tensor) and v.dtype != torch.bool)
    return batch[0].numel()


def run_eval(model: nn.Module, spec: TrainSpec, amp=None) -> dict:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (amp or contextlib.nullcontext()):
            return {k: round(float(v), 6) for k, v in spec.evaluate(model).items()}
    finally:
        model.train(was_training)
