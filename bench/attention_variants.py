"""Benchmark the attention variants of today's models (issue 24): grouped-query heads, packed
variable-length documents and a sliding window, each against SDPA and our dense kernel.

    python -m bench.attention_variants           # CUDA: bf16, the rows below
    python -m bench.attention_variants --quick   # CUDA: T = 4k for GQA (the varlen/window rows stay at 16k)
    (also part of ``python -m bench --only attention``)

Rows (forward, and forward+backward), head_dim 128:

* ``gqa H/Hk=4`` and ``gqa H/Hk=8``: q ``(B, 32, T, 128)``, k/v ``(B, 32/r, T, 128)``, B·T = 16k tokens,
  causal. Ours: ``flash_attention`` on the grouped k/v. Baselines: ``sdpa_gqa`` =
  ``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)``; ``dense`` = our kernel on k/v
  already repeated to 32 heads (what GQA avoids: the repeat itself is not timed).
* ``varlen``: 16 heads, documents of mixed lengths (a fixed list, 64 ... 4096 tokens) summing to 16k
  (scaled down with the total on CPU),
  packed into one sequence. Ours: ``flash_attention_varlen``. Baselines: ``sdpa_mask`` = SDPA with the
  explicit block-diagonal causal bool mask; ``dense`` = our causal kernel over the whole 16k (documents
  see each other: the cost of not separating them).
* ``window W=4096``: 16 heads, one sequence of 16k, causal within 4096 keys. Ours: ``flash_attention(...,
  window_size=4096)``. Baselines: ``sdpa_mask`` = SDPA with the explicit banded bool mask; ``dense`` = our
  causal kernel without the window.

TFLOP/s counts only the visible (query, key) pairs: 4·H·D·pairs forward, 2.5× that backward. On CPU the
run is a smoke test of tiny fp32 shapes (ours on the PyTorch fallback or the Triton interpreter): not a
performance result, and nothing is saved.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.attention import PASS_FLOP_FACTOR, _check, _time_passes, _try
from bench.common import DTYPE_NAMES, make_row, measure_ceilings, ratio

PASSES = ("fwd", "fwd+bwd")
HEAD_DIM = 128
GQA_HEADS, GQA_RATIOS = 32, (4, 8)
HEADS = 16
TOTAL = 16384
WINDOW = 4096
#: Document lengths of the varlen row, cycled until they fill TOTAL (the last one is cut to fit).
DOC_LENGTHS = [4096, 512, 1024, 64, 2048, 300, 3000, 128, 777, 1500, 256, 2000]


def _docs(total: int, lengths=DOC_LENGTHS) -> list[int]:
    out, i = [], 0
    while sum(out) < total:
        out.append(min(lengths[i % len(lengths)], total - sum(out)))
        i += 1
    return out


def _pairs_causal(Tq: int, Tk: int, window: int | None = None) -> int:
    """Visible (query, key) pairs of bottom-right causal attention within ``window``."""
    return sum(min(i + Tk - Tq + 1, window or Tk) for i in range(Tq))


def _rows(label, shape, times, pairs, H, D, dtype, ceilings, params, notes) -> list[dict]:
    rows = []
    flops = 4.0 * H * D * pairs
    for p in PASSES:
        ms = times["ours"][p]["median_ms"]
        base = {n: (t[p]["median_ms"] if t is not None else None) for n, t in times.items() if n != "ours"}
        rows.append(make_row(
            group="kernels", bench="attention_variants", name=f"{label} {p}", shape=shape,
            dtype=DTYPE_NAMES[dtype], unit="ms", ours=ms, ours_p20=times["ours"][p]["p20_ms"],
            ours_p80=times["ours"][p]["p80_ms"], baselines=base,
            speedup={n: ratio(ms, v) for n, v in base.items()}, metric="TFLOP/s",
            achieved=PASS_FLOP_FACTOR[p] * flops / (ms * 1e-3) / 1e12, ceiling=ceilings["matmul_tflops"],
            params={"pass": p, "pairs": pairs, "H": H, "D": D, **params}, notes=notes))
    return rows


def _time_all(provs: dict, q, k, v, dout, warmup, rep, skipped) -> dict:
    """``provs`` name -> (fn, q, k, v, dout); ours first (it must run), baselines may be skipped."""
    times = {}
    for name, (fn, *args) in provs.items():
        if name == "ours":
            times[name] = _time_passes(fn, *args, PASSES, warmup, rep)
            continue
        if _try(name, lambda fn=fn, args=args: fn(*args[:3]), skipped) is None:
            times[name] = None
            continue
        times[name] = _try(name, lambda fn=fn, args=args: _time_passes(fn, *args, PASSES, warmup, rep), skipped)
    return times


def run_gqa(T, dtype, device, ceilings, warmup, rep, total=TOTAL, H=GQA_HEADS, D=HEAD_DIM,
            ratios=GQA_RATIOS) -> list[dict]:
    from kernels import flash_attention

    rows = []
    B = max(1, total // T)
    for r in ratios:
        Hk = H // r
        g = torch.Generator(device=device).manual_seed(r)
        q = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
        k, v = (torch.randn(B, Hk, T, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in "kv")
        kd, vd = (t.detach().repeat_interleave(r, 1).requires_grad_() for t in (k, v))
        dout = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
        skipped: dict[str, str] = {}

        def ours(q, k, v):
            return flash_attention(q, k, v, causal=True)

        def sdpa_gqa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        with torch.no_grad():
            ref = _try("sdpa_gqa", lambda q=q, k=k, v=v: sdpa_gqa(q, k, v), skipped)
            if ref is not None:
                _check(f"gqa r={r} T={T}", ours(q, k, v), ref, dtype)
        del ref
        times = _time_all({"ours": (ours, q, k, v, dout), "sdpa_gqa": (sdpa_gqa, q, k, v, dout),
                           "dense": (ours, q, kd, vd, dout)}, q, k, v, dout, warmup, rep, skipped)
        rows += _rows(f"gqa H/Hk={r}", f"B={B} H={H} Hk={Hk} T={T} D={D}", times, B * _pairs_causal(T, T), H, D,
                      dtype, ceilings, {"T": T, "B": B, "Hk": Hk, "ratio": r},
                      "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    return rows


def run_varlen(total, dtype, device, ceilings, warmup, rep, H=HEADS, D=HEAD_DIM) -> list[dict]:
    from kernels import flash_attention, flash_attention_varlen

    docs = _docs(total, [max(1, n * total // TOTAL) for n in DOC_LENGTHS])  # the 16k mix, scaled
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], device=device, dtype=torch.int32)
    g = torch.Generator(device=device).manual_seed(7)
    q, k, v = (torch.randn(total, H, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in "qkv")
    dout = torch.randn(total, H, D, device=device, dtype=dtype, generator=g)
    doc_id = torch.repeat_interleave(torch.arange(len(docs), device=device), torch.tensor(docs, device=device))
    pos = torch.arange(total, device=device)
    mask = (doc_id[:, None] == doc_id[None, :]) & (pos[None, :] <= pos[:, None])  # (T, T) block-diagonal causal
    skipped: dict[str, str] = {}
    longest = max(docs)

    def ours(q, k, v):
        return flash_attention_varlen(q, k, v, cu, cu, longest, longest, causal=True)

    def bhtd(t):  # (T, H, D) -> (1, H, T, D), a view
        return t.transpose(0, 1).unsqueeze(0)

    def sdpa_mask(q, k, v):
        return F.scaled_dot_product_attention(bhtd(q), bhtd(k), bhtd(v), attn_mask=mask)[0].transpose(0, 1)

    def dense(q, k, v):
        return flash_attention(bhtd(q), bhtd(k), bhtd(v), causal=True)[0].transpose(0, 1)

    with torch.no_grad():
        ref = _try("sdpa_mask", lambda: sdpa_mask(q, k, v), skipped)
        if ref is not None:
            _check(f"varlen total={total}", ours(q, k, v), ref, dtype)
    del ref
    times = _time_all({"ours": (ours, q, k, v, dout), "sdpa_mask": (sdpa_mask, q, k, v, dout),
                       "dense": (dense, q, k, v, dout)}, q, k, v, dout, warmup, rep, skipped)
    pairs = sum(_pairs_causal(n, n) for n in docs)
    notes = "; ".join([f"{len(docs)} documents, {min(docs)}..{longest} tokens",
                       *(f"{n}: {why}" for n, why in skipped.items())])
    return _rows("varlen", f"total={total} docs={len(docs)} H={H} D={D}", times, pairs, H, D, dtype, ceilings,
                 {"T": total, "docs": len(docs)}, notes)


def run_window(T, W, dtype, device, ceilings, warmup, rep, H=HEADS, D=HEAD_DIM) -> list[dict]:
    from kernels import flash_attention

    g = torch.Generator(device=device).manual_seed(11)
    q, k, v = (torch.randn(1, H, T, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in "qkv")
    dout = torch.randn(1, H, T, D, device=device, dtype=dtype, generator=g)
    i = torch.arange(T, device=device)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)
    skipped: dict[str, str] = {}

    def ours(q, k, v):
        return flash_attention(q, k, v, causal=True, window_size=W)

    def sdpa_mask(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def dense(q, k, v):
        return flash_attention(q, k, v, causal=True)

    with torch.no_grad():
        ref = _try("sdpa_mask", lambda: sdpa_mask(q, k, v), skipped)
        if ref is not None:
            _check(f"window W={W} T={T}", ours(q, k, v), ref, dtype)
    del ref
    times = _time_all({"ours": (ours, q, k, v, dout), "sdpa_mask": (sdpa_mask, q, k, v, dout),
                       "dense": (dense, q, k, v, dout)}, q, k, v, dout, warmup, rep, skipped)
    return _rows(f"window W={W}", f"B=1 H={H} T={T} W={W} D={D}", times, _pairs_causal(T, T, W), H, D, dtype,
                 ceilings, {"T": T, "W": W}, "; ".join(f"{n}: {why}" for n, why in skipped.items()))


def pieces(quick: bool = False, *, device: str | None = None, ceilings: dict | None = None) -> list:
    """``[(label, thunk)]``, one shape each, every thunk returning rows: what a capped GPU-session step
    runs piece by piece (``bench.__main__.step_pieces``), and what ``run`` runs in a row."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ceilings = ceilings or measure_ceilings(device, quick=quick)
    if device == "cuda":
        dt, warmup, rep = torch.bfloat16, 10, 50
        out = [(f"gqa r={r} T={T}", lambda r=r, T=T: run_gqa(T, dt, device, ceilings, warmup, rep, ratios=(r,)))
               for T in ((4096,) if quick else (4096, 16384)) for r in GQA_RATIOS]
        return out + [("varlen 16k", lambda: run_varlen(TOTAL, dt, device, ceilings, warmup, rep)),
                      (f"window W={WINDOW} T=16k", lambda: run_window(TOTAL, WINDOW, dt, device, ceilings, warmup,
                                                                     rep))]
    dt, warmup, rep = torch.float32, 1, 2  # CPU smoke: tiny fp32 shapes, the same code paths
    return [("gqa", lambda: run_gqa(32, dt, device, ceilings, warmup, rep, total=32, H=8, D=16)),
            ("varlen", lambda: run_varlen(128, dt, device, ceilings, warmup, rep, H=1, D=16)),
            ("window", lambda: run_window(64, 16, dt, device, ceilings, warmup, rep, H=1, D=16))]


def run(quick: bool = False, *, device: str | None = None, ceilings: dict | None = None) -> list[dict]:
    """The GQA, varlen and window rows; ``bench.common.make_row`` format."""
    rows = []
    for _label, thunk in pieces(quick, device=device, ceilings=ceilings):
        rows += thunk()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    from bench.common import cli_finish, cli_start

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="GQA at T = 4k only")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = parser.parse_args(argv)
    device, ceilings, env = cli_start(args.quick, "a CPU smoke test with tiny fp32 shapes; not performance results.")
    rows = run(args.quick, device=device, ceilings=ceilings)
    return cli_finish("attention_variants", rows, device=device, env=env, ceilings=ceilings, save=not args.no_save,
                      legend="vs X: speed-up of ours over X (> 1: ours is faster). dense = our kernel without the "
                      "variant (k/v repeated; documents or window ignored). TFLOP/s over the visible (query, key) pairs.")


if __name__ == "__main__":
    raise SystemExit(main())
