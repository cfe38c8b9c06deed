"""Batched generation: ``gpt.generate_batch`` on ragged prompts vs one prompt at a time and vs HF.

    python -m bench --only generate        # bench.model's generate rows, then these
    python -m bench.batch_generate [--quick] [--device cpu]

CUDA: gpt2-small in bf16 (random weights), 64 prompts of 10-500 tokens (uniform lengths, fixed seed),
256 new tokens per prompt, greedy, no end-of-text stop (every row makes all 256 tokens), batch 16 and 64.
tokens/s = prompts x new tokens / wall time, prefills included. Baselines on the same prompts:
``gpt.generate`` one prompt at a time (same model, its KV cache and CUDA-graph decode), and Hugging Face
``GPT2LMHeadModel.generate`` (same config and dtype) in batches of the same size, left-padded with an
attention mask, when transformers is importable. ``rows_equal`` counts the rows whose tokens equal the
one-at-a-time run (bf16 batched and single matmuls round differently, so near-ties may flip).

CPU: the ``tiny`` preset in fp32 on the PyTorch fallback path with scaled-down shapes; a smoke run of
the code path, not a performance result.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import DTYPE_NAMES, env_info, make_row, measure_ceilings, ratio, time_calls

ONE_AT_A_TIME = "one at a time"
HF = "hf generate (left pad)"


def shapes(cuda: bool, quick: bool) -> dict:
    """Prompt count, prompt length range, new tokens and batch sizes for this device. Prompt + new
    tokens stay within the context (1024 on CUDA, 128 for the CPU ``tiny`` preset): HF cannot slide."""
    if cuda:
        return ({"n": 16, "lengths": (10, 500), "new": 64, "batches": [16]} if quick else
                {"n": 64, "lengths": (10, 500), "new": 256, "batches": [16, 64]})
    return ({"n": 8, "lengths": (4, 40), "new": 8, "batches": [4, 8]} if quick else
            {"n": 64, "lengths": (10, 96), "new": 32, "batches": [16, 64]})


def _hf_left_padded(hf, prompts: list[torch.Tensor], n_new: int, batch: int, device) -> list[list[int]]:
    out = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        width = max(p.numel() for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)  # (b, width), pads on the left
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - p.numel():] = p
            mask[i, width - p.numel():] = 1
        gen = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          pad_token_id=0)
        out += gen[:, width:].tolist()
    return out


def run(quick: bool = False, *, device=None, ceilings: dict | None = None) -> list[dict]:
    """Rows in ``make_row`` format, one per batch size."""
    from bench.model import _cfg_and_device, _hf_model
    from gpt import generate, generate_batch
    from gpt.model import GPTModel
    from gpt.weights import hf_to_state_dict

    cfg, device, cuda = _cfg_and_device(device)
    ceilings = ceilings or measure_ceilings(device, quick=quick)
    dtype = torch.bfloat16 if cuda else torch.float32
    sh = shapes(cuda, quick)
    n, (lo, hi), n_new = sh["n"], sh["lengths"], sh["new"]
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device, dtype).eval()
    hf = _hf_model(cfg, device, dtype)
    if hf is not None:  # one set of weights for both (our config has no QKV bias)
        with torch.no_grad():
            for block in hf.transformer.h:
                block.attn.c_attn.bias.zero_()
        model.load_state_dict(hf_to_state_dict(hf.state_dict(), cfg))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(0, cfg.vocab_size, (t,), generator=g).to(device) for t in lengths]
    iters = 2 if cuda and not quick else 1

    single_out: list[list[int]] = []

    def one_at_a_time():
        single_out[:] = [generate(model, p.view(1, -1), n_new)[0, p.numel():].tolist() for p in prompts]

    generate(model, prompts[0].view(1, -1), 4)  # compile / autotune the batch-1 kernels once
    t_single = time_calls(one_at_a_time, warmup=0, iters=1, device=device)
    tps_single = n * n_new / (t_single["median_ms"] * 1e-3)

    rows = []
    for batch in sh["batches"]:
        got: list[list[int]] = []

        def ours(b=batch, out=got):
            out[:] = generate_batch(model, prompts, n_new, batch_size=b)

        t = time_calls(ours, warmup=1, iters=iters, device=device)
        tps = n * n_new / (t["median_ms"] * 1e-3)
        base, notes = {ONE_AT_A_TIME: tps_single, HF: None}, []
        if hf is None:
            notes.append("hf generate: transformers is not importable")
        else:
            try:
                th = time_calls(lambda b=batch: _hf_left_padded(hf, prompts, n_new, b, device), warmup=1,
                                iters=iters, device=device)
                base[HF] = n * n_new / (th["median_ms"] * 1e-3)
            except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
                notes.append(f"hf generate: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
        equal = sum(a == b for a, b in zip(got, single_out))
        notes.insert(0, f"rows equal to one at a time: {equal}/{n}")
        rows.append(make_row(
            group="generate", bench="generate_batch", name="generate_batch",
            shape=f"{n} prompts {lo}-{hi} tok, new={n_new}, B={batch}", dtype=DTYPE_NAMES[dtype],
            unit="tokens/s", ours=tps, ours_p20=n * n_new / (t["p80_ms"] * 1e-3),
            ours_p80=n * n_new / (t["p20_ms"] * 1e-3), baselines=base,
            speedup={k: ratio(tps, v, higher_is_better=True) for k, v in base.items()},
            params={"B": batch, "prompts": n, "min_len": lo, "max_len": hi, "new": n_new,
                    "rows_equal": equal}, notes="; ".join(notes)))
    return rows


def main(argv=None) -> int:
    from bench.report import print_rows

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = env_info(device)
    print(f"device: {env.get('device')} | torch {env['torch']} | triton {env['triton']}\n")
    print_rows(run(args.quick, device=device))
    print("\nvs X: ours' tokens/s over X's (> 1: ours is faster).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
