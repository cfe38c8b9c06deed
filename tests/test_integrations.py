"""kernels.register_hf_attention and kernels.replace_modules inside models we did not write
(transformers' GPT-2 against its own eager attention), on both CPU kernel paths."""

import copy
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

import kernels
import kernels.integrations as integ

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
NAME = kernels.register_hf_attention()


def _gpt2(impl, seed=0, **cfg):
    torch.manual_seed(seed)
    base = dict(vocab_size=97, n_positions=48, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    config = transformers.GPT2Config(**{**base, **cfg})
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random biases/norms so every path matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.1 if name.endswith("bias") else 1.0)
    model.set_attn_implementation(impl)
    return model


@pytest.fixture(scope="module")
def pair():
    eager = _gpt2("eager")
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(NAME)
    assert eager.config._attn_implementation == "eager" and ours.config._attn_implementation == NAME
    return eager, ours


@pytest.fixture
def spy():
    """Records why each attention call did not run the kernel (None: it ran the kernel)."""
    reasons = []
    real = integ._kernel_reason

    def record(*args, **kwargs):
        reasons.append(real(*args, **kwargs))
        return reasons[-1]

    with mock.patch.object(integ, "_kernel_reason", record):
        yield reasons


def test_importing_kernels_does_not_import_transformers():
    code = "import sys, kernels; kernels.replace_modules(kernels.LayerNorm(4)); assert 'transformers' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, TRITON_INTERPRET="0"))
    assert r.returncode == 0, r.stderr


def test_hf_gpt2_logits_and_grads_equal_eager(pair, spy, kernel_path):
    eager, ours = pair
    idx = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(1))
    out_e, out_o = eager(idx, labels=idx), ours(idx, labels=idx)
    assert spy == [None, None]  # both layers ran the kernel
    torch.testing.assert_close(out_o.logits, out_e.logits, atol=1e-4, rtol=1e-4)
    ge = torch.autograd.grad(out_e.loss, list(eager.parameters()))
    go = torch.autograd.grad(out_o.loss, list(ours.parameters()))
    for (name, _), a, b in zip(eager.named_parameters(), go, ge):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


def test_padding_mask_runs_the_kernel_and_equals_eager(pair, spy, fallback_path):  # interpreter: test_hf_models
    eager, ours = pair
    idx = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(idx)
    mask[0, :6] = 0  # left padding in row 0
    with torch.no_grad():
        e, o = eager(idx, attention_mask=mask).logits, ours(idx, attention_mask=mask).logits
    assert spy == [None, None]  # unpadded to the varlen kernel (tests/test_hf_models.py checks it in depth)
    torch.testing.assert_close(o[1], e[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o[0, 6:], e[0, 6:], atol=1e-4, rtol=1e-4)
    spy.clear()
    with torch.no_grad():  # an all-ones mask is no padding: the kernel runs
        torch.testing.assert_close(ours(idx, attention_mask=torch.ones_like(idx)).logits, eager(idx).logits,
                                   atol=1e-4, rtol=1e-4)
    assert spy == [None, None]


def test_greedy_generate_equals_eager(pair, spy):
    eager, ours = pair
    prompt = torch.tensor([[5, 17, 42, 7, 3]])
    a = eager.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    b = ours.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert a.tolist() == b.tolist()
    assert spy and all(r is None for r in spy)  # prefill and the one-query decode steps ran the kernel


@pytest.mark.parametrize("case", ["head_dim_8", "cross_attention"])
def test_unsupported_cases_fall_back_and_equal_eager(case, spy):
    extra = {"n_embd": 32, "n_head": 4} if case == "head_dim_8" else {"add_cross_attention": True}
    eager = _gpt2("eager", **extra)
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(NAME)
    idx = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    kw = {}
    if case == "cross_attention":
        kw["encoder_hidden_states"] = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, **kw).logits, eager(idx, **kw).logits, atol=1e-4, rtol=1e-4)
    if case == "cross_attention":  # per block: self-attention on the kernel, cross-attention on SDPA
        assert spy[0::2] == [None, None] and all(r.startswith("not causal") for r in spy[1::2]), spy
    else:
        assert len(spy) == 2 and all(r.startswith("head_dim 8") for r in spy), spy


