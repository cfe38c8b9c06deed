"""Flash attention's launch side: autotune candidates (with their as-compiled sm_90 facts), the one
place that binds the kernels' arguments (``_fwd_call`` / ``_bwd_calls``, also used by the compile gate
``tests/gpu_ready.py``), and the dense and varlen launchers that the ops of ``kernels/attention.py``
register.
"""

from __future__ import annotations

import torch

from ._utils import INTERPRETED, LOG2E, launch, needs_int64, next_power_of_2, triton
from .attention_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _bwd_preprocess_kernel
from .attention_fwd import _attn_fwd_kernel

# ---------------------------------------------------------------------------------------------------
# Launch settings
# ---------------------------------------------------------------------------------------------------
# Autotune lists (CUDA). The key: head_dim, causal, dropout, a sequence-length bucket, the layout (row
# strides of q and k: the model's packed q/k/v views and a contiguous (B, H, T, D) tensor tune apart) and
# the EVEN_M/EVEN_N/LARGE flags (the dtype is part of Triton's key). Every block size divides _EVEN_BLOCK,
# so EVEN_M/EVEN_N (decided by the launcher, before the config is known) hold for whichever config wins.
_EVEN_BLOCK = 128


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Which calls a candidate is tuned for, from the call's features ``f`` (BLOCK_D, DROPOUT, VARLEN, WINDOW,
# SOFTCAP; the autotune key fixes them, BLOCK_D through HEAD_DIM): a candidate that spills registers or needs more
# than 227 KB of shared memory for some calls is left out of those calls' autotuning.
def _always(f):
    return True


def _d64_or_no_dropout(f):
    return f["BLOCK_D"] <= 64 or not f["DROPOUT"]


def _d64_no_dropout(f):
    return f["BLOCK_D"] <= 64 and not f["DROPOUT"]


def _d64_or_dense(f):
    return f["BLOCK_D"] <= 64 or not f["VARLEN"]


def _d64_or_dense_no_dropout(f):
    return f["BLOCK_D"] <= 64 or not (f["DROPOUT"] or f["VARLEN"])


def _d128_varlen_dropout(f):
    return f["BLOCK_D"] > 64 and f["VARLEN"] and f["DROPOUT"]


def _not_d128_varlen_dropout(f):
    return not _d128_varlen_dropout(f)


def _d64_no_varlen_dropout_or_plain(f):
    return (f["BLOCK_D"] <= 64 and not (f["VARLEN"] and f["DROPOUT"])) or not (
        f["DROPOUT"] or f["VARLEN"] or f["WINDOW"] or f["SOFTCAP"])


def _d64_or_no_varlen_softcap(f):
    return f["BLOCK_D"] <= 64 or not (f["VARLEN"] and f["SOFTCAP"])


