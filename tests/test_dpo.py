"""DPO (gpt.finetune.dpo, the book's ch. 7 bonus notebook): loss and rewards against the formula written
out here in fp64, compute_logprobs against a per-position loop, the prompt and padding masks, the fused
model's log-probabilities (no (b, T, V) logits) against compute_logprobs on the reference, and a short
run through gpt.training.train whose reward margin grows."""

import copy
import json
import math

import pytest
import torch

from gpt.config import GPTConfig
from gpt.data import DataError
from gpt.finetune.dpo import (
    PreferenceDataset,
    compute_dpo_loss,
    compute_dpo_loss_batch,
    compute_logprobs,
    custom_collate_fn,
    dpo_spec,
    filter_scorable,
    read_preferences,
    sequence_logprobs,
)
from gpt.model import GPTModel
from gpt.reference import GPTModel as RefModel
from gpt.training import LoopConfig, read_metrics, train

CFG = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=False)


def test_dpo_loss_and_rewards_match_the_formula():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(7, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    for beta in (0.1, 0.5, 2.0):
        loss, cr, rj = compute_dpo_loss(pc, pr, rc, rr, beta=beta)
        expect = sum(math.log1p(math.exp(-beta * ((a - b) - (c - d)))) for a, b, c, d in
                     zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())) / 7
        assert loss.item() == pytest.approx(expect, rel=1e-12)
        assert cr.item() == pytest.approx(sum(a - c for a, c in zip(pc.tolist(), rc.tolist())) / 7, rel=1e-12)
        assert rj.item() == pytest.approx(sum(b - d for b, d in zip(pr.tolist(), rr.tolist())) / 7, rel=1e-12)
    pc.requires_grad_(True)
    loss, cr, _ = compute_dpo_loss(pc, pr, rc, rr)
    assert loss.requires_grad and not cr.requires_grad  # rewards are detached


def _loop_logprobs(logits, labels, mask):
    out = []
    for b in range(logits.shape[0]):
        total, n = 0.0, 0
        for t in range(1, logits.shape[1]):
            if mask is None or mask[b, t]:
                row = logits[b, t - 1].double()
                total += (row[labels[b, t]] - torch.logsumexp(row, 0)).item()
                n += 1
        out.append(total / n)
    return torch.tensor(out, dtype=torch.float64)


def test_compute_logprobs_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 9), generator=g)
    mask = torch.rand(3, 9, generator=g) > 0.4
    mask[:, 1] = True
    torch.testing.assert_close(compute_logprobs(logits, labels, mask), _loop_logprobs(logits, labels, mask))
    torch.testing.assert_close(compute_logprobs(logits, labels), _loop_logprobs(logits, labels, None))


def test_collate_masks_prompt_two_newlines_and_padding():
    items = [{"prompt": [5, 6, 7], "chosen": [5, 6, 7, 1, 1, 20, 21], "rejected": [5, 6, 7, 1, 1, 30]},
             {"prompt": [8], "chosen": [8, 1, 1, 40], "rejected": [8, 1, 1, 50, 51, 52, 53, 54]}]
    b = custom_collate_fn(items, pad_token_id=99)
    assert b["chosen"].shape == b["rejected"].shape == (2, 9)  # longest + 1
    assert b["chosen"][0].tolist() == [5, 6, 7, 1, 1, 20, 21, 99, 99]
    assert b["chosen_mask"][0].tolist() == [False] * 5 + [True, True] + [False] * 2
    assert b["rejected_mask"][0].tolist() == [False] * 5 + [True] + [False] * 3
    assert b["chosen_mask"][1].tolist() == [False] * 3 + [True] + [False] * 5
    assert b["rejected_mask"][1].tolist() == [False] * 3 + [True] * 5 + [False]
    cut = custom_collate_fn(items, allowed_max_length=6)
    assert cut["chosen"].shape == (2, 6) and cut["rejected_mask"].shape == (2, 6)
    unmasked = custom_collate_fn(items, mask_prompt_tokens=False)
    assert unmasked["chosen_mask"][0].tolist() == [True] * 7 + [False] * 2


