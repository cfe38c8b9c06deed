"""Fused linear + cross-entropy (GPT-2's output head and loss) without the ``(N, V)`` logits in memory.

``linear_cross_entropy(x, weight, target, bias=None, *, ignore_index=-100, reduction="mean")`` is the
loss of ``cross_entropy(x @ weight.T + bias, target)``: x ``(..., d)``, weight ``(V, d)``, bias ``(V,)``,
target ``(...)`` int64. fp32 (IEEE dot products, no TF32), fp16 and bf16 inputs with fp32 logits,
statistics and loss; float64 runs the PyTorch fallback in float64 (on any device).

* Forward (``_lce_fwd_kernel``): a program owns BLOCK_N rows and one slice of the vocabulary; it walks
  the slice in BLOCK_V tiles, each ``x_blk @ W_blkᵀ (+ b)`` accumulated in fp32 over BLOCK_K chunks of d,
  keeps an online max / sum-of-exp (log-sum-exp) and picks out the target logit. The slices' partial
  log-sum-exps are combined in a fixed order. Only the fp32 log-sum-exp per row is saved.
* Backward: rows are processed in chunks of ``C`` rows (``C · V`` bounded, ~128 MiB on CUDA):
  ``_lce_dlogits_kernel`` recomputes the chunk's logits tile by tile in fp32 and writes
  ``dlogits = (softmax - onehot) · g`` in x's dtype; then ``dx[chunk] = dlogits @ W`` and
  ``dW += dlogitsᵀ @ x[chunk]`` are two GEMMs (cuBLAS on CUDA) and ``db += Σ_rows dlogits`` (fp32). Chunks
  run one after another, GEMMs and sums are deterministic: gradients are bit-identical run to run,
  with no atomics. (dx and dW cannot be accumulated in registers by one Triton program: a
  ``(BLOCK, d)`` fp32 accumulator at d = 768..1600 is larger than the register file.)
* ``ignore_index`` rows contribute nothing; ``"mean"`` divides by the number of non-ignored targets,
  counted on the device (no host sync, so ``torch.compile(fullgraph=True)`` traces it); a batch where
  every target is ignored gives loss 0 and zero gradients.
* Targets outside ``[0, V)`` other than ``ignore_index`` raise ``ValueError`` for CPU tensors (checked
  eagerly). For CUDA tensors (and under ``torch.compile``) checking would need a host sync every step,
  so the row's loss is NaN instead — never a silently wrong finite value (training stops on a NaN loss).
* Under ``torch.autocast`` x, weight and bias are cast to the autocast dtype, as ``F.linear`` would.

File order: ``@triton.jit`` kernels -> launchers -> op registration / autograd -> functional API.
Registration, dispatch and launches are ``kernel_op``/``launch`` of ``kernels/_utils.py``: ``triton_op``
in the ``gpt_kernels`` namespace
(CUDA: ``wrap_triton`` launches, visible to ``torch.compile``), a ``"cpu"`` kernel that runs the same
Triton code under the interpreter when ``TRITON_INTERPRET=1`` and the chunked PyTorch fallback of
``kernels/reference.py`` otherwise, ``register_autograd`` for the backward.
"""

from __future__ import annotations

import torch

from . import _eager_cpu
from . import reference as ref
from ._blocks import LOG2E, _dot_acc
from ._utils import (
    SUPPORTED_DTYPES,
    check_same_device,
    check_tensor,
    kernel_op,
    launch,
    needs_int64,
    sm_count,
    tl,
    triton,
)

