"""Pure-PyTorch attention: the test oracle and the CPU fallback of ``kernels/attention.py`` (dense and
varlen flash attention) and ``kernels/decode.py`` (same semantics as the kernels). Re-exported by
``kernels/reference.py``, the one import of every op's reference."""

from __future__ import annotations

import math

import torch

from ._utils import LN2, LOG2E


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype of every reference: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Attention (kernels/attention.py, kernels/decode.py)
#
# Causal masks are aligned bottom-right (flash-attention's convention): with Tq queries and Tk keys,
# query i sees keys j <= i + Tk - Tq. A query that sees no key (possible when Tq > Tk) outputs zeros.
# ---------------------------------------------------------------------------------------------------

def causal_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """``(Tq, Tk)`` bool, True where query i may attend key j (bottom-right aligned)."""
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return j <= i + (Tk - Tq)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  softmax_scale: float | None = None, dropout_mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, window_size: int | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Differentiable attention oracle: ``softmax(q kᵀ · scale, masked) [∘ mask / (1 - p)] v``.

    Math in at least fp32 (pass fp64 tensors for an fp64 oracle); the result has ``q``'s dtype.
    ``dropout_mask`` (bool, broadcastable to ``(B, H, Tq, Tk)``, True = keep) applies the given mask.
    k/v may have ``Hk`` heads dividing q's ``H`` (GQA: head h reads ``h // (H // Hk)``);
    ``window_size`` is a causal sliding window, ``softcap`` > 0 caps scores to ``c · tanh(s / c)``.
    """
    dt = _stat_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    H = q.shape[-3]
    k, v = expand_kv(k, H, q.dim() - 3), expand_kv(v, H, q.dim() - 3)
    s = (q.to(dt) @ k.to(dt).transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    if window_size is not None:
        s = s.masked_fill(~window_mask(q.shape[-2], k.shape[-2], window_size, q.device), float("-inf"))
    elif causal:
        allowed = causal_mask(q.shape[-2], k.shape[-2], q.device)
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows that see no key: zeros, not NaN
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    return (p @ v.to(dt)).to(q.dtype)


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _dropout_keep_ref(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The fallback's dropout mask: a function of the seed and the position only, so the backward
    regenerates it. A counter-based hash (splitmix64's mixer over ``seed · φ + flat index``, int64
    arithmetic wrapping) in tensor ops: no host sync on the seed, so torch.compile can trace it."""
    idx = torch.arange(math.prod(shape), device=device, dtype=torch.int64).view(shape)
    x = idx + seed.reshape(()).to(device=device, dtype=torch.int64) * -7046029254386353131  # 0x9E3779B97F4A7C15
    x = (x ^ _lsr(x, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = (x ^ _lsr(x, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    x = x ^ _lsr(x, 31)
    u = _lsr(x, 40).to(torch.float32) * (1.0 / (1 << 24))  # top 24 bits: uniform on [0, 1)
    return u >= dropout_p


def window_mask(Tq: int, Tk: int, window_size: int, device=None) -> torch.Tensor:
    """``(Tq, Tk)`` bool, True where query i may attend key j under a causal sliding window of
    ``window_size`` keys: with ``p_i = i + Tk - Tq``, ``p_i - W < j <= p_i`` (itself included)."""
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    p = i + (Tk - Tq)
    return (j <= p) & (j > p - window_size)


def expand_kv(k: torch.Tensor, n_heads: int, dim: int = 1) -> torch.Tensor:
    """GQA/MQA by index mapping: query head h reads K/V head ``h // (H // Hk)`` (transformers'
    ``repeat_kv``). Returns ``k`` itself when ``Hk == H``; the fallback's copy, never the kernels'."""
    hk = k.shape[dim]
    if hk == n_heads:
        return k
    idx = torch.arange(n_heads, device=k.device) // (n_heads // hk)
    return k.index_select(dim, idx)


def reduce_kv_grad(dk: torch.Tensor, n_kv_heads: int, dim: int = 1) -> torch.Tensor:
    """Sum a gradient over the query heads of each K/V head's group (inverse of :func:`expand_kv`)."""
    h = dk.shape[dim]
    if h == n_kv_heads:
        return dk
    shape = list(dk.shape)
    shape[dim:dim + 1] = [n_kv_heads, h // n_kv_heads]
    return dk.reshape(shape).sum(dim + 1)


def _scores_ref(q, k, causal, softmax_scale, window_size: int = 0, softcap: float = 0.0, dt=None):
    """Scaled (and soft-capped) scores ``(B, H, Tq, Tk)`` in fp32 (fp64 for fp64 inputs), masked; also
    the raw tanh term (``tanh(s/c)``, or None) the backward needs. ``k`` already has q's heads."""
    dt = dt or _stat_dtype(q.dtype)
    s = (q.to(dt) @ k.to(dt).transpose(-2, -1)) * softmax_scale
    t = None
    if softcap > 0.0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    Tq, Tk = q.shape[-2], k.shape[-2]
    if window_size > 0:
        s = s.masked_fill(~window_mask(Tq, Tk, window_size, q.device), float("-inf"))
    elif causal:
        s = s.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    return s, t


def flash_attention_fwd_ref(q, k, v, seed, causal: bool, softmax_scale: float, dropout_p: float,
                            window_size: int = 0, softcap: float = 0.0):
    """Fallback of the flash-attention forward: ``(o, lse)`` with the launcher's layouts.

    ``o`` is ``(B, H, Tq, D)`` in ``q.dtype`` stored as ``(B, Tq, H, D)`` (so merging heads is free);
    ``lse`` is the fp32 log-sum-exp of the scaled, masked scores ``(B, H, Tq)`` in the log2 domain, as
    the kernel saves it (``log2 Σ exp(s) = logsumexp(s) · log2 e``), ``+inf`` for a row that sees no key
    (its probabilities ``exp(s - lse · ln 2)`` are then all zero). k/v may have fewer heads (GQA:
    head h reads ``h // (H // Hk)``); ``window_size`` > 0 is a causal sliding window, ``softcap`` > 0
    caps the scores (``c · tanh(s / c)``) before masking. fp64 inputs compute in fp64.
    """
    B, H, Tq, D = q.shape
    dt = _stat_dtype(q.dtype)
    k, v = expand_kv(k, H), expand_kv(v, H)
    s, _ = _scores_ref(q, k, causal, softmax_scale, window_size, softcap, dt)
    lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    p = torch.exp(s - lse[..., None])
    if dropout_p > 0.0:
        p = p * _dropout_keep_ref(seed, p.shape, dropout_p, q.device) / (1.0 - dropout_p)
    lse = lse * LOG2E  # the kernel's log2 domain
    o = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    o.copy_(p @ v.to(dt))
    return o, lse.float().contiguous()


def flash_attention_bwd_ref(do, q, k, v, o, lse, seed, causal: bool, softmax_scale: float, dropout_p: float,
                            window_size: int = 0, softcap: float = 0.0):
    """Fallback of the flash-attention backward: ``(dq, dk, dv)`` in the inputs' dtypes.

    With P = exp(S - lse · ln 2) (``lse`` in the log2 domain, as saved by the forward), Z the dropout mask scaled by 1/(1-p) (all ones without dropout) and
    O = (P∘Z) V:  dV = (P∘Z)ᵀ dO,  dP = (dO Vᵀ)∘Z,  dS = P∘(dP − rowsum(dO∘O)),
    dQ = scale · dS' K,  dK = scale · dS'ᵀ Q, where dS' = dS ∘ (1 − tanh²(S₀/c)) with a softcap c
    (S = c·tanh(S₀/c), S₀ the scaled raw scores), else dS. With GQA dK/dV are summed over each K/V
    head's group of query heads.
    """
    H, Hk = q.shape[1], k.shape[1]
    dt = _stat_dtype(q.dtype)
    k_, v_ = expand_kv(k, H), expand_kv(v, H)
    s, t = _scores_ref(q, k_, causal, softmax_scale, window_size, softcap, dt)
    lse_n = lse.to(dt) * LN2
    p = torch.exp(s - lse_n[..., None])
    dof = do.to(dt)
    dp = dof @ v_.to(dt).transpose(-2, -1)
    if dropout_p > 0.0:
        z = _dropout_keep_ref(seed, p.shape, dropout_p, q.device) / (1.0 - dropout_p)
        pd, dp = p * z, dp * z
    else:
        pd = p
    dv = pd.transpose(-2, -1) @ dof
    delta = (dof * o.to(dt)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)
    dq = (ds @ k_.to(dt)) * softmax_scale
    dk = (ds.transpose(-2, -1) @ q.to(dt)) * softmax_scale
    return dq.to(q.dtype), reduce_kv_grad(dk, Hk).to(k.dtype), reduce_kv_grad(dv, Hk).to(v.dtype)


def varlen_ids(cu_seqlens: torch.Tensor, total: int):
    """Per token of a packed ``(total, ...)`` tensor: ``(seq, pos, length)`` int64, from the prefix sums
    ``cu_seqlens (n+1,)`` (no host sync). Tokens at or past ``cu_seqlens[-1]`` get ``seq = n``."""
    cu = cu_seqlens.to(torch.int64)
    idx = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu, idx, right=True) - 1  # empty sequences (repeated offsets) are skipped
    seq = seq.clamp(0, cu.numel() - 1)
    lens = torch.cat((cu[1:] - cu[:-1], cu.new_zeros(1)))  # seq = n (past the end): length 0
    return seq, idx - cu[seq], lens[seq]


def varlen_mask(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, causal: bool,
                window_size: int = 0) -> torch.Tensor:
    """``(total_q, total_k)`` bool: query token i may attend key token j — same sequence b (< n), and
    with causal, ``pos_k <= p_i`` where ``p_i = pos_q + len_k(b) - len_q(b)`` (bottom-right within the
    sequence), and with a window also ``pos_k > p_i - W``."""
    n = cu_seqlens_q.numel() - 1
    sq, pq, lq = varlen_ids(cu_seqlens_q, total_q)
    sk, pk, _ = varlen_ids(cu_seqlens_k, total_k)
    cu_k = cu_seqlens_k.to(torch.int64)
    lk_of_q = torch.cat((cu_k[1:] - cu_k[:-1], cu_k.new_zeros(1)))[sq]
    allowed = (sq[:, None] == sk[None, :]) & (sq[:, None] < n)
    p = (pq + lk_of_q - lq)[:, None]
    if causal or window_size > 0:
        allowed = allowed & (pk[None, :] <= p)
    if window_size > 0:
        allowed = allowed & (pk[None, :] > p - window_size)
    return allowed


def _varlen_scores(q, k, cu_q, cu_k, causal, softmax_scale, window_size, softcap, dt):
    """(H, total_q, total_k) scores of packed q (total_q, H, D), k (total_k, H, D), masked; tanh term."""
    s = (q.to(dt).transpose(0, 1) @ k.to(dt).permute(1, 2, 0)) * softmax_scale
    t = None
    if softcap > 0.0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    allowed = varlen_mask(cu_q, cu_k, q.shape[0], k.shape[0], causal, window_size)
    return s.masked_fill(~allowed, float("-inf")), t


def flash_attention_varlen_fwd_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, seed, causal: bool,
                                   softmax_scale: float, dropout_p: float, window_size: int = 0,
                                   softcap: float = 0.0):
    """Fallback of the varlen forward: ``(o (total_q, H, D), lse (H, total_q) log2 domain)``.

    One dense ``(H, total_q, total_k)`` score matrix under the block-diagonal mask of
    :func:`varlen_mask` (no host sync; the kernels never form it). Rows outside every sequence and
    queries that see no key give zeros (lse ``+inf``). Dropout: the hash mask of the dense fallback,
    over the packed ``(H, total_q, total_k)`` positions.
    """
    H = q.shape[1]
    dt = _stat_dtype(q.dtype)
    k, v = expand_kv(k, H), expand_kv(v, H)
    s, _ = _varlen_scores(q, k, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_size, softcap, dt)
    lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    p = torch.exp(s - lse[..., None])
    if dropout_p > 0.0:
        p = p * _dropout_keep_ref(seed, p.shape, dropout_p, q.device) / (1.0 - dropout_p)
    o = (p @ v.to(dt).transpose(0, 1)).transpose(0, 1).to(q.dtype).contiguous()
    return o, (lse * LOG2E).float().contiguous()


def flash_attention_varlen_bwd_ref(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, seed, causal: bool,
                                   softmax_scale: float, dropout_p: float, window_size: int = 0,
                                   softcap: float = 0.0):
    """Fallback of the varlen backward: ``(dq, dk, dv)`` in the packed layouts (math as
    :func:`flash_attention_bwd_ref`, dK/dV summed over each K/V head's group)."""
    H, Hk = q.shape[1], k.shape[1]
    dt = _stat_dtype(q.dtype)
    k_, v_ = expand_kv(k, H), expand_kv(v, H)
    s, t = _varlen_scores(q, k_, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_size, softcap, dt)
    p = torch.exp(s - (lse.to(dt) * LN2)[..., None])  # (H, Tq, Tk)
    dof = do.to(dt).transpose(0, 1)  # (H, Tq, D)
    dp = dof @ v_.to(dt).permute(1, 2, 0)
    if dropout_p > 0.0:
        z = _dropout_keep_ref(seed, p.shape, dropout_p, q.device) / (1.0 - dropout_p)
        pd, dp = p * z, dp * z
    else:
        pd = p
    dv = pd.transpose(-2, -1) @ dof  # (H, Tk, D)
    delta = (dof * o.to(dt).transpose(0, 1)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)
    dq = (ds @ k_.to(dt).transpose(0, 1)) * softmax_scale
    dk = (ds.transpose(-2, -1) @ q.to(dt).transpose(0, 1)) * softmax_scale
    dk, dv = reduce_kv_grad(dk, Hk, 0), reduce_kv_grad(dv, Hk, 0)
    return (dq.transpose(0, 1).to(q.dtype).contiguous(), dk.transpose(0, 1).to(k.dtype).contiguous(),
            dv.transpose(0, 1).to(v.dtype).contiguous())


def decode_attention_ref(q, k_cache, v_cache, cache_seqlens, softmax_scale: float | None = None,
                         window_size: int = 0, softcap: float = 0.0):
    """Attention of the ``Tq`` new queries over each row's valid cache prefix.

    Row b's cache holds ``L = cache_seqlens[b]`` valid positions, the last ``Tq`` of them the new tokens;
    query t sits at position ``p = L - Tq + t`` and sees keys ``j <= p`` (and ``j < L``), with a window
    ``W`` > 0 only ``j > p - W``. ``L`` is clamped to ``[0, Tmax]`` (as the kernel does, without a host
    sync); slots ``j >= L`` never reach the output, even when they hold NaN/inf (values there are
    replaced, not multiplied by a zero weight). Caches may have ``Hk`` heads dividing q's ``H`` (GQA);
    ``softcap`` > 0 caps the scores to ``c · tanh(s / c)``.
    """
    B, H, Tq, D = q.shape
    Tmax = k_cache.shape[-2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    dt = _stat_dtype(q.dtype)
    k_cache, v_cache = expand_kv(k_cache, H), expand_kv(v_cache, H)
    L = cache_seqlens.to(torch.long).clamp(0, Tmax).reshape(B, 1, 1, 1)
    j = torch.arange(Tmax, device=q.device).view(1, 1, 1, Tmax)
    t = torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)
    used = j < L  # slots a new token may read: the valid prefix, with a window only its last W + Tq - 1
    if window_size > 0:
        used = used & (j > L - Tq - window_size)
    used = used.transpose(-2, -1)
    k = torch.where(used, k_cache.to(dt), 0.0)  # unread slots -> 0 (NaN-safe, as the kernel never loads them)
    s = (q.to(dt) @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tmax)
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    pos = L - Tq + t
    allowed = (j < L) & (j <= pos)
    if window_size > 0:
        allowed = allowed & (j > pos - window_size)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    v = torch.where(used, v_cache.to(dt), 0.0)  # (B, H, Tmax, D); unread slots -> 0
    return (p @ v).to(q.dtype)
