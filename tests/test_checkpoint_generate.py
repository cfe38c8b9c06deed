"""Checkpoint round trip and corruption; uncached generation semantics."""

import random

import numpy as np
import pytest
import torch

from gpt import generate
from gpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gpt.config import GPTConfig
from gpt.generate import sample_next_token
from gpt.reference import GPTModel

# These test the CLIs and the pipeline, not the kernels (tests/test_attention.py etc. do that):
# run the fused model on its PyTorch fallback, in-process and in subprocesses, to keep CI fast.
pytestmark = pytest.mark.usefixtures("fallback_path")

CFG = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


def _model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(CFG)


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    opt.step()
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path / "run" / "ckpt.pt", model, optimizer=opt, step=42, extra={"tokens": 10})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    assert not list((tmp_path / "run").glob("*.tmp"))  # temp file renamed away

    model2 = _model(seed=1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    ckpt = load_checkpoint(path, model2, optimizer=opt2, restore_rng=True)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # RNG restored
    assert ckpt["step"] == 42 and ckpt["extra"] == {"tokens": 10}
    assert GPTConfig.from_dict(ckpt["config"]) == CFG
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)


def test_checkpoint_unwraps_compiled_model(tmp_path):
    model = _model()
    wrapped = torch.compile(model)  # no call: only the wrapper matters
    save_checkpoint(tmp_path / "c.pt", wrapped)
    keys = set(torch.load(tmp_path / "c.pt", weights_only=True)["model"])
    assert keys == set(model.state_dict())


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path / "c.pt", model, step=1)
    good = path.read_bytes()

    class Boom:  # not picklable by torch.save
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, model, step=2, extra={"x": Boom()})
    assert path.read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    path = save_checkpoint(tmp_path / "c.pt", _model())
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")


# ------------------------------------------------------------------------------------------ generate
def _book_generate_simple(model, idx, max_new_tokens, context_size):
    """The book's chapter-4 greedy loop, verbatim in spirit."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        idx_next = torch.argmax(logits[:, -1, :], dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def test_greedy_matches_book_loop_past_context():
    model = _model().eval()
    idx = torch.randint(0, 64, (2, 5))
    out = generate(model, idx, 20, use_cache=False)  # 25 tokens > context 16: sliding window
    assert out.shape == (2, 25)
    assert torch.equal(out, _book_generate_simple(model, idx, 20, 16))
    assert torch.equal(out[:, :5], idx)


def test_top_k_1_is_greedy_and_seed_reproducible():
    model = _model().eval()
    idx = torch.randint(0, 64, (1, 4))
    greedy = generate(model, idx, 8)
    assert torch.equal(generate(model, idx, 8, temperature=1.0, top_k=1), greedy)
    a = generate(model, idx, 8, temperature=1.5, top_k=20, generator=torch.Generator().manual_seed(3))
    b = generate(model, idx, 8, temperature=1.5, top_k=20, generator=torch.Generator().manual_seed(3))
    c = generate(model, idx, 8, temperature=1.5, top_k=20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next_token(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {0, 1}
    # softmax of these: [0.636, 0.234, 0.086, ...]; top_p=0.8 keeps the first two tokens only
    picks = {sample_next_token(logits, temperature=1.0, top_p=0.8, generator=g).item() for _ in range(300)}
    assert picks == {0, 1}
    picks = {sample_next_token(logits, temperature=1.0, top_p=0.5, generator=g).item() for _ in range(50)}
    assert picks == {0}


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next_token(logits.expand(1000, 3), temperature=1.0, generator=g)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / 1000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.05, rtol=0)


def test_eos_stop():
    model = _model().eval()
    idx = torch.randint(0, 64, (1, 4))
    full = generate(model, idx, 10)
    eos = full[0, 6].item()  # the third generated token becomes "end of text"
    first = (full[0, 4:] == eos).nonzero()[0].item()
    out = generate(model, idx, 10, eos_id=eos)
    assert torch.equal(out, full[:, :4 + first])  # stops before appending eos (the book's rule)


def test_eos_pads_finished_rows_in_a_batch():
    model = _model().eval()
    idx = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(2))
    full = generate(model, idx, 10)
    eos = full[0, 5].item()
    out = generate(model, idx, 10, eos_id=eos)
    row0 = out[0, 4:].tolist()
    k = row0.index(eos)
    assert all(t == eos for t in row0[k:])
    assert out[0, :4 + k].tolist() == full[0, :4 + k].tolist()


def test_generate_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="idx must be"):
        generate(model, torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="at least one"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.zeros(1, 1, dtype=torch.long), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.zeros(1, 1, dtype=torch.long), 2, temperature=1.0, top_p=1.5)


def test_generate_restores_training_mode():
    model = _model().train()
    generate(model, torch.zeros(1, 2, dtype=torch.long), 2)
    assert model.training


def test_generate_cli(tmp_path):
    import subprocess
    import sys

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1))
    save_checkpoint(tmp_path / "m.pt", model)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gpt.generate", *args], capture_output=True, text=True,
                              timeout=120)

    r = cli("--init", str(tmp_path / "m.pt"), "--prompt", "Every effort moves you", "--max-new-tokens", "5",
            "--backend", "reference", "--seed", "1", "--temperature", "1.0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Every effort moves you") and "tokens/s" in r.stderr
    assert "RuntimeWarning" not in r.stderr
    r = cli("--init", str(tmp_path / "missing.pt"), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = cli("--init", str(tmp_path / "m.pt"), "--prompt", " ")
    assert r.returncode == 2 and "prompt is empty" in r.stderr
