"""gpt.export: our models in the Hugging Face GPT-2 layout, loaded by transformers (logits, token ids),
read back exactly by from_pretrained, classifiers as GPT2ForSequenceClassification, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.cli.export import main
from gpt.config import GPTConfig
from gpt.export import ExportError, bpe_files_from_ranks, export_state_dict
from gpt.model import GPTModel as FusedGPT
from gpt.reference import GPTModel

# These test the export, not the kernels: the fused model runs its PyTorch fallback.
pytestmark = pytest.mark.usefixtures("fallback_path")

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
CFG = GPTConfig(vocab_size=50257, context_length=48, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.1)
SAMPLE = "Héllo wörld — naïve café 你好 🚀 <|endoftext|> tabs\tand  spaces\n\n  'quoted' don't 1234.5"


def _random_model(cls=GPTModel, cfg=CFG, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(cfg, **kw).eval()
    with torch.no_grad():  # non-trivial norms and biases so a mapping mistake cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if name.endswith(("scale", "shift", "bias")):
                p.normal_(0.5 if name.endswith("scale") else 0.0, 0.2)
    return model


def _ids(seed=1, shape=(2, 41), vocab=50257):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    model = _random_model()
    folder = model.save_pretrained(tmp_path_factory.mktemp("export") / "untied")
    return model, folder


def test_transformers_loads_untied_export_with_equal_logits(untied):
    model, folder = untied
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["qkv_bias"] is False and cfg["attn_pdrop"] == 0.1
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()  # untied stays untied
    assert not hf.transformer.h[0].attn.c_attn.bias.any()  # qkv_bias=False -> zeros
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)


def test_hf_tokenizer_matches_tiktoken(untied):
    from gpt.tokenizer import get_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(untied[1])
    ours = get_tokenizer().encode(SAMPLE, allowed_special="all")
    assert tok(SAMPLE)["input_ids"] == ours
    assert tok.decode(ours) == SAMPLE and tok.eos_token_id == 50256


def test_round_trip_is_exact_for_both_classes(untied):
    model, folder = untied
    for cls in (GPTModel, FusedGPT):
        back = cls.from_pretrained(folder)
        assert back.cfg == CFG.replace(drop_rate=0.0)  # dropout is a training setting, not exported weights
        assert back.out_head.weight is not back.tok_emb.weight
        sd, sd_back = model.state_dict(), back.state_dict()
        assert sd.keys() == sd_back.keys()
        for k in sd:
            assert torch.equal(sd[k], sd_back[k]), k


def test_qkv_biases_trained_after_export_are_kept(untied, tmp_path):
    model, folder = untied
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hf.transformer.h[1].attn.c_attn.bias.normal_(0, 0.3)  # e.g. finetuned in transformers
    hf.save_pretrained(tmp_path / "tuned")
    back = GPTModel.from_pretrained(tmp_path / "tuned")
    assert back.cfg.qkv_bias  # config still says qkv_bias false, but the biases are not zero
    idx = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(back(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_tied_model_exports_tied(tmp_path):
    model = _random_model(FusedGPT, CFG.replace(qkv_bias=True), tie_weights=True)
    folder = model.save_pretrained(tmp_path / "tied")
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    idx = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
    back = GPTModel.from_pretrained(folder)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_cli_exports_a_short_training_run(tmp_path, capsys):
    model = _random_model(FusedGPT, CFG.replace(drop_rate=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = _ids(4, (2, 17))
    for _ in range(3):  # a short training run: a few optimizer steps, then the run folder's checkpoint
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(tmp_path / "run" / "ckpt-last.pt", model.eval(), optimizer=opt, step=3)
    assert main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_classifier_exports_as_sequence_classification(tmp_path):
    from gpt.finetune.classify import PAD_ID, make_classifier

    model = make_classifier(_random_model(), 3).eval()
    with torch.no_grad():
        model.out_head.bias.normal_(0, 1.0)  # GPT2ForSequenceClassification's score has no bias: folded
    save_checkpoint(tmp_path / "ckpt-best.pt", model, extra={"task": "classify", "labels": ["ham", "spam", "x"]})
    assert main([str(tmp_path / "ckpt-best.pt"), str(tmp_path / "hf")]) == 0
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == {0: "ham", 1: "spam", 2: "x"}
    idx = _ids(5, (6, 20))
    idx[:3, 12:] = PAD_ID  # the book pads on the right with <|endoftext|> and reads the last position
    with torch.no_grad():
        ours, theirs = model(idx)[:, -1, :], hf(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert theirs.argmax(-1).tolist() == ours.argmax(-1).tolist()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.pad_token_id == PAD_ID and tok.padding_side == "right"


def test_bad_inputs_leave_nothing_behind(tmp_path):
    model = _random_model()
    sd = model.state_dict()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        model.save_pretrained(busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        model.save_pretrained(tmp_path / "file")
    broken = dict(sd, **{"trf_blocks.1.ff.layers.0.weight": torch.full_like(sd["trf_blocks.1.ff.layers.0.weight"],
                                                                             float("nan"))})
    with pytest.raises(ExportError, match=r"trf_blocks\.1\.ff\.layers\.0\.weight.*NaN"):
        export_state_dict(broken, CFG, tmp_path / "nan")
    with pytest.raises(ExportError, match="missing"):
        export_state_dict({k: v for k, v in sd.items() if "norm2" not in k}, CFG, tmp_path / "missing")
    small = _random_model(cfg=CFG.replace(vocab_size=101))
    with pytest.raises(ExportError, match="tokenizer"):
        small.save_pretrained(tmp_path / "small")
    with pytest.raises(ExportError, match="labels"):
        model.save_pretrained(tmp_path / "labels", labels=["a", "b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "file"]  # nothing written, no temp folders
    small.save_pretrained(tmp_path / "small", tokenizer=False)
    assert not (tmp_path / "small" / "vocab.json").exists()


def test_force_replaces_an_old_export(untied, tmp_path):
    model, _ = untied
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("pytorch_model.bin", "tokenizer.json", "model.safetensors"):
        (out / stale).write_text("stale")
    (out / "README.md").write_text("mine")
    model.save_pretrained(out, force=True)
    names = {p.name for p in out.iterdir()}
    assert "pytorch_model.bin" not in names and "tokenizer.json" not in names and "README.md" in names
    back = GPTModel.from_pretrained(out)
    assert torch.equal(back.out_head.weight, model.out_head.weight)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a file, a folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o1").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    save_checkpoint(tmp_path / "c.pt", _random_model(cfg=CFG.replace(n_layers=1)), rng=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "gpt.export", str(tmp_path / "c.pt"), str(tmp_path / "full")],
                       capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not empty" in r.stderr, r.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


def _shipped_bpe():
    from gpt import tokenizer

    folder = getattr(tokenizer, "ASSETS", None)
    if folder is None or not (Path(folder) / "vocab.bpe").is_file():
        pytest.skip("no GPT-2 BPE files shipped in the package")
    return json.loads((Path(folder) / "encoder.json").read_text()), (Path(folder) / "vocab.bpe").read_text("utf-8")


def test_bpe_files_rebuilt_from_tiktoken_ranks_prefix():
    """The offline fallback (no BPE files): vocab.json/merges.txt rebuilt from tiktoken's ranks equal
    GPT-2's files (the first 3000 tokens here; all of them in the slow test)."""
    from gpt.tokenizer import get_tokenizer

    encoder, merges = _shipped_bpe()
    ranks = {t: r for t, r in get_tokenizer()._mergeable_ranks.items() if r < 3000}
    vocab, rebuilt = bpe_files_from_ranks(ranks)
    assert rebuilt.splitlines() == merges.splitlines()[:3000 - 256 + 1]
    assert json.loads(vocab) == {t: r for t, r in encoder.items() if r < 3000 or r == 50256}


