"""gpt.generate_batch: every row equals its single-prompt ``generate``; scheduling, sampling, CLI, errors."""

import json
import math

import pytest
import torch
from torch import nn

from gpt import generate, generate_batch
from gpt.checkpoint import save_checkpoint
from gpt.cli.generate import main, read_prompts
from gpt.config import GPTConfig
from gpt.decoder import Decoder
from gpt.generate import sample_next_token
from gpt.model import GPTModel
from gpt.reference import GPTModel as RefModel

CTX = 32


def _models(n_layers=1, vocab=256):
    cfg = GPTConfig(vocab_size=vocab, context_length=CTX, emb_dim=32, n_heads=2, n_layers=n_layers, drop_rate=0.0)
    torch.manual_seed(0)
    ref = RefModel(cfg).eval()
    fused = GPTModel(cfg).eval()
    fused.load_state_dict(ref.state_dict())
    return fused, ref


def _prompts(lengths, vocab=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def _singles(model, prompts, n, **kw):
    """``generate`` on each prompt alone: its new tokens."""
    return [generate(model, p.view(1, -1), n, **kw)[0, p.numel():].tolist() for p in prompts]


# ----------------------------------------------------------------------------- equality with generate
def test_fused_rows_equal_single_generation(kernel_path):
    """Ragged prompts from 1 token to past the context, rows crossing the context while decoding
    (sliding window per row), per-row eos, batch sizes below (refill) and above the prompt count."""
    fused, _ = _models()
    if kernel_path == "interpreter":  # the interpreter is slow: fewer rows and tokens
        lengths, n, batch_sizes = [1, 7, 31, 40], 4, [2]
    else:
        lengths, n, batch_sizes = [1, 7, 30, 31, 32, 45, 12], 8, [3, 16]
    prompts = _prompts(lengths)
    eos = _singles(fused, prompts[1:2], n)[0][1]  # row 1 stops after one token
    want = _singles(fused, prompts, n, eos_id=eos)
    assert len(want[1]) == 1 and max(len(w) for w in want) == n
    for bs in batch_sizes:
        assert generate_batch(fused, [p.tolist() for p in prompts], n, eos_id=eos, batch_size=bs) == want, bs


def test_fused_equals_reference_model_batched(fallback_path):
    """Independent oracle: the book's reference model, uncached, one prompt at a time."""
    fused, ref = _models(n_layers=2)
    prompts = _prompts([2, 28, 33, 5])
    want = _singles(ref, prompts, 6, use_cache=False)
    assert generate_batch(fused, prompts, 6, batch_size=3) == want
    assert generate_batch(fused, prompts, 6, batch_size=3, use_cache=False) == want  # the recompute path


def test_reference_model_rows_equal_single_generation():
    _, ref = _models()
    prompts = _prompts([1, 7, 30, 32, 45, 3])
    eos = _singles(ref, prompts[2:3], 8, use_cache=False)[0][3]
    want = _singles(ref, prompts, 8, eos_id=eos, use_cache=False)
    assert len(want[2]) == 3 and max(len(w) for w in want) == 8
    for bs in (2, 20):
        assert generate_batch(ref, prompts, 8, eos_id=eos, batch_size=bs) == want, bs


def test_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=CTX, n_embd=32, n_layer=1, n_head=2)).eval()
    prompts = _prompts([3, 20, 40])
    assert generate_batch(hf, prompts, 6, batch_size=2) == _singles(hf, prompts, 6)


class _Successor(nn.Module):
    """A causal toy LM with no context limit: the next token is always ``last + 1 (mod V)``."""

    def __init__(self, vocab=50):
        super().__init__()
        self.vocab, self.calls = vocab, 0
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        self.calls += 1
        return nn.functional.one_hot((idx + 1) % self.vocab, self.vocab).float() + self.w  # (B, T, V)


def test_continuous_refill_schedule():
    """Row i stops after exactly k_i tokens (eos = 0 comes k_i + 1 steps after its last token), so the
    number of model calls shows that a finished row's slot is refilled at once."""
    model = _Successor()
    ks = [5, 1, 0, 3, 2, 4, 1]
    prompts = [[7, 49 - k] for k in ks]  # successor of 49 - k: k tokens, then 0 (eos)
    out = generate_batch(model, prompts, 10, eos_id=0, batch_size=2)
    assert out == [list(range(50 - k, 50)) for k in ks]
    # simulate slots: each row needs k + 1 steps; a freed slot takes the next prompt the next step
    slots, pending, steps = [], [k + 1 for k in ks], 0
    while pending or slots:
        while pending and len(slots) < 2:
            slots.append(pending.pop(0))
        slots = [s - 1 for s in slots if s > 1]
        steps += 1
    assert model.calls == steps == 12  # static batches of 2 would take 6 + 4 + 5 + 2 = 17
    model.calls = 0
    assert generate_batch(model, prompts, 2, eos_id=0, batch_size=3) == [list(range(50 - k, 50))[:2] for k in ks]