def _attn_inputs(B=2, H=4, Hkv=4, T=19, Tk=None, D=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hkv, Tk or T, D, generator=g)
    v = torch.randn(B, Hkv, Tk or T, D, generator=g)
    return q, k, v


def _sdpa(module, q, k, v, mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask, **kw)[0]


def test_direct_calls_masks_gqa_and_dropout(spy, kernel_path):
    module = nn.Module().eval()
    q, k, v = _attn_inputs()
    T = q.shape[2]
    causal_bool = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T), True = attend
    causal_float = torch.zeros(1, 1, T, T).masked_fill(~causal_bool, torch.finfo(torch.float32).min)
    reference = _sdpa(module, q, k, v, None, is_causal=True)
    for mask in (None, causal_bool, causal_float):  # a mask that is exactly causal still runs the kernel
        out, weights = integ.hf_flash_attention(module, q, k, v, mask, scaling=None)
        assert out.shape == (2, T, 4, 32) and weights is None
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    biased = causal_float + 0.5 * causal_bool  # an additive bias, not a mask: SDPA
    torch.testing.assert_close(integ.hf_flash_attention(module, q, k, v, biased)[0], _sdpa(module, q, k, v, biased))
    assert spy[:3] == [None, None, None] and spy[3].startswith("a 4-D attention mask"), spy

    qg, kg, vg = _attn_inputs(Hkv=2)  # grouped-query attention: 4 query heads share 2 key/value heads
    module.num_key_value_groups = 2
    torch.testing.assert_close(integ.hf_flash_attention(module, qg, kg, vg, None, scaling=0.3)[0],
                               _sdpa(module, qg, kg, vg, None, scaling=0.3), atol=1e-5, rtol=1e-5)
    del module.num_key_value_groups

    q1, k1, v1 = _attn_inputs(T=1, Tk=9)  # one query (decoding) sees every key
    torch.testing.assert_close(integ.hf_flash_attention(module, q1, k1, v1, None)[0],
                               _sdpa(module, q1, k1, v1, None), atol=1e-5, rtol=1e-5)

    no_drop = integ.hf_flash_attention(module, q, k, v, None, dropout=0.5)[0]  # eval: dropout ignored
    torch.testing.assert_close(no_drop, reference, atol=1e-5, rtol=1e-5)
    module.train()
    torch.manual_seed(0)
    dropped = integ.hf_flash_attention(module, q, k, v, None, dropout=0.5)[0]
    assert not torch.allclose(dropped, reference, atol=1e-3)
    torch.manual_seed(0)
    torch.testing.assert_close(integ.hf_flash_attention(module, q, k, v, None, dropout=0.5)[0], dropped)
    assert all(r is None for r in spy[4:])


def test_register_rejects_bad_names():
    for bad in ("", "sdpa", "eager", "my_flash", "org/repo", "paged|x", 3):
        with pytest.raises(ValueError, match="name"):
            kernels.register_hf_attention(bad)
    assert kernels.register_hf_attention("ours_test") == "ours_test"
    assert "ours_test" in transformers.AttentionInterface._global_mapping


class _SubLN(nn.LayerNorm):  # a subclass with its own behaviour must not be swapped
    def forward(self, x):
        return super().forward(x) * 2