# Facts from the as-launched compile for sm_90 (tests/gpu_ready.py: bf16, causal, GPT-2's packed q/k/v
# (H = 12), T=1024, triton 3.9; registers per thread, spill bytes stores/loads, shared memory; "varlen
# GQA": the packed varlen layout with Hk = 4). Every bf16/fp16 candidate issues wgmma (HGMMA);
# tests/test_gpu_ready.py fails on a spill or on > 227 KB. GPU timings decide among the candidates at
# run time.
_FWD_TABLE = [] if not hasattr(triton, "Config") else [
    # D=64: 120 regs (dropout 255), 64 KB; D=128: 173 regs, 128 KB; 0 spills, but D=128 with dropout
    # 24/24 B of spills
    (_cfg(128, 64, 8, 3), _d64_or_no_dropout),
    # D=64 long T, wider key blocks: 211 regs, 112 KB, 0 spills; with dropout 255 regs and 40/60 B of
    # spills; D=128 needs 224 KB (236 regs) and spills 180/184 B with dropout
    (_cfg(128, 128, 8, 3), _d64_no_dropout),
    # the 128-row tile for D=80-128: D=64 118 regs (dropout 169), 48 KB; D=128 128 regs (dropout 243),
    # 96 KB; 0 spills
    (_cfg(128, 32, 8, 4), _always),
    # short T or few heads (twice the programs): D=64 127 regs (dropout 255), 72 KB, 0 spills; D=128
    # 165 regs, 144 KB, 0 spills, but with dropout 255 regs and 12/12 B of spills (varlen with a window:
    # 20/20 B)
    (_cfg(64, 64, 4, 4), _d64_or_dense_no_dropout),
    # smallest: D=64 94 regs (dropout 128), 32 KB; D=128 128 regs (dropout 240), 64 KB; 0 spills
    (_cfg(64, 32, 4, 3), _always),
]
# dK/dV: the varlen kernel holds more live values (sequence offsets, masked tails, the GQA loop over the
# group's query heads), so at D=128 it gets the one tile that does not spill there.
_DKDV_TABLE = [] if not hasattr(triton, "Config") else [
    # 128 resident keys: D=64 158 regs (dropout 251), 57 KB; D=128 231 regs (dropout 255), 113 KB;
    # 0 spills (varlen GQA with dropout at D=64: 251 regs); varlen GQA D=128: 255 regs and 28/28 B of
    # spills with window + softcap (172/172 B without)
    (_cfg(32, 128, 8, 3), _d64_or_dense),
    # D=64 186 regs (dropout 253), 65 KB (dropout 69 KB), 0 spills, but varlen GQA with dropout 16/12 B;
    # D=128 237 regs, 129 KB, 0 spills, but 180/184 B of spills with dropout, 136/136 B in GQA with
    # window + softcap (varlen: 120/120 B)
    (_cfg(64, 64, 8, 3), _d64_no_varlen_dropout_or_plain),
    # D=64 long T: 220 regs, 81 KB, 0 spills; with dropout 124/124 B of spills; D=128 255 regs and
    # 68/80 B of spills (161 KB): D=64 without dropout only
    (_cfg(64, 128, 8, 3), _d64_no_dropout),
    # D=64 116 regs (dropout 128), 28 KB; D=128 198 regs (dropout 245), 56 KB; 0 spills; varlen GQA
    # D=128: 242 regs with window + softcap, but 128/128 B of spills without
    (_cfg(16, 64, 4, 3), _d64_or_dense),
    # D=64 117 regs (dropout 172), 44 KB; D=128 202 regs (dropout 245), 88 KB; 0 spills; varlen GQA
    # D=128: 233 regs with window + softcap, 252 without, 0 spills; with dropout 36/36 B of spills
    (_cfg(16, 128, 8, 3), _not_d128_varlen_dropout),
    # varlen GQA with dropout at D=128 (issue 24): 231 regs, 50 KB, 0 spills, the one tile without (16x128
    # w8 36 B, 16x64 w4 76 B, 32x128 332 B). Causal varlen with dropout walks its query blocks as one
    # masked loop (kernels/attention_bwd.py): with the two loop instances every wgmma tile spilled
    # there (16x64 w8 s1-4: 40-148 B, 16x128 128-144 B, 32x64 136-300 B, 64x64 676-2,336 B)
    (_cfg(16, 64, 8, 2), _d128_varlen_dropout),
]
_DQ_TABLE = [] if not hasattr(triton, "Config") else [
    # 128 resident queries: D=64 132 regs (dropout 174), 80 KB; D=128 185 regs (dropout 255), 160 KB;
    # 0 spills, but varlen D=128 with window + softcap 255 regs and 100/104 B of spills (softcap alone
    # 254 regs)
    (_cfg(128, 64, 8, 3), _d64_or_no_varlen_softcap),
    # D=64 116 regs (dropout 169), 56 KB; D=128 127 regs (dropout 222), 112 KB; 0 spills
    (_cfg(128, 32, 8, 3), _always),
    # D=64 117 regs (dropout 241), 64 KB; D=128 175 regs, 128 KB, 0 spills, but 28/28 B of spills with
    # dropout (varlen: 32/32 B)
    (_cfg(64, 64, 8, 3), _d64_or_no_dropout),
    # D=64 92 regs (dropout 128), 40 KB; D=128 134 regs (dropout 224), 80 KB; 0 spills
    (_cfg(64, 32, 4, 3), _always),
]
# fp32 (IEEE dots: FMA, no wgmma; 4-byte tiles). The FMA dot keeps its operands and accumulator in
# registers, and whether ptxas fits them in 255 registers depends on the tile's shape, not only its size:
# the earlier 64x32 / 128x32 / 64x64 fwd and dQ tiles spilled 4 B-87 KB (D=128 fwd 64x64: 52-84 KB,
# dQ 64x32 up to 76 KB), while 64 keys per block with 16-32 rows fits. Facts: sm_90 compile, the 7 flag
# variants of the sweep (causal/not, dropout, T=1000 uneven, GQA + window + softcap dense and varlen)
# plus varlen GQA with dropout, D=64/80/128; tests/gpu_ready.py fails a spill at the default (first).
def _d64_not_varlen_dropout(f):
    return f["BLOCK_D"] <= 64 and not (f["VARLEN"] and f["DROPOUT"])