def test_each_prompt_prefilled_once_then_batched_decode(fallback_path, monkeypatch):
    """Inside the context each prompt is prefilled exactly once (the ones entering together in one
    packed call) and then decoded with the others."""
    fused, _ = _models()
    prompts = _prompts([4, 9, 2])
    want = _singles(fused, prompts, 5)
    prefills, decodes = [], []
    real_prefill, real_decode = Decoder.prefill_rows, Decoder.decode
    monkeypatch.setattr(Decoder, "prefill_rows", lambda self, seqs, rows, starts=None:
                        prefills.append([len(s) for s in seqs]) or real_prefill(self, seqs, rows, starts))
    monkeypatch.setattr(Decoder, "decode", lambda self, t, p: decodes.append(p.view(-1).tolist())
                        or real_decode(self, t, p))
    assert generate_batch(fused, prompts, 5, batch_size=3) == want
    assert prefills == [[4, 9, 2]]
    assert decodes == [[4 + i, 9 + i, 2 + i] for i in range(4)]  # every row at its own position


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_and_single():
    """On CUDA the ragged decode step is replayed from a CUDA graph: same tokens as eager and as alone."""
    fused, _ = _models(n_layers=2)
    fused = fused.cuda()
    prompts = [p.cuda() for p in _prompts([1, 7, 30, 31, 45, 12, 3])]
    want = _singles(fused, prompts, 10, cuda_graph=False)
    eos = want[1][3]
    want_eos = _singles(fused, prompts, 10, eos_id=eos, cuda_graph=False)
    assert generate_batch(fused, prompts, 10, batch_size=3, cuda_graph=False) == want
    assert generate_batch(fused, prompts, 10, batch_size=3, cuda_graph=True) == want
    assert generate_batch(fused, prompts, 10, batch_size=16, eos_id=eos) == want_eos  # graph by default
    g = [torch.Generator(device="cuda").manual_seed(3) for _ in range(2)]
    a = generate_batch(fused, prompts, 10, temperature=1.0, generator=g[0], batch_size=3, cuda_graph=True)
    assert a == generate_batch(fused, prompts, 10, temperature=1.0, generator=g[1], batch_size=3, cuda_graph=False)


# ------------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_reproducible(fallback_path):
    fused, _ = _models()
    prompts = _prompts([3, 40, 8, 1])

    def run(seed, bs=3, **kw):
        return generate_batch(fused, prompts, 6, temperature=1.3, generator=torch.Generator().manual_seed(seed),
                              batch_size=bs, **kw)

    a = run(11)
    assert a == run(11) and a != run(12)
    assert all(len(r) == 6 for r in a)
    assert run(11, top_k=1) == generate_batch(fused, prompts, 6, batch_size=3)  # top-k 1 is greedy
    eos = a[0][2]
    with_eos = run(11, eos_id=eos)
    assert with_eos == run(11, eos_id=eos) and all(eos not in r for r in with_eos)


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(4, 100) * 30
    got = sample_next_token(logits, temperature=1e-30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1, keepdim=True))


# --------------------------------------------------------------------------------------------- errors
def test_bad_arguments():
    _, ref = _models()
    ok = [[1, 2]]
    cases = [
        (TypeError, "prompts", dict(prompts="hello")),
        (TypeError, "prompts", dict(prompts=torch.zeros(3, dtype=torch.long))),
        (TypeError, r"prompts\[1\]", dict(prompts=[[1], "ab"])),
        (TypeError, r"prompts\[0\]", dict(prompts=[[1.0, 2.0]])),
        (ValueError, r"prompts\[1\] is empty", dict(prompts=[[1], []])),
        (ValueError, r"prompts\[0\].*-1", dict(prompts=[[3, -1]])),
        (ValueError, r"prompts\[0\].*256", dict(prompts=[[256]])),
        (ValueError, r"prompts\[0\]", dict(prompts=[torch.ones(2, 2, dtype=torch.long)])),
        (ValueError, r"prompts\[0\]", dict(prompts=[torch.ones(2)])),
        (ValueError, "max_new_tokens", dict(max_new_tokens=-1)),
        (ValueError, "max_new_tokens", dict(max_new_tokens=2.5)),
        (ValueError, "batch_size", dict(batch_size=0)),
        (ValueError, "batch_size", dict(batch_size=True)),
        (ValueError, "eos_id", dict(eos_id="x")),
        (ValueError, "temperature", dict(temperature=math.nan)),
        (ValueError, "temperature", dict(temperature=1e-45)),
        (ValueError, "temperature", dict(temperature=-1.0)),
        (ValueError, "top_k", dict(top_k=0)),
        (ValueError, "top_p", dict(top_p=1.5)),
        (ValueError, "cuda_graph", dict(cuda_graph=True)),
    ]
    for exc, match, kw in cases:
        args = {"prompts": ok, "max_new_tokens": 2, **kw}
        with pytest.raises(exc, match=match):
            generate_batch(ref, args.pop("prompts"), args.pop("max_new_tokens"), **args)
    assert generate_batch(ref, [[1], [2, 3]], 0) == [[], []]
    assert generate_batch(ref, [], 5) == []
    assert generate_batch(ref, torch.tensor([[1, 2], [3, 4]]), 2) == generate_batch(ref, [[1, 2], [3, 4]], 2)


