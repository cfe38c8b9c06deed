"""Compile the attention, decode, LayerNorm, GELU and linear+cross-entropy kernels ahead of time for an H100 (sm_90) on a machine without a GPU.

The interpreter runs the kernels' semantics but not Triton's compiler: layouts, ``tl.dot`` shape and dtype
rules, shared-memory use. This compiles them to cubin with the ptxas bundled in the triton wheel and
reports shared memory per variant. ``python tests/aot_compile.py`` compiles every autotune config at
bf16 D=64/128 plus fp16/fp32/D=80/96/16/dropout/masked variants (~5 min, fp32 D=128 is slow);
``--quick`` one config per kernel (``tests/test_aot_compile.py`` runs that). Exit status 1 on a failure.
"""
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # before importing triton: real JITFunctions, not the interpreter
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.attention as A
import kernels.decode as Dm

TARGET = GPUTarget("cuda", 90, 32)

def sig_of(fn, types, constexprs):
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        else:
            sig[n] = types.get(n, "i32")
    return sig

def compile_one(jit, types, constexprs, num_warps=4, num_stages=3):
    fn = jit.fn if hasattr(jit, "fn") and not isinstance(jit, triton.runtime.jit.JITFunction) else jit
    src = ASTSource(fn=fn, signature=sig_of(fn, types, constexprs), constexprs=constexprs)
    t = time.time()
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    return time.time() - t, k.metadata.shared

def unwrap(k):
    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k


DT = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}

def attn_types(fn, dt):
    t = {}
    for n in fn.arg_names:
        if n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            t[n] = dt
        elif n in ("LSE", "DELTA"):
            t[n] = "*fp32"
        elif n == "SEED":
            t[n] = "*i64"
        elif n in ("qk_scale", "sm_scale", "dropout_p"):
            t[n] = "fp32"
        else:
            t[n] = "i32"
    return t

results = []
def attempt(label, fn, types, consts, warps, stages):
    try:
        dt_s, shared = compile_one(fn, types, consts, warps, stages)
        results.append((label, "ok", f"{dt_s:.1f}s smem={shared}"))
    except Exception as e:
        results.append((label, "FAIL", f"{type(e).__name__}: {str(e)[:300]}"))
    print(*results[-1], flush=True)

kernels = [("fwd", unwrap(A._attn_fwd_kernel), A._FWD_CONFIGS), ("dkdv", unwrap(A._attn_bwd_dkdv_kernel), A._DKDV_CONFIGS),
           ("dq", unwrap(A._attn_bwd_dq_kernel), A._DQ_CONFIGS)]
variants = []
for D in (64, 128):
    for causal in (True, False):
        variants.append(("bf16", D, causal, False, True, None))  # all configs
variants += [("fp16", 64, True, False, True, 0), ("fp32", 64, True, False, True, 0), ("bf16", 80, True, False, True, 0),
             ("bf16", 96, False, False, False, 0), ("bf16", 64, True, True, True, 0), ("fp16", 128, True, True, False, 0),
             ("bf16", 16, True, False, False, 0), ("fp32", 128, False, True, False, 0)]
QUICK = "--quick" in sys.argv
if QUICK:
    variants = [("bf16", 64, True, False, True, 0), ("fp16", 80, False, True, False, 1), ("fp32", 32, True, False, False, 2)]
for dtn, D, causal, dropout, even, cfg_idx in variants:
    BD = triton.next_power_of_2(max(D, 16))
    for kname, fn, cfgs in kernels:
        chosen = cfgs if cfg_idx is None else [cfgs[cfg_idx]]
        for c in chosen:
            consts = dict(HEAD_DIM=D, BLOCK_D=BD, CAUSAL=causal, DROPOUT=dropout, IEEE=dtn == "fp32", EVEN_M=even,
                          EVEN_N=even, EVEN_D=BD == D, LARGE=not even, **c.kwargs)
            attempt(f"{kname} {dtn} D={D} causal={causal} drop={dropout} even={even} {c.kwargs} w{c.num_warps}s{c.num_stages}",
                    fn, attn_types(fn, DT[dtn]), consts, c.num_warps, c.num_stages)
    # preprocess
    fn = unwrap(A._bwd_preprocess_kernel)
    attempt(f"pre {dtn} D={D}", fn, attn_types(fn, DT[dtn]), dict(HEAD_DIM=D, BLOCK_D=BD, EVEN_D=BD == D, LARGE=False, BLOCK_M=64), 4, 1)