def _d128_or_no_dropout(f):
    return f["BLOCK_D"] > 64 or not f["DROPOUT"]


_FWD_TABLE_FP32 = [] if not hasattr(triton, "Config") else [
    # D=64 72-92 regs, 48 KB; D=80/128 87-98 regs, 88 KB; 0 spills in every variant
    (_cfg(32, 64, 8, 2), _always),
    # D=64 79-96 regs, 40 KB; D=80/128 103-126 regs, 76 KB; 0 spills in every variant
    (_cfg(16, 64, 4, 2), _always),
]
_DKDV_TABLE_FP32 = [] if not hasattr(triton, "Config") else [
    # the one dK/dV tile with 0 spills in every variant: D=64 75-114 regs, 17 KB; D=80/128 90-150 regs,
    # 33 KB (16x32 and 32x16 spill 16-1,396 B with uneven T or varlen, 32x32 w8 20 B)
    (_cfg(16, 16, 4, 2), _always),
    # D=64 104-242 regs, 45 KB, 0 spills, but 32/32 B with varlen + dropout; D=128 0 spills except
    # 1,384/1,180 B at an uneven T: D=64 only
    (_cfg(16, 64, 8, 2), _d64_not_varlen_dropout),
]
_DQ_TABLE_FP32 = [] if not hasattr(triton, "Config") else [
    # D=64 72-94 regs, 44 KB; D=80/128 91-111 regs, 84 KB; 0 spills in every variant
    (_cfg(16, 64, 4, 2), _always),
    # D=64 64-96 regs, 56 KB, 0 spills but 4/4 B with dropout (non-causal); D=80/128 83-112 regs, 104 KB,
    # 0 spills
    (_cfg(32, 64, 8, 2), _d128_or_no_dropout),
]

_FWD_CONFIGS = [c for c, _ in _FWD_TABLE]
_DKDV_CONFIGS = [c for c, _ in _DKDV_TABLE]
_DQ_CONFIGS = [c for c, _ in _DQ_TABLE]
_KEY = ["HEAD_DIM", "CAUSAL", "DROPOUT", "T_BUCKET", "stride_qm", "stride_kn", "EVEN_M", "EVEN_N", "LARGE",
        "WINDOW", "SOFTCAP", "VARLEN"]


def _candidates(table, table_fp32):
    """``early_config_prune``: the candidates of the call's dtype (IEEE: fp32) tuned for its BLOCK_D,
    DROPOUT, VARLEN, WINDOW and SOFTCAP."""
    def prune(configs, named_args, **meta):
        rows = table_fp32 if meta.get("IEEE") else table
        f = {k: meta.get(k, False) for k in ("DROPOUT", "VARLEN", "WINDOW", "SOFTCAP")}
        f["BLOCK_D"] = meta.get("BLOCK_D", 128)
        keep = [c for c, ok in rows if ok(f)]
        return keep or [rows[-1][0]]
    return prune


if hasattr(triton, "autotune"):
    def _tuned(kernel, table, table_fp32):
        return triton.autotune(configs=[c for c, _ in table + table_fp32], key=_KEY,
                               prune_configs_by={"early_config_prune": _candidates(table, table_fp32)})(kernel)

    _attn_fwd_tuned = _tuned(_attn_fwd_kernel, _FWD_TABLE, _FWD_TABLE_FP32)
    _attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv_kernel, _DKDV_TABLE, _DKDV_TABLE_FP32)
    _attn_bwd_dq_tuned = _tuned(_attn_bwd_dq_kernel, _DQ_TABLE, _DQ_TABLE_FP32)

# The interpreter runs programs one after another in Python: one fixed small config that still
# exercises every path (BLOCK_M != BLOCK_N, unmasked + diagonal loops, masked tails).
_INTERPRET_FWD = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 1}
_INTERPRET_DKDV = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 1}
_INTERPRET_DQ = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 1}
_INTERPRET_PRE = {"BLOCK_M": 32, "num_warps": 1}


def _t_bucket(t: int) -> int:
    """Sequence-length bucket for the autotune key: powers of two from 256 to 16k."""
    return min(max(next_power_of_2(t), 256), 16384)


