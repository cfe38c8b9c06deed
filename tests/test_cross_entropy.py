"""kernels.linear_cross_entropy: loss and every gradient vs an fp64 oracle, reductions, ignored rows,
determinism, errors, registration, memory, and ``GPTModel.loss`` on both models.

CPU runs both paths (``kernel_path``): the Triton kernels through the interpreter and the chunked
PyTorch fallback. The interpreter is slow, so its shapes stay small (V = 1000 and V = 300, neither a
multiple of the vocabulary block); V = 50,257 runs on the fallback. bf16 and GPT-2 shapes need a GPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import linear_cross_entropy
from kernels.reference import linear_cross_entropy_ref
from tests.utils import assert_verbose_allclose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]


def _inputs(lead, V, d, *, bias, dtype=torch.float32, seed=0, ignore_every=0, device=DEVICE):
    """x (*lead, d), weight (V, d), bias (V,) or None, target (*lead) with every k-th target ignored."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g)
    w = torch.randn(V, d, generator=g) * d**-0.5 * 2  # logits of order 1-2: a non-trivial softmax
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, lead, generator=g)
    if ignore_every:
        t.view(-1)[::ignore_every] = -100
    cast = (lambda u: None if u is None else u.to(device=device, dtype=dtype))
    return cast(x), cast(w), cast(b), t.to(device)


def _run(fn, x, w, b, t, grad=None, **kw):
    """(loss, dx, dw, db) of ``fn`` on leaf copies; ``grad`` is the upstream gradient (ones if None)."""
    leaves = [u.detach().clone().requires_grad_() if u is not None else None for u in (x, w, b)]
    out = fn(leaves[0], leaves[1], t, leaves[2], **kw)
    out.backward(torch.ones_like(out) if grad is None else grad.to(out.dtype))
    return [out.detach()] + [u.grad if u is not None else None for u in leaves]


def _ref64(x, w, b, t, grad=None, **kw):
    return _run(linear_cross_entropy_ref, *(u.double() if u is not None else None for u in (x, w, b)), t,
                grad=grad, **kw)


def _compare(got, want, atol, rtol, tag):
    for name, a, e in zip(("loss", "dx", "dw", "db"), got, want):
        if e is None:
            assert a is None
            continue
        assert a.shape == e.shape, name
        assert torch.isfinite(a).all(), f"{name} [{tag}] has non-finite values"
        assert_verbose_allclose(a, e, atol=atol, rtol=rtol, name=f"{name} [{tag}]")


# (leading shape, V, d, bias): N = 37, 129 (3-D x), 1; V = 1000 and 300 (not multiples of any block,
# several vocabulary tiles and slices in the interpreter); d = 64 and 80 (a masked d tail).
CASES = [
    pytest.param((37,), 1000, 64, True, id="n37-v1000-d64-bias"),
    pytest.param((3, 43), 300, 80, False, id="n129-3d-v300-d80"),
    pytest.param((1,), 1000, 80, True, id="n1-v1000-d80-bias"),
]


