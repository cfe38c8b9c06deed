"""Host syncs of the training loop: the loss is summed on the device, one read-back per optimizer step
(the loss, the gradient norm and the statistics together; the non-finite guard uses it), none inside a
micro-batch.

The counter sits below the loop's code: a ``TorchDispatchMode`` sees every op that must read device
memory to return (``aten._local_scalar_dense``, which ``.item()``, ``float()``, ``bool()``, ``int()``
and ``math.isfinite(tensor)`` all reach, ``nonzero``, ``masked_select``, boolean indexing, ``equal``,
``unique``, a copy to the host or a blocking one from pageable host memory), a ``TorchFunctionMode`` the reads that dispatch no op on CPU (``tolist``, ``numpy``,
``cpu``), and ``torch.cuda.synchronize`` is patched. Left out, because on a GPU they read host memory
only: AdamW reading its own step counters (by identity: PyTorch keeps them on the host on every device;
the fused CUDA AdamW reads none), the data order (``EpochBatches.indices``: a CPU permutation), the instruct collate's padding (host
tensors, copied to the device once at its end) and the
kernels' target-range check (``kernels.cross_entropy._check_args``: it runs for CPU targets only)."""

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gpt.config import GPTConfig
from gpt.model import GPTModel
from gpt.training import LoopConfig, TrainingDiverged, TrainSpec, calc_loss_batch, train

pytestmark = pytest.mark.usefixtures("fallback_path")

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique", "_unique2",
            "unique_dim", "unique_consecutive"}
HOST_READS = {"tolist", "numpy", "cpu"}
HOST_ONLY = {("gpt/data.py", "indices"), ("kernels/cross_entropy.py", "_check_args"),  # (file, function)
             ("gpt/finetune/instruct.py", "custom_collate_fn")}  # (it pads on the host, then copies once)


def _in_host_only_code() -> bool:
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        code = frame.f_code
        if any(code.co_filename.endswith(f) and code.co_name == fn for f, fn in HOST_ONLY):
            return True
        frame = frame.f_back
    return False


class SyncCounter(TorchDispatchMode):
    """Appends ("sync", what) to ``events`` for each device read; ``host_tensors`` are exempt."""

    def __init__(self, events: list, host_tensors):
        super().__init__()
        self.events, self.host_tensors = events, host_tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else []) if i is not None)
        if ((name in SYNC_OPS or bool_index or _blocking_copy(name, args, kwargs))
                and not any(args and args[0] is t for t in self.host_tensors()) and not _in_host_only_code()):
            self.events.append(("sync", name))
        return func(*args, **kwargs)


def _blocking_copy(name, args, kwargs) -> bool:
    """A copy between the host and an accelerator that waits for its queue: device -> host always, host ->
    device unless asynchronous from pinned memory (a pageable copy synchronizes the stream)."""
    if name == "_to_copy":
        src, dst, non_blocking = args[0], kwargs.get("device"), kwargs.get("non_blocking", False)
    elif name == "copy_":
        dst, src = args[0].device, args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    else:
        return False
    if not isinstance(src, torch.Tensor) or dst is None or (src.device.type == "cpu") == (dst.type == "cpu"):
        return False
    return src.device.type != "cpu" or not (non_blocking and src.is_pinned())


class HostReads(TorchFunctionMode):
    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and not _in_host_only_code():
            self.events.append(("sync", name))
        return func(*args, **(kwargs or {}))


def _run(tmp_path, monkeypatch, loss_fn, *, steps=3, grad_accum=4, device="cpu"):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    model = GPTModel(cfg)
    data = [(torch.randint(0, 64, (16,)), torch.randint(0, 64, (16,))) for _ in range(64)]
    events: list = []

    def marked_loss(m, batch, device):
        events.append(("micro",))
        return loss_fn(m, batch, device)

    spec = TrainSpec(train_data=data, collate=lambda items: tuple(torch.stack(t) for t in zip(*items)),
                     loss_fn=marked_loss, evaluate=lambda m: {"val_loss": 1.0})
    loop = LoopConfig(steps=steps, batch_size=2, grad_accum=grad_accum, eval_every=100, save_every=100, lr=1e-3)
    optimizers = []
    orig_init = torch.optim.AdamW.__init__

    def init(self, *a, **k):  # mark each optimizer step in the timeline
        orig_init(self, *a, **k)
        optimizers.append(self)
        self.register_step_post_hook(lambda *_: events.append(("opt_step",)))

    monkeypatch.setattr(torch.optim.AdamW, "__init__", init)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: events.append(("sync", "cuda.synchronize")))

    def host_tensors():
        return [s["step"] for o in optimizers for s in o.state.values() if "step" in s]

    with SyncCounter(events, host_tensors), HostReads(events):
        train(model, spec, loop, tmp_path, torch.device(device), log=lambda *a: None)
    return events