# decode
for dtn in (("bf16",) if QUICK else ("bf16", "fp16", "fp32")):
    for D in ((64,) if QUICK else (64, 128, 80)):
        BD = triton.next_power_of_2(D)
        fn = unwrap(Dm._decode_split_kernel)
        types = {n: ("*fp32" if n in ("O_PART", "LSE_PART") else "*i32" if n == "SEQLENS" else DT[dtn] if n in ("Q", "K", "V")
                     else "fp32" if n == "qk_scale" else "i32") for n in fn.arg_names}
        attempt(f"decode split {dtn} D={D}", fn, types, dict(HEAD_DIM=D, BLOCK_D=BD, EVEN_D=BD == D, IEEE=dtn == "fp32",
                LARGE=False, BLOCK_M=16, BLOCK_N=Dm._BLOCK_N_CUDA), 4, 3)
        fn = unwrap(Dm._decode_combine_kernel)
        types = {n: ("*fp32" if n in ("O_PART", "LSE_PART") else DT[dtn] if n == "OUT" else "i32") for n in fn.arg_names}
        attempt(f"decode combine {dtn} D={D}", fn, types, dict(HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=16, BLOCK_S=8), 4, 1)
# LayerNorm (fwd with/without the fused residual add; bwd with dW/dB partials) and GELU, GPT-2 widths
import kernels.layernorm as LN  # noqa: E402

G = sys.modules["kernels.gelu"]  # (the package attribute `kernels.gelu` is the function)

for dtn in (("bf16",) if QUICK else ("bf16", "fp16", "fp32")):
    for N in ((768,) if QUICK else (768, 1024, 1600, 4096)):
        BN = triton.next_power_of_2(N)
        fn = unwrap(LN._layer_norm_fwd_kernel)
        for has_res in (False, True):
            types = {n: (DT[dtn] if n in ("X", "RES", "S", "Y", "W", "B") else "*fp32" if n in ("MEAN", "RSTD")
                         else "fp32" if n == "eps" else "i32") for n in fn.arg_names}
            attempt(f"layer_norm fwd {dtn} N={N} res={has_res}", fn, types,
                    dict(HAS_RES=has_res, HAS_W=True, HAS_B=True, BLOCK_M=1, BLOCK_N=BN), 8, 1)
        fn = unwrap(LN._layer_norm_bwd_kernel)
        types = {n: (DT[dtn] if n in ("DY", "X", "W", "DS", "DX") else "*fp32" if n in ("MEAN", "RSTD", "DW", "DB")
                     else "i32") for n in fn.arg_names}
        attempt(f"layer_norm bwd {dtn} N={N}", fn, types,
                dict(HAS_W=True, HAS_DS=True, COMPUTE_DW=True, COMPUTE_DB=True, BLOCK_M=4, BLOCK_N=BN), 8, 1)
    for name, kern in (("fwd", G._gelu_fwd_kernel), ("bwd", G._gelu_bwd_kernel)):
        fn = unwrap(kern)
        for approx in (True, False):
            types = {n: (DT[dtn] if n.isupper() else "i64") for n in fn.arg_names}
            attempt(f"gelu {name} {dtn} tanh={approx}", fn, types, dict(APPROX_TANH=approx, BLOCK=1024, INT64=True),
                    4, 1)

# Fused linear + cross-entropy: the forward (online LSE) and the dlogits kernel, every autotune config at
# bf16 d=768 (GPT-2) with and without bias; fp16/fp32 (IEEE dot) and d=1600 with one config each.
import kernels.cross_entropy as CE  # noqa: E402

for kname, kern, cfgs in (("lce fwd", CE._lce_fwd_kernel, CE._FWD_CONFIGS),
                          ("lce dlogits", CE._lce_dlogits_kernel, CE._DLOGITS_CONFIGS)):
    fn = unwrap(kern)
    variants = [("bf16", 768, True, None), ("bf16", 768, False, None), ("fp16", 1600, False, 0), ("fp32", 768, True, 0)]
    if QUICK:
        variants = [("bf16", 768, True, 0), ("fp16", 80, False, 1)]
    for dtn, D, has_bias, cfg_idx in variants:
        types = {n: (DT[dtn] if n in ("X", "W", "B", "DZ") else "*i64" if n == "T"
                     else "*fp32" if n in ("PART_LSE", "PART_T", "LSE", "G") else "i32") for n in fn.arg_names}
        for c in (cfgs if cfg_idx is None else [cfgs[cfg_idx]]):
            attempt(f"{kname} {dtn} d={D} bias={has_bias} {c.kwargs} w{c.num_warps}s{c.num_stages}", fn, types,
                    dict(HAS_BIAS=has_bias, IEEE=dtn == "fp32", LARGE=False, **c.kwargs), c.num_warps, c.num_stages)

fails = [r for r in results if r[1] != "ok"]
print(f"\n{len(results) - len(fails)} ok, {len(fails)} failed; triton {triton.__version__}, sm_90")
sys.exit(1 if fails else 0)
