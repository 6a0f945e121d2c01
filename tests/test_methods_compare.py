"""`lorart.compare` end to end on a tiny model (two methods, two steps): the table, CSV and JSON are written and
hold the measured values."""
import csv
import importlib.util
import os

import pytest

import lorart
from lorart.methods import MethodError
from train_helpers import tiny_folder


def test_compare_writes_the_table(tmp_path):
    model = tiny_folder(tmp_path / "tiny")
    tb = importlib.util.find_spec("tensorboard") is not None
    res = lorart.compare("bitfit,prompt", model=model, output_dir=str(tmp_path / "cmp"), max_steps=2, batch_size=4,
                         max_seq_len=48, num_samples=2, progress=False, report_to="tensorboard" if tb else "none")
    if tb:   # each method is a TensorBoard run: `tensorboard --logdir OUT/runs` shows them side by side
        from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
        mux = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "cmp" / "runs"))
        mux.Reload()
        runs = mux.Runs()
        assert sorted(r.split(os.sep)[0] for r in runs) == ["bitfit", "prompt"], runs
        assert all([e.step for e in mux.Scalars(r, "train/loss")] == [1, 2] for r in runs)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"bitfit", "prompt"}
    assert rows["bitfit"]["added_biases"] > 0 and rows["prompt"]["trainable_params"] == 20 * 64
    for r in rows.values():
        assert r["steps"] == 2 and r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and r["artifact_bytes"] > 0
        assert r["after"]["eval_loss"] > 0 and r["after"]["general_ppl"] > 0
    assert rows["bitfit"]["before"]["eval_loss"] is not None     # the base model's numbers come from bitfit
    md = open(res["paths"]["markdown"]).read()
    assert "| base model |" in md and "| prompt |" in md and "bitfit (merged)" in md and "zero-initialised" in md
    with open(res["paths"]["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == ["base model", "bitfit", "prompt"]
    assert os.path.exists(rows["prompt"]["artifact_dir"])


def test_compare_rejects_bad_arguments(tmp_path):
    with pytest.raises(MethodError, match="argument `report_to`: expected 'none' or some of"):
        lorart.compare("lora", report_to="comet", output_dir=str(tmp_path))
    with pytest.raises(MethodError, match="'dora' is not one of"):
        lorart.compare("lora,dora", output_dir=str(tmp_path))
    with pytest.raises(MethodError, match="max_steps.*>= 1, got 0"):
        lorart.compare("lora", max_steps=0, output_dir=str(tmp_path))
