"""glibc's heap under `lorart train` on the CPU: kept (fastest) unless the plan says keeping it would not fit.

The decision (`memory_headroom`) is checked on numbers; the whole path (plan -> decision -> mallopt -> summary.json)
in a fresh process each time, as mallopt changes the process for good.
"""
import json
import os
import subprocess
import sys

import pytest

from lorart.planner.measure import GLIBC_HEAP_RATIO, available_bytes, malloc_mode, memory_headroom

GiB = 2 ** 30


def test_headroom_keeps_the_heap_where_it_fits():
    assert memory_headroom(2 * GiB, GiB, 8 * GiB, "auto") == (False, None)
    assert memory_headroom(2 * GiB, GiB, 8 * GiB, "keep") == (False, None)


def test_headroom_returns_memory_where_the_heap_would_not_fit():
    # the plan fits (1 GiB more needed, 1.5 available) but glibc's heap might not (up to 1.7 x 2 GiB - 1 GiB)
    back, why = memory_headroom(2 * GiB, GiB, int(1.5 * GiB), "auto")
    assert back and "memory is tight" in why and "LORART_MALLOC=keep" in why
    assert memory_headroom(2 * GiB, GiB, int(1.5 * GiB), "keep") == (False, None)   # the user said keep
    edge = int(2 * GiB * GLIBC_HEAP_RATIO) - GiB
    assert memory_headroom(2 * GiB, GiB, edge + 1, "auto") == (False, None)
    assert memory_headroom(2 * GiB, GiB, edge - 1, "auto")[0]


def test_headroom_warns_when_even_the_plan_does_not_fit():
    back, why = memory_headroom(4 * GiB, GiB, GiB, "auto")
    assert back and "may be killed" in why and "gradient_checkpointing" in why
    back, why = memory_headroom(4 * GiB, GiB, GiB, "keep")
    assert not back and "may be killed" in why


def test_headroom_without_numbers_changes_nothing():
    assert memory_headroom(None, GiB, GiB, "auto") == (False, None)
    assert memory_headroom(GiB, None, GiB, "auto") == (False, None)
    assert memory_headroom(GiB, GiB, None, "auto") == (False, None)
    assert memory_headroom(None, None, None, "return") == (True, "LORART_MALLOC=return")


@pytest.mark.parametrize("value, mode", [(None, "auto"), ("", "auto"), ("Return", "return"), ("keep", "keep"),
                                         ("default", "keep"), (" auto ", "auto")])
def test_malloc_mode(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv("LORART_MALLOC", raising=False)
    else:
        monkeypatch.setenv("LORART_MALLOC", value)
    assert malloc_mode() == mode


def test_malloc_mode_refuses_what_it_does_not_know(monkeypatch):
    monkeypatch.setenv("LORART_MALLOC", "sometimes")
    with pytest.raises(ValueError, match="LORART_MALLOC.*return, keep or auto.*'sometimes'"):
        malloc_mode()


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux /proc")
def test_available_bytes_is_at_most_memavailable():
    with open("/proc/meminfo") as f:
        kb = int(next(x for x in f if x.startswith("MemAvailable:")).split()[1])
    a = available_bytes()
    assert a is not None and 0 <= a <= kb * 1024 * 1.05   # MemAvailable moves between the two reads


RUN = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import lorart
import lorart.planner.measure as measure
from train_helpers import tiny_folder
avail = json.loads(sys.argv[3])
if avail is not None:
    measure.available_bytes = lambda: avail
model = tiny_folder(os.path.join(sys.argv[2], "m"))
lorart.train(model, output_dir=os.path.join(sys.argv[2], "o"), max_steps=2, batch_size=4, max_seq_len=64, r=4,
             num_samples=0, eval_before=False, progress=True, general_data=False, device="cpu")
s = json.load(open(os.path.join(sys.argv[2], "o", "summary.json")))
print("RESULT " + json.dumps(s["memory"]))
"""


def _train(tmp_path, avail, malloc=None):
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "LORART_MALLOC")}
    if malloc:
        env["LORART_MALLOC"] = malloc
    r = subprocess.run([sys.executable, "-c", RUN, os.path.dirname(__file__), os.fspath(tmp_path), json.dumps(avail)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:]), r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_train_keeps_the_heap_with_room_and_returns_memory_when_tight(tmp_path):
    mem, err = _train(tmp_path / "roomy", 64 * GiB)
    assert mem["malloc"] == "default" and "malloc_why" not in mem and "memory is tight" not in err
    mem, err = _train(tmp_path / "tight", 1 << 20)   # 1 MiB left: even the plan does not fit
    assert mem["malloc"] == "fixed" and "may be killed" in mem["malloc_why"], mem
    assert "lorart train: the plan's peak" in err and "may be killed" in err
    mem, err = _train(tmp_path / "kept", 1 << 20, malloc="keep")   # the user's word wins, with the warning
    assert mem["malloc"] == "default" and "may be killed" in mem["malloc_why"]
    mem, _ = _train(tmp_path / "always", 64 * GiB, malloc="return")
    assert mem["malloc"] == "fixed" and mem["malloc_why"] == "LORART_MALLOC=return"


def test_cli_refuses_an_unknown_malloc_mode(tmp_path):
    env = dict(os.environ, LORART_MALLOC="sometimes", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-m", "lorart", "train", "--output-dir", os.fspath(tmp_path / "o"),
                        "--max-steps", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("lorart: error: ") and "LORART_MALLOC" in lines[-1], r.stderr[-2000:]
    assert not (tmp_path / "o").exists()