def _toy():
    torch.manual_seed(0)
    shared = nn.LayerNorm(16)
    model = nn.Sequential(
        nn.Linear(8, 16), shared, nn.GELU(approximate="tanh"), nn.Linear(16, 16),
        nn.Sequential(nn.LayerNorm(16, eps=1e-3, elementwise_affine=False), nn.GELU(), shared),
        _SubLN(16), nn.LayerNorm(16, bias=False), nn.Linear(16, 4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weight" in name and p.dim() == 1:
                p.normal_(1.0, 0.3)
            elif "bias" in name:
                p.normal_(0.0, 0.3)
    return model


def test_replace_modules_same_outputs_grads_and_parameters(kernel_path):
    model = _toy()
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(1))
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    params = list(model.parameters())
    assert kernels.replace_modules(model) is model
    assert [type(m).__name__ for m in model] == ["Linear", "LayerNorm", "GELU", "Linear", "Sequential", "_SubLN",
                                                 "LayerNorm", "Linear"]
    assert isinstance(model[1], kernels.LayerNorm) and isinstance(model[2], kernels.GELU)
    assert model[4][2] is model[1]  # shared stays shared
    assert model[4][0].eps == 1e-3 and model[4][0].weight is None and model[4][1].approximate == "none"
    assert model[2].approximate == "tanh" and type(model[5]) is _SubLN and model[6].bias is None
    assert all(a is b for a, b in zip(model.parameters(), params))  # the same Parameter objects
    out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out.square().sum(), list(model.parameters())), ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_replace_modules_options_and_errors():
    model = _toy()
    kernels.replace_modules(model, layer_norm=False)
    assert type(model[1]) is nn.LayerNorm and isinstance(model[2], kernels.GELU)
    model = _toy().double()
    kernels.replace_modules(model, gelu=False)
    assert type(model[1]) is nn.LayerNorm and type(model[2]) is nn.GELU  # float64: no kernel path, left alone
    with pytest.raises(TypeError, match="model"):
        kernels.replace_modules("model")
    with pytest.raises(TypeError, match="gelu must be a bool"):
        kernels.replace_modules(nn.Linear(2, 2), gelu="yes")


def test_hf_gpt2_after_swap_equals_before(kernel_path):
    eager = _gpt2("eager", seed=3)
    swapped = kernels.replace_modules(copy.deepcopy(eager))
    swapped.set_attn_implementation(NAME)
    kinds = {type(m).__name__ for m in swapped.modules()}
    assert "NewGELUActivation" not in kinds and {"GELU", "LayerNorm"} <= kinds
    assert sum(isinstance(m, kernels.LayerNorm) for m in swapped.modules()) == 5  # 2 per block + ln_f
    idx = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(swapped(idx).logits, eager(idx).logits, atol=1e-4, rtol=1e-4)


def test_docs_integrations_page_runs(tmp_path, monkeypatch, capsys):
    """docs/integrations.md, executed: its python blocks in one namespace, its `python -m gpt.export` lines
    through the CLI's main(), each output checked against the ```text block after it (tests/utils.py's
    rules, as for the guide: lines in order, `...` any text, `~1.0` any number). Twice in the same folder:
    a user re-runs a page (the export into the now non-empty folder once failed the second time)."""
    import contextlib
    import io
    import shlex

    from gpt.cli.export import main as export_main
    from tests.utils import check_output, parse_markdown

    doc = ROOT / "docs" / "integrations.md"
    sections = parse_markdown(doc.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as a user's CPU runs them
    for attempt in ("first run", "re-run"):
        ns: dict = {"__name__": "__docs__"}
        ran = 0
        for section in sections:
            for block in section.blocks:
                where = f"{doc.name}:{block.line} ({section.title}, {attempt})"
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    if block.lang == "python":
                        exec(compile("\n" * (block.line - 1) + block.code, str(doc), "exec"), ns)
                    else:
                        for cmd in block.code.splitlines():
                            argv = shlex.split(cmd.removeprefix("$ "), comments=True)
                            if argv[:3] == ["python", "-m", "gpt.export"]:
                                assert export_main(argv[3:]) == 0, where
                ran += 1
                if block.expected is not None:
                    check_output(buf.getvalue(), block.expected, where)
        assert ran >= 5
    assert "docs/integrations.md" in (ROOT / "README.md").read_text(encoding="utf-8")
