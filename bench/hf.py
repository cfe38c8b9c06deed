"""Our kernels inside Hugging Face GPT-2: ``attn_implementation`` ours vs ``sdpa`` vs ``eager``, plus the swap.

    python -m bench --only hf          # part of the suite (JSON/Markdown rows, group "hf")
    python -m bench.hf [--quick]       # alone, prints the table

``transformers.GPT2LMHeadModel`` with random weights (no download) at GPT-2 124M on CUDA (bf16 weights
for generation, bf16 autocast for training), a tiny config on CPU (fp32; a smoke run of the fallback
path, not a performance result). Variants, all the same weights:

* ``ours``: ``attn_implementation=kernels.register_hf_attention()`` and ``kernels.replace_modules``
  (Triton LayerNorm and GELU in place of ``nn.LayerNorm`` and ``NewGELUActivation``);
* ``ours attention``: our attention only; ``sdpa`` and ``eager``: transformers' own.

Rows: tokens/s of a training step (forward, backward, AdamW; dropout 0) at ``B×T`` and of greedy
``generate`` at batch 1 (prefill included, transformers' dynamic cache). Timing: ``bench.common.time_calls``
(device sync per call, warm-up excluded, rotating random batches; median, p20/p80).
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.common import DTYPE_NAMES, make_row, measure_ceilings, ratio, time_calls

VARIANTS = ("ours", "ours attention", "sdpa", "eager")


def _config(cuda: bool):
    import transformers

    if cuda:
        size = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    else:
        size = dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2Config(**size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   bos_token_id=0, eos_token_id=0)


def build_variants(cuda: bool, device, dtype=None) -> dict:
    """The four variants of one random GPT-2 (same weights), on ``device`` in ``dtype``."""
    import transformers

    import kernels

    name = kernels.register_hf_attention()
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(_config(cuda)).to(device=device, dtype=dtype)
    models = {}
    for variant in VARIANTS:
        m = copy.deepcopy(base)
        m.set_attn_implementation({"ours": name, "ours attention": name}.get(variant, variant))
        models[variant] = kernels.replace_modules(m) if variant == "ours" else m
    return models


def _train_rows(quick: bool, device, cuda: bool, ceilings: dict) -> list[dict]:
    models = build_variants(cuda, device)
    vocab = models["ours"].config.vocab_size
    B, T = (8, 1024) if cuda else (2, 32)
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, vocab, (B, T), generator=g).to(device) for _ in range(3)]
    results, errors = {}, {}
    for variant, model in models.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)

        def make_step(x, model=model, opt=opt):
            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    loss = model(x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        try:
            t = time_calls([make_step(x) for x in batches], warmup=3 if quick else 5, iters=5 if quick else 20,
                           device=device)
            results[variant] = {"tokens_per_s": B * T / (t["median_ms"] * 1e-3), **t}
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            errors[variant] = f"{type(e).__name__}: {e}"
        del opt
    return [_row("hf train step", f"{'gpt2-small' if cuda else 'tiny'} B={B} T={T}",
                 "bf16 autocast" if cuda else "fp32", results, errors, B * T, {"B": B, "T": T})]


def _generate_rows(quick: bool, device, cuda: bool) -> list[dict]:
    dtype = torch.bfloat16 if cuda else torch.float32
    models = build_variants(cuda, device, dtype)
    vocab = models["ours"].config.vocab_size
    prompt_len, n_new = (128, 256) if cuda else (8, 8)
    if quick:
        n_new //= 2
    g = torch.Generator(device="cpu").manual_seed(1)
    prompts = [torch.randint(1, vocab, (1, prompt_len), generator=g).to(device) for _ in range(3)]
    results, errors = {}, {}
    for variant, model in models.items():
        model.eval()

        def make_gen(p, model=model):
            return lambda: model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n_new,
                                          min_new_tokens=n_new, do_sample=False, pad_token_id=0)

        try:
            with torch.no_grad():
                t = time_calls([make_gen(p) for p in prompts], warmup=2, iters=3 if quick else 10, device=device)
            results[variant] = {"tokens_per_s": n_new / (t["median_ms"] * 1e-3), **t}
        except Exception as e:  # noqa: BLE001
            errors[variant] = f"{type(e).__name__}: {e}"
    return [_row("hf generate (greedy, B=1)", f"prompt={prompt_len} new={n_new}", DTYPE_NAMES[dtype],
                 results, errors, n_new, {"B": 1, "prompt": prompt_len, "new": n_new})]


def _row(name: str, shape: str, dtype: str, results: dict, errors: dict, tokens: int, params: dict) -> dict:
    if "ours" not in results:
        raise RuntimeError(f"{name}: ours failed: {errors.get('ours')}")
    r = results["ours"]
    base = {v: results[v]["tokens_per_s"] if v in results else None for v in VARIANTS if v != "ours"}
    return make_row(group="hf", bench="hf", name=name, shape=shape, dtype=dtype, unit="tokens/s",
                    ours=r["tokens_per_s"], ours_p20=tokens / (r["p80_ms"] * 1e-3),
                    ours_p80=tokens / (r["p20_ms"] * 1e-3), baselines=base,
                    speedup={v: ratio(r["tokens_per_s"], b, higher_is_better=True) for v, b in base.items()},
                    params={**params, "ms_all": {v: x["median_ms"] for v, x in results.items()}},
                    notes="; ".join(f"{v}: {why}" for v, why in errors.items()))


def run(quick: bool = False, *, device=None, ceilings: dict | None = None, use_compile: bool | None = None
        ) -> list[dict]:
    """Rows for the suite: the HF GPT-2 training step and greedy generation, ours vs sdpa vs eager."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    ceilings = ceilings or measure_ceilings(device, quick=True)
    return _train_rows(quick, device, cuda, ceilings) + _generate_rows(quick, device, cuda)


def main(argv=None) -> int:
    from bench.report import print_rows

    parser = argparse.ArgumentParser(prog="python -m bench.hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and tokens")
    args = parser.parse_args(argv)
    print_rows(run(args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
