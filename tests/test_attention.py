"""kernels.flash_attention: forward and every gradient vs an fp64 oracle, dropout, determinism, errors.

CPU runs both paths: the Triton kernels through the interpreter (conftest's TRITON_INTERPRET=1) and the
pure-PyTorch fallback (TRITON_INTERPRET=0). bf16 and long sequences need a GPU (``gpu`` marker).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import CausalSelfAttention, flash_attention
from kernels.reference import attention_ref, causal_mask
from tests.utils import assert_verbose_allclose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, Tq, Tk, D, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, t, D, generator=g) for t in (Tq, Tk, Tk))
    do = torch.randn(B, H, Tq, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def _run(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of ``fn`` on leaf copies of q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _ref64(q, k, v, do, **kw):
    return _run(attention_ref, *(t.double() for t in (q, k, v, do)), **kw)


def _sdpa(q, k, v, *, causal):
    """PyTorch's own attention, with our bottom-right causal alignment as an explicit mask."""
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# (B, H, Tq, Tk, D, causal): odd lengths (masked tails), a long-ish one with several key blocks, head_dim
# 80 (padded to 128 inside), Tq < Tk (bottom-right causal), one token, one query over many keys.
CASES = [
    pytest.param(1, 2, 37, 37, 64, True, id="1x2x37x64-causal"),
    pytest.param(1, 2, 37, 37, 64, False, id="1x2x37x64-full"),
    pytest.param(2, 3, 129, 129, 32, True, id="2x3x129x32-causal"),
    pytest.param(1, 2, 45, 45, 80, True, id="d80-causal"),
    pytest.param(1, 1, 33, 33, 96, False, id="d96-full"),
    pytest.param(2, 2, 17, 45, 64, True, id="tq<tk-causal"),
    pytest.param(1, 2, 17, 45, 16, False, id="tq<tk-full-d16"),
    pytest.param(2, 2, 1, 1, 64, True, id="t1"),
    pytest.param(1, 2, 1, 50, 64, True, id="tq1-tk50"),
]


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", CASES)
def test_fp32_forward_and_grads_match_fp64(kernel_path, B, H, Tq, Tk, D, causal):
    q, k, v, do = _inputs(B, H, Tq, Tk, D, torch.float32)
    got = _run(flash_attention, q, k, v, do, causal=causal)
    want = _ref64(q, k, v, do, causal=causal)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32 and a.shape == e.shape
        assert_verbose_allclose(a, e, atol=2e-5, rtol=2e-5, name=f"{name} [{kernel_path}]")


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", [c for c in CASES if c.id in (
    "1x2x37x64-causal", "2x3x129x32-causal", "d80-causal", "tq<tk-causal", "tq<tk-full-d16", "t1")])
def test_fp16_error_at_most_twice_pytorch_fp16(kernel_path, B, H, Tq, Tk, D, causal):
    q, k, v, do = _inputs(B, H, Tq, Tk, D, torch.float16, seed=1)
    got = _run(flash_attention, q, k, v, do, causal=causal)
    torch_fp16 = _run(_sdpa, q, k, v, do, causal=causal)
    want = _ref64(q, k, v, do, causal=causal)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), got, torch_fp16, want):
        assert a.dtype == torch.float16
        err = (a.double() - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        # A tiny floor (1/8 fp16 ulp of the largest value) for cases where both are only rounding-limited.
        # A gradient that is exactly zero in exact arithmetic (dq when each query sees one key: dS = P∘(dP
        # − rowsum(dO∘O)) cancels) keeps a residue of O's fp16 rounding: take the floor at O's scale.
        floor = 2.0 ** -13 * (e.abs().max().item() or want[0].abs().max().item())
        assert err <= 2 * err_torch + floor, (
            f"{name} [{kernel_path}]: max error {err:.3g} > 2 × PyTorch fp16's {err_torch:.3g} + {floor:.3g}")


def test_strided_views_of_a_fused_qkv_projection(kernel_path):
    """q, k, v as permuted views of one (B, T, 3, H, D) projection: no copy needed, same result."""
    torch.manual_seed(0)
    B, T, H, D = 2, 41, 3, 32
    x = torch.randn(B, T, 16, device=DEVICE)
    proj = torch.nn.Linear(16, 3 * H * D, device=DEVICE)

    def attend(fn):
        xx = x.clone().requires_grad_()
        qkv = proj(xx).view(B, T, 3, H, D)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, D), non-contiguous
        assert not q.is_contiguous()
        out = fn(q, k, v, causal=True)  # (B, H, T, D)
        out.transpose(1, 2).reshape(B, T, H * D).square().sum().backward()
        grads = (xx.grad, proj.weight.grad.clone())
        proj.weight.grad = None
        proj.bias.grad = None
        return out.detach(), *grads

    for name, a, e in zip(("out", "dx", "dW"), attend(flash_attention), attend(attention_ref)):
        assert_verbose_allclose(a, e, atol=1e-4, rtol=1e-4, name=name)