def _meta(D, dtype, causal, dropout_p, window, softcap, varlen):
    BLOCK_D = max(16, next_power_of_2(D))
    return dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, CAUSAL=bool(causal), DROPOUT=dropout_p > 0.0,
                WINDOW=window > 0, SOFTCAP=softcap > 0.0, VARLEN=varlen,
                IEEE=dtype == torch.float32, EVEN_D=BLOCK_D == D)


def _score_scales(softmax_scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap2) of the kernels' ``_scores``: log2-domain scores, or the softcap's two factors."""
    if softcap > 0.0:
        return softmax_scale / softcap, softcap * LOG2E
    return softmax_scale * LOG2E, 1.0


def _even(Tq, Tk, blocks):
    if blocks is None:  # autotuned: every candidate block divides _EVEN_BLOCK
        return Tq % _EVEN_BLOCK == 0, Tk % _EVEN_BLOCK == 0
    return Tq % blocks["BLOCK_M"] == 0, Tk % blocks["BLOCK_N"] == 0


def _bhmd(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """Strides as the kernels index them, (batch, head, row, dim): a packed (total, H, D) tensor has
    no batch stride (its sequences are offsets along the rows)."""
    return (0, t.stride(1), t.stride(0), t.stride(2)) if varlen else tuple(t.stride())


def _fwd_call(q, k, v, o, lse, seed, cu_q, cu_k, nb, Tq, Tk, causal, softmax_scale, dropout_p, window, softcap):
    """(grid, args, meta) of the forward kernel: the launcher's one source of its arguments (the GPU
    compile gate binds the same). Dense: nb = B, Tq/Tk the lengths; varlen: nb = sequences, Tq/Tk the
    max_seqlens (grid size; each program reads its sequence's bounds from cu_q/cu_k)."""
    varlen = cu_q is not None
    H, Hk, D = q.shape[1], k.shape[1], q.shape[-1]
    meta = _meta(D, q.dtype, causal, dropout_p, window, softcap, varlen)
    if varlen:
        even_m = even_n = False
        large = needs_int64(q, k, v, o)
        lse_strides = (0, lse.stride(0))
    else:
        even_m, even_n = _even(Tq, Tk, _INTERPRET_FWD if INTERPRETED else None)
        large = needs_int64(q, k, v, o, start_dim=2)
        lse_strides = (lse.stride(0), lse.stride(1))
    meta.update(EVEN_M=even_m, EVEN_N=even_n, LARGE=large)
    qk_scale, cap2 = _score_scales(softmax_scale, softcap)
    args = (q, k, v, o, lse, lse if seed is None else seed, lse if cu_q is None else cu_q,
            lse if cu_k is None else cu_k,
            *_bhmd(q, varlen), *_bhmd(k, varlen), *_bhmd(v, varlen), *_bhmd(o, varlen), *lse_strides,
            H, H // Hk, Tq, Tk, qk_scale, cap2, window, dropout_p, _t_bucket(max(Tq, Tk)))
    return (lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), nb * H)), args, meta


def _fwd(*call):
    grid, args, meta = _fwd_call(*call)
    launch(_attn_fwd_kernel, grid, args, meta, tuned=_attn_fwd_tuned, interpret=_INTERPRET_FWD)


