"""Benchmark the Llama family's layers: RMSNorm, add+RMSNorm, SwiGLU, rotary, the Llama-3 head + loss,
and a Llama-shaped decoder layer with and without ``kernels.replace_modules`` + our attention.

    python -m bench.llama_layers            # CUDA: widths 2048-8192, SwiGLU at 14,336, rotary D=128, bf16
    python -m bench.llama_layers --quick    # one width per kernel, fewer repetitions
    python -m bench --only llama            # the same rows inside the suite

Kernel rows (bench ``llama_kernels``, ms and GB/s; forward, backward, forward+backward): ours vs torch
eager (``F.rms_norm``, the unfused add, ``F.silu(g) * u``, transformers' ``x * cos + rotate_half(x) *
sin``) and ``torch.compile`` of the same expressions (``compiled``). GB/s counts the minimal bytes
moved (every tensor read or written once); ``%copy`` is that over the device-to-device copy bandwidth
measured in the same run (these ops are memory-bound).

Head + loss (bench ``llama_loss``): ``kernels.linear_cross_entropy`` at Llama-3's vocabulary (128,256,
d 4096) vs ``cross_entropy(linear(x, W).float(), t)`` eager and compiled, forward+backward time and
peak memory above the inputs (memory rows: the "speed-up" is the baseline's peak over ours).

Decoder layer (bench ``llama_layer``, ms): a one-layer transformers ``LlamaModel`` (d 2048, 32 query /
8 key-value heads, MLP 8192, T 2048) forward+backward in bf16, transformers' modules with SDPA
(``hf``), vs after ``replace_modules`` with ``register_hf_attention`` (ours).

On CPU the run is a smoke test (tiny shapes; ours runs the Triton interpreter or the PyTorch
fallback; no torch.compile, no memory numbers): its timings mean nothing for the GPU targets.
``run()`` returns the rows for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from bench.common import (
    cli_finish,
    cli_start,
    make_row,
    measure_ceilings,
    ratio,
    time_calls,
)
from bench.layernorm_gelu import _as_tuple, _time_passes
from bench.loss import _peak_mib
from kernels import add_rms_norm, apply_rotary, linear_cross_entropy, rms_norm, swiglu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ["fwd", "bwd", "fwd+bwd"]


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

def _torch_rms(x, w):
    return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), 1e-6)


def _torch_add_rms(x, r, w):
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w.to(s.dtype), 1e-6), s


def _torch_swiglu(g, u):
    return F.silu(g) * u


def _torch_rotary(x, cos, sin):  # transformers' apply_rotary_pos_emb, one tensor
    h = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin[:, None]


def _kernel_cases(cuda: bool, quick: bool, dtype: torch.dtype, device: str):
    """[(op, shape label, inputs, ours, torch fn, bytes per pass)]; inputs are leaves needing grads."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, grad=True, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt, generator=g).requires_grad_(grad)

    e = dtype.itemsize
    rows = 4096 if cuda else 32
    widths = ([4096] if quick else [2048, 4096, 8192]) if cuda else [64]
    out = []
    for n in widths:
        x, r, w = rnd(rows, n), rnd(rows, n), rnd(n, dt=torch.float32)
        nb = rows * n * e
        out.append(("rms_norm", f"{rows}x{n}", (x, w), lambda x, w: rms_norm(x, w), _torch_rms,
                    {"fwd": 2 * nb, "bwd": 3 * nb}))
        out.append(("add_rms_norm", f"{rows}x{n}", (x, r, w), lambda x, r, w: add_rms_norm(x, r, w),
                    _torch_add_rms, {"fwd": 4 * nb, "bwd": 4 * nb}))
    hidden = 14336 if cuda else 96
    gt, up = rnd(rows, hidden), rnd(rows, hidden)
    nb = rows * hidden * e
    out.append(("swiglu", f"{rows}x{hidden}", (gt, up), swiglu, _torch_swiglu, {"fwd": 3 * nb, "bwd": 5 * nb}))
    B, H, T, D = (4, 32, 2048, 128) if cuda else (1, 2, 16, 16)
    q = rnd(B, T, H, D).transpose(1, 2)  # transformers' layout: a (B, T, H, D) projection viewed as (B, H, T, D)
    pos = torch.arange(T, device=device, dtype=torch.float32)
    ang = pos[:, None] * (10000.0 ** (-torch.arange(0, D, 2, device=device) / D))[None]
    cos = torch.cat([ang.cos()] * 2, -1)[None].expand(B, T, D).to(dtype)
    sin = torch.cat([ang.sin()] * 2, -1)[None].expand(B, T, D).to(dtype)
    nb = B * H * T * D * e
    out.append(("rotary", f"{B}x{H}x{T}x{D}", (q, cos, sin), apply_rotary, _torch_rotary,
                {"fwd": 2 * nb, "bwd": 2 * nb}))
    return out