@pytest.mark.parametrize("lead,V,d,bias", CASES)
def test_fp32_loss_and_grads_match_fp64(kernel_path, lead, V, d, bias):
    """reduction="none" with a random upstream gradient per row (every row's g differs) and ignored rows."""
    x, w, b, t = _inputs(lead, V, d, bias=bias, ignore_every=5 if math.prod(lead) > 1 else 0)
    grad = torch.randn(lead, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = _run(linear_cross_entropy, x, w, b, t, grad=grad, reduction="none")
    want = _ref64(x, w, b, t, grad=grad, reduction="none")
    assert got[0].dtype == torch.float32 and got[0].shape == t.shape
    _compare(got, want, 2e-5, 2e-5, kernel_path)
    assert (got[0].view(-1)[t.view(-1) == -100] == 0).all()


def test_gpt2_vocab_50257_on_the_fallback(fallback_path):
    """100 rows: two chunks of the fallback (83 rows of 50,257 logits each)."""
    x, w, b, t = _inputs((2, 50), 50257, 64, bias=True, ignore_every=7)
    grad = torch.rand(2, 50, generator=torch.Generator().manual_seed(2))
    got = _run(linear_cross_entropy, x, w, b, t, grad=grad, reduction="none")
    want = _ref64(x, w, b, t, grad=grad, reduction="none")
    _compare(got, want, 1e-5, 1e-5, "V=50257")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_with_ignored_rows(kernel_path, reduction):
    x, w, b, t = _inputs((37,), 300, 64, bias=True, ignore_every=3)
    got = _run(linear_cross_entropy, x, w, b, t, reduction=reduction)
    want = _ref64(x, w, b, t, reduction=reduction)
    _compare(got, want, 2e-5, 2e-5, f"{kernel_path} {reduction}")
    # The oracle's convention agrees with torch's own cross_entropy (mean over the non-ignored targets).
    torch_loss = F.cross_entropy(F.linear(x.double(), w.double(), b.double()), t, reduction=reduction)
    assert_verbose_allclose(got[0], torch_loss, atol=1e-5, rtol=1e-5, name="vs F.cross_entropy")
    # Ignored rows get no gradient at all.
    assert (got[1][t == -100] == 0).all()


def test_all_ignored_gives_zero_loss_and_zero_grads_not_nan(kernel_path):
    x, w, b, t = _inputs((2, 9), 300, 64, bias=True)
    t = torch.full_like(t, -7)
    for reduction in ("mean", "sum", "none"):
        loss, dx, dw, db = _run(linear_cross_entropy, x, w, b, t, ignore_index=-7, reduction=reduction)
        assert (loss == 0).all(), reduction
        for g in (dx, dw, db):
            assert (g == 0).all(), reduction


def test_custom_ignore_index_and_valid_negative_free_targets(kernel_path):
    """ignore_index may be any int, also a valid class id (that class is then skipped)."""
    x, w, b, t = _inputs((37,), 300, 64, bias=False)
    t[:10] = 5
    got = _run(linear_cross_entropy, x, w, b, t, ignore_index=5)
    want = _ref64(x, w, b, t, ignore_index=5)
    _compare(got, want, 2e-5, 2e-5, kernel_path)


def test_non_contiguous_x_and_weight(kernel_path):
    """x as a transposed view and a strided slice, weight as a transposed view: same result, no copy."""
    x, w, b, t = _inputs((37,), 300, 64, bias=True)
    x_t = x.t().contiguous().t()  # (37, 64) with strides (1, 37)
    w_t = w.t().contiguous().t()  # (300, 64) with strides (1, 300)
    x_big = torch.randn(37, 3, 64).to(DEVICE)
    x_big[:, 1] = x
    x_s = x_big[:, 1]  # row stride 192
    want = _run(linear_cross_entropy, x, w, b, t)
    for name, xv, wv in (("x.T", x_t, w), ("x slice", x_s, w), ("w.T", x, w_t)):
        assert not (xv.is_contiguous() and wv.is_contiguous())
        got = _run(linear_cross_entropy, xv, wv, b, t)
        _compare(got, want, 1e-6, 1e-6, name)


def test_fp16_error_at_most_twice_pytorch_fp16(kernel_path):
    x, w, b, t = _inputs((37,), 300, 64, bias=True, dtype=torch.float16, seed=3, ignore_every=6)
    got = _run(linear_cross_entropy, x, w, b, t)
    torch_fp16 = _run(lambda x, w, t, b: F.cross_entropy(F.linear(x, w, b), t), x, w, b, t)
    want = _ref64(x, w, b, t)
    assert got[0].dtype == torch.float32
    for name, a, o, e in zip(("loss", "dx", "dw", "db"), got, torch_fp16, want):
        assert a.dtype == (torch.float32 if name == "loss" else torch.float16)
        err = (a.double() - e).abs().max().item()
        err_torch = (o.double() - e).abs().max().item()
        floor = 2.0**-13 * e.abs().max().item()  # 1/8 fp16 ulp of the largest value
        assert err <= 2 * err_torch + floor, f"{name} [{kernel_path}]: {err:.3g} > 2 × torch fp16 {err_torch:.3g}"


def test_bf16_on_both_cpu_paths_matches_fp64(kernel_path):
    """Regression: the interpreter's bf16 tl.dot returned ~1e10 for a loss of 6.5 (found by
    tests/sanitize_driver.py); bf16 operands are now upcast there. bf16 products are exact in fp32, so
    the loss is fp32-accurate against fp64 on the same bf16 inputs; gradients are rounded to bf16."""
    x, w, b, t = _inputs((37,), 300, 64, bias=True, dtype=torch.bfloat16, seed=5, ignore_every=6)
    got = _run(linear_cross_entropy, x, w, b, t)
    want = _ref64(x, w, b, t)
    assert got[0].dtype == torch.float32
    assert_verbose_allclose(got[0], want[0], atol=1e-5, rtol=1e-5, name=f"loss [{kernel_path}]")
    for name, a, e in zip(("dx", "dw", "db"), got[1:], want[1:]):
        assert a.dtype == torch.bfloat16
        assert_verbose_allclose(a, e, atol=2.0**-8 * e.abs().max().item(), rtol=2.0**-7, name=f"{name} [{kernel_path}]")


def test_float64_runs_the_fallback_and_passes_gradcheck(kernel_path):
    x, w, b, t = _inputs((5,), 7, 3, bias=True, dtype=torch.float64, ignore_every=4)
    leaves = [u.detach().requires_grad_() for u in (x, w, b)]
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x, w, b, r=reduction: linear_cross_entropy(x, w, t, b, reduction=r), leaves)
    assert linear_cross_entropy(x, w, t, b).dtype == torch.float64


