"""Benchmark causal flash attention (forward, backward, forward+backward) and KV-cache decode attention.

    python -m bench.attention            # CUDA: the full sweep below, bf16
    python -m bench.attention --quick    # CUDA: head_dim 64, T 1k/4k/16k; decode contexts 512/4k
    python -m bench.attention --no-decode / --no-train-shapes / --no-variants / --no-compile / --no-save

GQA, varlen and sliding-window rows come from ``bench.attention_variants`` (its docstring).

Training shapes (as the flash-attention benchmark): B·T = 16384 tokens and hidden 2048, so
H = 2048 / D; head_dim 64 and 128; T = 512 ... 16k; bf16; causal. Ours is
``kernels.flash_attention(q, k, v, causal=True)`` on ``(B, H, T, D)`` tensors. Baselines:

* ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``, ``sdpa_math``:
  ``F.scaled_dot_product_attention(..., is_causal=True)`` pinned to one backend with
  ``torch.nn.attention.sdpa_kernel``; a backend that raises (unsupported here) is skipped and noted;
* ``book``: the book's ``MultiHeadAttention`` core (``q @ kᵀ``, masked with the ``.bool()`` of the
  float triangular buffer, softmax of ``scores / sqrt(D)``, ``@ v``), and ``compile(book)`` its
  ``torch.compile``; both are skipped where their T×T matrices would need more than half the GPU memory.

TFLOP/s counts the causal FLOPs: forward 4·B·H·T²·D × 0.5, backward 2.5× the forward. ``vs sdpa_best``
is the speed-up over the fastest SDPA backend that ran for that shape and pass.

Decode (the generation hot path): ``kernels.decode_attention(q, k_cache, v_cache, cache_seqlens)`` with
one new token per row, GPT-2 heads (H=12, D=64), a static cache of 8k positions, context 128 ... 8k,
batch 1 and 16, vs SDPA (default dispatch and each backend) on the cache prefix ``k_cache[:, :, :ctx]``
and the book's explicit attention. Reported in µs and in GB/s of reading the valid KV cache once.

Timing: ``triton.testing.do_bench`` medians (warm-up excluded; it flushes L2 before every run, so
small KV caches are read cold). Inputs are ``randn``. On CPU the run is a smoke test with tiny fp32
shapes: ours is the PyTorch fallback (or the Triton interpreter with ``TRITON_INTERPRET=1``), the CUDA
SDPA backends are skipped, and nothing is saved.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bench.common import (
    DTYPE_NAMES,
    bench,
    cli_finish,
    cli_start,
    make_row,
    measure_ceilings,
    ratio,
)

SDPA_BACKENDS = {  # our provider name -> torch.nn.attention.SDPBackend member
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}
PASSES = ("fwd", "bwd", "fwd+bwd")
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
TOTAL_TOKENS, HIDDEN = 16384, 2048
SEQ_LENS = [512, 1024, 2048, 4096, 8192, 16384]
HEAD_DIMS = [64, 128]
DECODE_CONTEXTS = [128, 256, 512, 1024, 2048, 4096, 8192]
DECODE_BATCHES = [1, 16]
DECODE_HEADS, DECODE_HEAD_DIM = 12, 64


def _kernels():
    try:
        from kernels import decode_attention, flash_attention
    except ImportError as e:  # the kernels land separately; say so instead of a bare traceback
        raise RuntimeError(f"kernels.flash_attention / kernels.decode_attention are not importable: {e}") from e
    return flash_attention, decode_attention


def attention_flops(B: int, H: int, Tq: int, Tk: int, D: int, *, causal: bool = True) -> float:
    """Forward FLOPs of attention (two matmuls), halved for the causal mask."""
    return 4.0 * B * H * Tq * Tk * D * (0.5 if causal else 1.0)


# ---------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------

def _sdpa(backend: str | None, *, causal: bool):
    """SDPA pinned to one backend (``None``: PyTorch's own dispatch)."""
    if backend is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = getattr(SDPBackend, backend)

    def fn(q, k, v):
        with sdpa_kernel(member):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def _book(T: int, device):
    """The attention core of the book's ``MultiHeadAttention.forward`` on ``(B, H, T, D)`` tensors,
    line for line (the mask is the module's float buffer, turned into bool on every call)."""
    mask = torch.triu(torch.ones(T, T, device=device), diagonal=1)

    def fn(queries, keys, values):
        num_tokens = queries.shape[-2]
        attn_scores = queries @ keys.transpose(2, 3)
        mask_bool = mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values

    return fn


def _explicit_decode(q, k, v):
    """Decode with the book's math on the cache prefix: one query row sees every cached key."""
    w = torch.softmax((q @ k.transpose(2, 3)) / k.shape[-1] ** 0.5, dim=-1)
    return w @ v


def _fits(nbytes: float, device: str) -> bool:
    if device != "cuda":
        return True
    return nbytes <= 0.5 * torch.cuda.get_device_properties(0).total_memory


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------

def _time_passes(fn, q, k, v, dout, passes, warmup, rep) -> dict[str, dict]:
    """Time forward (grad enabled, as in training), backward alone, and forward+backward."""
    out = {}
    if "fwd" in passes:
        out["fwd"] = bench(lambda: fn(q, k, v), warmup=warmup, rep=rep)
    if "bwd" in passes:
        o = fn(q, k, v)
        out["bwd"] = bench(lambda: torch.autograd.grad(o, (q, k, v), dout, retain_graph=True),
                           warmup=warmup, rep=rep)
        del o
    if "fwd+bwd" in passes:
        out["fwd+bwd"] = bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout),
                               warmup=warmup, rep=rep)
    return out


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _why(e: BaseException) -> str:
    """A short reason for a skipped baseline."""
    text = str(e)
    if _is_oom(e):
        return "OOM"
    if "No viable backend" in text or "No available kernel" in text:
        return "not available for this input/device"
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:70]}"


