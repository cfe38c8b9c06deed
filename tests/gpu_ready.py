"""Compile every Triton kernel for an H100/H200 (sm_90) as the launchers bind it, on a machine without a GPU.

The interpreter runs the kernels' semantics, not Triton's compiler: layouts, ``tl.dot`` rules, register
allocation, shared memory. This script compiles them to cubin with the ptxas that the triton wheel carries,
after passing real-shaped CPU tensors and the launchers' scalars through Triton's own argument binder
(``create_function_from_signature`` + ``JITFunction._pack_args``, what ``JITFunction.run`` does before it
compiles), so the 16-byte alignment hints and the stride-1 / int-1 specializations are those of a GPU
launch. Per variant it reports registers, spill bytes (ptxas ``-v``), shared memory and whether the SASS
issues wgmma (``HGMMA``, via the wheel's ``cuobjdump``).

    python tests/gpu_ready.py            # the fast subset (default configs, bf16 + fp32 attention, D=64/128)
    python tests/gpu_ready.py --full     # every autotune config x dtype x causal/dropout/EVEN flags
    python tests/gpu_ready.py --json F   # also write the facts as JSON
    python tests/gpu_ready.py --only attn_fwd,lce   # case-name substrings

Exit status 1 when a variant fails the gate (does not compile, spills in bf16/fp16, needs more than
227 KB of shared memory, or an attention / linear+CE kernel without HGMMA). fp32 variants must compile
and fit in shared memory; their spills are reported, not failed (fp32 is the correctness path), except
at the default (first) autotune config of the three attention kernels: a training run with
``--dtype fp32`` on a GPU gets those, so they fail the gate above FP32_ATTN_SPILL_LIMIT bytes.
``tests/test_gpu_ready.py`` runs this in subprocesses (the kernels must be decorated with the interpreter
off), with a throw-away Triton cache so every variant really compiles.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ["TRITON_INTERPRET"] = "0"  # before importing triton: real JITFunctions, not the interpreter
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v: registers and spill bytes, printed per compile
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from kernels._utils import needs_int64, row_launch_config  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # 227 KB: the most shared memory one block may opt into on sm_90
WGMMA_KERNELS = ("attn_fwd", "attn_dkdv", "attn_dq", "lce_fwd", "lce_dlogits")
# fp32 attention at its default config: the FMA tiles of kernels/attention_launch.py spill 0 B in every
# variant of the sweep (the tiles before them spilled up to 84 KB)
FP32_ATTN_SPILL_LIMIT = 0
FP32_GATED = ("attn_fwd", "attn_dkdv", "attn_dq")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Case:
    name: str  # kernel family, e.g. attn_fwd
    label: str  # variant description
    jit: object
    args: tuple
    kwargs: dict
    dtype: str
    facts: dict = field(default_factory=dict)
    default: bool = False  # the first (default) of an autotuned kernel's candidates for this call


def unwrap(k) -> JITFunction:
    while not isinstance(k, JITFunction):
        k = k.fn
    return k


def bind(jit: JITFunction, args: tuple, kwargs: dict):
    """(ASTSource, options) exactly as ``JITFunction.run`` builds them for these arguments on TARGET."""
    backend = make_backend(TARGET)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", jit.debug or triton.knobs.runtime.debug)
    comp = triton.knobs.compilation
    for opt in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what run() adds (triton >= 3.7)
        if hasattr(comp, opt):
            kwargs.setdefault(opt, getattr(comp, opt))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(jit, signature, constexprs, attrs), options


def _tool(name: str) -> str:
    tool = getattr(triton.knobs.nvidia, name, None)
    if tool is not None and getattr(tool, "path", None):
        return tool.path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_case(case: Case) -> dict:
    t0 = time.time()
    facts: dict = {"ok": False}
    try:
        src, options = bind(case.jit, case.args, case.kwargs)
        # what the binder specialized: int arguments folded to constants (stride 1), 16-divisible arguments
        facts["folded"] = sorted(n for n, t in src.signature.items() if t == "constexpr" and n not in case.kwargs)
        facts["aligned"] = sorted(case.jit.arg_names[k[0]] for k, v in src.attrs.items()
                                  if any(a and a[0] == "tt.divisibility" for a in v))
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=TARGET, options=options.__dict__)
        text = log.getvalue()
        regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
        stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
        loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", text)]
        stack = [int(x) for x in re.findall(r"(\d+) bytes stack frame", text)]
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        try:
            sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        finally:
            os.unlink(f.name)
        facts.update(ok=True, regs=max(regs) if regs else None, spill_stores=sum(stores),
                     spill_loads=sum(loads), stack=max(stack) if stack else 0, smem=k.metadata.shared,
                     hgmma=len(re.findall(r"\bHGMMA\b", sass)), ldl_stl=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
                     num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages)
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is a finding, not a crash
        facts["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    facts["seconds"] = round(time.time() - t0, 1)
    return facts


def problems(case: Case) -> list[str]:
    f = case.facts
    if not f.get("ok"):
        return [f"does not compile: {f.get('error')}"]
    out = []
    if f["smem"] > SMEM_LIMIT:
        out.append(f"needs {f['smem']} B of shared memory (> {SMEM_LIMIT})")
    if case.dtype != "fp32" and (f["spill_stores"] or f["spill_loads"]):
        out.append(f"spills ({f['spill_stores']} B stores, {f['spill_loads']} B loads)")
    elif case.dtype != "fp32" and f["regs"] is None and f["ldl_stl"]:  # a cache hit prints no ptxas log
        out.append(f"{f['ldl_stl']} LDL/STL (local memory) in the SASS of a cached kernel")
    if (case.dtype == "fp32" and case.default and case.name in FP32_GATED
            and max(f["spill_stores"], f["spill_loads"]) > FP32_ATTN_SPILL_LIMIT):
        out.append(f"fp32 default config spills ({f['spill_stores']} B stores, {f['spill_loads']} B loads; "
                   f"limit {FP32_ATTN_SPILL_LIMIT})")
    if case.name in WGMMA_KERNELS and case.dtype != "fp32" and not f["hgmma"]:
        out.append("no HGMMA (wgmma) in the SASS")
    return out


# ---------------------------------------------------------------------------------------------------
# Variants: each builds the launcher's argument tuple from real-shaped CPU tensors
# ---------------------------------------------------------------------------------------------------

def candidates(tuned, jit: JITFunction, args: tuple, meta: dict) -> list:
    """The configs the autotuner would try for this call (its ``early_config_prune`` applied, as in
    ``Autotuner.prune_configs``); the first is the default."""
    prune = getattr(tuned, "early_config_prune", None)
    if prune is None:
        return list(tuned.configs)
    return prune(tuned.configs, dict(zip(jit.arg_names, args)), **meta)


def _cfg_kwargs(c) -> dict:
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _qkv(B, H, T, D, dtype, layout):
    """q, k, v (B, H, T, D) as the model makes them (packed: views of one (B, T, 3, H, D) GEMM output)
    or as the benchmark does (contiguous)."""
    if layout == "packed":
        qkv = torch.empty((B, T, 3, H, D), dtype=dtype).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]
    return tuple(torch.empty((B, H, T, D), dtype=dtype) for _ in range(3))


def attention_cases(dtn, D, causal, dropout, T, layout, configs: str, *, Hk=None, window=0, softcap=0.0,
                    varlen=False) -> list[Case]:
    """The three attention kernels (and, with every config, the delta preprocess) with the arguments
    the launchers build (kernels.attention_launch._fwd_call / _bwd_calls). ``Hk`` < 12: GQA; ``window``,
    ``softcap``; ``varlen``: the packed (total, H, D) layout of flash_attention_varlen (4 sequences of
    up to T tokens)."""
    import kernels.attention_launch as A

    dtype = DTYPES[dtn]
    B, H = 2, 12
    Hk = Hk or H
    if varlen:
        n = 4
        qkv = torch.empty((n * T, H + 2 * Hk, D), dtype=dtype)  # one fused projection, heads split by views
        if layout != "packed":
            qkv = torch.empty((3, n * T, max(H, Hk), D), dtype=dtype)
            q, k, v = qkv[0, :, :H], qkv[1, :, :Hk], qkv[2, :, :Hk]
        else:
            q, k, v = qkv[:, :H], qkv[:, H:H + Hk], qkv[:, H + Hk:]
        o, do = torch.empty((n * T, H, D), dtype=dtype), torch.empty((n * T, H, D), dtype=dtype)
        lse = torch.empty((H, n * T), dtype=torch.float32)
        cu = torch.empty((n + 1,), dtype=torch.int32)
        nb = n
    else:
        if layout == "packed":  # the model's views of one (B, T, H + 2 Hk, D) GEMM output
            qkv = torch.empty((B, T, H + 2 * Hk, D), dtype=dtype).transpose(1, 2)
            q, k, v = qkv[:, :H], qkv[:, H:H + Hk], qkv[:, H + Hk:]
        else:
            q = torch.empty((B, H, T, D), dtype=dtype)
            k, v = torch.empty((B, Hk, T, D), dtype=dtype), torch.empty((B, Hk, T, D), dtype=dtype)
        o = torch.empty((B, T, H, D), dtype=dtype).transpose(1, 2)
        do = torch.empty((B, T, H, D), dtype=dtype).transpose(1, 2)  # grad of the merged-heads view
        lse = torch.empty((B, H, T), dtype=torch.float32)
        cu, nb = None, B
    seed = torch.empty((1,), dtype=torch.int64) if dropout else None
    dq, dk, dv = (torch.empty(t.shape, dtype=dtype) for t in (q, k, v))
    p = 0.1 if dropout else 0.0
    scale = D ** -0.5
    _grid, fwd_args, fwd_meta = A._fwd_call(q, k, v, o, lse, seed, cu, cu, nb, T, T, causal, scale, p, window, softcap)
    pre, dkdv, dq_call = A._bwd_calls(do, q, k, v, o, lse, seed, dq, dk, dv, cu, cu, nb, T, T, causal, scale, p,
                                      window, softcap)
    extra = (f" Hk={Hk}" if Hk != H else "") + (f" W={window}" if window else "") + \
        (f" softcap={softcap:g}" if softcap else "") + (" varlen" if varlen else "")
    tag = f"{dtn} D={D} T={T} causal={causal} dropout={dropout} even={fwd_meta['EVEN_M']} {layout}{extra}"
    out = []
    for name, kern, tuned, args, meta in (("attn_fwd", A._attn_fwd_kernel, A._attn_fwd_tuned, fwd_args, fwd_meta),
                                          ("attn_dkdv", dkdv[0], dkdv[1], dkdv[3], dkdv[4]),
                                          ("attn_dq", dq_call[0], dq_call[1], dq_call[3], dq_call[4])):
        cfgs = candidates(tuned, unwrap(kern), args, meta)
        for i, c in enumerate(cfgs if configs == "all" else cfgs[:1]):
            out.append(Case(name, f"{tag} {c.kwargs} w{c.num_warps}s{c.num_stages}", unwrap(kern), args,
                            dict(meta, **_cfg_kwargs(c)), dtn, default=i == 0))
    if configs == "all":
        out.append(Case("attn_pre", tag, unwrap(pre[0]), pre[3], pre[4], dtn))
    return out


def decode_cases(dtn, D, *, Hk=None, window=0, softcap=0.0) -> list[Case]:
    """Split + combine with the launcher's arguments (kernels.decode._decode_calls); ``Hk``: GQA caches."""
    import kernels.decode as Dm

    dtype = DTYPES[dtn]
    B, H, Tq, Tmax = 4, 12, 1, 1024
    Hk = Hk or H
    q, _, _ = _qkv(B, H, Tq, D, dtype, "packed")
    kc = torch.empty((B, Hk, Tmax, D), dtype=dtype)
    vc = torch.empty((B, Hk, Tmax, D), dtype=dtype)
    seqlens = torch.empty((B,), dtype=torch.int32)
    out = torch.empty((B, Tq, H, D), dtype=dtype).transpose(1, 2)
    split, combine = Dm._decode_calls(q, kc, vc, seqlens, out, D ** -0.5, window, softcap)
    extra = (f" Hk={Hk}" if Hk != H else "") + (f" W={window}" if window else "") + \
        (f" softcap={softcap:g}" if softcap else "")
    tag = f"{dtn} D={D} Tmax={Tmax} splits={split[2][24]}{extra}"
    return [Case("decode_split", tag, unwrap(split[0]), split[2], split[3], dtn),
            Case("decode_combine", tag, unwrap(combine[0]), combine[2], combine[3], dtn)]


