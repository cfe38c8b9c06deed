"""kernels.replace_modules on transformers' Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2):
tiny random models equal themselves after the swap (fp32 within 1e-5: logits, every parameter's
gradient, greedy generate tokens; state_dict keys unchanged), on both CPU kernel paths."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kernels

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_act="silu", mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_act="silu")),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_act="silu")),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(hidden_act="silu")),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(hidden_activation="gelu_pytorch_tanh",
                                                         final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
                                                         query_pre_attn_scalar=16, sliding_window=8)),
}
# Norms per model: 2 per layer + the final one (Qwen3: + q_norm, k_norm per layer; Gemma2: 4 per layer).
NORMS = {"llama": 5, "mistral": 5, "qwen2": 5, "qwen3": 9, "gemma": 5, "gemma2": 9}


def _model(family, seed=0):
    cfg_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(**{**COMMON, **extra})
    config._attn_implementation = "eager"
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random norm weights (and biases) so every scale matters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if family.startswith("gemma") or name.endswith("bias") else 1.0, 0.3)
    return model


def _swap(model):
    swapped = kernels.replace_modules(copy.deepcopy(model))
    kinds = [type(m) for m in swapped.modules()]
    return swapped, kinds


def _loss_grads(model, idx):
    model.zero_grad(set_to_none=True)
    out = model(idx, labels=idx)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check(family, *, generate=True):
    before = _model(family)
    after, kinds = _swap(before)
    assert kinds.count(kernels.RMSNorm) == NORMS[family]
    assert kinds.count(kernels.GatedMLP) == 2
    assert not any(t.__name__.endswith(("RMSNorm", "MLP")) and t.__module__.startswith("transformers")
                   for t in kinds)
    assert list(after.state_dict()) == list(before.state_dict())
    if family.startswith("gemma"):
        assert {m.offset for m in after.modules() if isinstance(m, kernels.RMSNorm)} == {1.0}
        assert {m.activation for m in after.modules() if isinstance(m, kernels.GatedMLP)} == {"gelu_tanh"}
    idx = torch.randint(2, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    logits0, grads0 = _loss_grads(before, idx)
    logits1, grads1 = _loss_grads(after, idx)
    torch.testing.assert_close(logits1, logits0, atol=1e-5, rtol=1e-5)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-5, rtol=1e-5, msg=name)
    if generate:
        prompt = idx[:, :4]
        with torch.no_grad():
            want = before.generate(prompt, max_new_tokens=6, do_sample=False)
            got = after.generate(prompt, max_new_tokens=6, do_sample=False)
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_equals_itself_after_replace_modules(fallback_path, family):
    _check(family)


@pytest.mark.parametrize("kernel_path", ["interpreter"], indirect=True)  # (the fallback: the test above)
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_family_equals_itself_on_the_interpreted_kernels(kernel_path, family):
    _check(family, generate=family == "llama")


def test_replace_modules_parameters_options_and_unknown_modules():
    model = _model("llama")
    params = list(model.parameters())
    kernels.replace_modules(model, mlp=False)
    assert all(a is b for a, b in zip(model.parameters(), params))  # the same Parameter objects
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, kernels.RMSNorm) and type(layer.mlp).__name__ == "LlamaMLP"
    assert layer.input_layernorm.weight is params[[n for n, _ in _model("llama").named_parameters()].index(
        "model.layers.0.input_layernorm.weight")]
    model = kernels.replace_modules(_model("llama"), rms_norm=False)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm" and isinstance(model.model.layers[0].mlp, kernels.GatedMLP)

    # torch.nn.RMSNorm (eps None stays None), train mode carried over, a subclass and an unknown act left alone
    class MyNorm(nn.RMSNorm):
        pass

    cfg = transformers.LlamaConfig(**{**COMMON, "hidden_act": "relu"})
    relu_mlp = transformers.models.llama.modeling_llama.LlamaMLP(cfg)
    box = nn.Sequential(nn.RMSNorm(8).train(), MyNorm(8), relu_mlp, nn.RMSNorm((2, 4), eps=1e-3).double())
    kernels.replace_modules(box)
    assert isinstance(box[0], kernels.RMSNorm) and box[0].eps is None and box[0].training
    assert type(box[1]) is MyNorm and box[2] is relu_mlp and type(box[3]) is nn.RMSNorm  # (float64: no kernel)
    x = torch.randn(3, 8)
    torch.testing.assert_close(box[0](x), nn.functional.rms_norm(x, (8,), box[0].weight), atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="rms_norm must be a bool"):
        kernels.replace_modules(box, rms_norm=1)