#: The dtypes accepted; float64 runs the PyTorch fallback (the kernels compute in fp32).
DTYPES = (*SUPPORTED_DTYPES, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _logits_tile(X, W, B, rows_o, row_mask, cols, cols_o, col_mask, stride_xn, stride_xd, stride_wv,
                 stride_wd, D, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # (BLOCK_N, BLOCK_V) fp32 logits x[rows] @ W[cols]ᵀ (+ b[cols]); the d axis in BLOCK_K chunks.
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < D
        x = tl.load(X + rows_o[:, None] * stride_xn + ks[None, :] * stride_xd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        wT = tl.load(W + ks[:, None] * stride_wd + cols_o[None, :] * stride_wv,
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_V)
        acc = _dot_acc(x, wT, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


# Softcap (Gemma 2's final_logit_softcapping), c > 0:  z' = c · tanh(z / c),  dz'/dz = 1 − tanh²(z / c),
# with tanh(u) = 1 − 2 / (1 + exp(2u)): one exp2 and one division; exp(2u) = inf gives 1 and 0 gives −1
# (no NaN), and the derivative is exactly 0 there.
@triton.jit
def _softcap(z, softcap):
    t = 1.0 - 2.0 / (1.0 + tl.math.exp2(z * (2.0 * LOG2E / softcap)))
    return softcap * t, 1.0 - t * t


# Forward, per row i with logits z_i = x_i Wᵀ + b (fp32; capped by _softcap when SOFTCAP) over the
# vocabulary slice [v_lo, v_hi):
#   m = max_v z_iv (running),  l = Σ_v exp(z_iv - m) (rescaled by exp(m_old - m) when m grows),
#   part_lse_i = m + log(l)  (-inf for an empty slice),  part_t_i = z_{i, t_i} if t_i is in the slice else 0,
#   part_s_i = Σ_v z_iv over the slice (only with label smoothing, SMOOTH).
# The launcher combines slices: lse_i = logsumexp_s part_lse_si, z_{i,t_i} = Σ_s part_t_si, S_i = Σ_s part_s_si,
#   loss_i = lse_i - (1 - ε)·z_{i,t_i} - ε/V · S_i  (0 when t_i == ignore_index; ε the label smoothing:
#   torch's (1 - ε)·nll + ε·mean_v(-log p_v), as -log p_v = lse - z_v).
@triton.jit
def _lce_fwd_kernel(
    X, W, B, T, PART_LSE, PART_T, PART_S,  # PART_*: (splits, N) fp32; PART_S only when SMOOTH
    stride_xn, stride_xd, stride_wv, stride_wd,
    N, V, D, V_PER_SPLIT, softcap,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, LARGE: tl.constexpr,
    SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows_o = rows.to(tl.int64) if LARGE else rows
    tgt = tl.load(T + rows, mask=row_mask, other=-1)
    v_lo = split * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        cols_o = cols.to(tl.int64) if LARGE else cols
        z = _logits_tile(X, W, B, rows_o, row_mask, cols, cols_o, col_mask, stride_xn, stride_xd, stride_wv,
                         stride_wd, D, HAS_BIAS, IEEE, BLOCK_N, BLOCK_V, BLOCK_K)
        if SOFTCAP:
            z, _ = _softcap(z, softcap)
        if SMOOTH:  # (columns past the slice hold z = 0: zero-filled W/b loads, and softcap(0) = 0)
            s_i += tl.sum(z, 1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))  # finite: every tile holds at least one column
        p = tl.math.exp2((z - m_new[:, None]) * LOG2E)
        l_i = l_i * tl.math.exp2((m_i - m_new) * LOG2E) + tl.sum(p, 1)
        m_i = m_new
        t_i += tl.sum(tl.where((cols[None, :] == tgt[:, None]) & col_mask[None, :], z, 0.0), 1)
    part_lse = tl.where(l_i > 0.0, m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    out = split.to(tl.int64) * N + rows
    tl.store(PART_LSE + out, part_lse, mask=row_mask)
    tl.store(PART_T + out, t_i, mask=row_mask)
    if SMOOTH:
        tl.store(PART_S + out, s_i, mask=row_mask)


# Backward math. With p_iv = softmax(z_i)_v = exp(z_iv - lse_i) and g_i the upstream gradient of
# loss_i (g_i = grad / num_valid for "mean", grad for "sum", grad_i for "none"; forced to 0 on ignored
# rows), d loss_i / d z_iv = p_iv - (1 - ε)·[v == t_i] - ε/V (ε: label smoothing), so
#   dz_iv = g_i · (p_iv - (1 - ε)·[v == t_i] - ε/V)       (dlogits; recomputed, one chunk of rows at a time)
# (with a softcap, z is the capped logit and dz is multiplied by its derivative 1 - tanh²(z₀/c)), then
#   dx_i  = Σ_v dz_iv W_v          = (dz @ W)_i            (per chunk, GEMM)
#   dW_v  = Σ_i dz_iv x_i          = (dzᵀ @ x)_v           (accumulated chunk after chunk, in order)
#   db_v  = Σ_i dz_iv                                      (fp32, chunk after chunk)
# This kernel writes dz for rows [row0, row0 + n_rows) into DZ (n_rows, V), one (BLOCK_N, BLOCK_V) tile
# per program: each tile has one owner, so there is nothing to reduce across programs.
@triton.jit
def _lce_dlogits_kernel(
    X, W, B, T, LSE, G, DZ,
    stride_xn, stride_xd, stride_wv, stride_wd, stride_dz,
    row0, n_rows, V, D, ignore_index, softcap, smoothing,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, LARGE: tl.constexpr,
    SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # row index inside the chunk
    row_mask = local < n_rows
    rows = row0 + local
    rows_o = rows.to(tl.int64) if LARGE else rows
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols_o = cols.to(tl.int64) if LARGE else cols
    z = _logits_tile(X, W, B, rows_o, row_mask, cols, cols_o, col_mask, stride_xn, stride_xd, stride_wv,
                     stride_wd, D, HAS_BIAS, IEEE, BLOCK_N, BLOCK_V, BLOCK_K)
    tgt = tl.load(T + rows, mask=row_mask, other=ignore_index)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(G + rows, mask=row_mask, other=0.0)
    g = tl.where(tgt == ignore_index, 0.0, g)
    if SOFTCAP:
        z, cap_grad = _softcap(z, softcap)
    p = tl.math.exp2((z - lse[:, None]) * LOG2E)
    if SMOOTH:
        dz = (p - tl.where(cols[None, :] == tgt[:, None], 1.0 - smoothing, 0.0) - smoothing / V) * g[:, None]
    else:
        dz = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * g[:, None]
    if SOFTCAP:
        dz = dz * cap_grad
    tl.store(DZ + local.to(tl.int64)[:, None] * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------------------
# Launch settings
# ---------------------------------------------------------------------------------------------------

def _cfg(bn, bv, bk, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# CUDA autotune lists (GEMM-shaped tiles; the dtype is part of Triton's key, and so is the row count: N
# for the forward, the chunk's rows for dlogits, since few rows want smaller row blocks to fill the GPU).
# Facts from the as-launched compile for sm_90 (tests/gpu_ready.py: bf16, d=768, V=50257, N=8192, triton
# 3.9): every tile issues wgmma (HGMMA); none spills. A 128x256 forward tile spills (8 warps: 255 regs,
# 636/628 B; 16 warps: 128 regs, 432/424 B): the (128, 256) logits tile plus the online-softmax state do
# not fit the register file, so it is not a candidate.
_FWD_CONFIGS = [] if not hasattr(triton, "Config") else [
    _cfg(128, 128, 64, 8, 3),   # the classic Hopper GEMM tile, two warpgroups: 254 regs, 96 KB
    _cfg(64, 128, 64, 4, 4),    # more programs for small N: 254 regs, 96 KB
    _cfg(64, 256, 32, 8, 4),    # fewer online-softmax steps per row block: 244 regs, 80 KB
]
# For dlogits the 128x256 tile fits without a bias (254 regs, 144 KB) but spills 16/16 B with one.
_DLOGITS_CONFIGS = [] if not hasattr(triton, "Config") else [
    _cfg(128, 128, 64, 8, 3),   # 128 regs, 96 KB
    _cfg(64, 128, 64, 4, 4),    # 130 regs, 96 KB
]
# With label smoothing or a softcap the forward holds more per row and the 3-stage 128x128 tile spills
# (255 regs, 8/8 B at d=4096; so do 64x128 w4s4, 8/8 B, and 64x256, 12/12 B): those calls try these
# instead (as launched, bf16 d=4096 V=50257 N=8192, triton 3.9): 128x128 with 2 stages (255 regs, 0 spills,
# 64 KB) and 128x64 (180 regs, 0 spills, 72 KB), both with wgmma. SOFTCAP/SMOOTH are in the key.
_FWD_OPTION_CONFIGS = [] if not hasattr(triton, "Config") else [
    _cfg(128, 128, 64, 8, 2),
    _cfg(128, 64, 64, 8, 3),
]


def _fwd_prune(configs, named_args, **meta):
    return _FWD_OPTION_CONFIGS if meta.get("SOFTCAP") or meta.get("SMOOTH") else configs


_KEY = ["D", "HAS_BIAS", "N", "SOFTCAP", "SMOOTH"]
_DLOGITS_KEY = ["D", "HAS_BIAS", "n_rows"]
if hasattr(triton, "autotune"):
    _lce_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=_KEY,
                                     prune_configs_by={"early_config_prune": _fwd_prune})(_lce_fwd_kernel)
    _lce_dlogits_tuned = triton.autotune(configs=_DLOGITS_CONFIGS, key=_DLOGITS_KEY)(_lce_dlogits_kernel)

# The interpreter runs programs one after another in Python: small fixed tiles that still exercise
# every path (several vocabulary slices, tiles and d chunks with masked tails, several row chunks).
_INTERPRET_BLOCKS = {"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 1}
_INTERPRET_SPLITS = 2
_INTERPRET_CHUNK_ROWS = 64
#: Bytes of dlogits per backward chunk on CUDA (the only (rows, V) buffer that ever exists).
_CHUNK_BYTES = 128 * 2**20


def _num_splits(N: int, V: int, device: torch.device) -> int:
    """Vocabulary slices per row block: enough programs to fill the GPU when N is small."""
    if device.type != "cuda":
        return min(_INTERPRET_SPLITS, V)
    row_blocks = triton.cdiv(N, 128)
    return max(1, min(16, triton.cdiv(2 * sm_count(device), row_blocks), triton.cdiv(V, 1024)))


def _chunk_rows(N: int, V: int, dtype: torch.dtype, device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRET_CHUNK_ROWS
    rows = _CHUNK_BYTES // (V * torch.empty((), dtype=dtype).element_size())
    return max(256, rows // 256 * 256)


# ---------------------------------------------------------------------------------------------------
# Launchers: x (N, d) any strides, weight (V, d) any strides, target (N,) int64 contiguous,
# bias (V,) contiguous or None
# ---------------------------------------------------------------------------------------------------

def _combine_loss(lse, tlogit, zsum, target, ignore_index, V, label_smoothing):
    """Per-row loss from lse, the target logit and (label smoothing) the logits' sum: 0 on ignored rows,
    NaN on out-of-range targets."""
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    loss = lse - (1.0 - label_smoothing) * tlogit
    if zsum is not None:
        loss = loss - (label_smoothing / V) * zsum
    loss = torch.where(in_range, loss, torch.full_like(lse, float("nan")))
    return torch.where(valid, loss, torch.zeros_like(lse))


def _lce_fwd_launch(x, weight, target, bias, ignore_index, label_smoothing=0.0, softcap=0.0):
    N, D = x.shape
    V = weight.shape[0]
    if N == 0:
        empty = torch.empty((0,), dtype=torch.float32, device=x.device)
        return empty, empty.clone()
    splits = _num_splits(N, V, x.device)
    v_per_split = triton.cdiv(V, splits)
    part_lse = torch.empty((splits, N), dtype=torch.float32, device=x.device)
    part_t = torch.empty((splits, N), dtype=torch.float32, device=x.device)
    smooth = label_smoothing > 0
    part_s = torch.empty((splits, N), dtype=torch.float32, device=x.device) if smooth else None
    meta = dict(HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, LARGE=needs_int64(x, weight),
                SOFTCAP=softcap > 0, SMOOTH=smooth)
    args = (x, weight, bias, target, part_lse, part_t, part_s, *x.stride(), *weight.stride(), N, V, D, v_per_split,
            float(softcap))
    launch(_lce_fwd_kernel, lambda m: (triton.cdiv(N, m["BLOCK_N"]), splits), args, meta,
           tuned=_lce_fwd_tuned, interpret=_INTERPRET_BLOCKS)
    lse = torch.logsumexp(part_lse, dim=0) if splits > 1 else part_lse[0]  # (N,)
    tlogit = part_t.sum(dim=0) if splits > 1 else part_t[0]
    zsum = part_s.sum(dim=0) if smooth else None
    return _combine_loss(lse, tlogit, zsum, target, ignore_index, V, label_smoothing), lse


def _lce_bwd_launch(g, x, weight, target, bias, lse, ignore_index, need_dx, need_dw, need_db, label_smoothing=0.0,
                    softcap=0.0):
    N, D = x.shape
    V = weight.shape[0]
    dx = torch.empty((N, D), dtype=x.dtype, device=x.device) if need_dx else x.new_empty(0)
    dw = torch.zeros((V, D), dtype=weight.dtype, device=x.device) if need_dw else x.new_empty(0)
    db = torch.zeros((V,), dtype=torch.float32, device=x.device) if need_db else x.new_empty(0)
    if N == 0:
        return dx, dw, db.to(x.dtype)
    C = min(N, _chunk_rows(N, V, x.dtype, x.device))
    dz_buf = torch.empty((C, V), dtype=x.dtype, device=x.device)  # the only (rows, V) buffer
    meta = dict(HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, LARGE=needs_int64(x, weight),
                SOFTCAP=softcap > 0, SMOOTH=label_smoothing > 0)
    for row0 in range(0, N, C):
        n_rows = min(C, N - row0)
        dz = dz_buf[:n_rows]
        args = (x, weight, bias, target, lse, g, dz, *x.stride(), *weight.stride(), dz.stride(0),
                row0, n_rows, V, D, ignore_index, float(softcap), float(label_smoothing))
        launch(_lce_dlogits_kernel, lambda m, n=n_rows: (triton.cdiv(n, m["BLOCK_N"]), triton.cdiv(V, m["BLOCK_V"])),
               args, meta, tuned=_lce_dlogits_tuned, interpret=_INTERPRET_BLOCKS)
        if need_dx:
            torch.mm(dz, weight, out=dx[row0:row0 + n_rows])  # (n, V) @ (V, d)
        if need_dw:
            dw.addmm_(dz.t(), x[row0:row0 + n_rows])  # (V, n) @ (n, d), fp32 accumulation inside
        if need_db:
            db += dz.sum(dim=0, dtype=torch.float32)
    return dx, dw, db.to(x.dtype) if need_db else db


# ---------------------------------------------------------------------------------------------------
# Op registration and autograd
# ---------------------------------------------------------------------------------------------------

def _not_float64(x: torch.Tensor) -> bool:
    return x.dtype != torch.float64  # float64 runs the fallback on every device (the kernels are fp32)


@kernel_op("gpt_kernels::linear_cross_entropy_bwd", launch=_lce_bwd_launch, fallback=ref.linear_cross_entropy_bwd_ref,
           dispatch_arg=1, triton_if=_not_float64)
def _linear_cross_entropy_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                              bias: torch.Tensor | None, lse: torch.Tensor, ignore_index: int, need_dx: bool,
                              need_dw: bool, need_db: bool, label_smoothing: float = 0.0, softcap: float = 0.0
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) in the inputs' dtypes (empty when not needed); g is the (N,) loss gradient."""


def _setup_context(ctx, inputs, output):
    x, weight, target, bias, ignore_index, label_smoothing, softcap = inputs
    _loss, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.ignore_index = ignore_index
    ctx.options = (label_smoothing, softcap)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, target, bias, lse)


def _backward(ctx, dloss, _dlse):
    x, weight, target, bias, lse = ctx.saved_tensors
    need_dx, need_dw, _, need_db = ctx.needs_input_grad[:4]
    need_db = need_db and ctx.has_bias
    dx, dw, db = torch.ops.gpt_kernels.linear_cross_entropy_bwd(
        dloss.contiguous(), x, weight, target, bias, lse, ctx.ignore_index, need_dx, need_dw, need_db, *ctx.options)
    return dx if need_dx else None, dw if need_dw else None, None, db if need_db else None, None, None, None


@kernel_op("gpt_kernels::linear_cross_entropy_fwd", launch=_lce_fwd_launch, fallback=ref.linear_cross_entropy_fwd_ref,
           triton_if=_not_float64, backward=_backward, setup_context=_setup_context)
def _linear_cross_entropy_fwd(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                              bias: torch.Tensor | None, ignore_index: int, label_smoothing: float = 0.0,
                              softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) per row of 2-D x, both (N,) fp32 (fp64 for fp64 inputs); loss 0 on ignored rows.
    lse is the natural log-sum-exp of the logits (the loss is lse - z[target], so it stays natural)."""


# ---------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------

def _check_options(label_smoothing, softcap):
    for name, v in (("label_smoothing", label_smoothing), ("softcap", softcap)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if not (softcap >= 0.0 and softcap != float("inf")):
        raise ValueError(f"softcap must be a finite number >= 0 (0: no cap), got {softcap!r}")


def _check_args(x, weight, target, bias, ignore_index, reduction, label_smoothing=0.0, softcap=0.0):
    check_tensor("x", x, min_ndim=1, dtypes=DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=DTYPES)
    V, d = weight.shape
    if V == 0 or d == 0:
        raise ValueError(f"weight must be (V, d) with V, d > 0, got shape {tuple(weight.shape)}")
    if x.shape[-1] != d:
        raise ValueError(f"x must have last dim d = {d} to match weight (V, d) {tuple(weight.shape)}, "
                         f"got shape {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=DTYPES)
        if bias.shape[0] != V:
            raise ValueError(f"bias must have shape ({V},) to match weight (V, d), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of int64 class indices, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must hold int64 class indices, got dtype {str(target.dtype).replace('torch.', '')}")
    if target.shape != x.shape[:-1]:
        raise ValueError(f"target must have the leading shape of x {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
    check_same_device(x=x, weight=weight, bias=bias, target=target)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_options(label_smoothing, softcap)
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(f"target must hold class indices in [0, {V}) or ignore_index={ignore_index}, "
                             f"found {value}")


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, softcap: float = 0.0) -> torch.Tensor:
    """``cross_entropy(x @ weight.T + bias, target)`` without storing the ``(N, V)`` logits.

    x ``(..., d)``, weight ``(V, d)``, bias ``(V,)`` or None (same dtype as x), target ``(...)`` int64
    with x's leading shape. Returns a scalar for ``"mean"`` (over non-ignored targets; 0 when all are
    ignored or there are none, N = 0) and ``"sum"``, a tensor of target's shape for ``"none"`` (0 on ignored positions). The loss
    is fp32 (fp64 for fp64 inputs). Differentiable in x, weight and bias; gradients are deterministic.
    Targets outside ``[0, V)`` (other than ``ignore_index``) raise ``ValueError`` on CPU and give a NaN
    loss on CUDA (no host sync). Under ``torch.autocast`` the inputs are cast like ``F.linear``'s.

    ``label_smoothing`` ε in ``[0, 1)`` has ``F.cross_entropy``'s semantics (``(1 − ε)·nll + ε·mean_v(−log
    p_v)``; ignored rows excluded, also from the mean's count); ``softcap`` c > 0 replaces the logits by
    ``c·tanh(logits / c)`` first (Gemma 2's ``final_logit_softcapping``). Both run inside the online
    log-sum-exp (still no ``(N, V)`` logits), gradients included.
    """
    _check_args(x, weight, target, bias, ignore_index, reduction, label_smoothing, softcap)
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    x2 = x.reshape(-1, x.shape[-1])  # (N, d): a view whenever the leading dims allow it
    t = target.reshape(-1).contiguous()  # (N,)
    b = bias.contiguous() if bias is not None else None
    plain = label_smoothing == 0 and softcap == 0
    if plain and _eager_cpu.linear_cross_entropy_applies(x2, weight, b, reduction):  # fp32 eager CPU: no recompute
        return _eager_cpu.linear_cross_entropy(x2, weight, t, b, int(ignore_index), reduction,
                                               ref.LCE_CHUNK_ELEMENTS)
    loss, _lse = torch.ops.gpt_kernels.linear_cross_entropy_fwd(x2, weight, t, b, int(ignore_index),
                                                                float(label_smoothing), float(softcap))
    if reduction == "none":
        return loss.view(target.shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    count = (t != ignore_index).sum()  # on the device: no host sync
    return total / count.clamp(min=1).to(total.dtype)
