"""End-to-end benchmarks: a GPT-2 training step and KV-cached generation, fused vs the references.

    python -m bench.model                  # CUDA: gpt2-small, T=1024, bf16; CPU: a tiny smoke run
    python -m bench.model --quick          # fewer steps and configurations, no torch.compile(book)
    python -m bench.model --only train     # or --only generate; --no-compile; --no-save

Training (``run_train``): tokens/s of a whole optimizer step (bf16 autocast forward, backward, fused
AdamW; dropout 0) of ``gpt.GPTModel`` (ours, eager and ``torch.compile``d) vs the book reference
``gpt.reference.GPTModel`` eager, its ``torch.compile`` and the ``torch.compile`` of the reference with
its attention core replaced by ``F.scaled_dot_product_attention`` (the "compiled reference with SDPA"
baseline of docs/design.md). Steps are timed one by one with a device sync, warm-up (compilation,
autotuning) excluded, rotating three random batches; median with p20/p80. TFLOP/s uses the
nanoGPT/PaLM estimate 6·N + 12·L·d·T FLOPs per token (N = parameters without the embeddings);
``% ceiling`` is that over the bf16 matmul throughput measured in the same run (an MFU against the
achievable, not the datasheet, peak; ``mfu`` against the datasheet peak is added for known GPUs).

Generation (``run_generate``): tokens/s of ``gpt.generate`` (greedy, eos off) at batch 1 and 16, bf16,
for the fused model with its static KV cache and the decode step in a CUDA graph (ours) vs the same
without the graph (``cache, no graph``), vs the fused model without the cache, the book
reference (no cache: recompute the window each step) and Hugging Face ``GPT2LMHeadModel.generate`` with
its cache (same shapes, random weights) when transformers is importable. Prefill is included.

On CPU: the ``tiny`` preset, a handful of steps and tokens, fp32, no torch.compile: a smoke run of the
fallback path, not a performance result; nothing is saved.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import (
    DTYPE_NAMES,
    cli_finish,
    cli_start,
    env_info,
    make_row,
    measure_ceilings,
    ratio,
    time_calls,
)

# Datasheet dense bf16 peaks (TFLOP/s) for the MFU column; matched on the device name.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0), ("L4", 121.0)]


def _peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def _sdpa_reference(model):
    """Swap every block's book attention core for ``F.scaled_dot_product_attention`` (same weights)."""
    from gpt.attention import MultiHeadAttention

    class SDPAMultiHeadAttention(MultiHeadAttention):
        def forward(self, x):
            b, T, _ = x.shape
            q, k, v = (w(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
                       for w in (self.W_query, self.W_key, self.W_value))
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 dropout_p=self.dropout.p if self.training else 0.0)
            return self.out_proj(ctx.transpose(1, 2).reshape(b, T, self.d_out))

    for block in model.trf_blocks:
        block.att.__class__ = SDPAMultiHeadAttention
    return model


def _nonembedding_params(model) -> int:
    emb = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def train_flops_per_token(cfg, n_params: int, T: int) -> float:
    return 6.0 * n_params + 12.0 * cfg.n_layers * cfg.emb_dim * T


