"""Collate, splits, length-grouped batches and packing (no tokenizer needed)."""
import pytest
import torch

from lorart.data import (Example, batch_indices, collate, iterate_batches, pack_examples,
                         split_examples)


def _ex(n, start=10, prompt=0):
    ids = list(range(start, start + n))
    return Example(ids, [-100] * prompt + ids[prompt:], f"f.jsonl:{n}")


def test_collate_right_pads():
    b = collate([_ex(3, prompt=1), _ex(5)], pad_id=2, pad_to_multiple_of=4)
    assert b["input_ids"].tolist() == [[10, 11, 12, 2, 2, 2, 2, 2], [10, 11, 12, 13, 14, 2, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 5 + [0] * 3]
    assert b["labels"][0].tolist() == [-100, 11, 12] + [-100] * 5
    assert all(v.dtype == torch.long for v in b.values())


def test_split_deterministic():
    exs = [_ex(i + 1) for i in range(50)]
    a, b = split_examples(exs, 0.2, seed=3), split_examples(exs, 0.2, seed=3)
    assert [len(e) for e in a[1]] == [len(e) for e in b[1]] and len(a[1]) == 10 and len(a[0]) == 40
    assert [len(e) for e in split_examples(exs, 0.2, seed=4)[1]] != [len(e) for e in a[1]]
    assert sorted(len(e) for e in a[0] + a[1]) == list(range(1, 51))
    with pytest.raises(ValueError):
        split_examples(exs, 1.0)


def test_length_grouped_batches_deterministic_and_complete():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    b1 = batch_indices(lengths, 8, seed=1, epoch=0, mega_batch_mult=4)
    assert b1 == batch_indices(lengths, 8, seed=1, epoch=0, mega_batch_mult=4)
    assert b1 != batch_indices(lengths, 8, seed=1, epoch=1, mega_batch_mult=4)
    assert sorted(i for b in b1 for i in b) == list(range(200))
    assert max(lengths[i] for i in b1[0]) == max(lengths)  # longest batch first
    for b in b1:  # sorted within mega-batches, so batches are homogeneous
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    pad_grouped = sum(len(b) * max(lengths[i] for i in b) for b in b1)
    plain = batch_indices(lengths, 8, seed=1, group_by_length=False)
    assert pad_grouped < sum(len(b) * max(lengths[i] for i in b) for b in plain)
    assert len(batch_indices(lengths[:20], 8, drop_last=True)) == 2


def test_iterate_batches():
    exs = [_ex(n) for n in (3, 9, 4, 8, 5)]
    batches = list(iterate_batches(exs, 2, pad_id=0, seed=0))
    assert len(batches) == 3 and sum(b["input_ids"].shape[0] for b in batches) == 5


def test_packing_masks_documents():
    exs = [_ex(3), _ex(4, start=50), _ex(5, start=70)]
    packs = pack_examples(exs, max_seq_len=8)
    assert [p.doc_lens for p in packs] == [[3, 4], [5]]
    assert packs[0].labels == [-100, 11, 12, -100, 51, 52, 53]
    b = collate(packs, pad_id=0)
    m = b["attention_mask"]
    assert m.shape == (2, 1, 7, 7) and m.dtype == torch.bool
    assert m[0, 0, 4, :3].sum() == 0 and m[0, 0, 4, 3:5].all()  # doc 2 cannot see doc 1
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        pack_examples([_ex(9)], max_seq_len=8)


def test_packed_batch_runs_through_model():
    from lorart.models import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4)).eval()
    exs = [_ex(3), _ex(4, start=50), _ex(6, start=70)]
    packed = collate(pack_examples(exs, max_seq_len=8), pad_id=0)
    out = m(**packed)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    sep = m(torch.tensor([exs[1].input_ids])).logits
    torch.testing.assert_close(out.logits[0, 3:7], sep[0], atol=1e-5, rtol=1e-5)