def test_out_of_range_targets_give_nan_at_the_op_level(kernel_path):
    """What CUDA tensors get (no host-sync check there): NaN on that row, never a finite wrong value."""
    x, w, b, t = _inputs((37,), 300, 64, bias=True)
    t[3], t[4] = 300, -2
    loss, _lse = torch.ops.gpt_kernels.linear_cross_entropy_fwd(x, w, t, b, -100)
    assert torch.isnan(loss[3]) and torch.isnan(loss[4])
    assert torch.isfinite(loss[torch.arange(37) >= 5]).all()


def test_bad_inputs_are_clear_errors():
    x, w, b, t = _inputs((4, 5), 30, 8, bias=True)
    cases = [
        (TypeError, "target must hold int64", dict(target=t.float())),
        (TypeError, "target must hold int64", dict(target=t.int())),
        (ValueError, "target must have the leading shape", dict(target=t[:, :4])),
        (ValueError, r"class indices in \[0, 30\).*found 30", dict(target=t.clone().fill_(30))),
        (ValueError, "found -1", dict(target=t.clone().fill_(-1))),
        (ValueError, "x must have last dim d = 8", dict(x=x[..., :7])),
        (ValueError, "weight must be 2-D", dict(weight=w[0])),
        (ValueError, r"bias must have shape \(30,\)", dict(bias=b[:29])),
        (TypeError, "weight must have x's dtype", dict(weight=w.double())),
        (TypeError, "bias must have x's dtype", dict(bias=b.half())),
        (TypeError, "x must have dtype", dict(x=x.int())),
        (TypeError, "x must be a torch.Tensor", dict(x=x.tolist())),
        (ValueError, "reduction must be one of", dict(reduction="avg")),
        (TypeError, "ignore_index must be an int", dict(ignore_index=1.5)),
    ]
    for exc, match, override in cases:
        kw = dict(x=x, weight=w, target=t, bias=b, reduction="mean", ignore_index=-100) | override
        with pytest.raises(exc, match=match):
            linear_cross_entropy(kw.pop("x"), kw.pop("weight"), kw.pop("target"), kw.pop("bias"), **kw)


# ---------------------------------------------------------------------------------------------------
# Registration: torch.library's checks, torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------------
def test_opcheck(fallback_path):
    bias = True
    x, w, b, t = _inputs((19,), 53, 16, bias=bias, ignore_every=4)
    x.requires_grad_()
    w.requires_grad_()
    # (aot_dispatch is left to test_torch_compile_fullgraph_cpu: it costs ~10 s here)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.gpt_kernels.linear_cross_entropy_fwd.default, (x, w, t, b, -100),
                          test_utils=utils)
    _loss, lse = torch.ops.gpt_kernels.linear_cross_entropy_fwd(x, w, t, b, -100)
    g = torch.rand(19)
    torch.library.opcheck(torch.ops.gpt_kernels.linear_cross_entropy_bwd.default,
                          (g, x.detach(), w.detach(), t, b, lse, -100, True, True, bias), test_utils=utils)