def time_train_step(model, batches, device, *, warmup: int, iters: int) -> dict:
    """Median/p20/p80 ms of one optimizer step, tokens/s and peak memory."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)

    def make_step(x, y):
        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = [make_step(x, y) for x, y in batches]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time_calls(steps, warmup=warmup, iters=iters, device=device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    tokens = batches[0][0].numel()
    return {**t, "tokens_per_s": tokens / (t["median_ms"] * 1e-3), "peak_gib": peak}


def _cfg_and_device(device):
    from gpt.config import GPTConfig

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    return GPTConfig.from_preset("gpt2-small" if cuda else "tiny", drop_rate=0.0), device, cuda


def run_train(quick: bool = False, *, device=None, ceilings: dict | None = None,
              use_compile: bool | None = None, batch_size: int | None = None,
              seq_len: int | None = None) -> list[dict]:
    """Training-step throughput of the fused model vs the references; rows in ``make_row`` format."""
    from gpt.model import GPTModel
    from gpt.reference import GPTModel as RefModel

    cfg, device, cuda = _cfg_and_device(device)
    use_compile = cuda if use_compile is None else use_compile
    ceilings = ceilings or measure_ceilings(device, quick=quick)
    B = batch_size or (8 if cuda else 2)
    T = seq_len or (cfg.context_length if cuda else 64)
    warmup, iters = (3, 5 if quick else 20) if cuda else (2, 5)
    g = torch.Generator(device=device).manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device, generator=g)
        batches.append((x[:, :-1], x[:, 1:]))

    torch.manual_seed(0)
    state = RefModel(cfg).state_dict()

    def build(kind):
        model = (GPTModel if kind == "fused" else RefModel)(cfg)
        model.load_state_dict(state)
        model = model.to(device).train()
        return _sdpa_reference(model) if kind == "ref_sdpa" else model

    variants = {"ours": ("fused", False), "reference": ("ref", False)}
    if use_compile:
        variants["compile(reference+SDPA)"] = ("ref_sdpa", True)
        if not quick:
            variants["compile(reference)"] = ("ref", True)
            variants["ours+compile"] = ("fused", True)
    results, errors = {}, {}
    for name, (kind, compiled) in variants.items():
        model = build(kind)
        fn = torch.compile(model) if compiled else model
        try:
            results[name] = time_train_step(fn, batches, device, warmup=warmup, iters=iters)
        except Exception as e:  # noqa: BLE001 - report a failing baseline, keep the others
            if name == "ours":
                raise
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        del model, fn
        if cuda:
            torch.cuda.empty_cache()

    n_params = _nonembedding_params(RefModel(cfg))
    fpt = train_flops_per_token(cfg, n_params, T)
    peak = _peak_tflops(env_info(device).get("device", "")) if cuda else None
    rows = []
    ours_names = ["ours"] + (["ours+compile"] if "ours+compile" in results else [])
    for oname in ours_names:
        r = results[oname]
        base = {n: results[n]["tokens_per_s"] if n in results else None
                for n in variants if not n.startswith("ours")}
        tflops = fpt * r["tokens_per_s"] / 1e12
        notes = "; ".join(f"{n}: {why}" for n, why in errors.items())
        rows.append(make_row(
            group="train", bench="train", name="train step" + (" (compiled)" if oname != "ours" else ""),
            shape=f"{'gpt2-small' if cuda else 'tiny'} B={B} T={T}", dtype="bf16 autocast" if cuda else "fp32",
            unit="tokens/s", ours=r["tokens_per_s"],
            ours_p20=B * T / (r["p80_ms"] * 1e-3), ours_p80=B * T / (r["p20_ms"] * 1e-3),
            baselines=base, speedup={n: ratio(r["tokens_per_s"], v, higher_is_better=True) for n, v in base.items()},
            metric="TFLOP/s", achieved=tflops, ceiling=ceilings["matmul_tflops"],
            params={"B": B, "T": T, "ms_per_step": r["median_ms"], "flops_per_token": fpt,
                    "n_params_nonembedding": n_params, "peak_gib": {n: v["peak_gib"] for n, v in results.items()},
                    "ms_per_step_all": {n: v["median_ms"] for n, v in results.items()}},
            mfu=tflops / peak if peak else None, notes=notes))
    return rows


def _hf_model(cfg, device, dtype):
    try:
        import transformers
    except ImportError:
        return None
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length,
                                     n_embd=cfg.emb_dim, n_layer=cfg.n_layers, n_head=cfg.n_heads)
    return transformers.GPT2LMHeadModel(hf_cfg).to(device, dtype).eval()


def run_generate(quick: bool = False, *, device=None, ceilings: dict | None = None,
                 configs: list[tuple[int, int, int]] | None = None) -> list[dict]:
    """Generation tokens/s: fused+KV cache vs no cache, the reference and HF; ``(batch, prompt, new)``."""
    from gpt import generate
    from gpt.model import GPTModel
    from gpt.reference import GPTModel as RefModel

    cfg, device, cuda = _cfg_and_device(device)
    ceilings = ceilings or measure_ceilings(device, quick=quick)
    dtype = torch.bfloat16 if cuda else torch.float32
    if configs is None:
        if cuda:
            configs = [(1, 16, 512)] if quick else [(1, 16, 512), (16, 16, 512), (1, 512, 256), (16, 512, 256)]
        else:
            configs = [(1, 8, 16)] if quick else [(1, 8, 16), (4, 8, 16)]
    torch.manual_seed(0)
    ref = RefModel(cfg).to(device, dtype).eval()
    fused = GPTModel(cfg).to(device, dtype).eval()
    fused.load_state_dict(ref.state_dict())
    hf = _hf_model(cfg, device, dtype)
    elem = torch.finfo(dtype).bits // 8
    weight_bytes = _nonembedding_params(ref) * elem

    rows = []
    for b, prompt_len, n_new in configs:
        g = torch.Generator(device=device).manual_seed(b * 7 + prompt_len)
        prompt = torch.randint(0, cfg.vocab_size, (b, prompt_len), device=device, generator=g)
        providers = {
            "ours": (lambda p=prompt, n=n_new: generate(fused, p, n), 3),
            "fused no cache": (lambda p=prompt, n=n_new: generate(fused, p, n, use_cache=False), 1),
            **({"cache, no graph": (lambda p=prompt, n=n_new: generate(fused, p, n, cuda_graph=False), 3)}
               if cuda else {}),
            "reference": (lambda p=prompt, n=n_new: generate(ref, p, n, use_cache=False), 1),
        }
        if hf is not None:
            providers["hf generate"] = (lambda p=prompt, n=n_new: hf.generate(
                p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0), 3)
        tps, errors, ours_t = {}, {}, None
        for name, (fn, iters) in providers.items():
            try:
                t = time_calls(fn, warmup=1, iters=iters if cuda else 1, device=device)
            except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
                if name == "ours":
                    raise
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                continue
            tps[name] = b * n_new / (t["median_ms"] * 1e-3)
            if name == "ours":
                ours_t = t
        ours = tps["ours"]
        base = {n: tps.get(n) for n in providers if n != "ours"}
        steps_per_s = ours / b
        kv_bytes = 2 * cfg.n_layers * b * cfg.emb_dim * (prompt_len + n_new / 2) * elem  # mean per step
        rows.append(make_row(
            group="generate", bench="generate", name="generate (KV cache)",
            shape=f"B={b} prompt={prompt_len} new={n_new}", dtype=DTYPE_NAMES[dtype],
            unit="tokens/s", ours=ours,
            ours_p20=b * n_new / (ours_t["p80_ms"] * 1e-3), ours_p80=b * n_new / (ours_t["p20_ms"] * 1e-3),
            baselines=base, speedup={n: ratio(ours, v, higher_is_better=True) for n, v in base.items()},
            metric="GB/s", achieved=steps_per_s * (weight_bytes + kv_bytes) / 1e9, ceiling=ceilings["copy_gbs"],
            params={"B": b, "prompt": prompt_len, "new": n_new, "weight_bytes": weight_bytes},
            notes="; ".join(f"{n}: {why}" for n, why in errors.items())))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--only", choices=["train", "generate"], default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(argv)

    device, ceilings, env = cli_start(args.quick, "a tiny CPU smoke run of the fallback path (the 'tiny' preset), "
                                      "not a performance result.", device=args.device)
    rows = []
    if args.only in (None, "train"):
        rows += run_train(args.quick, device=device, ceilings=ceilings,
                          use_compile=False if args.no_compile else None)
    if args.only in (None, "generate"):
        rows += run_generate(args.quick, device=device, ceilings=ceilings)
    return cli_finish("model", rows, device=device, env=env, ceilings=ceilings, save=not args.no_save,
                      legend="vs X: ours' tokens/s over X's (> 1: ours is faster).")


if __name__ == "__main__":
    raise SystemExit(main())
