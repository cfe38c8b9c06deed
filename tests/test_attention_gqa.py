"""GQA/MQA, sliding window, softcap and packed varlen attention (issue 24 items 1-3): forward and every
gradient against independent float64 oracles, on the interpreter and on the CPU fallback.

The oracles are written here, not taken from kernels/reference.py: torch's SDPA (math backend) with
``enable_gqa`` and a boolean mask built from the definitions, or the same scores by hand when a softcap
applies (``c · tanh(s / c)``); varlen is checked one sequence at a time against them. The default
matrix is pairwise (every ratio, length, head_dim, window and softcap value appears; their product
runs under ``-m slow``): the interpreter takes seconds per case.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from tests.guard_utils import guarded
from tests.utils import assert_verbose_allclose

ATOL = RTOL = 3e-5


# ---------------------------------------------------------------------------------------------------
# Independent fp64 oracles
# ---------------------------------------------------------------------------------------------------

def _mask(Tq, Tk, causal, window):
    """(Tq, Tk) bool from the definitions: p_i = i + Tk - Tq; causal j <= p_i; window also j > p_i - W."""
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    m = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        m &= j <= i
    if window is not None:
        m &= j > i - window
    return m


def _oracle(q, k, v, *, causal=True, window=None, softcap=0.0, scale=None):
    """fp64 attention of q (B, H, Tq, D) over k/v (B, Hk, Tk, D); rows that see no key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    mask = _mask(Tq, Tk, causal, window)
    if softcap == 0.0 and bool(mask.any(-1).all()) and Tk > 0:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])
    g = q.shape[1] // max(k.shape[1], 1)
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # head h reads kv head h // g
    s = q @ kk.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    p = s.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return p @ vv


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = _leaves(q, k, v)
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _compare(got, want, label, atol=ATOL, rtol=RTOL):
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_verbose_allclose(a, e, atol=atol, rtol=rtol, name=f"{name} {label}")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# flash_attention: GQA, window, softcap
# ---------------------------------------------------------------------------------------------------

# (H, Hk, Tq, Tk, D, causal, window, softcap): ratios 1, 2, 4 and MQA; Tq = Tk and Tq < Tk; lengths
# 0, 1, 7, 33, 70; head_dim 16, 64, 80, 128; windows None, 1, 5, 33 (several blocks) and > T; softcap.
CASES = [
    (2, 2, 33, 33, 16, True, None, 0.0),
    (4, 2, 7, 33, 64, True, 5, 0.0),
    (4, 1, 70, 70, 80, True, 1, 2.0),
    (8, 2, 33, 70, 128, True, 100, 0.0),  # (the priciest: B = 1 below)
    (4, 2, 1, 1, 16, True, 5, 1.0),
    (4, 4, 1, 70, 64, True, None, 5.0),
    (4, 2, 7, 33, 80, False, None, 2.0),
    (2, 1, 70, 70, 16, True, 33, 0.0),
    (6, 3, 0, 7, 16, True, 5, 1.0),
    (4, 1, 70, 70, 16, True, 5, 0.5),
]


def _ids(c):
    H, Hk, Tq, Tk, D, causal, w, cap = c
    return f"H{H}/Hk{Hk}-T{Tq}x{Tk}-D{D}-{'causal' if causal else 'full'}-W{w}-cap{cap:g}"


def _check_case(H, Hk, Tq, Tk, D, causal, window, softcap, B=None):
    B = B or (2 if H * Tq * Tk * D <= 4 * 33 * 33 * 64 else 1)  # batch offsets, where the interpreter is quick
    q, k, v = _rand(B, H, Tq, D, seed=1), _rand(B, Hk, Tk, D, seed=2), _rand(B, Hk, Tk, D, seed=3)
    do = _rand(B, H, Tq, D, seed=4)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    got = _fwd_bwd(lambda q, k, v: kernels.flash_attention(q, k, v, **kw), q, k, v, do)
    want = _fwd_bwd(lambda q, k, v: _oracle(q, k, v, causal=causal, window=window, softcap=softcap),
                    q.double(), k.double(), v.double(), do.double())
    assert got[2].shape == k.shape and got[3].shape == v.shape  # dK/dV in k/v's (GQA) shape
    return got, want


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_gqa_window_softcap_match_fp64(kernel_path, case):
    got, want = _check_case(*case)
    _compare(got, want, f"{_ids(case)} [{kernel_path}]")


