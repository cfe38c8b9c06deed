"""The eager CPU fast path (kernels/_eager_cpu.py) against the registered ops' fallback and fp64.

The functional API sends fp32 eager CPU calls to torch's native kernels; everything else goes through
the registered custom ops. These tests pin both halves: the fast path is taken exactly where it
applies, and it computes what the registered op (and an fp64 oracle) computes, forward and backward,
on strided views too.
"""

import pytest
import torch

from kernels import add_layer_norm, flash_attention, gelu, layer_norm
from kernels import reference as ref
from tests.utils import assert_verbose_allclose

pytestmark = pytest.mark.usefixtures("fallback_path")


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, inputs, g)


def _ran_op(t: torch.Tensor) -> bool:
    """Whether a registered gpt_kernels op made ``t`` (its autograd node, or one a view away)."""
    fn = t.grad_fn
    names = [type(fn).__name__] + [type(f).__name__ for f, _ in fn.next_functions if f is not None]
    return any("gpt_kernels" in n for n in names)


def _qkv(B, H, Tq, Tk, D, seed=0):
    """q (B, H, Tq, D) and k, v (B, H, Tk, D) as strided views of fused projections, like the model."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=gen).transpose(1, 2).requires_grad_()
    kv = torch.randn(B, Tk, 2, H, D, generator=gen)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k.requires_grad_(), v.requires_grad_()


@pytest.mark.parametrize("causal,Tq,Tk,scale", [(True, 37, 37, None), (False, 5, 37, None),
                                                (False, 37, 37, 0.3), (True, 1, 1, None)])
def test_attention_fast_path_equals_the_registered_op(causal, Tq, Tk, scale):
    q, k, v = _qkv(2, 3, Tq, Tk, 32)
    out = flash_attention(q, k, v, causal=causal, softmax_scale=scale)
    assert type(out.grad_fn).__name__ == "_CPUFlashAttentionBackward"  # the fast path ran
    assert out.transpose(1, 2).is_contiguous()  # same (B, T, H, D) storage as the op
    s = float(32 ** -0.5 if scale is None else scale)
    o_op, _ = torch.ops.gpt_kernels.flash_attention_fwd(q, k, v, None, causal, s, 0.0)
    assert_verbose_allclose(out, o_op, atol=2e-6, rtol=1e-5, name="out vs op")
    o64 = ref.attention_ref(q.double(), k.double(), v.double(), causal=causal, softmax_scale=scale)
    assert_verbose_allclose(out, o64, atol=2e-6, rtol=1e-5, name="out vs fp64")
    for name, a, e in zip("qkv", _grads(out, (q, k, v)), _grads(o_op, (q, k, v))):
        assert_verbose_allclose(a, e, atol=1e-5, rtol=1e-5, name=f"d{name}")


@pytest.mark.parametrize("causal,Tq,Tk,scale,dropout_p", [
    (True, 5, 37, None, 0.0),   # bottom-right causal with Tq < Tk: torch's kernel aligns top-left
    (True, 37, 37, -0.5, 0.0),  # a negative scale: torch's CPU kernel returns NaN there
    (True, 37, 37, 0.0, 0.0),   # a zero scale: likewise
    (True, 37, 37, None, 0.5),  # dropout: the op's own regenerable mask
    (True, 9, 9, None, "last-dim stride 2"),  # torch's CPU kernel ignores the last dim's stride
])
def test_attention_cases_the_fast_path_cannot_serve_take_the_op(causal, Tq, Tk, scale, dropout_p):
    q, k, v = _qkv(1, 2, Tq, Tk, 16)
    if dropout_p == "last-dim stride 2":
        dropout_p = 0.0
        q, k, v = (torch.stack((t.detach(), torch.full_like(t, float("nan"))), -1).flatten(-2)[..., ::2]
                   .requires_grad_() for t in (q, k, v))  # (B, H, T, D) views at stride 2 in a NaN buffer
    torch.manual_seed(0)
    out = flash_attention(q, k, v, causal=causal, softmax_scale=scale, dropout_p=dropout_p)
    assert type(out.grad_fn).__name__ != "_CPUFlashAttentionBackward"
    assert torch.isfinite(out).all()
    if dropout_p == 0.0:
        o64 = ref.attention_ref(q.double(), k.double(), v.double(), causal=causal, softmax_scale=scale)
        assert_verbose_allclose(out, o64, atol=2e-6, rtol=1e-5)


def test_fp16_and_autocast_stay_on_the_registered_ops():
    x = torch.randn(4, 64, dtype=torch.float16, requires_grad=True)
    assert _ran_op(layer_norm(x))
    assert _ran_op(gelu(x))
    x32 = torch.randn(4, 64, requires_grad=True)
    assert not _ran_op(layer_norm(x32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _ran_op(layer_norm(x32))


def test_layer_norm_fast_path_on_strided_inputs_equals_fp64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 96, generator=gen)[:, 1].requires_grad_()  # (6, 96) rows 192 apart
    r = torch.randn(96, 6, generator=gen).t().requires_grad_()  # transposed
    w = torch.randn(192, generator=gen)[::2].requires_grad_()  # strided weight
    b = torch.tensor(0.5).expand(96).requires_grad_()  # stride-0 bias
    y, s = add_layer_norm(x, r, w, b)
    assert not _ran_op(y)  # the fast path ran
    ins = (x, r, w, b)
    y64, s64 = ref.add_layer_norm_ref(*(t.double() for t in ins))
    assert_verbose_allclose(y, y64, atol=1e-5, rtol=1e-5, name="y")
    assert_verbose_allclose(s, s64, atol=1e-6, rtol=1e-6, name="s")
    out, out64 = y * 1.5 + s, y64 * 1.5 + s64
    for name, a, e in zip(("dx", "dres", "dw", "db"), _grads(out, ins), _grads(out64, ins)):
        assert_verbose_allclose(a, e, atol=1e-4, rtol=1e-4, name=name)
    z = layer_norm(x, w, b)
    assert_verbose_allclose(z, ref.layer_norm_ref(x.double(), w.double(), b.double()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_fast_path_equals_the_registered_op(approximate):
    x = torch.randn(8, 300).t().requires_grad_()  # non-contiguous
    y = gelu(x, approximate)
    assert not _ran_op(y)
    y_op = torch.ops.gpt_kernels.gelu_fwd(x, approximate)
    assert_verbose_allclose(y, y_op, atol=1e-6, rtol=1e-6)
    (a,), (e,) = _grads(y, (x,)), _grads(y_op, (x,))
    assert_verbose_allclose(a, e, atol=1e-6, rtol=1e-6)


def test_bad_input_is_still_rejected_before_the_fast_path():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, torch.ones(7))
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(q, q, q)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [3, 1000])
def test_linear_cross_entropy_grad_in_forward_equals_fp64(reduction, chunk_rows):
    """The CPU path computes the gradient in the forward, chunk by chunk: several chunks (3 rows each)
    and one, ignored rows, a bias, x and the weight strided."""
    from kernels import _eager_cpu

    gen = torch.Generator().manual_seed(0)
    N, d, V = 37, 24, 301
    x = torch.randn(d, N, generator=gen).t().requires_grad_()  # non-contiguous
    w = (torch.randn(V, 2 * d, generator=gen)[:, ::2] * 0.3).requires_grad_()  # strided
    b = torch.randn(V, generator=gen).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen)
    t[::4] = -100
    loss = _eager_cpu.linear_cross_entropy(x, w, t, b, -100, reduction, chunk_rows * V)
    assert type(loss.grad_fn).__name__ == "_LinearCrossEntropyGradInForwardBackward"
    want = ref.linear_cross_entropy_ref(x.double(), w.double(), t, b.double(), reduction=reduction)
    assert_verbose_allclose(loss, want, atol=1e-5, rtol=1e-5, name="loss")
    for name, a, e in zip(("dx", "dw", "db"), torch.autograd.grad(loss * 1.7, (x, w, b)),
                          torch.autograd.grad(want * 1.7, (x, w, b))):
        assert_verbose_allclose(a, e, atol=1e-5, rtol=1e-5, name=name)


def test_linear_cross_entropy_public_api_takes_the_cpu_path_and_handles_all_ignored():
    from kernels import linear_cross_entropy

    x = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (2, 5))
    loss = linear_cross_entropy(x, w, t)
    assert type(loss.grad_fn).__name__ == "_LinearCrossEntropyGradInForwardBackward"
    want = ref.linear_cross_entropy_ref(x.double(), w.double(), t)
    assert_verbose_allclose(loss, want, atol=1e-5, rtol=1e-5)
    none = linear_cross_entropy(x, w, t, reduction="none")  # per-row: the registered op
    assert none.shape == (2, 5) and _ran_op(none)
    ignored = linear_cross_entropy(x, w, torch.full((2, 5), -100))
    dx, dw = torch.autograd.grad(ignored, (x, w))
    assert ignored.item() == 0.0 and not dx.any() and not dw.any()
    with torch.no_grad():
        assert_verbose_allclose(linear_cross_entropy(x, w, t), want, atol=1e-5, rtol=1e-5)
