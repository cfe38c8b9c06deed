"""Config presets and the book's reference model: parameter counts, state_dict names, behaviour."""

import pytest
import torch

from gpt.config import GPT_CONFIG_124M, GPTConfig
from gpt.reference import GPTModel


def test_book_parameter_count():
    model = GPTModel(GPT_CONFIG_124M)  # the book's dict
    assert sum(p.numel() for p in model.parameters()) == 163_009_536
    # without the separate output head: the 124M of GPT-2's name
    assert sum(p.numel() for p in model.parameters()) - model.out_head.weight.numel() == 124_412_160


@pytest.mark.parametrize("name,params", [("gpt2-medium", 406_212_608), ("gpt2-large", 838_220_800),
                                         ("gpt2-xl", 1_637_792_000)])
def test_preset_parameter_counts(name, params):
    # Count from shapes on the meta device: no memory for the big models.
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset(name))
    assert sum(p.numel() for p in model.parameters()) == params


def test_presets_and_dict_equivalence():
    assert GPTConfig.from_preset("gpt2-small") == GPTConfig.from_dict(GPT_CONFIG_124M)
    tiny = GPTConfig.from_preset("tiny")
    assert tiny.context_length == 128 and 2 <= tiny.n_layers <= 4
    assert GPTConfig.from_preset("tiny", drop_rate=0.2).drop_rate == 0.2
    assert GPTConfig.coerce(tiny.to_dict()) == tiny


@pytest.mark.parametrize("bad,match", [
    (lambda: GPTConfig.from_preset("gpt5"), "unknown preset 'gpt5'"),
    (lambda: GPTConfig.from_dict({**GPT_CONFIG_124M, "emb_dimm": 3}), "unknown GPT config key"),
    (lambda: GPTConfig(emb_dim=100, n_heads=12), "divisible by n_heads"),
    (lambda: GPTConfig(drop_rate=1.5), "drop_rate"),
    (lambda: GPTConfig(n_layers=0), "n_layers"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_coerce_type_error():
    with pytest.raises(TypeError, match="GPTConfig or a dict"):
        GPTConfig.coerce([1, 2])


def test_state_dict_names():
    model = GPTModel(GPTConfig.from_preset("tiny", n_layers=2, qkv_bias=True))
    keys = set(model.state_dict())
    expected = {"tok_emb.weight", "pos_emb.weight", "final_norm.scale", "final_norm.shift", "out_head.weight"}
    for i in range(2):
        p = f"trf_blocks.{i}."
        for lin in ("W_query", "W_key", "W_value", "out_proj"):
            expected |= {p + f"att.{lin}.weight", p + f"att.{lin}.bias"}
        for j in (0, 2):
            expected |= {p + f"ff.layers.{j}.weight", p + f"ff.layers.{j}.bias"}
        for n in (1, 2):
            expected |= {p + f"norm{n}.scale", p + f"norm{n}.shift"}
    assert keys == expected


def test_book_checkpoint_with_mask_buffer_loads_strict():
    """A book checkpoint (with the derived ``mask`` buffer) loads strictly, every weight arrives, and the
    mask it carries is dropped, never trusted: a corrupted one (no masking at all) leaves the model causal."""
    cfg = GPTConfig.from_preset("tiny", n_layers=1)
    torch.manual_seed(0)
    src = GPTModel(cfg).eval()
    sd = src.state_dict()
    sd["trf_blocks.0.att.mask"] = torch.triu(torch.ones(128, 128), diagonal=1)  # as the book saves it
    torch.manual_seed(1)
    dst = GPTModel(cfg).eval()
    dst.load_state_dict(sd, strict=True)
    assert dst.state_dict().keys() == src.state_dict().keys()
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        want = src(idx)
        assert torch.equal(dst(idx), want)
        sd["trf_blocks.0.att.mask"] = torch.zeros(128, 128)  # no masking at all
        dst.load_state_dict(sd, strict=True)
        assert torch.equal(dst(idx), want)
        later = idx.clone()
        later[:, 5:] = (later[:, 5:] + 1) % cfg.vocab_size  # change only the later tokens
        assert torch.equal(dst(later)[:, :5], want[:, :5])  # earlier positions never see them


def test_forward_shape_causality_and_too_long():
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", n_layers=2)
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, cfg.vocab_size)
    idx2 = idx.clone()
    idx2[:, 7:] = (idx2[:, 7:] + 1) % cfg.vocab_size  # changing future tokens must not change the past
    torch.testing.assert_close(model(idx2)[:, :7], logits[:, :7])
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_layernorm_and_gelu_match_torch():
    from gpt.reference import GELU, LayerNorm

    x = torch.randn(4, 7, 32, dtype=torch.float64)
    ln = LayerNorm(32).double()
    with torch.no_grad():
        ln.scale.normal_()
        ln.shift.normal_()
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (32,), ln.scale, ln.shift, 1e-5))
    torch.testing.assert_close(GELU()(x), torch.nn.functional.gelu(x, approximate="tanh"))


def test_dropout_train_vs_eval():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", n_layers=1, drop_rate=0.5))
    idx = torch.randint(0, 1000, (1, 8))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))
