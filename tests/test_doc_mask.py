"""``train.py pretrain --doc-mask``: attention never crosses an ``<|endoftext|>`` inside a window.

The fused model runs the documents of each window through ``flash_attention_varlen`` with positions
counted from each document's start, so a window [A <|endoftext|>, B] must give exactly what the book's
reference model (``gpt/reference.py``) gives for ``A <|endoftext|>`` and for ``B`` run on their own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.config import GPTConfig
from gpt.data import document_spans
from gpt.model import GPTModel
from gpt.reference import GPTModel as ReferenceGPT
from gpt.tokenizer import get_tokenizer
from tests.utils import book_named

ROOT = Path(__file__).resolve().parents[1]
EOT = get_tokenizer().eot_token
CFG = GPTConfig(vocab_size=EOT + 1, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


def _models():
    torch.manual_seed(0)
    fused = GPTModel(CFG).eval()
    ref = ReferenceGPT(CFG).eval()
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _window(seed=1):
    """Two windows (b=2, T=16): row 0 = A(6) eot | B(9); row 1 = eot | C(10) eot | D(4)."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 1000, (2, 17), generator=g)
    tok[0, 6] = EOT
    tok[1, 0] = EOT
    tok[1, 11] = EOT
    return tok[:, :-1], tok[:, 1:]  # input, target (b, T)


def _doc_forward(model, x, targets=None, padded=False):
    cu, pos, max_len = document_spans(x, EOT)
    if padded:  # the accelerator form: empty spans up to b*T + 1, max_seqlen T (no host read)
        n_tok = x.numel()
        cu = torch.cat((cu[:-1], torch.full((n_tok + 2 - cu.numel(),), n_tok, dtype=torch.int32)))
        max_len = x.shape[1]
    kw = {} if targets is None else {"targets": targets, "reduction": "sum"}
    return model(x, positions=pos, cu_seqlens=cu, max_seqlen=max_len, **kw)


def test_document_spans():
    x = torch.tensor([[1, 2, EOT, 3, 4, EOT], [EOT, 5, 6, 7, EOT, 8]])
    cu, pos, max_len = document_spans(x, EOT)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 6, 7, 11, 12] and max_len == 4
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2], [0, 0, 1, 2, 3, 0]]


def test_a_document_never_sees_the_one_before(kernel_path):
    fused, _ = _models()
    x, _ = _window()
    y = x.clone()
    y[0, :6] = torch.randint(0, 1000, (6,))  # perturb document A (its eot kept)
    with torch.no_grad():
        masked, masked_y = _doc_forward(fused, x), _doc_forward(fused, y)
        plain, plain_y = fused(x), fused(y)
    assert torch.equal(masked[0, 7:], masked_y[0, 7:])  # B: bit-identical
    assert torch.equal(masked[1], masked_y[1])  # the other row too
    assert not torch.equal(masked[0, :7], masked_y[0, :7])
    assert (plain[0, 7:] - plain_y[0, 7:]).abs().max() > 1e-4  # without the mask B sees A


def _reference_docs(ref, x, targets):
    """Logits (b, T, V) and the summed loss of the reference model run on each document alone."""
    cu, _, _ = document_spans(x, EOT)
    xf, tf = x.reshape(-1), targets.reshape(-1)
    logits, loss = [], 0.0
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        doc_logits = ref(xf[s:e][None])  # (1, len, V): positions 0..len-1, like the document alone
        logits.append(doc_logits[0])
        loss = loss + torch.nn.functional.cross_entropy(doc_logits[0], tf[s:e], reduction="sum")
    return torch.cat(logits).view(*x.shape, -1), loss


@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
def test_doc_masked_logits_equal_the_reference_on_each_document(kernel_path, padded):
    fused, ref = _models()
    x, targets = _window()
    with torch.no_grad():
        got = _doc_forward(fused, x, padded=padded)
        want, _ = _reference_docs(ref, x, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_gradients_equal_the_reference_per_document(fallback_path):
    fused, ref = _models()
    x, targets = _window(seed=2)
    loss = _doc_forward(fused, x, targets)
    _, want = _reference_docs(ref, x, targets)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    loss.backward()
    want.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    grads = book_named((n, p.grad) for n, p in fused.named_parameters())
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_cu_seqlens_exclude_a_cache_and_a_long_window(fallback_path):
    from gpt.kv_cache import KVCache

    fused, _ = _models()
    x, _ = _window()
    cu, pos, _ = document_spans(x, EOT)
    with pytest.raises(ValueError, match="KV cache"):
        fused(x, cu_seqlens=cu, positions=pos, cache=KVCache.__new__(KVCache))
    long = torch.zeros((1, 17), dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds context_length"):
        fused(long, cu_seqlens=document_spans(long, EOT)[0], positions=document_spans(long, EOT)[1])


# ------------------------------------------------------------------------------------------ the CLI
def run_train(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _losses(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_doc_mask_runs_and_differs_from_plain_attention(tmp_path, fallback_path):
    docs = tmp_path / "docs"  # short documents: read_text joins the files with <|endoftext|>
    docs.mkdir()
    for i in range(60):
        (docs / f"{i:02d}.txt").write_text(f"Document {i} says that the number {i * 7} is {'odd' if i % 2 else 'even'}, "
                                           f"and then it ends after a few more words about item {i}.")
    common = ("--data", docs, "--steps", 2, "--batch-size", 2, "--context-length", 32, "--eval-every", 2,
              "--eval-batches", 1)
    r = run_train("pretrain", "--doc-mask", *common, "--out", tmp_path / "doc")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "attention within documents (--doc-mask)" in r.stdout
    rows = _losses(tmp_path / "doc")
    assert [row["step"] for row in rows] == [1, 2] and rows[-1]["val_loss"] is not None
    assert json.loads((tmp_path / "doc" / "config.json").read_text())["args"]["doc_mask"] is True
    r = run_train("pretrain", *common, "--out", tmp_path / "plain")
    assert r.returncode == 0, r.stderr[-3000:]
    doc, plain = (torch.load(tmp_path / n / "ckpt-last.pt", weights_only=True)["model"] for n in ("doc", "plain"))
    assert not torch.equal(doc["trf_blocks.0.att.W_query.weight"], plain["trf_blocks.0.att.W_query.weight"])
    r = run_train("pretrain", "--resume", "--steps", 3, "--out", tmp_path / "doc")  # the stored flag holds
    assert r.returncode == 0 and "--doc-mask" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("argv, match", [
    (["pretrain", "--doc-mask", "--backend", "reference"], "--doc-mask needs the fused model"),
    (["classify", "--doc-mask", "--data", "x.tsv"], "unrecognized arguments: --doc-mask"),
    (["instruct", "--doc-mask"], "unrecognized arguments: --doc-mask"),
])
def test_bad_combinations_are_one_line_exit_2(tmp_path, argv, match, fallback_path, capsys):
    from gpt.cli.train import cli

    out = tmp_path / "out"
    try:
        code = cli([*argv, "--steps", "1", "--out", str(out)])
    except SystemExit as e:  # (argparse's errors exit from the parser)
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert not out.exists()
