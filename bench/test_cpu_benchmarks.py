"""CPU benchmarks of the fallback path with pytest-benchmark (not part of the test suite: ``testpaths``
is ``tests/``). They track the speed of what a CPU user runs: the kernels' PyTorch fallbacks and a whole
training step of the fused model, each next to its baseline in the same group.

    pytest bench --benchmark-only                           # run and print the comparison table
    pytest bench --benchmark-only --benchmark-autosave      # store under .benchmarks/ (git-ignored)
    pytest bench --benchmark-only --benchmark-compare       # compare with the last saved run

Small shapes (the tiny preset, T=64), fp32, random inputs. ``tests/test_bench.py`` runs this file once
with ``--benchmark-disable`` so it cannot rot.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # the PyTorch fallback: what a CPU user runs (before importing triton)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("pytest_benchmark")

B, T = 4, 64


@pytest.fixture(autouse=True)
def _threads():
    torch.manual_seed(0)
    yield


def _train_step(model):
    from gpt.config import GPTConfig

    cfg = model.cfg if hasattr(model, "cfg") else GPTConfig.from_preset("tiny", drop_rate=0.0)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits = model(x[:, :-1])  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


@pytest.mark.benchmark(group="train step tiny B=4 T=64 fp32")
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_train_step(benchmark, impl):
    from gpt.config import GPTConfig
    from gpt.model import GPTModel
    from gpt.reference import GPTModel as RefModel

    cfg = GPTConfig.from_preset("tiny", drop_rate=0.0)
    model = (GPTModel if impl == "fused" else RefModel)(cfg).train()
    loss = benchmark(_train_step(model))
    assert torch.isfinite(loss)


@pytest.mark.benchmark(group="attention fwd+bwd B=4 H=4 T=64 D=32 fp32")
@pytest.mark.parametrize("impl", ["flash_attention", "sdpa", "book"])
def test_attention_fwd_bwd(benchmark, impl):
    from kernels import flash_attention

    q, k, v = (torch.randn(B, 4, T, 32, requires_grad=True) for _ in range(3))
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)

    def book(q, k, v):  # the book's MultiHeadAttention core
        s = (q @ k.transpose(-2, -1)).masked_fill(mask, float("-inf"))  # (B, H, T, T)
        return torch.softmax(s / k.shape[-1] ** 0.5, dim=-1) @ v

    fn = {"flash_attention": lambda: flash_attention(q, k, v, causal=True),
          "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
          "book": lambda: book(q, k, v)}[impl]

    def run():
        out = fn()
        out.sum().backward()
        return out

    out = benchmark(run)
    assert out.shape == (B, 4, T, 32)


@pytest.mark.benchmark(group="layer_norm fwd+bwd 256x768 fp32")
@pytest.mark.parametrize("impl", ["kernels", "torch"])
def test_layer_norm_fwd_bwd(benchmark, impl):
    from kernels import layer_norm

    x = torch.randn(256, 768, requires_grad=True)
    w, b = torch.ones(768, requires_grad=True), torch.zeros(768, requires_grad=True)
    fn = layer_norm if impl == "kernels" else (lambda x, w, b, eps: F.layer_norm(x, (768,), w, b, eps))

    def run():
        y = fn(x, w, b, 1e-5)
        y.sum().backward()
        return y

    assert benchmark(run).shape == (256, 768)


@pytest.mark.benchmark(group="gelu fwd+bwd 256x3072 fp32")
@pytest.mark.parametrize("impl", ["kernels", "torch"])
def test_gelu_fwd_bwd(benchmark, impl):
    from kernels import gelu

    x = torch.randn(256, 3072, requires_grad=True)
    fn = gelu if impl == "kernels" else (lambda x: F.gelu(x, approximate="tanh"))

    def run():
        y = fn(x)
        y.sum().backward()
        return y

    assert benchmark(run).shape == (256, 3072)


@pytest.mark.benchmark(group="generate tiny 32 tokens fp32")
@pytest.mark.parametrize("impl", ["fused+cache", "fused", "reference"])
def test_generate(benchmark, impl):
    from gpt.config import GPTConfig
    from gpt.generate import generate
    from gpt.model import GPTModel
    from gpt.reference import GPTModel as RefModel

    cfg = GPTConfig.from_preset("tiny", drop_rate=0.0)
    model = (RefModel if impl == "reference" else GPTModel)(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    out = benchmark(lambda: generate(model, idx, 32, use_cache=impl == "fused+cache"))
    assert out.shape == (1, 40)