def test_restores_training_mode():
    fused, ref = _models()
    for m in (fused.train(), ref.train()):
        generate_batch(m, [[1, 2]], 2, use_cache=True)
        assert m.training


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = RefModel(GPTConfig(vocab_size=50257, context_length=CTX, emb_dim=32, n_heads=2, n_layers=1))
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    save_checkpoint(path, model)
    return path, model


def test_cli_prompts_file(tmp_path, ckpt, capsys):
    from gpt.tokenizer import get_tokenizer

    path, model = ckpt
    prompts = ["Every effort moves you", "Hi", "A longer prompt that runs past the thirty-two token context " * 4]
    (tmp_path / "p.txt").write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(prompts)))
    assert main(["--init", str(path), "--prompts-file", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "6", "--batch-size", "2", "--backend", "reference"]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "3 prompts" in err
    tok = get_tokenizer()
    ids = [tok.encode(p) for p in prompts]
    want = [tok.decode(t) for t in generate_batch(model, ids, 6, eos_id=50256)]
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": p, "completion": c} for p, c in zip(prompts, want)]
    assert want[0] == tok.decode(_singles(model, [torch.tensor(ids[0])], 6, eos_id=50256)[0])
    # jsonl input keeps its fields
    assert main(["--init", str(path), "--prompts-file", str(tmp_path / "p.jsonl"), "--out",
                 str(tmp_path / "o2.jsonl"), "--max-new-tokens", "6", "--backend", "reference"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o2.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": p, "id": i, "completion": c} for i, (p, c) in enumerate(zip(prompts, want))]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["--prompt", "x", "--temperature", "1e-45"], "--temperature"),
    (["--prompt", "x", "--temperature", "inf"], "--temperature"),
    (["--prompt", "x", "--top-k", "0"], "--top-k"),
    (["--prompt", "x", "--top-k", "-3"], "--top-k"),
    (["--prompt", "x", "--top-p", "0"], "--top-p"),
    (["--prompt", "x", "--top-p", "1.01"], "--top-p"),
    (["--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--prompt", "x", "--out", "o.jsonl"], "--prompts-file"),
    (["--prompts-file", "p.txt"], "--out"),
    (["--prompts-file", "p.txt", "--out", "o.jsonl", "--batch-size", "0"], "--batch-size"),
    (["--prompts-file", "missing.txt", "--out", "o.jsonl"], "no such file"),
    (["--prompts-file", "p.txt", "--out", "p.txt"], "overwritten"),
    (["--prompts-file", "p.txt", "--out", "nodir/o.jsonl"], "does not exist"),
    (["--prompts-file", "blank.txt", "--out", "o.jsonl"], "no prompts"),
    (["--prompts-file", "bad.jsonl", "--out", "o.jsonl"], "bad.jsonl:2"),
    (["--prompts-file", "notjson.jsonl", "--out", "o.jsonl"], "notjson.jsonl:1: not valid JSON"),
])
def test_cli_bad_input(tmp_path, ckpt, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("hello\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    (tmp_path / "notjson.jsonl").write_text("hello\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["--init", str(ckpt[0]), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written or lost


def test_cli_stream_ends_with_newline(ckpt, capsys):
    assert main(["--init", str(ckpt[0]), "--prompt", "Every effort", "--max-new-tokens", "4",
                 "--backend", "reference"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Every effort") and out.endswith("\n") and not out.endswith("\n\n")
    assert "tokens/s" in err


def test_read_prompts_drops_a_byte_order_mark(tmp_path):
    """A BOM (Notepad's UTF-8) is no part of the first prompt: it would be tokenized into it and echoed
    in the output; a .jsonl file with one would fail on line 1."""
    text = tmp_path / "p.txt"
    text.write_bytes("\ufeffhello\r\nwörld\r\n".encode())
    assert [r["prompt"] for r in read_prompts(text, tmp_path / "o.jsonl")] == ["hello", "wörld"]
    jl = tmp_path / "p.jsonl"
    jl.write_bytes(("\ufeff" + json.dumps({"prompt": "hi", "id": 1}) + "\n").encode())
    assert read_prompts(jl, tmp_path / "o.jsonl") == [{"prompt": "hi", "id": 1}]


def test_no_prompts_give_no_rows(fallback_path):
    """An empty prompt list (a filtered batch that came out empty) is [] as with max_new_tokens=0; the
    KV-cache path raised "max() arg is an empty sequence"."""
    fused, ref = _models()
    for model, cache in ((fused, True), (fused, False), (ref, True)):
        assert generate_batch(model, [], 5, use_cache=cache) == []
        assert generate_batch(model, torch.zeros(0, 3, dtype=torch.long), 5, use_cache=cache) == []