def test_prompt_tokens_do_not_change_the_score():
    torch.manual_seed(0)
    model = RefModel(CFG).eval()
    items = [{"prompt": [5, 6, 7], "chosen": [5, 6, 7, 1, 1, 20, 21], "rejected": [5, 6, 7, 1, 1, 30]}]
    b = custom_collate_fn(items, pad_token_id=0)
    with torch.no_grad():
        base = sequence_logprobs(model, b["chosen"], b["chosen_mask"])
        # only the response tokens' own probabilities count: replacing a response token changes the score...
        other = b["chosen"].clone()
        other[0, 6] = 22
        assert sequence_logprobs(model, other, b["chosen_mask"]) != base
        # ... while the prompt's tokens count only as context: the score equals the manual mean over 20, 21
        logits = model(b["chosen"]).double()
        manual = sum((logits[0, t - 1, b["chosen"][0, t]] - torch.logsumexp(logits[0, t - 1], 0)).item()
                     for t in (5, 6)) / 2
    assert base.item() == pytest.approx(manual, rel=1e-5)


def test_fused_logprobs_equal_compute_logprobs_on_the_reference(kernel_path):
    torch.manual_seed(0)
    ref = RefModel(CFG).eval()
    fused = GPTModel(CFG).eval()
    fused.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, CFG.vocab_size, (3, 12))
    mask = torch.rand(3, 12) > 0.3
    mask[:, 1] = True
    calls = []
    fused.out_head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        expect = compute_logprobs(ref(tokens), tokens, mask)
        got = sequence_logprobs(fused, tokens, mask)
    assert not calls, "the fused model computed (b, T, V) logits"
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def _toy_items(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        p = torch.randint(10, 97, (4,), generator=g).tolist()
        items.append({"prompt": p, "chosen": p + [1, 1, 3, 4, 5], "rejected": p + [1, 1, 6, 7]})
    return items


class _Toy(PreferenceDataset):
    def __init__(self, items):
        self.data, self.encoded_texts = items, items


def test_dpo_batch_on_the_fused_model_equals_the_books_two_pass_version(fallback_path):
    torch.manual_seed(0)
    policy = GPTModel(CFG)
    reference = RefModel(CFG).eval()
    batch = custom_collate_fn(_toy_items(4), pad_token_id=0)
    loss, cr, rj = compute_dpo_loss_batch(batch, policy, reference, beta=0.3)
    ref_policy = RefModel(CFG)
    ref_policy.load_state_dict(policy.state_dict())
    book = compute_dpo_loss(compute_logprobs(ref_policy(batch["chosen"]), batch["chosen"], batch["chosen_mask"]),
                            compute_logprobs(ref_policy(batch["rejected"]), batch["rejected"], batch["rejected_mask"]),
                            compute_logprobs(reference(batch["chosen"]), batch["chosen"], batch["chosen_mask"]),
                            compute_logprobs(reference(batch["rejected"]), batch["rejected"], batch["rejected_mask"]),
                            beta=0.3)
    for a, b in zip((loss, cr, rj), book):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_short_run_grows_the_reward_margin(tmp_path, fallback_path):
    torch.manual_seed(0)
    policy = GPTModel(CFG)
    reference = copy.deepcopy(policy)
    ds = _Toy(_toy_items(8))
    spec = dpo_spec(ds, _Toy(_toy_items(4, seed=1)), reference, beta=0.5, allowed_max_length=CFG.context_length,
                    batch_size=4, eval_batches=1, device=torch.device("cpu"), pad_token_id=0)
    loop = LoopConfig(steps=12, batch_size=4, lr=3e-3, warmup=1, eval_every=12, save_every=12)
    last = train(policy, spec, loop, tmp_path, torch.device("cpu"), log=lambda *a: None)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {"chosen_reward", "rejected_reward", "reward_margin"} <= set(rows[0])
    assert rows[0]["reward_margin"] == pytest.approx(0, abs=1e-6)  # policy == reference at the start
    assert rows[-1]["reward_margin"] > 0.5 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert last["val_reward_margin"] > 0 and "val_loss" in last
    for p in reference.parameters():
        assert not p.requires_grad


def test_read_preferences_and_filter(tmp_path):
    good = [{"instruction": "Say hi", "input": "", "output": "hi", "chosen": "Hi!", "rejected": "No."}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(good))
    assert read_preferences(path)[0]["chosen"] == "Hi!"
    bad = [good[0], {"instruction": "x", "chosen": "y"}]
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"entry 1 has no 'rejected' field"):
        read_preferences(path)
    path.write_text("[{]")
    with pytest.raises(DataError, match="not valid JSON"):
        read_preferences(path)
    ds = _Toy([{"prompt": [1] * 10, "chosen": [1] * 14, "rejected": [1] * 13}, _toy_items(1)[0]])
    ds, dropped = filter_scorable(ds, 12)
    assert dropped == 1 and len(ds) == 1