FULL = [c for c in itertools.product([(2, 2), (4, 2), (8, 2), (4, 1)], [(1, 1), (7, 7), (33, 33), (70, 70),
                                                                       (7, 33), (33, 70)],
                                     [16, 64, 80, 128], [None, 1, 5, 100], [0.0, 2.0])]


@pytest.mark.slow
@pytest.mark.parametrize("heads,lens,D,window,softcap", FULL)
def test_full_product_matches_fp64(kernel_path, heads, lens, D, window, softcap):
    got, want = _check_case(*heads, *lens, D, True, window, softcap, B=1)
    _compare(got, want, f"{heads} {lens} D{D} W{window} cap{softcap} [{kernel_path}]")


@pytest.mark.parametrize("Tq,Tk", [(0, 0), (5, 0), (0, 9), (9, 4)])
def test_empty_and_keyless_rows(kernel_path, Tq, Tk):
    """Zero lengths and queries that see no key (Tq > Tk, bottom-right): zeros, finite gradients."""
    q, k, v = _rand(1, 4, Tq, 16, seed=1), _rand(1, 2, Tk, 16, seed=2), _rand(1, 2, Tk, 16, seed=3)
    do = _rand(1, 4, Tq, 16, seed=4)
    got = _fwd_bwd(lambda q, k, v: kernels.flash_attention(q, k, v, window_size=3, softcap=2.0), q, k, v, do)
    want = _fwd_bwd(lambda q, k, v: _oracle(q, k, v, window=3, softcap=2.0), q.double(), k.double(),
                    v.double(), do.double())
    _compare(got, want, f"Tq={Tq} Tk={Tk} [{kernel_path}]")


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_strided_nan_guarded_views(kernel_path, layout):
    """q, k, v as views inside NaN-filled buffers (every dim strided, or stored in reverse): a read
    outside the view (wrong stride, kv-head offset, missing mask) puts NaN into the result."""
    H, Hk, Tq, Tk, D = 4, 2, 19, 37, 16
    src = [_rand(2, H, Tq, D, seed=1), _rand(2, Hk, Tk, D, seed=2), _rand(2, Hk, Tk, D, seed=3)]
    do = _rand(2, H, Tq, D, seed=4)
    kw = dict(window_size=6, softcap=3.0)
    leaves = _leaves(*src)
    out = kernels.flash_attention(*(guarded(t, layout) for t in leaves), **kw)
    out.backward(do)
    got = [out.detach()] + [t.grad for t in leaves]
    want = _fwd_bwd(lambda q, k, v: _oracle(q, k, v, window=6, softcap=3.0), *(t.double() for t in src),
                    do.double())
    _compare(got, want, f"{layout} [{kernel_path}]")


def test_window_never_reads_keys_outside_every_window(kernel_path):
    """Queries at the end of a long key sequence with a small window: the first 64 keys are outside
    every query's window and poisoned with NaN. The kernels skip those key blocks (never load them), so
    output and gradients stay finite and exact; a kernel that only masked them would compute 0·NaN.
    (The fallback materializes every score, so it gets finite poison instead: same expectation.)"""
    H, Hk, Tq, Tk, D, W = 4, 2, 8, 200, 16, 5
    q, k, v, do = _rand(1, H, Tq, D, seed=1), _rand(1, Hk, Tk, D, seed=2), _rand(1, Hk, Tk, D, seed=3), \
        _rand(1, H, Tq, D, seed=4)
    want = _fwd_bwd(lambda q, k, v: _oracle(q, k, v, window=W), q.double(), k.double(), v.double(), do.double())
    poison = float("nan") if kernel_path == "interpreter" else 1e4
    k[:, :, :64], v[:, :, :64] = poison, poison
    got = _fwd_bwd(lambda q, k, v: kernels.flash_attention(q, k, v, window_size=W), q, k, v, do)
    want[2][:, :, :64] = 0.0  # unseen keys get zero gradients
    want[3][:, :, :64] = 0.0
    _compare(got, want, f"[{kernel_path}]")


