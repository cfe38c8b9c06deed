"""from_pretrained and the GPT-2 config options that change attention scaling (issue 13, item 5).

``scale_attn_by_inverse_layer_idx=True`` and ``scale_attn_weights=False`` change Hugging Face's logits
and the model has no such scaling: they are refused with a clear WeightsError naming the option.
``reorder_and_upcast_attn=True`` only computes HF's scores and softmax in fp32 (scale applied before
the product), which this model's attention always does: accepted, and the logits match HF's eager
path, the only one where the option takes effect.
"""

from __future__ import annotations

import pytest
import torch

import gpt
from gpt.reference import GPTModel as ReferenceGPT
from gpt.weights import WeightsError

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")


def _hf(tmp_path, **options):
    """A small random GPT-2 with the given options, saved with save_pretrained; (model, folder)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=3, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", **options)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and norms, and q/k big enough that the score scale matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.1 if name.endswith("bias") else 1.0)
            elif name.endswith("c_attn.weight"):
                p.normal_(0, 0.3)
    folder = tmp_path / "hf"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _idx():
    return torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("option, match", [
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ({"scale_attn_weights": False}, "scale_attn_weights=False"),
], ids=["inverse_layer_idx", "no_scale"])
def test_scaling_options_are_refused(tmp_path, option, match):
    hf, folder = _hf(tmp_path, **option)
    plain, _ = _hf(tmp_path / "plain")
    with torch.no_grad():  # the option really changes HF's logits (else refusing would be pointless)
        assert (hf(_idx()).logits - plain(_idx()).logits).abs().max() > 1e-2
    for cls in (gpt.GPTModel, ReferenceGPT):
        with pytest.raises(WeightsError, match=match):
            cls.from_pretrained(folder)


def test_reorder_and_upcast_attn_is_accepted_and_matches_hf(tmp_path):
    hf, folder = _hf(tmp_path, reorder_and_upcast_attn=True)
    assert hf.transformer.h[0].attn.reorder_and_upcast_attn and hf.config._attn_implementation == "eager"
    idx = _idx()
    with torch.no_grad():
        theirs = hf(idx).logits
        for cls in (gpt.GPTModel, ReferenceGPT):
            ours = cls.from_pretrained(folder)(idx)
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
