"""Pretrained-weight loading against transformers.GPT2LMHeadModel (random config, no download)."""

import json

import pytest
import torch

from gpt.reference import GPTModel
from gpt.weights import WeightsError, hf_to_state_dict

# These test the CLIs and the pipeline, not the kernels (tests/test_attention.py etc. do that):
# run the fused model on its PyTorch fallback, in-process and in subprocesses, to keep CI fast.
pytestmark = pytest.mark.usefixtures("fallback_path")

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _hf_model(seed=0, n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=101):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                  n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and norms so a mapping mistake cannot hide behind zeros/ones
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.1 if name.endswith("bias") else 1.0)
    return model


@pytest.fixture(scope="module")
def hf_model():
    return _hf_model()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, hf_model):
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf_model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_folder_logits_match_hf(hf_model, hf_folder):
    model = GPTModel.from_pretrained(hf_folder)
    assert model.cfg.qkv_bias and model.cfg.n_layers == 2 and model.cfg.context_length == 32
    idx = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.out_head.weight, model.tok_emb.weight)  # tied values


def test_greedy_tokens_match_hf_generate(hf_model, hf_folder):
    from gpt import generate

    model = GPTModel.from_pretrained(hf_folder)
    prompt = torch.tensor([[5, 17, 42, 7]])
    ours = generate(model, prompt, 12, use_cache=False)
    theirs = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt),
                               pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_bare_safetensors_without_prefix(tmp_path, hf_model):
    """The no-prefix layout (keys like ``h.0.attn.c_attn.weight``), as a bare file with no config."""
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf_model.state_dict().items()
          if k != "lm_head.weight"}
    assert "wte.weight" in sd and not any(k.startswith("transformer.") for k in sd)
    path = tmp_path / "gpt2-tiny.safetensors"
    safetensors_torch.save_file(sd, str(path))
    with pytest.raises(WeightsError, match="number of heads"):  # width 64 is no GPT-2 release
        GPTModel.from_pretrained(path)
    model = GPTModel.from_pretrained(path, n_heads=4)
    idx = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-4, rtol=1e-4)


def test_shape_mismatch_names_the_tensor(tmp_path, hf_model, hf_folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["n_embd"] = 32  # config says 32 wide, tensors are 64 wide
    cfg["n_head"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"c_attn\.weight|tok_emb\.weight"):
        GPTModel.from_pretrained(bad)


def test_missing_tensor_is_named(hf_model):
    from gpt.weights import hf_config_to_gpt

    cfg = hf_config_to_gpt(hf_model.config.to_dict())
    sd = dict(hf_model.state_dict())
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(WeightsError, match=r"h\.1\.mlp\.c_fc\.bias"):
        hf_to_state_dict(sd, cfg)


def test_own_checkpoint_and_run_folder(tmp_path):
    from gpt.checkpoint import save_checkpoint
    from gpt.config import GPTConfig

    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.1)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    save_checkpoint(tmp_path / "ckpt-last.pt", model, step=3)
    for source in (tmp_path / "ckpt-last.pt", tmp_path):
        loaded = GPTModel.from_pretrained(source)
        assert loaded.cfg == cfg and not loaded.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k]), k


def test_bad_sources(tmp_path):
    with pytest.raises(WeightsError, match="not a file, a folder or a model name"):
        GPTModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(WeightsError, match="neither model.safetensors"):
        GPTModel.from_pretrained(tmp_path)


def test_model_name_offline_is_a_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="cannot download 'gpt2'"):
        GPTModel.from_pretrained("gpt2")