def _bwd_calls(do, q, k, v, o, lse, seed, dq, dk, dv, cu_q, cu_k, nb, Tq, Tk, causal, softmax_scale, dropout_p,
               window, softcap):
    """The three backward launches (delta, dK/dV, dQ) into dq, dk, dv as (kernel, tuned, grid, args,
    meta, interpret) tuples, in order; nb/Tq/Tk as in _fwd_call."""
    varlen = cu_q is not None
    H, Hk, D = q.shape[1], k.shape[1], q.shape[-1]
    meta = _meta(D, q.dtype, causal, dropout_p, window, softcap, varlen)
    if varlen:
        large = needs_int64(q, k, v, o, do)
        o4, do4 = o.permute(1, 0, 2).unsqueeze(0), do.permute(1, 0, 2).unsqueeze(0)  # (1, H, total_q, D)
        lse_strides = (0, lse.stride(0))
    else:
        large = needs_int64(q, k, v, o, do, start_dim=2)
        o4, do4 = o, do
        lse_strides = (lse.stride(0), lse.stride(1))
    nb4, _, T4, _ = o4.shape
    delta = torch.empty((nb4, H, T4), dtype=torch.float32, device=q.device)
    pre = (_bwd_preprocess_kernel, None, lambda m: (triton.cdiv(T4, m["BLOCK_M"]), nb4 * H),
           (o4, do4, delta, *o4.stride(), *do4.stride(), H, T4),
           dict(HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], EVEN_D=meta["EVEN_D"], LARGE=large, BLOCK_M=64, num_warps=4),
           _INTERPRET_PRE)
    qk_scale, cap2 = _score_scales(softmax_scale, softcap)
    seed_arg = lse if seed is None else seed
    cu_args = (lse if cu_q is None else cu_q, lse if cu_k is None else cu_k)
    common = (*lse_strides, H, H // Hk, Tq, Tk, qk_scale, cap2, window, softmax_scale, dropout_p,
              _t_bucket(max(Tq, Tk)))
    strides = (*_bhmd(q, varlen), *_bhmd(k, varlen), *_bhmd(v, varlen), *_bhmd(do, varlen))

    even_m, even_n = (False, False) if varlen else _even(Tq, Tk, _INTERPRET_DKDV if INTERPRETED else None)
    dkdv = (_attn_bwd_dkdv_kernel, _attn_bwd_dkdv_tuned, lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), nb * Hk),
            (q, k, v, do, lse, delta, dk, dv, seed_arg, *cu_args, *strides, *_bhmd(dk, varlen),
             *_bhmd(dv, varlen), *common), dict(meta, EVEN_M=even_m, EVEN_N=even_n, LARGE=large), _INTERPRET_DKDV)
    even_m, even_n = (False, False) if varlen else _even(Tq, Tk, _INTERPRET_DQ if INTERPRETED else None)
    dq_call = (_attn_bwd_dq_kernel, _attn_bwd_dq_tuned, lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), nb * H),
               (q, k, v, do, lse, delta, dq, seed_arg, *cu_args, *strides, *_bhmd(dq, varlen), *common),
               dict(meta, EVEN_M=even_m, EVEN_N=even_n, LARGE=large), _INTERPRET_DQ)
    return [pre, dkdv, dq_call]


def _bwd(*call):
    for kernel, tuned, grid, args, meta, interpret in _bwd_calls(*call):
        launch(kernel, grid, args, meta, tuned=tuned, interpret=interpret)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------

def _attn_fwd_launch(q, k, v, seed, causal, softmax_scale, dropout_p, window_size=0, softcap=0.0):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    # (B, Tq, H, D) storage: merging heads afterwards ((B, H, T, D) -> (B, T, H*D)) is a free view.
    o = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if Tk == 0:  # nothing to attend to
        return o.zero_(), lse.fill_(float("inf"))
    _fwd(q, k, v, o, lse, seed, None, None, B, Tq, Tk, causal, softmax_scale, dropout_p, window_size, softcap)
    return o, lse


def _attn_bwd_launch(do, q, k, v, o, lse, seed, causal, softmax_scale, dropout_p, window_size=0, softcap=0.0):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _bwd(do, q, k, v, o, lse, seed, dq, dk, dv, None, None, B, Tq, Tk, causal, softmax_scale, dropout_p,
         window_size, softcap)
    return dq, dk, dv


# Varlen (packed sequences): q (total_q, H, D), k/v (total_k, Hk, D), cu_seqlens int32 (n+1,).
def _varlen_fwd_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal,
                       softmax_scale, dropout_p, window_size=0, softcap=0.0):
    total_q, H, D = q.shape
    n = cu_seqlens_q.shape[0] - 1
    o = torch.zeros((total_q, H, D), dtype=q.dtype, device=q.device)  # rows outside every sequence: 0
    lse = torch.full((H, total_q), float("inf"), dtype=torch.float32, device=q.device)
    if o.numel() == 0 or n == 0 or max_seqlen_q == 0 or k.shape[0] == 0 or max_seqlen_k == 0:
        return o, lse
    _fwd(q, k, v, o, lse, seed, cu_seqlens_q, cu_seqlens_k, n, max_seqlen_q, max_seqlen_k, causal,
         softmax_scale, dropout_p, window_size, softcap)
    return o, lse


def _varlen_bwd_launch(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed,
                       causal, softmax_scale, dropout_p, window_size=0, softcap=0.0):
    n = cu_seqlens_q.shape[0] - 1
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # rows outside every sequence: 0
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0 or n == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return dq, dk, dv
    _bwd(do, q, k, v, o, lse, seed, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, n, max_seqlen_q, max_seqlen_k,
         causal, softmax_scale, dropout_p, window_size, softcap)
    return dq, dk, dv