def test_gqa_gradients_are_bitwise_deterministic(kernel_path):
    q, k, v, do = _rand(1, 4, 24, 16, seed=1), _rand(1, 1, 24, 16, seed=2), _rand(1, 1, 24, 16, seed=3), \
        _rand(1, 4, 24, 16, seed=4)
    fn = lambda q, k, v: kernels.flash_attention(q, k, v, window_size=9, softcap=2.0)  # noqa: E731
    a, b = _fwd_bwd(fn, q, k, v, do), _fwd_bwd(fn, q, k, v, do)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gqa_equals_repeated_kv(kernel_path, dropout_p):
    """GQA is exactly the dense kernel on repeated K/V (same fp32 arithmetic per head, and with dropout
    the same per-query-head mask from the same seed); dK/dV are the repeated gradients summed over the
    group."""
    q, k, v, do = _rand(1, 6, 21, 16, seed=1), _rand(1, 2, 21, 16, seed=2), _rand(1, 2, 21, 16, seed=3), \
        _rand(1, 6, 21, 16, seed=4)

    def gqa(q, k, v):
        torch.manual_seed(5)
        return kernels.flash_attention(q, k, v, dropout_p=dropout_p)

    def repeated(q, k, v):
        torch.manual_seed(5)
        return kernels.flash_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), dropout_p=dropout_p)

    got, rep = _fwd_bwd(gqa, q, k, v, do), _fwd_bwd(repeated, q, k, v, do)
    _compare(got, rep, f"dropout={dropout_p} [{kernel_path}]", atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# flash_attention_varlen
# ---------------------------------------------------------------------------------------------------

def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _varlen_oracle(q, k, v, lq, lk, **kw):
    """Per sequence: the dense fp64 oracle on its slices (independent of any packing logic)."""
    outs, a, b = [], 0, 0
    for nq, nk in zip(lq, lk):
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[a:a + nq], k[b:b + nk], v[b:b + nk]))
        outs.append(_oracle(qs, ks, vs, **kw)[0].transpose(0, 1))
        a, b = a + nq, b + nk
    return torch.cat(outs)


VARLEN_CASES = [
    # (H, Hk, lens_q, lens_k, D, causal, window, softcap)
    (4, 2, [7, 0, 33, 1], [7, 0, 33, 1], 16, True, None, 0.0),
    (4, 1, [5, 0, 20, 3], [9, 4, 41, 3], 64, True, 5, 2.0),
    (2, 2, [3, 17], [11, 17], 80, False, None, 1.5),
    (4, 2, [70, 1, 9], [70, 1, 9], 128, True, 1, 0.0),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[f"varlen{i}" for i in range(len(VARLEN_CASES))])
def test_varlen_matches_per_sequence_fp64(kernel_path, case):
    H, Hk, lq, lk, D, causal, window, softcap = case
    q, k, v = _rand(sum(lq), H, D, seed=1), _rand(sum(lk), Hk, D, seed=2), _rand(sum(lk), Hk, D, seed=3)
    do = _rand(sum(lq), H, D, seed=4)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    got = _fwd_bwd(lambda q, k, v: kernels.flash_attention_varlen(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk),
                                                                  **kw), q, k, v, do)
    okw = dict(causal=causal, window=window, softcap=softcap)
    want = _fwd_bwd(lambda q, k, v: _varlen_oracle(q, k, v, lq, lk, **okw), q.double(), k.double(), v.double(),
                    do.double())
    _compare(got, want, f"{case} [{kernel_path}]")