def test_output_is_laid_out_for_a_free_head_merge(kernel_path):
    q, k, v, _ = _inputs(2, 3, 19, 19, 16, torch.float32)
    out = flash_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) in memory: merging heads is a view


def test_softmax_scale(kernel_path):
    q, k, v, do = _inputs(1, 2, 23, 23, 32, torch.float32)
    got = _run(flash_attention, q, k, v, do, softmax_scale=0.37)
    want = _ref64(q, k, v, do, softmax_scale=0.37)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_verbose_allclose(a, e, atol=2e-5, rtol=2e-5, name=name)


def test_queries_that_see_no_key_give_zeros_not_nan(kernel_path):
    """Tq > Tk, causal bottom-right: the first Tq - Tk queries see no key."""
    q, k, v, do = _inputs(1, 2, 20, 7, 32, torch.float32)
    out, dq, dk, dv = _run(flash_attention, q, k, v, do, causal=True)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    assert (out[:, :, :13] == 0).all() and (dq[:, :, :13] == 0).all()
    want = _ref64(q, k, v, do, causal=True)
    for name, a, e in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        assert_verbose_allclose(a, e, atol=2e-5, rtol=2e-5, name=name)


def test_zero_softmax_scale_is_a_plain_average(kernel_path):
    """softmax_scale=0: uniform weights over the visible keys, an exact closed form."""
    q, k, v, _ = _inputs(1, 1, 9, 9, 16, torch.float32)
    out = flash_attention(q, k, v, causal=True, softmax_scale=0.0)
    want = v.cumsum(2) / torch.arange(1, 10, device=DEVICE).view(1, 1, 9, 1)
    assert_verbose_allclose(out, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Dropout: the mask is a function of torch's RNG state (one seed per call) and the position only.
# The identity trick exposes it: with v = I (D >= Tk) the output row is the dropped attention row.
# ---------------------------------------------------------------------------------------------------
def _recover_keep_mask(B, H, Tq, Tk, D, p, causal, rng_seed):
    """The kept positions of the mask ``flash_attention`` draws after ``torch.manual_seed(rng_seed)``."""
    q = torch.zeros(B, H, Tq, D, device=DEVICE)  # uniform attention over the visible keys
    k = torch.randn(B, H, Tk, D, device=DEVICE)
    v = torch.eye(Tk, D, device=DEVICE).expand(B, H, Tk, D)  # out[..., j] = P_dropped[..., j]
    torch.manual_seed(rng_seed)
    out = flash_attention(q, k, v, causal=causal, dropout_p=p)[..., :Tk]  # (B, H, Tq, Tk)
    allowed = causal_mask(Tq, Tk, DEVICE) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=DEVICE)
    visible = allowed.sum(-1, keepdim=True).clamp(min=1)
    scaled = out * visible * (1 - p)  # 1 where kept, 0 where dropped
    assert torch.allclose(scaled, scaled.round(), atol=1e-4), "dropout output is not {0, 1/(1-p)} · P"
    return (scaled > 0.5) & allowed, allowed


def test_dropout_same_seed_same_output_and_different_seed_differs(kernel_path):
    q, k, v, _ = _inputs(2, 2, 33, 33, 32, torch.float32)
    outs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        outs.append(flash_attention(q, k, v, dropout_p=0.2))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], flash_attention(q, k, v))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics_match_p(kernel_path, p):
    keep, allowed = _recover_keep_mask(2, 4, 64, 64, 64, p, causal=False, rng_seed=0)
    n = allowed.sum().item() * 8  # 32768 draws
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-3, f"kept {frac:.4f}, expected {1 - p}"
    # Independent across heads, batch rows, queries and keys: no repeated mask.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0, :, 0], keep[0, 0, :, 1])
    # Each row keeps ~ (1 - p) of its keys: no row-wise bias.
    row_frac = keep.float().mean(-1)
    assert (row_frac - (1 - p)).abs().max() < 6 * (p * (1 - p) / 64) ** 0.5