@pytest.mark.slow
def test_export_without_bpe_files_rebuilds_them(untied, tmp_path, monkeypatch):
    import gpt.export as E
    from gpt.tokenizer import get_tokenizer

    encoder, merges = _shipped_bpe()
    monkeypatch.setattr(E, "_bpe_folder", lambda: None)
    folder = untied[0].save_pretrained(tmp_path / "rebuilt")
    assert (folder / "merges.txt").read_text("utf-8") == merges
    assert json.loads((folder / "vocab.json").read_text("utf-8")) == encoder
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok(SAMPLE)["input_ids"] == get_tokenizer().encode(SAMPLE, allowed_special="all")


@pytest.mark.parametrize("marker", ["ckpt-last.pt", "metrics.jsonl", ".lock"])
def test_force_refuses_a_training_run_folder(untied, tmp_path, marker):
    """--force into a run folder (``export runs/x runs/x --force``) overwrote the run's config.json (its
    stored arguments): the run could no longer be resumed."""
    model, _ = untied
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"command": "pretrain", "args": {}}')
    (run / marker).write_text("")
    with pytest.raises(ExportError, match="training run"):
        model.save_pretrained(run, force=True)
    assert json.loads((run / "config.json").read_text())["args"] == {}
    assert {p.name for p in run.iterdir()} == {"config.json", marker}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_export_permissions_follow_the_umask(tmp_path, umask):
    """An export is meant to be shared: the folder and files get the modes mkdir/open give under the
    process umask (it was mkdtemp's private 0700 folder and a 0600 model.safetensors), also with --force."""
    import stat

    model = _random_model(cfg=GPTConfig(vocab_size=50257, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    old = os.umask(umask)
    try:
        fresh = model.save_pretrained(tmp_path / "fresh")
        (tmp_path / "again").mkdir()
        (tmp_path / "again" / "notes.txt").write_text("kept")
        forced = model.save_pretrained(tmp_path / "again", force=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o777 & ~umask
    for folder in (fresh, forced):
        files = [p for p in folder.iterdir() if p.name != "notes.txt"]
        assert "model.safetensors" in {p.name for p in files}
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, (p.name, oct(p.stat().st_mode))


def test_cli_export_converts_tensors_without_building_a_model(tmp_path, monkeypatch):
    """Re-exporting a Hugging Face folder (or a model name) converts the state_dict directly: building a
    model to read its state_dict back allocated every parameter a second time (1.5B for gpt2-xl)."""
    from safetensors.torch import load_file

    cfg = CFG.replace(vocab_size=300, drop_rate=0.0)
    src = export_state_dict(_random_model(cfg=cfg).state_dict(), cfg, tmp_path / "src", tokenizer=False)

    def refuse(self, *a, **k):
        raise AssertionError("a model was built to export a state_dict")

    monkeypatch.setattr(GPTModel, "__init__", refuse)
    monkeypatch.setattr(FusedGPT, "__init__", refuse)
    assert main([str(src), str(tmp_path / "out"), "--no-tokenizer"]) == 0
    want, got = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