def test_varlen_strided_nan_guarded(kernel_path):
    lq, lk = [6, 0, 13], [9, 2, 13]
    src = [_rand(sum(lq), 4, 16, seed=1), _rand(sum(lk), 2, 16, seed=2), _rand(sum(lk), 2, 16, seed=3)]
    do = _rand(sum(lq), 4, 16, seed=4)
    leaves = _leaves(*src)
    out = kernels.flash_attention_varlen(*(guarded(t, "strided") for t in leaves), _cu(lq), _cu(lk), 13, 13,
                                         window_size=4)
    out.backward(do)
    want = _fwd_bwd(lambda q, k, v: _varlen_oracle(q, k, v, lq, lk, window=4), *(t.double() for t in src),
                    do.double())
    _compare([out.detach()] + [t.grad for t in leaves], want, f"[{kernel_path}]")


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the NaN sequence, inside the interpreter
def test_varlen_sequences_are_isolated(kernel_path):
    """Changing sequence 2 (its queries, keys and values) leaves sequence 1's output and gradients
    bit-identical. On the interpreter sequence 2 is even NaN: the kernels never read across."""
    lens = [21, 30]
    cu = _cu(lens)
    q, k, v, do = _rand(51, 4, 16, seed=1), _rand(51, 2, 16, seed=2), _rand(51, 2, 16, seed=3), _rand(51, 4, 16, seed=4)
    run = lambda q, k, v: kernels.flash_attention_varlen(q, k, v, cu, cu, 30, 30, softcap=2.0)  # noqa: E731
    base = _fwd_bwd(run, q, k, v, do)
    q2, k2, v2, do2 = (t.clone() for t in (q, k, v, do))
    for t in (q2, k2, v2, do2):  # (the fallback's dense masked product would turn a NaN into 0·NaN)
        t[21:] = float("nan") if kernel_path == "interpreter" else torch.randn_like(t[21:]) * 7.0
    pert = _fwd_bwd(run, q2, k2, v2, do2)
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, pert):
        assert torch.equal(a[:21], b[:21]), f"{name}: sequence 1 changed when sequence 2 did [{kernel_path}]"


def test_varlen_equals_dense_batch(kernel_path):
    """Equal-length sequences packed = the dense batched call (same kernel arithmetic)."""
    B, T, H, Hk, D = 3, 17, 4, 2, 16
    q, k, v = _rand(B, H, T, D, seed=1), _rand(B, Hk, T, D, seed=2), _rand(B, Hk, T, D, seed=3)
    dense = kernels.flash_attention(q, k, v, window_size=5)
    pack = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], D)  # noqa: E731
    cu = _cu([T] * B)
    out = kernels.flash_attention_varlen(pack(q), pack(k), pack(v), cu, cu, T, T, window_size=5)
    assert_verbose_allclose(out, pack(dense), atol=1e-6, rtol=1e-6, name=f"varlen vs dense [{kernel_path}]")


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_dropout_equals_dense(kernel_path, causal):
    """One packed sequence with dropout = the dense call (the same per-head mask from the same seed):
    causal varlen with dropout walks its dK/dV query blocks as one masked loop (kernels/attention_bwd.py),
    the dense call as a masked and an unmasked one; the masks, outputs and gradients agree."""
    T, H, Hk, D = 45, 4, 2, 16
    q, k, v, do = _rand(1, H, T, D, seed=1), _rand(1, Hk, T, D, seed=2), _rand(1, Hk, T, D, seed=3), \
        _rand(1, H, T, D, seed=4)
    pack = lambda t: t[0].transpose(0, 1)  # (1, h, T, D) -> (T, h, D)  # noqa: E731
    cu = _cu([T])

    def dense(q, k, v):
        torch.manual_seed(5)
        return kernels.flash_attention(q, k, v, causal=causal, dropout_p=0.3)

    def varlen(q, k, v):
        torch.manual_seed(5)
        out = kernels.flash_attention_varlen(pack(q), pack(k), pack(v), cu, cu, T, T, causal=causal, dropout_p=0.3)
        return out.transpose(0, 1)[None]  # (T, H, D) -> (1, H, T, D)

    got, want = _fwd_bwd(varlen, q, k, v, do), _fwd_bwd(dense, q, k, v, do)
    assert not torch.equal(got[0], _fwd_bwd(lambda q, k, v: kernels.flash_attention(q, k, v, causal=causal),
                                            q, k, v, do)[0])  # dropout did drop
    _compare(got, want, f"causal={causal} [{kernel_path}]", atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,Hk,Tq,D,window,softcap", [(4, 2, 1, 16, 5, 0.0), (8, 1, 3, 64, 9, 2.0),
                                                        (4, 4, 2, 80, None, 1.0), (6, 2, 1, 128, 200, 0.0)])