@pytest.mark.parametrize("causal", [True, False])
def test_dropout_gradients_match_a_reference_with_the_same_mask(kernel_path, causal):
    B, H, T, D, p = 1, 2, 40, 64, 0.3
    keep, _ = _recover_keep_mask(B, H, T, T, D, p, causal=causal, rng_seed=11)
    q, k, v, do = _inputs(B, H, T, T, D, torch.float32, seed=3)

    def ours(q, k, v):
        torch.manual_seed(11)  # the same seed draws the same mask
        return flash_attention(q, k, v, causal=causal, dropout_p=p)

    got = _run(ours, q, k, v, do)
    want = _ref64(q, k, v, do, causal=causal, dropout_mask=keep, dropout_p=p)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_verbose_allclose(a, e, atol=5e-5, rtol=5e-5, name=f"{name} [{kernel_path}]")


# ---------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------
def test_bad_head_dim_is_a_clear_error():
    for d in (8, 15, 129, 256):
        q = torch.randn(1, 1, 4, d)
        with pytest.raises(ValueError, match="head_dim must be in \\[16, 128\\]"):
            flash_attention(q, q, q)


def test_bad_dtypes_are_clear_errors():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q.int(), q.int(), q.int())
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attention(q, q.half(), q)


def test_device_mismatch_is_a_clear_error():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="same device"):
        flash_attention(q, q.to("meta"), q)


def test_bad_shapes_and_arguments_are_clear_errors():
    q = torch.randn(2, 3, 4, 16)
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="batch and heads"):
        flash_attention(q, q[:, :2], q[:, :2])
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, q, q[:, :, :3])
    with pytest.raises(ValueError, match="same head_dim"):
        k = torch.randn(2, 3, 4, 32)
        flash_attention(q, k, k)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attention(q, q, q, softmax_scale=float("nan"))
    with pytest.raises(TypeError, match="causal"):
        flash_attention(q, q, q, causal=1)


# ---------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------
def test_module_rejects_sequences_longer_than_its_context():
    m = CausalSelfAttention(16, 32, context_length=8, dropout=0.0, num_heads=2)
    with pytest.raises(ValueError, match="exceeds context_length"):
        m(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="divisible"):
        CausalSelfAttention(16, 30, 8, 0.0, 4)