def run_kernels(quick, *, device, ceilings, use_compile, dtypes=None) -> list[dict]:
    cuda = device == "cuda"
    warmup, rep = (25, 100) if cuda else (2, 5)
    rows = []
    for dname in dtypes or (["bf16"] if cuda else ["fp32"]):
        dtype = DTYPES[dname]
        for op, shape, inputs, ours, theirs, nbytes in _kernel_cases(cuda, quick, dtype, device):
            nbytes = {**nbytes, "fwd+bwd": nbytes["fwd"] + nbytes["bwd"]}
            provs = {"ours": ours, "torch": theirs}
            if use_compile:
                provs["compiled"] = torch.compile(theirs, dynamic=False)
            with torch.no_grad():  # a fast wrong kernel is no result
                for a, b in zip(_as_tuple(ours(*inputs)), _as_tuple(theirs(*inputs))):
                    tol = 1e-4 if dtype == torch.float32 else 6e-2
                    if not torch.allclose(a.float(), b.float(), atol=tol, rtol=tol):
                        raise AssertionError(f"{op}: ours differs from torch by {(a.float() - b.float()).abs().max():.3g}")
            times = {name: _time_passes(fn, inputs, warmup, rep) for name, fn in provs.items()}
            for p in PASSES:
                ms = times["ours"][p]["median_ms"]
                base = {k: times[k][p]["median_ms"] for k in provs if k != "ours"}
                rows.append(make_row(
                    group="kernels", bench="llama_kernels", name=f"{op} {p}", shape=shape, dtype=dname, unit="ms",
                    ours=ms, ours_p20=times["ours"][p]["p20_ms"], ours_p80=times["ours"][p]["p80_ms"],
                    baselines=base, speedup={k: ratio(ms, v) for k, v in base.items()}, metric="GB/s",
                    achieved=nbytes[p] / (ms * 1e-3) / 1e9, ceiling=ceilings["copy_gbs"],
                    params={"op": op, "pass": p, "bytes": nbytes[p]},
                    notes="" if use_compile else "no torch.compile baseline"))
            if cuda:
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------
# Llama-3 head + loss
# ---------------------------------------------------------------------------------------------------

def run_loss(quick, *, device, ceilings, use_compile) -> list[dict]:
    cuda = device == "cuda"
    N, d, V = (8192 if quick else 16384, 4096, 128256) if cuda else (64, 32, 1000)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, d, device=device, dtype=dtype, generator=g).requires_grad_(True)
    w = (0.02 * torch.randn(V, d, device=device, dtype=dtype, generator=g)).requires_grad_(True)
    t = torch.randint(0, V, (N,), device=device, generator=g)

    def plain(x, w, t):
        return F.cross_entropy(F.linear(x, w).float(), t)

    provs = {"ours": lambda x, w, t: linear_cross_entropy(x, w, t), "torch": plain}
    if use_compile:
        provs["compiled"] = torch.compile(plain)
    calls = {k: (lambda f=f: torch.autograd.grad(f(x, w, t), (x, w))) for k, f in provs.items()}
    times = {k: time_calls(c, warmup=3 if cuda else 1, iters=10 if cuda else 3, device=device) for k, c in calls.items()}
    peaks = {k: _peak_mib(c, cuda) for k, c in calls.items()}
    ms = times["ours"]["median_ms"]
    base = {k: v["median_ms"] for k, v in times.items() if k != "ours"}
    flops = 3 * 2 * N * V * d
    shape = f"N={N} d={d} V={V}"
    rows = [make_row(group="loss", bench="llama_loss", name="linear+CE fwd+bwd", shape=shape,
                     dtype="bf16" if cuda else "fp32", unit="ms", ours=ms, baselines=base,
                     speedup={k: ratio(ms, v) for k, v in base.items()}, metric="TFLOP/s",
                     achieved=flops / (ms * 1e-3) / 1e12, ceiling=ceilings.get("matmul_tflops"),
                     params={"N": N, "d": d, "V": V})]
    if cuda:
        pb = {k: v for k, v in peaks.items() if k != "ours"}
        rows.append(make_row(group="loss", bench="llama_loss_memory", name="linear+CE peak memory", shape=shape,
                             dtype="bf16", unit="MiB", ours=peaks["ours"], baselines=pb,
                             speedup={k: ratio(peaks["ours"], v) for k, v in pb.items()}, params={"N": N, "d": d, "V": V}))
    return rows


