"""Every method through lorart.train on a tiny model and the bundled data: held-out loss goes down, the artifact
holds only what was trained and loads back onto the base model with the same logits."""
import pytest
import torch

import lorart.methods as M
from lorart import train
from train_helpers import tiny_model, tiny_tokenizer

# a learning rate each method learns this small task with in a few steps
LR = {"full": 3e-3, "lora": 1e-2, "qlora": 1e-2, "adapter": 1e-2, "prefix": 1e-1, "prompt": 3e-1, "bitfit": 3e-2}
OPTIONS = {"adapter": {"bottleneck": 8}, "prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 8}}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def records():
    import json

    from lorart.data import default_dataset_paths
    p = default_dataset_paths()
    rd = [json.loads(x) for x in open(p["train"], encoding="utf-8")]
    ev = [json.loads(x) for x in open(p["heldout"], encoding="utf-8")]
    return rd[:64], ev[:12]


@pytest.mark.parametrize("name", list(M.METHODS))
def test_train_lowers_heldout_loss_and_round_trips(name, tok, records, tmp_path):
    res = train(tiny_model(tok), records[0], eval_data=records[1], tokenizer=tok, method=name,
                method_options=OPTIONS.get(name), output_dir=str(tmp_path / "run"), max_steps=8, batch_size=8,
                max_seq_len=64, lr=LR[name],
                warmup=0, num_samples=0, eval_every=8, general_data=False, progress=False)
    # a soft prompt steers a random 2-layer model only through its attention: it moves the loss least
    margin = 0.02 if name == "prompt" else 0.05
    assert res.after["eval_loss"] < res.before["eval_loss"] - margin, (res.before, res.after)
    assert isinstance(res.method, M.METHODS[name])
    ids = torch.randint(0, tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    res.model.eval()
    with torch.no_grad():
        want = res.model(ids).logits
    base = tiny_model(tok)
    M.load(base, res.adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, want, atol=1e-5, rtol=1e-5)
    size = M.storage_bytes(res.adapter_dir)
    n_trained = res.method.report()["trainable_params"]
    assert n_trained * 4 <= size < n_trained * 4 + 64 * 1024   # fp32 tensors + small JSON headers


def test_train_rejects_unknown_method(tok, tmp_path):
    with pytest.raises(ValueError, match="argument `method`: expected one of full, lora"):
        train(tiny_model(tok), None, tokenizer=tok, method="ia3", output_dir=str(tmp_path), progress=False)
