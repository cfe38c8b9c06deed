"""linear_cross_entropy(label_smoothing=..., softcap=...): loss and every gradient vs fp64
``F.cross_entropy(c·tanh(logits / c), target, label_smoothing=ε)`` (torch's op: an independent oracle),
every reduction, ignored rows, on both CPU paths (interpreter: the online log-sum-exp kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import linear_cross_entropy
from tests.utils import assert_verbose_allclose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(N, V, d, *, dtype=torch.float32, seed=0, ignore_every=4, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) * d**-0.5 * 3  # logits of a few units: the cap bends them
    b = torch.randn(V, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return [u.to(device=device, dtype=dtype) for u in (x, w, b)] + [t.to(device)]


def _torch_loss(x, w, b, t, *, reduction, label_smoothing, softcap):
    z = F.linear(x, w, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, t, reduction=reduction, label_smoothing=label_smoothing)


def _grads(fn, x, w, b, t, g, **kw):
    leaves = [u.detach().clone().requires_grad_() for u in (x, w, b)]
    out = fn(*leaves[:2], t, leaves[2], **kw) if fn is linear_cross_entropy else fn(*leaves, t, **kw)
    out.backward(g.to(out.dtype) if out.dim() else torch.ones_like(out))
    return [out.detach()] + [u.grad for u in leaves]


@pytest.mark.parametrize("label_smoothing,softcap", [(0.1, 0.0), (0.0, 2.5), (0.25, 4.0)],
                         ids=["smooth", "softcap", "both"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_options_match_torch_fp64(kernel_path, reduction, label_smoothing, softcap):
    x, w, b, t = _inputs(37, 300, 48)
    g = torch.randn(37, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, softcap=softcap)
    got = _grads(linear_cross_entropy, x, w, b, t, g, **kw)
    want = _grads(_torch_loss, x.double(), w.double(), b.double(), t, g.double(), **kw)
    for name, a, e in zip(("loss", "dx", "dw", "db"), got, want):
        assert a.dtype == (torch.float32 if name == "loss" else x.dtype)
        assert_verbose_allclose(a, e, atol=2e-5, rtol=2e-5, name=f"{name} [{kernel_path}]")


def test_options_off_equal_the_plain_loss_and_fp16(kernel_path):
    """0.0 for both is exactly the plain loss; fp16 inputs with both options stay within fp16 error."""
    x, w, b, t = _inputs(19, 130, 40, seed=3)
    plain = linear_cross_entropy(x, w, t, b)
    assert torch.equal(linear_cross_entropy(x, w, t, b, label_smoothing=0.0, softcap=0.0), plain)
    xh, wh, bh = (u.half() for u in (x, w, b))
    kw = dict(reduction="mean", label_smoothing=0.1, softcap=3.0)
    got = _grads(linear_cross_entropy, xh, wh, bh, t, None, **kw)
    want = _grads(_torch_loss, xh.double(), wh.double(), bh.double(), t, None, **kw)
    for name, a, e in zip(("loss", "dx", "dw", "db"), got, want):
        assert_verbose_allclose(a, e, atol=2e-3, rtol=5e-3, name=name)


def test_options_on_a_large_vocabulary_and_all_ignored(fallback_path):
    """V = 50,257 on the chunked fallback; an all-ignored batch is 0 (mean), not NaN, with both options."""
    x, w, b, t = _inputs(6, 50257, 16, ignore_every=0)
    kw = dict(reduction="mean", label_smoothing=0.1, softcap=30.0)
    got = _grads(linear_cross_entropy, x, w, b, t, None, **kw)
    want = _grads(_torch_loss, x.double(), w.double(), b.double(), t, None, **kw)
    for name, a, e in zip(("loss", "dx", "dw", "db"), got, want):
        assert_verbose_allclose(a, e, atol=1e-5, rtol=1e-5, name=name)
    t_ign = torch.full_like(t, -100)
    loss = linear_cross_entropy(x, w, t_ign, b, **kw)
    assert loss.item() == 0.0


def test_bad_options_are_clear_errors():
    x, w, b, t = _inputs(4, 10, 8)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
            linear_cross_entropy(x, w, t, b, label_smoothing=bad)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
            linear_cross_entropy(x, w, t, b, softcap=bad)
    with pytest.raises(TypeError, match="softcap must be a float"):
        linear_cross_entropy(x, w, t, b, softcap="30")


def test_opcheck_with_options(fallback_path):
    x, w, b, t = _inputs(11, 53, 16)
    x.requires_grad_()
    w.requires_grad_()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.gpt_kernels.linear_cross_entropy_fwd.default, (x, w, t, b, -100, 0.1, 5.0),
                          test_utils=utils)
    _loss, lse = torch.ops.gpt_kernels.linear_cross_entropy_fwd(x, w, t, b, -100, 0.1, 5.0)
    torch.library.opcheck(torch.ops.gpt_kernels.linear_cross_entropy_bwd.default,
                          (torch.rand(11), x.detach(), w.detach(), t, b, lse, -100, True, True, True, 0.1, 5.0),
                          test_utils=utils)


def test_torch_compile_fullgraph_with_options(fallback_path):
    x, w, b, t = _inputs(9, 70, 16)
    fn = torch.compile(lambda x, w, t, b: linear_cross_entropy(x, w, t, b, label_smoothing=0.2, softcap=3.0),
                       fullgraph=True, backend="aot_eager")
    got = _grads(linear_cross_entropy, x, w, b, t, None, label_smoothing=0.2, softcap=3.0)
    leaves = [u.detach().clone().requires_grad_() for u in (x, w, b)]
    out = fn(leaves[0], leaves[1], t, leaves[2])
    out.backward()
    for name, a, e in zip(("loss", "dx", "dw", "db"), got, [out.detach()] + [u.grad for u in leaves]):
        assert_verbose_allclose(a, e, atol=1e-6, rtol=1e-6, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_options_llama_vocab(dtype):
    x, w, b, t = _inputs(512, 128256, 256, dtype=dtype)
    kw = dict(reduction="mean", label_smoothing=0.1, softcap=30.0)
    got = _grads(linear_cross_entropy, x, w, b, t, None, **kw)
    want = _grads(_torch_loss, x.double(), w.double(), b.double(), t, None, **kw)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, e in zip(("loss", "dx", "dw", "db"), got, want):
        assert_verbose_allclose(a.float(), e, atol=tol, rtol=tol, name=name)