def test_torch_compile_fullgraph_cpu(kernel_path):
    x, w, b, t = _inputs((2, 9), 300, 64, bias=True, ignore_every=5)
    fn = torch.compile(lambda x, w, t, b: linear_cross_entropy(x, w, t, b), fullgraph=True, backend="aot_eager")
    got = _run(fn, x, w, b, t)
    want = _run(linear_cross_entropy, x, w, b, t)
    _compare(got, want, 1e-6, 1e-6, kernel_path)


# ---------------------------------------------------------------------------------------------------
# GPTModel.loss
# ---------------------------------------------------------------------------------------------------
SMALL_CFG = dict(vocab_size=300, context_length=32, emb_dim=64, n_heads=2, n_layers=1, drop_rate=0.0,
                 qkv_bias=True)


def _model_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_model_loss_equals_the_logits_path(kernel_path):
    from gpt.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(SMALL_CFG).to(DEVICE)
    idx = torch.randint(0, 300, (2, 9), device=DEVICE)
    targets = torch.randint(0, 300, (2, 9), device=DEVICE)
    targets[0, :4] = -100
    fused = model.loss(idx, targets)
    g_fused = _model_grads(model, fused)
    plain = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    g_plain = _model_grads(model, plain)
    assert_verbose_allclose(fused, plain, atol=1e-5, rtol=1e-5, name="loss")
    assert g_fused.keys() == g_plain.keys() and "out_head.weight" in g_fused
    for n in g_fused:
        assert_verbose_allclose(g_fused[n], g_plain[n], atol=2e-5, rtol=1e-4, name=n)
    assert torch.equal(model(idx, targets=targets), model.loss(idx, targets))


def test_reference_model_loss_is_cross_entropy_and_matches_fused(fallback_path):
    from gpt.model import GPTModel
    from gpt.reference import GPTModel as RefModel

    torch.manual_seed(0)
    ref = RefModel(SMALL_CFG)
    fused = GPTModel(SMALL_CFG)
    fused.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 300, (2, 19))
    targets = torch.randint(0, 300, (2, 19))
    targets[1, 5:] = -1
    want = F.cross_entropy(ref(idx).flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert_verbose_allclose(ref.loss(idx, targets, ignore_index=-1), want, atol=1e-6, rtol=1e-6, name="ref")
    assert_verbose_allclose(fused.loss(idx, targets, ignore_index=-1), want, atol=1e-5, rtol=1e-5, name="fused")
    assert ref.loss(idx, torch.full_like(targets, -100)).item() == 0.0


def test_training_loss_helper_uses_model_loss_through_wrappers(fallback_path):
    """calc_loss_batch (pretraining, instruction finetuning) calls model(idx, targets=...) when the model
    (also inside torch.compile's wrapper) has ``loss``; a plain logits model keeps the book's path."""
    from gpt.model import GPTModel
    from gpt.training import _has_loss, calc_loss_batch

    torch.manual_seed(0)
    model = GPTModel(SMALL_CFG)
    idx = torch.randint(0, 300, (2, 11))
    targets = torch.randint(0, 300, (2, 11))
    assert _has_loss(model) and _has_loss(torch.compile(model))
    assert not _has_loss(torch.nn.Linear(3, 3))
    got = calc_loss_batch(idx, targets, model, "cpu")
    assert torch.equal(got, model.loss(idx, targets))


# ---------------------------------------------------------------------------------------------------
# Memory: the fallback never holds the (N, V) logits
# ---------------------------------------------------------------------------------------------------
_MEMORY_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, sys.argv[1])
    import torch
    from kernels import linear_cross_entropy
    N, V, d = 2048, 50257, int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, d, generator=g).requires_grad_()
    w = torch.randn(V, d, generator=g).mul_(0.03).requires_grad_()  # in place: no transient copy
    t = torch.randint(0, V, (N,), generator=g)
    linear_cross_entropy(x[:4], w[:50], t[:4] % 50).backward()  # warm-up (library init), tiny
    w.grad = x.grad = None
    def status(key):  # MiB
        line = next(ln for ln in open("/proc/self/status") if ln.startswith(key + ":"))
        return int(line.split()[1]) / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    peak = lambda: status("VmHWM")  # noqa: E731
    base = peak()
    slack = base - status("VmRSS")  # must be ~0 after the reset: nothing hides growth
    loss = linear_cross_entropy(x, w, t)
    fwd = peak()
    loss.backward()
    print(slack, fwd - base, peak() - base, float(loss.detach()))