def _per_step(events, grad_accum):
    """For each optimizer step: (syncs in each of its micro-batches but the last, syncs from its last
    micro-batch to the optimizer step, syncs after the step until the next step's first micro-batch)."""
    steps, cur = [], None
    for e in events:
        if e[0] == "micro":
            if cur is not None and len(cur["micro"]) == grad_accum:  # a new step begins
                steps.append(cur)
                cur = None
            if cur is None:
                cur = {"micro": [], "after": 0}
            cur["micro"].append(0)
        elif e[0] == "opt_step":
            cur["stepped"] = True
        elif e[0] == "sync" and cur is not None:
            if cur.get("stepped"):
                cur["after"] += 1
            else:
                cur["micro"][-1] += 1
    steps.append(cur)
    return [(s["micro"][:-1], s["micro"][-1], s["after"]) for s in steps]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_one_sync_per_optimizer_step_none_per_micro_batch(tmp_path, monkeypatch, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    events = _run(tmp_path, monkeypatch, lambda m, batch, dev: calc_loss_batch(batch[0], batch[1], m, dev),
                  device=device)
    steps = _per_step(events, 4)
    assert len(steps) == 3 and sum(e == ("opt_step",) for e in events) == 3
    for i, (inside, last, after) in enumerate(steps):
        assert inside == [0, 0, 0], f"step {i + 1}: host syncs inside micro-batches {inside}: {events}"
        assert last <= 1, f"step {i + 1}: {last} syncs between the last micro-batch and the update"
        if i < len(steps) - 1:  # (the last step evaluates and saves the checkpoint: those read values)
            assert after == 0, f"step {i + 1}: {after} syncs after the update"


def test_statistics_are_summed_on_the_device(tmp_path, monkeypatch):
    def loss_fn(m, batch, dev):
        loss = calc_loss_batch(batch[0], batch[1], m, dev)
        return loss, {"twice": 2 * loss.detach(), "const": 1.5}

    steps = _per_step(_run(tmp_path, monkeypatch, loss_fn, steps=2), 4)
    assert [(inside, last) for inside, last, _ in steps] == [([0, 0, 0], 1), ([0, 0, 0], 1)]
    from gpt.training import read_metrics
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["const"] for r in rows] == [1.5, 1.5]
    assert all(abs(r["twice"] - 2 * r["train_loss"]) < 1e-5 for r in rows)


def test_the_counter_sees_a_sync_in_the_loss(tmp_path, monkeypatch):
    """The hook can fail: a loss function reading its value (``float``) is counted in its micro-batch."""
    def loss_fn(m, batch, dev):
        loss = calc_loss_batch(batch[0], batch[1], m, dev)
        assert float(loss) > 0
        return loss

    steps = _per_step(_run(tmp_path, monkeypatch, loss_fn, steps=1), 4)
    assert steps[0][0] == [1, 1, 1] and steps[0][1] == 2


def test_the_guard_still_stops_a_nan_loss_before_the_update(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0))
    data = [(torch.randint(0, 64, (16,)), torch.randint(0, 64, (16,))) for _ in range(16)]
    calls = {"n": 0}

    def loss_fn(m, batch, dev):  # the second micro-batch of step 2 is NaN
        calls["n"] += 1
        loss = calc_loss_batch(batch[0], batch[1], m, dev)
        return loss * float("nan") if calls["n"] == 4 else loss

    spec = TrainSpec(train_data=data, collate=lambda items: tuple(torch.stack(t) for t in zip(*items)),
                     loss_fn=loss_fn, evaluate=lambda m: {"val_loss": 1.0})
    cfg = LoopConfig(steps=4, batch_size=2, grad_accum=2, eval_every=100, save_every=1, lr=1e-3)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2"):
        train(model, spec, cfg, tmp_path, torch.device("cpu"), log=lambda *a: None)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _recipe_losses(device):
    """One micro-batch of each finetuning recipe's loss as the loop calls it: (name, thunk)."""
    import copy

    from gpt.finetune import classify, dpo, instruct

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0)
    model = GPTModel(cfg).to(device)
    clf = classify.make_classifier(copy.deepcopy(model), 2)
    x, y = torch.randint(0, 97, (2, 16)), torch.tensor([0, 1])
    items = [{"prompt": [5, 6, 7], "chosen": [5, 6, 7, 1, 1, 3, 4], "rejected": [5, 6, 7, 1, 1, 8]},
             {"prompt": [9, 10], "chosen": [9, 10, 1, 1, 3], "rejected": [9, 10, 1, 1, 8, 8, 8]}]

    class Prefs(dpo.PreferenceDataset):
        def __init__(self, entries):
            self.data, self.encoded_texts = entries, entries

    spec = dpo.dpo_spec(Prefs(items), Prefs(items), copy.deepcopy(model), beta=0.1, allowed_max_length=32,
                        batch_size=2, eval_batches=1, device=torch.device(device), pad_token_id=0)
    chat = [([5, 6, 7, 8], 2), ([9, 10], 1)]  # (token ids, prompt length)
    return [
        ("classify", lambda: classify.loss_fn(clf, (x, y), device)),
        ("dpo", lambda: spec.loss_fn(model, spec.collate(items), device)),
        ("instruct", lambda: calc_loss_batch(*instruct.custom_collate_fn(chat, pad_token_id=0, device=device),
                                             model, device)),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_finetuning_losses_do_not_sync(device):
    """classify, instruct and DPO: a micro-batch's loss (collate, copy to the device, forward, rewards)
    reads nothing back (on CUDA: batches through pinned memory, asynchronously)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for name, thunk in _recipe_losses(device):
        events: list = []
        with SyncCounter(events, list), HostReads(events):
            out = thunk()
        loss = out[0] if isinstance(out, tuple) else out
        assert events == [], f"{name}: host syncs in one micro-batch: {events}"
        assert torch.isfinite(loss.detach()).all(), name


def test_a_finetuning_sync_is_seen(monkeypatch):
    """The counter can fail here: DPO's rewards read with .item() per micro-batch (as before) are counted."""
    from gpt.finetune import dpo

    real = dpo.compute_dpo_loss_batch

    def reads(*a, **k):
        loss, chosen, rejected = real(*a, **k)
        chosen.item()
        return loss, chosen, rejected

    monkeypatch.setattr(dpo, "compute_dpo_loss_batch", reads)
    name, thunk = _recipe_losses("cpu")[1]
    events: list = []
    with SyncCounter(events, list), HostReads(events):
        thunk()
    assert name == "dpo" and ("sync", "_local_scalar_dense") in events