# ---------------------------------------------------------------------------------------------------
# Llama-shaped decoder layer
# ---------------------------------------------------------------------------------------------------

def run_layer(quick, *, device, ceilings, use_compile) -> list[dict]:
    import transformers

    import kernels

    cuda = device == "cuda"
    if cuda:
        shape = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8)
        B, T, dtype = 1 if quick else 2, 2048, torch.bfloat16
    else:
        shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
        B, T, dtype = 1, 16, torch.float32
    config = transformers.LlamaConfig(vocab_size=256, num_hidden_layers=1, max_position_embeddings=max(T, 64), **shape)
    torch.manual_seed(0)
    hf = transformers.LlamaModel(config).to(device=device, dtype=dtype).train()
    hf.set_attn_implementation("sdpa")
    ours = kernels.replace_modules(copy.deepcopy(hf))
    ours.set_attn_implementation(kernels.register_hf_attention())
    ids = torch.randint(0, 256, (B, T), device=device)
    provs = {"ours": ours, "hf": hf}
    if use_compile:
        provs["compiled"] = torch.compile(hf)

    def step(m):
        def go():
            m(ids).last_hidden_state.float().square().mean().backward()
            m.zero_grad(set_to_none=True)
        return go

    times = {k: time_calls(step(m), warmup=3 if cuda else 1, iters=10 if cuda else 3, device=device)
             for k, m in provs.items()}
    ms = times["ours"]["median_ms"]
    base = {k: v["median_ms"] for k, v in times.items() if k != "ours"}
    return [make_row(group="llama", bench="llama_layer", name="decoder layer fwd+bwd",
                     shape=f"B={B} T={T} d={shape['hidden_size']} heads {shape['num_attention_heads']}/"
                           f"{shape['num_key_value_heads']}", dtype="bf16" if cuda else "fp32", unit="ms",
                     ours=ms, baselines=base, speedup={k: ratio(ms, v) for k, v in base.items()},
                     params={"B": B, "T": T, **shape},
                     notes="ours: replace_modules + register_hf_attention; hf: transformers' modules, SDPA")]


def run(quick: bool = False, *, device: str | None = None, ceilings: dict | None = None,
        use_compile: bool | None = None) -> list[dict]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    use_compile = device == "cuda" if use_compile is None else use_compile
    ceilings = ceilings or measure_ceilings(device, quick=quick)
    kw = dict(device=device, ceilings=ceilings, use_compile=use_compile)
    return run_kernels(quick, **kw) + run_loss(quick, **kw) + run_layer(quick, **kw)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one width per kernel, smaller batches")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = parser.parse_args(argv)
    device, ceilings, env = cli_start(args.quick, "a CPU smoke test with tiny shapes; timings mean nothing for the "
                                      "GPU targets.")
    rows = run(args.quick, device=device, ceilings=ceilings, use_compile=False if args.no_compile else None)
    return cli_finish("llama_layers", rows, device=device, env=env, ceilings=ceilings, save=not args.no_save)


if __name__ == "__main__":
    raise SystemExit(main())
