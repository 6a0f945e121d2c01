"""bench/train.py end to end on a tiny random Llama (the benchmark itself must not rot): lorart's LoRA and
QLoRA steps run in their own processes, report times, memory and losses, and their first losses agree; and
bench/train_floor.py (the compute floor of a LoRA step) on the same tiny shapes."""
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


def test_train_floor_tiny():
    """bench/train_floor.py on the tiny Llama shapes: every GEMM of the step at its shape (M = batch x seq rows,
    the LM head on the seq - 1 predicted positions), a positive rate for each, and the floor line."""
    where = os.path.dirname(os.path.dirname(os.path.abspath(lorart.__file__)))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_floor.py"), "--tiny", "--batch", "2",
                        "--seq", "16", "--reps", "1", "--threads", "1"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=where))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line[:24].strip(): line[24:].split() for line in r.stdout.splitlines() if not line.startswith("#")}
    # TINY: hidden 128, intermediate 256, 4 heads and 2 KV heads of 32, vocab 512
    shapes = {"q_proj": "32x128x128", "k_proj": "32x128x64", "v_proj": "32x128x64", "o_proj": "32x128x128",
              "gate/up_proj": "32x128x256", "down_proj": "32x256x128", "lm_head": "30x128x512"}
    for name, shape in shapes.items():
        assert rows[name][0] == shape, (name, rows[name])
        assert float(rows[name][1]) > 0 and float(rows[name][2]) > 0, (name, rows[name])
    assert float(rows["attention (SDPA causal)"][0]) > 0
    assert rows["LoRA factors (r)"][0] == "32x128x16" and float(rows["LoRA factors (r)"][1]) > 0
    assert "the floor no step of these FLOPs can beat" in r.stdout.splitlines()[-1]