""")


def _fallback_peak_mib(tmp_path, d):
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY_SCRIPT)
    # Large blocks straight from mmap and back on free: the peak RSS then tracks live tensors (glibc
    # would otherwise keep freed chunks cached below a moving threshold, adding tens of MiB of noise).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, str(script), str(ROOT), str(d)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    slack, fwd, bwd, loss = (float(v) for v in r.stdout.split())
    assert slack < 16, f"{slack:.0f} MiB of freed memory below the peak would hide growth"
    assert 10.0 < loss < 12.0  # ~ln(50257) = 10.8 for near-uniform logits
    return fwd, bwd


LOGITS_MIB = 2048 * 50257 * 4 / 2**20  # fp32 logits of N=2048, V=50,257: 393 MiB = 412 MB


@pytest.mark.parametrize("d", [pytest.param(64, id="d64"), pytest.param(768, id="d768", marks=pytest.mark.slow)])
def test_fallback_peak_memory_stays_far_below_the_logits(tmp_path, d):
    """N=2048, V=50,257 fp32 in a fresh process: the logits alone would be 412 MB, their gradient as much.
    The forward may grow the peak RSS by a few chunks at most; forward+backward by the gradients
    themselves (dW, dx) plus a few chunks. Peak RSS is Linux's VmHWM, reset just before the call.
    d=768 (GPT-2) costs ~0.6 TFLOP on the CPU, so it runs under
    ``-m slow``; the logits' size does not depend on d."""
    fwd, bwd = _fallback_peak_mib(tmp_path, d)
    grads_mib = (50257 + 2048) * d * 4 / 2**20
    assert fwd < 0.15 * LOGITS_MIB, f"forward grew the peak RSS by {fwd:.0f} MiB"
    assert bwd < grads_mib + 0.15 * LOGITS_MIB, f"fwd+bwd grew the peak RSS by {bwd:.0f} MiB (grads {grads_mib:.0f})"


# ---------------------------------------------------------------------------------------------------
# GPU (compiled kernels, bf16, GPT-2 shapes)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_gpt2_shapes_vs_fp64(dtype):
    x, w, b, t = _inputs((4, 1000), 50257, 768, bias=False, dtype=dtype, ignore_every=9)
    got = _run(linear_cross_entropy, x, w, b, t)
    want = _ref64(x, w, b, t)
    if dtype == torch.float32:
        _compare(got, want, 1e-5, 1e-4, "fp32")
        return
    torch_ = _run(lambda x, w, t, b: F.cross_entropy(F.linear(x, w, b).float(), t.view(-1)), x.view(-1, 768), w, b, t)
    for name, a, o, e in zip(("loss", "dx", "dw"), got, torch_, want):
        e = e.view(a.shape)
        err = (a.double() - e).abs().max().item()
        err_torch = (o.double().view(a.shape) - e).abs().max().item()
        assert err <= 2 * err_torch + 2.0**-10 * e.abs().max().item(), (name, err, err_torch)


@pytest.mark.gpu
def test_gpu_deterministic_and_bounded_memory():
    x, w, b, t = _inputs((8192,), 50257, 768, bias=True, dtype=torch.bfloat16)
    first = _run(linear_cross_entropy, x, w, b, t)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    second = _run(linear_cross_entropy, x, w, b, t)
    peak = torch.cuda.max_memory_allocated() - base
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    logits_bytes = 8192 * 50257 * 2
    assert peak < logits_bytes / 2, f"peak {peak / 2**20:.0f} MiB vs bf16 logits {logits_bytes / 2**20:.0f} MiB"