def test_decode_gqa_window_softcap(kernel_path, H, Hk, Tq, D, window, softcap):
    B, Tmax = 3, 70
    lens = [70, 33, 0]
    q, k, v = _rand(B, H, Tq, D, seed=1), _rand(B, Hk, Tmax, D, seed=2), _rand(B, Hk, Tmax, D, seed=3)
    want = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    for b, L in enumerate(lens):
        if L >= Tq:  # the new tokens sit at L - Tq .. L - 1 of a cache holding L keys
            want[b] = _oracle(q[b:b + 1], k[b:b + 1, :, :L], v[b:b + 1, :, :L], window=window, softcap=softcap)[0]
        if window is not None:  # keys before the first new token's window are never read
            k[b, :, :max(L - Tq - window + 1, 0)] = float("nan")
            v[b, :, :max(L - Tq - window + 1, 0)] = float("nan")
        k[b, :, L:], v[b, :, L:] = float("nan"), float("inf")
    out = kernels.decode_attention(q, k, v, torch.tensor(lens, dtype=torch.int32), window_size=window,
                                   softcap=softcap)
    assert_verbose_allclose(out, want, atol=ATOL, rtol=RTOL, name=f"decode [{kernel_path}]")


# ---------------------------------------------------------------------------------------------------
# Bad inputs: one ValueError naming the argument
# ---------------------------------------------------------------------------------------------------

def _qkv(H=4, Hk=2, T=5, D=16):
    return torch.randn(1, H, T, D), torch.randn(1, Hk, T, D), torch.randn(1, Hk, T, D)


@pytest.mark.parametrize("kw,match", [
    (dict(window_size=0), "window_size"), (dict(window_size=-3), "window_size"),
    (dict(window_size=2.0), "window_size"), (dict(window_size=True), "window_size"),
    (dict(window_size=4, causal=False), "window_size"), (dict(softcap=-1.0), "softcap"),
    (dict(softcap=float("inf")), "softcap"), (dict(softcap=float("nan")), "softcap"),
])
def test_bad_options(kw, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        kernels.flash_attention(q, k, v, **kw)
    cu = _cu([5])
    with pytest.raises(ValueError, match=match):
        kernels.flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                       5, 5, **kw)
    if "causal" not in kw:
        with pytest.raises(ValueError, match=match):
            kernels.decode_attention(q[:, :, :1], k, v, torch.tensor([5], dtype=torch.int32), **kw)


def test_bad_heads():
    q, k, v = _qkv(H=4, Hk=3)
    with pytest.raises(ValueError, match="H % Hk"):
        kernels.flash_attention(q, k, v)
    cu = _cu([5])
    with pytest.raises(ValueError, match="H % Hk"):
        kernels.flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                       5, 5)
    with pytest.raises(ValueError, match="H % Hk"):
        kernels.decode_attention(q[:, :, :1], k, v, torch.tensor([5], dtype=torch.int32))


@pytest.mark.parametrize("cu_q,match", [
    (torch.tensor([0, 5], dtype=torch.int64), "cu_seqlens_q"),
    (torch.tensor([0.0, 5.0]), "cu_seqlens_q"),
    (torch.tensor([[0, 5]], dtype=torch.int32), "cu_seqlens_q"),
    (torch.zeros(0, dtype=torch.int32), "cu_seqlens_q"),
    (torch.tensor([0, 2, 5], dtype=torch.int32), "cu_seqlens_q and cu_seqlens_k"),
])
def test_bad_cu_seqlens(cu_q, match):
    q, k, v = (t[0].transpose(0, 1) for t in _qkv())
    with pytest.raises(ValueError, match=match):
        kernels.flash_attention_varlen(q, k, v, cu_q, _cu([5]), 5, 5)


@pytest.mark.parametrize("m", [-1, 2.5, None, True])
def test_bad_max_seqlen(m):
    q, k, v = (t[0].transpose(0, 1) for t in _qkv())
    with pytest.raises(ValueError, match="max_seqlen_q"):
        kernels.flash_attention_varlen(q, k, v, _cu([5]), _cu([5]), m, 5)