def test_module_dropout_in_train_mode_only(kernel_path):
    torch.manual_seed(0)
    m = CausalSelfAttention(32, 32, 24, dropout=0.5, num_heads=2)
    x = torch.randn(2, 24, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    assert torch.equal(a, b) and not torch.allclose(a, m.eval()(x))


# ---------------------------------------------------------------------------------------------------
# GPU: bf16, long sequences, determinism at scale (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("T", [1000, 2048])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_bf16_error_at_most_twice_sdpa_bf16(T, D, causal):
    q, k, v, do = _inputs(2, 4, T, T, D, torch.bfloat16, seed=T + D)
    got = _run(flash_attention, q, k, v, do, causal=causal)
    torch_bf16 = _run(_sdpa, q, k, v, do, causal=causal)
    want = _run(_sdpa, *(t.float() for t in (q, k, v, do)), causal=causal)  # fp32 oracle (fp64 is too slow)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), got, torch_bf16, want):
        err = (a.float() - e).abs().max().item()
        err_torch = (t.float() - e).abs().max().item()
        floor = 2.0 ** -10 * e.abs().max().item()
        assert err <= 2 * err_torch + floor, f"{name}: {err:.3g} > 2 × {err_torch:.3g} + {floor:.3g}"


@pytest.mark.gpu
def test_gpu_long_sequence_fp16_forward_backward():
    T = 16384
    q, k, v, do = _inputs(1, 4, T, T, 64, torch.float16, seed=7)
    got = _run(flash_attention, q, k, v, do, causal=True)
    want = _run(_sdpa, *(t.float() for t in (q, k, v, do)), causal=True)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all()
        rel = ((a.float() - e).norm() / e.norm()).item()
        assert rel < 5e-3, f"{name}: relative error {rel:.3g}"


@pytest.mark.gpu
def test_gpu_tq_less_than_tk_and_odd_lengths_bf16():
    q, k, v, do = _inputs(3, 2, 257, 1031, 96, torch.bfloat16, seed=2)
    got = _run(flash_attention, q, k, v, do, causal=True)
    want = _run(attention_ref, *(t.float() for t in (q, k, v, do)), causal=True)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        rel = ((a.float() - e).norm() / e.norm()).item()
        assert rel < 1e-2, f"{name}: relative error {rel:.3g}"


@pytest.mark.gpu
def test_gpu_gradients_bitwise_deterministic():
    q, k, v, do = _inputs(4, 12, 1024, 1024, 64, torch.bfloat16, seed=9)
    first = _run(flash_attention, q, k, v, do, deterministic=True)
    for _ in range(3):
        again = _run(flash_attention, q, k, v, do, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_dropout_gradients_match_same_mask_reference():
    B, H, T, D, p = 2, 3, 100, 128, 0.2
    keep, _ = _recover_keep_mask(B, H, T, T, D, p, causal=True, rng_seed=4)
    q, k, v, do = _inputs(B, H, T, T, D, torch.float32, seed=4)

    def ours(q, k, v):
        torch.manual_seed(4)
        return flash_attention(q, k, v, causal=True, dropout_p=p)

    got = _run(ours, q, k, v, do)
    want = _ref64(q, k, v, do, causal=True, dropout_mask=keep, dropout_p=p)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_verbose_allclose(a, e, atol=1e-4, rtol=1e-4, name=name)


# ---------------------------------------------------------------------------------------------------
# Registration: the ops pass torch.library's checks and torch.compile traces through them
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck(fallback_path, dropout_p):
    """On the fallback path (the interpreter draws a different, Philox, mask than the traced fallback)."""
    q, k, v, do = _inputs(1, 2, 19, 23, 16, torch.float32)
    seed = torch.tensor([123], dtype=torch.int64) if dropout_p else None
    q.requires_grad_()
    args = (q, k, v, seed, True, 0.25, dropout_p)
    torch.library.opcheck(torch.ops.gpt_kernels.flash_attention_fwd.default, args)
    o, lse = torch.ops.gpt_kernels.flash_attention_fwd(*args)
    torch.library.opcheck(torch.ops.gpt_kernels.flash_attention_bwd.default,
                          (do, q.detach(), k, v, o.detach(), lse, seed, True, 0.25, dropout_p))


def test_torch_compile_fullgraph_cpu(kernel_path):
    torch.manual_seed(0)
    m = CausalSelfAttention(32, 32, 40, 0.0, 2, qkv_bias=True)
    x = torch.randn(2, 37, 32, requires_grad=True)
    compiled = torch.compile(lambda t: m(t).square().sum(), fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    g = x.grad.clone()
    x.grad = None
    m(x).square().sum().backward()
    assert_verbose_allclose(g, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_model():
    from gpt.config import GPTConfig
    from gpt.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", drop_rate=0.0)).cuda()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = model(idx).float()
        got = torch.compile(model, fullgraph=True)(idx).float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_torch_compile_with_dropout_cpu(fallback_path):
    """Attention dropout under torch.compile (fullgraph: the fallback's mask needs no host sync) has the
    dropout semantics: the output and every gradient equal an fp64 reference that applies the keep-mask
    the compiled function draws for that seed (recovered with the identity trick), scaled by 1/(1-p) —
    so the backward regenerates the forward's mask — and the mask keeps about 1 - p of the weights."""
    B, H, T, D, p, seed = 1, 2, 37, 64, 0.3, 5
    fn = torch.compile(lambda q, k, v: flash_attention(q, k, v, causal=True, dropout_p=p), fullgraph=True,
                       backend="aot_eager")
    q0 = torch.zeros(B, H, T, D)  # uniform attention over the visible keys
    k0 = torch.randn(B, H, T, D)
    v0 = torch.eye(T, D).expand(B, H, T, D).contiguous()  # out[..., j] = P_dropped[..., j]
    torch.manual_seed(seed)
    dropped = fn(q0, k0, v0)[..., :T]  # (B, H, T, T)
    allowed = causal_mask(T, T, DEVICE)
    scaled = dropped * allowed.sum(-1, keepdim=True) * (1 - p)  # 1 where kept, 0 where dropped
    assert torch.allclose(scaled, scaled.round(), atol=1e-4), "compiled dropout is not {0, 1/(1-p)} · P"
    keep = (scaled > 0.5) & allowed
    frac = keep.sum().item() / (allowed.sum().item() * B * H)
    assert abs(frac - (1 - p)) < 0.08, f"kept {frac:.3f} of the weights, expected {1 - p}"

    q, k, v, do = _inputs(B, H, T, T, D, torch.float32, seed=3)

    def compiled(q, k, v):
        torch.manual_seed(seed)  # the same seed draws the same mask
        return fn(q, k, v)

    got = _run(compiled, q, k, v, do)
    want = _ref64(q, k, v, do, causal=True, dropout_mask=keep, dropout_p=p)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_verbose_allclose(a, e, atol=5e-5, rtol=5e-5, name=f"compiled {name}")