def layernorm_cases(dtn, N, *, residual=True) -> list[Case]:
    import kernels.layernorm as LN

    dtype = DTYPES[dtn]
    M = 8 * 1024  # GPT-2 rows: batch 8 x T 1024
    cuda = torch.device("cuda")  # row_launch_config reads only device.type (no CUDA call)
    x = torch.empty((M, N), dtype=dtype)
    res = torch.empty((M, N), dtype=dtype) if residual else None
    w = torch.empty((N,), dtype=dtype)
    b = torch.empty((N,), dtype=dtype)
    s = torch.empty((M, N), dtype=dtype) if residual else x.new_empty(0)
    y = torch.empty((M, N), dtype=dtype)
    mean = torch.empty((M,), dtype=torch.float32)
    rstd = torch.empty((M,), dtype=torch.float32)
    bm, bn, warps = row_launch_config(M, N, cuda, LN._fwd_tile(N), LN._TILE_INTERPRET)
    fwd = Case("ln_fwd", f"{dtn} N={N} res={residual} BLOCK_M={bm} w{warps}", unwrap(LN._layer_norm_fwd_kernel),
               (x, res, s, y, w, b, mean, rstd, x.stride(0), res.stride(0) if residual else 0, N, N,
                w.stride(0), b.stride(0), M, N, 1e-5),
               dict(HAS_RES=residual, HAS_W=True, HAS_B=True, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps), dtn)
    bm, bn, warps = row_launch_config(M, N, cuda, LN._TILE_BWD, LN._TILE_INTERPRET)
    grid = min(triton.cdiv(M, bm), 132 * max(1, 32 // warps))
    dy = torch.empty((M, N), dtype=dtype)
    ds = torch.empty((M, N), dtype=dtype) if residual else None
    dx = torch.empty((M, N), dtype=dtype)
    dw = torch.empty((grid, N), dtype=torch.float32)
    db = torch.empty((grid, N), dtype=torch.float32)
    bwd = Case("ln_bwd", f"{dtn} N={N} ds={residual} BLOCK_M={bm} w{warps}", unwrap(LN._layer_norm_bwd_kernel),
               (dy, x, w, mean, rstd, ds, dx, dw, db, dy.stride(0), x.stride(0), ds.stride(0) if residual else 0, N,
                w.stride(0), M, N),
               dict(HAS_W=True, HAS_DS=residual, COMPUTE_DW=True, COMPUTE_DB=True, BLOCK_M=bm, BLOCK_N=bn,
                    num_warps=warps), dtn)
    return [fwd, bwd]


def gelu_cases(dtn, approx=True) -> list[Case]:
    G = sys.modules.get("kernels.gelu") or __import__("importlib").import_module("kernels.gelu")
    dtype = DTYPES[dtn]
    n = 8 * 1024 * 3072  # GPT-2 MLP activations
    x, y, dy = (torch.empty((n,), dtype=dtype) for _ in range(3))
    meta = dict(APPROX_TANH=approx, BLOCK=G._BLOCK, INT64=False, num_warps=G._NUM_WARPS)
    tag = f"{dtn} n={n} tanh={approx} BLOCK={G._BLOCK} w{G._NUM_WARPS}"
    return [Case("gelu_fwd", tag, unwrap(G._gelu_fwd_kernel), (x, y, n), meta, dtn),
            Case("gelu_bwd", tag, unwrap(G._gelu_bwd_kernel), (dy, x, y, n), meta, dtn)]


def lce_cases(dtn, D, has_bias, configs: str, *, options: bool = False) -> list[Case]:
    """``options``: label smoothing and a softcap on (Gemma 2's loss), else the plain loss."""
    import kernels.cross_entropy as CE

    dtype = DTYPES[dtn]
    N, V = 8 * 1024, 50257  # GPT-2: batch 8 x T 1024 rows, the unpadded vocabulary
    x = torch.empty((N, D), dtype=dtype)
    w = torch.empty((V, D), dtype=dtype)
    bias = torch.empty((V,), dtype=dtype) if has_bias else None
    target = torch.empty((N,), dtype=torch.int64)
    splits = max(1, min(16, triton.cdiv(2 * 132, triton.cdiv(N, 128)), triton.cdiv(V, 1024)))
    part = torch.empty((splits, N), dtype=torch.float32)
    meta = dict(HAS_BIAS=has_bias, IEEE=dtn == "fp32", LARGE=needs_int64(x, w), SOFTCAP=options, SMOOTH=options)
    fwd_args = (x, w, bias, target, part, part, part if options else None, *x.stride(), *w.stride(), N, V, D,
                triton.cdiv(V, splits), 30.0 if options else 0.0)
    C = min(N, max(256, CE._CHUNK_BYTES // (V * x.element_size()) // 256 * 256))
    dz = torch.empty((C, V), dtype=dtype)
    lse = torch.empty((N,), dtype=torch.float32)
    g = torch.empty((N,), dtype=torch.float32)
    dl_args = (x, w, bias, target, lse, g, dz, *x.stride(), *w.stride(), dz.stride(0), 0, C, V, D, -100,
               30.0 if options else 0.0, 0.1 if options else 0.0)
    tag = f"{dtn} d={D} bias={has_bias}" + (" smoothing+softcap" if options else "")
    out = []
    for name, kern, args in (("lce_fwd", CE._lce_fwd_kernel, fwd_args), ("lce_dlogits", CE._lce_dlogits_kernel, dl_args)):
        cfgs = candidates({"lce_fwd": CE._lce_fwd_tuned, "lce_dlogits": CE._lce_dlogits_tuned}[name], unwrap(kern),
                          args, meta)
        for c in (cfgs if configs == "all" else cfgs[:1]):
            out.append(Case(name, f"{tag} {c.kwargs} w{c.num_warps}s{c.num_stages}", unwrap(kern), args,
                            dict(meta, **_cfg_kwargs(c)), dtn))
    return out


def rms_norm_cases(dtn, N, *, residual=True) -> list[Case]:
    import kernels.rmsnorm as RMS

    dtype = DTYPES[dtn]
    M = 4 * 2048  # Llama rows: batch 4 x T 2048
    cuda = torch.device("cuda")
    x, y, dy, dx = (torch.empty((M, N), dtype=dtype) for _ in range(4))
    res = torch.empty((M, N), dtype=dtype) if residual else None
    s = torch.empty((M, N), dtype=dtype) if residual else x.new_empty(0)
    w = torch.empty((N,), dtype=torch.float32)  # fp32 parameters with bf16 activations
    rstd = torch.empty((M,), dtype=torch.float32)
    bm, bn, warps = row_launch_config(M, N, cuda, RMS._TILE_FWD, RMS._TILE_INTERPRET)
    fwd = Case("rms_fwd", f"{dtn} N={N} res={residual} BLOCK_M={bm} w{warps}", unwrap(RMS._rms_norm_fwd_kernel),
               (x, res, s, y, w, rstd, x.stride(0), res.stride(0) if residual else 0, N, N, w.stride(0), M, N,
                1e-6, 1.0),
               dict(HAS_RES=residual, HAS_W=True, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps), dtn)
    bm, bn, warps = row_launch_config(M, N, cuda, RMS._TILE_BWD, RMS._TILE_INTERPRET)
    grid = min(triton.cdiv(M, bm), 132 * max(1, 32 // warps))  # row_partials_grid on 132 SMs
    ds = torch.empty((M, N), dtype=dtype) if residual else None
    dw = torch.empty((grid, N), dtype=torch.float32)
    bwd = Case("rms_bwd", f"{dtn} N={N} ds={residual} BLOCK_M={bm} w{warps}", unwrap(RMS._rms_norm_bwd_kernel),
               (dy, x, w, rstd, ds, dx, dw, dy.stride(0), x.stride(0), ds.stride(0) if residual else 0, N,
                w.stride(0), M, N, 1.0),
               dict(HAS_W=True, HAS_DS=residual, COMPUTE_DW=True, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps), dtn)
    return [fwd, bwd]


def glu_cases(dtn, activation="silu", hidden=14336) -> list[Case]:
    import kernels.glu as GLU

    dtype = DTYPES[dtn]
    M = 4 * 2048
    fused = torch.empty((M, 2 * hidden), dtype=dtype)  # gate/up as the halves of one projection
    gate, up = fused[:, :hidden], fused[:, hidden:]
    y, dy, dg, du = (torch.empty((M, hidden), dtype=dtype) for _ in range(4))
    _grid, bm, bn, warps = GLU._grid(M, hidden, torch.device("cuda"))
    meta = dict(ACT=GLU.ACTIVATIONS.index(activation), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    tag = f"{dtn} {M}x{hidden} {activation} BLOCK={bm}x{bn} w{warps}"
    return [Case("glu_fwd", tag, unwrap(GLU._glu_fwd_kernel), (gate, up, y, gate.stride(0), up.stride(0), M, hidden),
                 meta, dtn),
            Case("glu_bwd", tag, unwrap(GLU._glu_bwd_kernel),
                 (dy, gate, up, dg, du, dy.stride(0), gate.stride(0), up.stride(0), M, hidden), meta, dtn)]


def rotary_cases(dtn, D=128) -> list[Case]:
    import kernels.rotary as ROT

    dtype = DTYPES[dtn]
    B, H, T = 4, 32, 2048
    x = torch.empty((B, T, H, D), dtype=dtype).transpose(1, 2)  # a (B, T, H, D) projection viewed as (B, H, T, D)
    y = torch.empty((B, H, T, D), dtype=dtype)
    cos = torch.empty((B, T, D), dtype=dtype)
    sin = torch.empty((B, T, D), dtype=dtype)
    bd = triton.next_power_of_2(D // 2)
    bt = max(1, min(triton.next_power_of_2(T), ROT._TILE // bd))
    out = []
    for backward in (False, True):
        args = (x, cos, sin, y, *x.stride(), *ROT._cos_strides(cos), *ROT._cos_strides(sin), *y.stride(), H, T, D // 2)
        out.append(Case("rotary", f"{dtn} D={D} backward={backward} BLOCK_T={bt}", unwrap(ROT._rotary_kernel), args,
                        dict(BACKWARD=backward, BLOCK_T=bt, BLOCK_D=bd, num_warps=ROT._NUM_WARPS), dtn))
    return out


GPT2_WIDTHS = (768, 1024, 1280, 1600)
LLAMA_WIDTHS = (2048, 4096, 8192)


def fast_cases() -> list[Case]:
    """Default configs, bf16 (and fp32 attention): what CI checks on every run."""
    cases = []
    for D in (64, 128):
        cases += attention_cases("bf16", D, True, False, 1024, "packed", "first")
    # issue 24's variants: GQA + sliding window + softcap (Gemma 2) dense at D=128, packed varlen at D=64
    # and D=128 (varlen GQA at D=128 spilled with the dense default dK/dV tile: its own candidates)
    cases += attention_cases("bf16", 128, True, False, 1024, "packed", "first", Hk=4, window=256, softcap=50.0)
    for D in (64, 128):
        cases += attention_cases("bf16", D, True, False, 1024, "packed", "first", Hk=4, window=256, softcap=50.0,
                                 varlen=True)
    # varlen GQA with dropout (issue 24): at D=128 every wgmma dK/dV tile spilled before its one-loop
    # causal walk and its own candidate (kernels/attention_launch.py)
    for D in (64, 128):
        cases += attention_cases("bf16", D, True, True, 1024, "packed", "first", Hk=4, varlen=True)
    # fp32 (issue 21): the default FMA tiles, gated at FP32_ATTN_SPILL_LIMIT
    cases += attention_cases("fp32", 128, True, True, 1024, "packed", "first")
    cases += attention_cases("fp32", 64, True, True, 1024, "packed", "first", Hk=4, varlen=True)
    cases += decode_cases("bf16", 64)
    cases += decode_cases("bf16", 128, Hk=4, window=256, softcap=50.0)[:1]
    for N in (768, 1600):
        cases += layernorm_cases("bf16", N)
    cases += gelu_cases("bf16")
    cases += lce_cases("bf16", 768, False, "first")
    cases += lce_cases("bf16", 4096, False, "first", options=True)  # Gemma 2's loss options, a Llama width
    cases += rms_norm_cases("bf16", 4096)
    # the launch settings that spilled before (2026-12-01): LayerNorm forward at BLOCK_N 1024 in fp16
    # without a residual, and the RMSNorm backward's wide-row path (N=16384)
    cases += layernorm_cases("fp16", 768, residual=False)[:1] + rms_norm_cases("bf16", 16384)[1:]
    cases += glu_cases("bf16", "silu") + glu_cases("bf16", "gelu_tanh")[:1]
    cases += rotary_cases("bf16", 128)
    return cases


def full_cases() -> list[Case]:
    """Every autotune config x dtype x causal/dropout/EVEN flags x layout, decode, every GPT-2 width."""
    cases = []
    for dtn in ("bf16", "fp16", "fp32"):
        for D in (64, 128):
            for causal in (True, False):
                for dropout in (False, True):
                    cases += attention_cases(dtn, D, causal, dropout, 1024, "packed", "all")
            cases += attention_cases(dtn, D, True, False, 1000, "contiguous", "all")  # EVEN_M/N off
        cases += attention_cases(dtn, 80, True, False, 1024, "contiguous", "all")
        for D in (64, 128):
            cases += decode_cases(dtn, D)
            cases += decode_cases(dtn, D, Hk=4, window=256, softcap=50.0)
            for varlen in (False, True):  # GQA + window + softcap, dense and packed
                cases += attention_cases(dtn, D, True, False, 1024, "packed", "all", Hk=4, window=256,
                                         softcap=50.0, varlen=varlen)
            cases += attention_cases(dtn, D, True, True, 1024, "packed", "all", Hk=4, varlen=True)  # + dropout
        for N in GPT2_WIDTHS:
            cases += layernorm_cases(dtn, N, residual=True) + layernorm_cases(dtn, N, residual=False)[:1]
        cases += gelu_cases(dtn, True) + gelu_cases(dtn, False)
        for D, bias in ((768, False), (768, True), (1600, False)):
            cases += lce_cases(dtn, D, bias, "all")
        cases += lce_cases(dtn, 4096, True, "all", options=True)
        for N in LLAMA_WIDTHS + (128, 16384):  # (128: Qwen3's per-head q_norm/k_norm)
            cases += rms_norm_cases(dtn, N, residual=True) + rms_norm_cases(dtn, N, residual=False)
        for act in ("silu", "gelu_tanh", "gelu"):
            cases += glu_cases(dtn, act)
        for D in (64, 80, 128):
            cases += rotary_cases(dtn, D)
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="every config x dtype x flag (minutes)")
    ap.add_argument("--only", default="", help="comma list of substrings of 'name label'")
    ap.add_argument("--match", default="", help="regular expression searched in 'name label'")
    ap.add_argument("--shard", default="0/1", help="I/N: compile every N-th case starting at I")
    ap.add_argument("--json", default=None, help="write the facts of every variant here")
    args = ap.parse_args(argv)
    cases = full_cases() if args.full else fast_cases()
    if args.only:
        subs = [s for s in args.only.split(",") if s]
        cases = [c for c in cases if any(s in f"{c.name} {c.label}" for s in subs)]
    if args.match:
        cases = [c for c in cases if re.search(args.match, f"{c.name} {c.label}")]
    i, n = (int(x) for x in args.shard.split("/"))
    cases = cases[i::n]
    failed = 0
    for c in cases:
        c.facts = compile_case(c)
        bad = problems(c)
        failed += bool(bad)
        f = c.facts
        facts = (f"regs={f['regs']} spill={f['spill_stores']}/{f['spill_loads']}B smem={f['smem']} "
                 f"hgmma={f['hgmma']} ldl/stl={f['ldl_stl']}" if f["ok"] else "")
        print(f"{'FAIL' if bad else 'ok  '} {c.name:14s} {c.label} | {facts} {f['seconds']}s"
              + (f" | {'; '.join(bad)}" if bad else ""), flush=True)
    print(f"\n{len(cases) - failed} ok, {failed} failed; triton {triton.__version__}, sm_90")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([dict(name=c.name, label=c.label, dtype=c.dtype, default=c.default, problems=problems(c),
                            **c.facts) for c in cases], fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
