"""The training loop's loss claims, each checked so that the plausible wrong implementation fails:

- grad_accum=k with batch b gives the gradient (and the update) of one batch of k*b: the loss is averaged over
  all target tokens of the step, not per micro-batch (micro-batches here hold very different target counts);
- the target count is that of the shifted labels: position 0 is never predicted, even when it is a target
  (text records), and the loss equals an independent next-token cross-entropy on full logits."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import lorart
from lorart.data import IGNORE_INDEX, collate
from lorart.training import Recipe, TrainOptions

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

QUIET = dict(num_samples=0, eval_before=False, r=4, alpha=8, dropout=0.0, max_seq_len=96, warmup=0)

# 8 instruction records whose outputs (the targets) range from 2 to ~70 tokens
WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hum".split()
RECORDS = [{"instruction": f"Say item {i}.", "output": " ".join(WORDS[:1 + (i * 5) % 14] * (1 + i % 3))}
           for i in range(8)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


def _recipe(tiny, out, **kw):
    opts = TrainOptions(**{**QUIET, **kw}).validate()
    return Recipe(opts, out, progress=False).setup(tiny, RECORDS, eval_data=RECORDS[:2], general_data=False)


def _grads(recipe) -> dict:
    return {n: p.grad.detach().clone() for n, p in recipe.params.items()}


def test_grad_accum_equals_one_big_batch(tiny, tmp_path):
    rec = _recipe(tiny, tmp_path / "a", batch_size=4, grad_accum=2)
    try:
        examples = sorted(rec.data.train, key=lambda e: e.num_target_tokens)
        micro = [collate(examples[:4], rec.pad), collate(examples[4:], rec.pad)]
        counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
        assert max(counts) > 2 * min(counts), counts   # the data discriminates per-micro-batch averaging
        rec.model.train()
        loss_acc, n_acc = rec.forward_backward(micro)
        g_acc = _grads(rec)
        rec.optimizer.zero_grad(set_to_none=True)
        loss_one, n_one = rec.forward_backward([collate(examples, rec.pad)])
        g_one = _grads(rec)
        rec.optimizer.zero_grad(set_to_none=True)
        assert n_acc == n_one == sum(counts)
        assert loss_acc == pytest.approx(loss_one, rel=1e-5)
        for n in g_one:
            torch.testing.assert_close(g_acc[n], g_one[n], rtol=1e-4, atol=1e-7, msg=n)
        # the wrong rule (each micro-batch averaged over its own targets, then averaged) is far from it
        wrong = {}
        for b, c in zip(micro, counts):
            rec.forward_backward([b])
            for n, p in rec.params.items():
                wrong[n] = wrong.get(n, 0) + p.grad / len(micro)
            rec.optimizer.zero_grad(set_to_none=True)
        diff = max(float((wrong[n] - g_one[n]).norm() / g_one[n].norm()) for n in g_one if g_one[n].norm() > 0)
        assert diff > 1e-2
    finally:
        rec.close()


def test_grad_accum_run_equals_big_batch_run(tiny, tmp_path):
    """End to end: one step of 2 x 4 and one step of 8 over the same 8 examples: same loss, same gradient norm
    (logged before clipping), same adapter update."""
    runs = {}
    for name, (b, k) in {"accum": (4, 2), "one": (8, 1)}.items():
        runs[name] = lorart.train(tiny, RECORDS, eval_data=RECORDS[:2], output_dir=tmp_path / name, max_steps=1,
                                  batch_size=b, grad_accum=k, lr=1e-3, general_data=False, progress=False, **QUIET)
    a, o = runs["accum"].history[0], runs["one"].history[0]
    assert a["tokens"] == o["tokens"]
    assert a["loss"] == pytest.approx(o["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(o["grad_norm"], rel=1e-4)
    pa = dict(runs["accum"].model.named_parameters())
    for n, p in runs["one"].model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(pa[n], p, rtol=1e-4, atol=1e-6, msg=n)


def test_first_position_target_is_not_counted(tiny, tmp_path):
    """Text records are targets from position 0; only positions 1.. are predicted."""
    texts = [{"text": " ".join(WORDS[:n])} for n in (3, 9, 14, 6)]
    rec = _recipe(tiny, tmp_path / "t", batch_size=4)
    try:
        exs = [lorart.data.encode_record(t, rec.tokenizer) for t in texts]
        assert all(e.labels[0] != IGNORE_INDEX for e in exs)
        batch = collate(exs, rec.pad)
        rec.model.train()
        loss_sum, n = rec.forward_backward([batch])
        assert n == sum(len(e) - 1 for e in exs)
        got = {k: p.grad.detach().clone() for k, p in rec.params.items()}
        rec.optimizer.zero_grad(set_to_none=True)
        # independent reference: full logits, HF-style shift, mean over the predicted targets
        logits = rec.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        assert loss_sum / n == pytest.approx(float(ref), rel=1e-5)
        ref.backward()
        for k, p in rec.params.items():
            torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-7, msg=k)
        rec.optimizer.zero_grad(set_to_none=True)
        ev = lorart.training.evaluate.eval_loss(rec.model, exs, rec.pad, rec.device, rec.dtype)
        assert ev["tokens"] == n and ev["loss"] == pytest.approx(float(ref), rel=1e-5)
    finally:
        rec.close()
