"""bench/train.py end to end on a tiny random Llama (the benchmark itself must not rot): lorart's LoRA and
QLoRA steps run in their own processes, report times, memory and losses, and their first losses agree."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import lorart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_bench_tiny(tmp_path):
    out = tmp_path / "rows.json"
    # the lorart these tests import (the tree built in place, or the installed package as in CI, whose tree has
    # no compiled core), for the driver and as the baseline stack
    where = os.path.dirname(os.path.dirname(os.path.abspath(lorart.__file__)))
    env = dict(os.environ, PYTHONPATH=where)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train.py"), "--tiny", "--stacks", "lorart",
                        "--rounds", "1", "--steps", "1", "--batch", "2", "--seq", "16", "--workdir", str(tmp_path),
                        "--baseline", where, "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["method"], x["stack"]) for x in rows] == [("lora", "lorart"), ("lora", "lorart-base"),
                                                         ("qlora", "lorart"), ("qlora", "lorart-base")]
    for x in rows:
        assert "error" not in x, x
        assert x["s_per_step"] > 0 and x["peak_bytes"] > 0 and x["trainable"] > 0
    # NF4 of random weights moves the loss a little, not much
    assert abs(rows[0]["first_loss"] - rows[2]["first_loss"]) < 0.05 * rows[0]["first_loss"]
    # the baseline stack (here the same tree, imported in its own process) computes the same losses
    assert rows[1]["first_loss"] == rows[0]["first_loss"] and rows[3]["last_loss"] == rows[2]["last_loss"]
    assert "lora fp32" in r.stdout or "lora   fp32" in r.stdout