def _try(name, thunk, skipped: dict):
    """Run ``thunk``; on an exception record why ``name`` was skipped and return None."""
    try:
        return thunk()
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        skipped[name] = _why(e)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def _check(name, out, ref, dtype):
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (out.float() - ref.float()).abs().max().item()
    if not err <= tol * max(1.0, ref.float().abs().max().item()):
        print(f"WARNING: {name}: ours differs from SDPA by {err:.3g} (max abs)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------

def run_train_shapes(quick: bool = False, *, device: str | None = None, ceilings: dict | None = None,
                     dtype: torch.dtype | None = None, head_dims=None, seq_lens=None, total_tokens=None,
                     hidden=None, use_compile: bool | None = None, include_math: bool = True) -> list[dict]:
    """Flash attention fwd / bwd / fwd+bwd vs every SDPA backend and the book's attention."""
    flash_attention, _ = _kernels()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if cuda:
        dtype = dtype or torch.bfloat16
        head_dims = head_dims or ([64] if quick else HEAD_DIMS)
        seq_lens = seq_lens or ([1024, 4096, 16384] if quick else SEQ_LENS)
        total_tokens, hidden = total_tokens or TOTAL_TOKENS, hidden or HIDDEN
        warmup, rep = 25, 100
    else:  # smoke run
        dtype = dtype or torch.float32
        head_dims = head_dims or [64]
        seq_lens = seq_lens or [64, 128]
        total_tokens, hidden = total_tokens or 256, hidden or 128
        warmup, rep = 2, 5
    use_compile = cuda if use_compile is None else use_compile
    ceilings = ceilings or measure_ceilings(device, quick=quick)

    rows = []
    for D in head_dims:
        for T in seq_lens:
            rows += _attention_shape(flash_attention, max(1, total_tokens // T), hidden // D, T, D, dtype,
                                     device, ceilings, use_compile, include_math, warmup, rep)
            if cuda:
                torch.cuda.empty_cache()
    return rows


def _attention_shape(flash_attention, B, H, T, D, dtype, device, ceilings, use_compile, include_math,
                     warmup, rep) -> list[dict]:
    elem = torch.finfo(dtype).bits // 8
    g = torch.Generator(device=device).manual_seed(T * 1000 + D)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
               for _ in range(3))
    dout = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
    skipped: dict[str, str] = {}
    scores = B * H * T * T  # elements of the T x T attention matrices of all heads
    provs = {"ours": lambda q, k, v: flash_attention(q, k, v, causal=True)}
    for name, backend in SDPA_BACKENDS.items():
        if name == "sdpa_math" and not include_math:
            continue
        # The math backend upcasts bf16/fp16 to fp32 and keeps several T x T matrices alive.
        if name == "sdpa_math" and not _fits(6 * scores * 4, device):
            skipped[name] = "T×T matrices > half the GPU memory"
            continue
        provs[name] = _sdpa(backend, causal=True)
    if _fits(6 * scores * elem + T * T * 4, device):
        provs["book"] = _book(T, device)
        if use_compile:
            provs["compile(book)"] = torch.compile(_book(T, device), dynamic=False)
    else:
        skipped["book"] = "T×T matrices > half the GPU memory"

    with torch.no_grad():
        ref = _try("sdpa", lambda: _sdpa(None, causal=True)(q, k, v), skipped)
        if ref is not None:
            _check(f"attention B={B} H={H} T={T} D={D}", flash_attention(q, k, v, causal=True), ref, dtype)
    ref = None

    times: dict[str, dict] = {}
    for name, fn in provs.items():
        if name == "ours":
            times[name] = _time_passes(fn, q, k, v, dout, PASSES, warmup, rep)
            continue
        # Probe once: a backend that does not support this input raises here.
        if _try(name, lambda fn=fn: fn(q, k, v), skipped) is None:
            continue
        r = _try(name, lambda fn=fn: _time_passes(fn, q, k, v, dout, PASSES, warmup, rep), skipped)
        if r is not None:
            times[name] = r

    flops = attention_flops(B, H, T, T, D, causal=True)
    rows = []
    for p in PASSES:
        t = times["ours"][p]
        ms = t["median_ms"]
        base = {name: (times[name][p]["median_ms"] if name in times else None)
                for name in [*SDPA_BACKENDS, "book", "compile(book)"] if name in provs or name in skipped}
        sdpa_times = {n: v for n, v in base.items() if n.startswith("sdpa") and v is not None}
        best = min(sdpa_times, key=sdpa_times.get) if sdpa_times else None
        speed = {"sdpa_flash": ratio(ms, base.get("sdpa_flash")),
                 "sdpa_best": ratio(ms, sdpa_times.get(best)) if best else None,
                 "book": ratio(ms, base.get("book"))}
        tflops = PASS_FLOP_FACTOR[p] * flops / (ms * 1e-3) / 1e12
        notes = "; ".join(f"{n}: {why}" for n, why in skipped.items())
        if best:
            notes = f"best SDPA: {best}" + (f"; {notes}" if notes else "")
        rows.append(make_row(
            group="kernels", bench="attention", name=f"attention {p}",
            shape=f"B={B} H={H} T={T} D={D}", dtype=DTYPE_NAMES[dtype], unit="ms", ours=ms,
            ours_p20=t["p20_ms"], ours_p80=t["p80_ms"], baselines=base, speedup=speed,
            metric="TFLOP/s", achieved=tflops, ceiling=ceilings["matmul_tflops"],
            params={"pass": p, "B": B, "H": H, "T": T, "D": D, "flops": PASS_FLOP_FACTOR[p] * flops,
                    "best_sdpa": best},
            notes=notes))
    return rows


def run_decode(quick: bool = False, *, device: str | None = None, ceilings: dict | None = None,
               dtype: torch.dtype | None = None, contexts=None, batches=None, heads=None,
               head_dim=None, max_len=None) -> list[dict]:
    """Decode attention latency (one new token per row) vs SDPA on the valid cache prefix."""
    _, decode_attention = _kernels()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if cuda:
        dtype = dtype or torch.bfloat16
        contexts = contexts or ([512, 4096] if quick else DECODE_CONTEXTS)
        batches = batches or DECODE_BATCHES
        heads, head_dim = heads or DECODE_HEADS, head_dim or DECODE_HEAD_DIM
        warmup, rep = 25, 100
    else:
        dtype = dtype or torch.float32
        contexts = contexts or [64, 256]
        batches = batches or [1, 2]
        heads, head_dim = heads or 2, head_dim or 64
        warmup, rep = 2, 5
    max_len = max_len or max(contexts)
    ceilings = ceilings or measure_ceilings(device, quick=quick)

    rows = []
    for B in batches:
        g = torch.Generator(device=device).manual_seed(B)
        k_cache, v_cache, q = (torch.randn(B, heads, n, head_dim, device=device, dtype=dtype, generator=g)
                               for n in (max_len, max_len, 1))
        for ctx in contexts:
            rows.append(_decode_point(decode_attention, q, k_cache, v_cache, ctx, ceilings, warmup, rep))
        del k_cache, v_cache, q
        if cuda:
            torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def _decode_point(decode_attention, q, k_cache, v_cache, ctx, ceilings, warmup, rep) -> dict:
    B, heads, max_len, head_dim = k_cache.shape
    dtype = q.dtype
    seqlens = torch.full((B,), ctx, device=q.device, dtype=torch.int32)
    kp, vp = k_cache[:, :, :ctx], v_cache[:, :, :ctx]  # strided views of the static cache
    skipped: dict[str, str] = {}
    provs = {"sdpa": _sdpa(None, causal=False),
             **{n: _sdpa(b, causal=False) for n, b in SDPA_BACKENDS.items()},
             "book": _explicit_decode}
    ref = _try("sdpa", lambda: provs["sdpa"](q, kp, vp), skipped)
    if ref is not None:
        _check(f"decode B={B} ctx={ctx}", decode_attention(q, k_cache, v_cache, seqlens), ref, dtype)
    t = bench(lambda: decode_attention(q, k_cache, v_cache, seqlens), warmup=warmup, rep=rep)
    base = {}
    for name, fn in provs.items():
        if _try(name, lambda fn=fn: fn(q, kp, vp), skipped) is None:
            base[name] = None
            continue
        r = _try(name, lambda fn=fn: bench(lambda: fn(q, kp, vp), warmup=warmup, rep=rep), skipped)
        base[name] = None if r is None else r["median_ms"] * 1e3
    us = t["median_ms"] * 1e3
    backends = {n: v for n, v in base.items() if n.startswith("sdpa_") and v is not None}
    best = min(backends, key=backends.get) if backends else None
    kv_bytes = 2 * B * heads * ctx * head_dim * (torch.finfo(dtype).bits // 8)
    notes = "; ".join(f"{n}: {why}" for n, why in skipped.items())
    if best:
        notes = f"best SDPA: {best}" + (f"; {notes}" if notes else "")
    return make_row(
        group="kernels", bench="decode", name="decode_attention",
        shape=f"B={B} H={heads} ctx={ctx} D={head_dim}", dtype=DTYPE_NAMES[dtype], unit="us", ours=us,
        ours_p20=t["p20_ms"] * 1e3, ours_p80=t["p80_ms"] * 1e3, baselines=base,
        speedup={"sdpa": ratio(us, base.get("sdpa")),
                 "sdpa_best": ratio(us, backends.get(best)) if best else None},
        metric="GB/s", achieved=kv_bytes / (us * 1e-6) / 1e9, ceiling=ceilings["copy_gbs"],
        params={"B": B, "H": heads, "ctx": ctx, "D": head_dim, "max_len": max_len,
                "kv_bytes": kv_bytes, "best_sdpa": best},
        notes=notes)


def run(quick: bool = False, *, device: str | None = None, ceilings: dict | None = None,
        decode: bool = True, train_shapes: bool = True, use_compile: bool | None = None,
        variants: bool = True) -> list[dict]:
    """Every attention benchmark (with ``bench.attention_variants``: GQA, varlen, window); rows in the
    ``bench.common.make_row`` format."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ceilings = ceilings or measure_ceilings(device, quick=quick)
    rows = []
    if train_shapes:
        rows += run_train_shapes(quick, device=device, ceilings=ceilings, use_compile=use_compile)
    if decode:
        rows += run_decode(quick, device=device, ceilings=ceilings)
    if variants:
        from bench import attention_variants

        rows += attention_variants.run(quick, device=device, ceilings=ceilings)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes (head_dim 64; T 1k, 4k, 16k)")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode benchmark")
    parser.add_argument("--no-train-shapes", action="store_true", help="skip fwd/bwd at training shapes")
    parser.add_argument("--no-variants", action="store_true",
                        help="skip the GQA / varlen / window rows (bench.attention_variants)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile(book) baseline")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = parser.parse_args(argv)

    device, ceilings, env = cli_start(args.quick, "a CPU smoke test with tiny fp32 shapes. Ours runs the PyTorch "
                                      "fallback (or the Triton interpreter when TRITON_INTERPRET=1); the CUDA-only "
                                      "SDPA backends are skipped. These timings are not performance results.")
    rows = run(args.quick, device=device, ceilings=ceilings, decode=not args.no_decode,
               train_shapes=not args.no_train_shapes, use_compile=False if args.no_compile else None,
               variants=not args.no_variants)
    return cli_finish("attention", rows, device=device, env=env, ceilings=ceilings, save=not args.no_save,
                      legend="vs X: speed-up of ours over X (> 1: ours is faster); sdpa_best = the fastest SDPA "
                      "backend that ran. TFLOP/s with the causal FLOP count; % ceiling is over the measured bf16 "
                      "matmul (attention) or copy bandwidth (decode).")


if __name__ == "__main__":
    raise SystemExit(main())
