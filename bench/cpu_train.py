"""CPU fallback training step: the fused GPTModel vs the book reference, interleaved, per-pair ratios.

    python -m bench.cpu_train B T {logits,loss} REPS     # e.g. 2 64 logits 30;  8 128 loss 12

``logits``: both models step on ``F.cross_entropy(model(x))``; ``loss``: the fused model steps on
``model.loss`` (the fused linear + cross-entropy, as ``train.py`` trains it), the reference on its
logits. The two steps alternate (the order flipped every pair) so machine noise hits both; the
speed-up is the median of the per-pair ratios with its interquartile range. The ``tiny`` preset, fp32,
AdamW, dropout 0, the fallback path (``TRITON_INTERPRET=0``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gpt.config import GPTConfig
from gpt.model import GPTModel
from gpt.reference import GPTModel as RefModel


def make_step(model, fused_loss: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x):
        inp, tgt = x[:, :-1], x[:, 1:]  # (B, T) each
        if fused_loss:
            loss = model.loss(inp, tgt)
        else:
            loss = F.cross_entropy(model(inp).flatten(0, 1), tgt.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (no usage block)
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def parse_args(argv) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.cpu_train", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("B", type=_positive_int, help="batch size")
    p.add_argument("T", type=_positive_int, help="sequence length (tokens per row)")
    p.add_argument("mode", choices=("logits", "loss"), help="what the fused model steps on (see above)")
    p.add_argument("reps", type=_positive_int, help="number of interleaved fused/reference pairs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)  # --help and bad input exit here
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # the fallback, read at call time; restored after
    try:
        return _run(args.B, args.T, args.mode, args.reps)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _run(B: int, T: int, mode: str, reps: int) -> int:
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", drop_rate=0.0)
    ref = RefModel(cfg)
    fused = GPTModel(cfg)
    fused.load_state_dict(ref.state_dict())
    batches = [torch.randint(0, cfg.vocab_size, (B, T + 1)) for _ in range(3)]
    steps = {"fused": make_step(fused, mode == "loss"), "ref": make_step(ref, False)}
    for step in steps.values():  # warm-up
        for x in batches:
            step(x)
    times = {k: [] for k in steps}
    ratios = []
    for i in range(reps):
        pair = {}
        for k in (steps if i % 2 == 0 else reversed(list(steps))):
            t0 = time.perf_counter()
            steps[k](batches[i % 3])
            pair[k] = time.perf_counter() - t0
            times[k].append(pair[k])
        ratios.append(pair["ref"] / pair["fused"])
    q1, _, q3 = statistics.quantiles(ratios, n=4) if reps > 1 else (ratios[0],) * 3
    med = statistics.median
    print(f"B={B} T={T} fused {'model.loss' if mode == 'loss' else 'logits'} vs reference logits, "
          f"{torch.get_num_threads()} threads: fused {med(times['fused']) * 1e3:.0f} ms, reference "
          f"{med(times['ref']) * 1e3:.0f} ms; speed-up median {med(ratios):.3f} (IQR {q1:.3f}-{q3:.3f}, "
          f"{reps} interleaved pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
