"""`report_to` / `--report-to`: the metrics of a run read back from TensorBoard event files, an offline W&B run and
a local MLflow store; a resumed run's TensorBoard curves equal an uninterrupted run's; a missing package is one
line naming the extra, before anything loads."""
from __future__ import annotations

import glob
import json
import os
import struct
import sys
import time

import pytest

import lorart

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

OPTS = dict(max_steps=4, batch_size=4, max_seq_len=48, lr=5e-3, warmup=0, r=4, eval_every=2, save_every=1,
            num_samples=1, sample_max_new_tokens=2, general_data=False, progress=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    p = lorart.data.default_dataset_paths()
    (d / "data.jsonl").write_text("\n".join(open(p["train"], encoding="utf-8").read().splitlines()[:24]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(open(p["heldout"], encoding="utf-8").read().splitlines()[:4]) + "\n")
    return {"dir": d, "model": tiny_folder(d / "model"), "data": str(d / "data.jsonl"), "eval": str(d / "eval.jsonl")}


def _train(env, out, **kw):
    return lorart.train(env["model"], env["data"], eval_data=env["eval"], output_dir=out, **{**OPTS, **kw})


def _steps(res):
    return [h for h in res.history if "loss" in h]


def _evals(res):
    return [h for h in res.history if "eval_loss" in h]


def _tb(folder):
    """The one TensorBoard run under OUTPUT_DIR/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    sub, = os.listdir(folder)
    ea = EventAccumulator(os.path.join(folder, sub), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _scalars(ea, tag):
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def test_tensorboard_event_files_hold_the_run(env, tmp_path):
    pytest.importorskip("tensorboard")
    res = _train(env, tmp_path / "run", report_to="tensorboard", format_regex=r"[\s\S]*")
    ea = _tb(tmp_path / "run" / "tensorboard")
    steps, evals = _steps(res), _evals(res)
    approx = lambda v: pytest.approx(v, rel=1e-6)  # noqa: E731 - event files hold float32
    assert _scalars(ea, "train/loss") == [(h["step"], approx(h["loss"])) for h in steps]
    assert _scalars(ea, "train/learning_rate") == [(h["step"], approx(h["lr"])) for h in steps]
    assert _scalars(ea, "train/grad_norm") == [(h["step"], approx(h["grad_norm"])) for h in steps]
    assert _scalars(ea, "train/tokens_per_s") == [(h["step"], approx(h["tokens_per_s"])) for h in steps]
    assert [s for s, _ in _scalars(ea, "memory/peak_rss_mb")] == [1, 2, 3, 4]
    assert all(v > 10 for _, v in _scalars(ea, "memory/peak_rss_mb"))
    assert _scalars(ea, "eval/loss") == [(h["step"], approx(h["eval_loss"])) for h in evals]
    assert _scalars(ea, "before/eval_loss") == [(0, approx(res.before["eval_loss"]))]
    assert _scalars(ea, "after/eval_loss") == [(4, approx(res.after["eval_loss"]))]
    assert _scalars(ea, "after/format_accuracy") == [(4, approx(res.after["format_accuracy"]))]
    assert _scalars(ea, "train/skipped_steps") == [(s, 0.0) for s in range(1, 5)]
    table = ea.Tensors("before_after/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| held-out loss | " in table and f"{res.after['eval_loss']:.4f}" in table
    config = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "report_to:\n- tensorboard" in config and "max_steps: 4" in config
    # a run that overwrites the folder is a TensorBoard run of its own; trackers' folders are never removed
    (tmp_path / "run" / "mlruns").mkdir()
    (tmp_path / "run" / "mlruns" / "keep").write_text("someone else's")
    _train(env, tmp_path / "run", report_to="tensorboard", overwrite=True, max_steps=1)
    assert len(os.listdir(tmp_path / "run" / "tensorboard")) == 2
    assert (tmp_path / "run" / "mlruns" / "keep").read_text() == "someone else's"


def test_a_resumed_run_continues_its_tensorboard_curves(env, tmp_path):
    pytest.importorskip("tensorboard")
    ref = _train(env, tmp_path / "ref", report_to="tensorboard")

    def die(rec):
        if rec["step"] == 3:
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):   # step 3 is logged, its checkpoint is not written
        _train(env, tmp_path / "run", report_to="tensorboard", callback=die, save_every=2, eval_every=1)
    _train(env, tmp_path / "run", report_to="tensorboard", resume=True, save_every=2, eval_every=1)
    ea, ea_ref = _tb(tmp_path / "run" / "tensorboard"), _tb(tmp_path / "ref" / "tensorboard")
    assert _scalars(ea, "train/loss") == _scalars(ea_ref, "train/loss")   # each step once, the same values
    assert [s for s, _ in _scalars(ea, "eval/loss")] == [1, 2, 3, 4]
    assert _scalars(ea, "before/eval_loss") == _scalars(ea_ref, "before/eval_loss")


def _wandb_records(folder, wait_s=60.0):
    """The records of an offline W&B run's .wandb file, once its `exit` record is there: wandb.finish() returns
    when W&B's service has the run's exit, and the service writes the file a moment later."""
    path, = glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))
    deadline = time.monotonic() + wait_s
    while True:
        recs = _read_wandb_file(path)
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def _read_wandb_file(path):
    """The protobuf Records of a .wandb file (a LevelDB-style log: 7-byte file header, then 32 KiB blocks of
    [crc32, length, type] chunks); a record still being written at the end is left out."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"[:len(data)]
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):   # a full record, or the last chunk of one
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_run(env, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = _train(env, tmp_path / "run", report_to="wandb")
    recs = _wandb_records(str(tmp_path / "run"))
    rows = {}
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(row["_step"], {}).update(row)
    losses = [(s, rows[s]["train/loss"]) for s in sorted(rows) if "train/loss" in rows[s]]
    assert losses == [(h["step"], pytest.approx(h["loss"])) for h in _steps(res)]
    assert rows[0]["before/eval_loss"] == pytest.approx(res.before["eval_loss"])
    assert rows[4]["after/eval_loss"] == pytest.approx(res.after["eval_loss"]) and "eval/loss" in rows[4]
    assert rows[4]["train/learning_rate"] == pytest.approx(_steps(res)[-1]["lr"])
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary.update({"/".join(i.nested_key) or i.key: i.value_json for i in r.summary.update})
    assert json.loads(summary["after/eval_loss"]) == pytest.approx(res.after["eval_loss"])
    config = {}
    for r in recs:
        if r.WhichOneof("record_type") == "config":
            config.update({"/".join(i.nested_key) or i.key: i.value_json for i in r.config.update})
    assert json.loads(config["r"]) == {"value": 4} or json.loads(config["r"]) == 4


def _mlflow_run(folder):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri="file:" + os.path.join(folder, "mlruns"))
    exp = client.get_experiment_by_name("lorart")
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def test_mlflow_local_store_holds_the_run(env, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    res = _train(env, tmp_path / "run", report_to="mlflow")
    client, (run,) = _mlflow_run(str(tmp_path / "run"))
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(h["step"], pytest.approx(h["loss"])) for h in _steps(res)]
    assert run.data.metrics["after/eval_loss"] == pytest.approx(res.after["eval_loss"])
    assert run.data.params["r"] == "4" and run.data.params["report_to"] == '["mlflow"]'
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"before_after.md", "summary.json", "config.yaml"} <= arts

    def die(rec):
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        _train(env, tmp_path / "failed", report_to="mlflow", callback=die)
    _, (failed,) = _mlflow_run(str(tmp_path / "failed"))
    assert failed.info.status == "FAILED"


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_line_before_anything_loads(env, tmp_path, tracker, capsys, monkeypatch):
    from lorart.__main__ import main
    monkeypatch.setitem(sys.modules, tracker, None)   # `import tracker` now fails as for a missing package
    monkeypatch.delenv("LORART_DEBUG", raising=False)
    out = tmp_path / "out"
    rc = main(["train", "--model", "/nonexistent/model", "--data", env["data"], "--output-dir", str(out),
               "--report-to", f"none,{tracker}"])
    lines = capsys.readouterr().err.strip().splitlines()
    dist = "mlflow-skinny" if tracker == "mlflow" else tracker
    assert rc == 2 and lines == [f"lorart: error: --report-to {tracker} needs the `{dist}` package, which is not "
                                 f"installed: pip install \"lorart[{tracker}]\""], lines
    assert not out.exists()   # refused before the folder, the model or the data


def test_a_tracker_that_cannot_start_is_one_error_and_leaves_no_run(env, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from lorart.training import reporting

    def no_account(self, *a):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setattr(reporting.WandB, "__init__", no_account)
    monkeypatch.setitem(sys.modules, "wandb", sys.modules.get("wandb") or type(sys)("wandb"))
    with pytest.raises(ValueError, match=r"--report-to wandb: could not start the tracker: RuntimeError: No API key "
                                         r"configured.*\(for W&B without an account: WANDB_MODE=offline\)"):
        _train(env, tmp_path / "run", report_to="tensorboard,wandb")
    assert sorted(os.listdir(tmp_path / "run")) == [".lorart.lock"]   # a retry needs no --overwrite


def test_an_unreachable_mlflow_server_fails_within_seconds(tmp_path, monkeypatch):
    # MLflow's own retries took 4 min 17 s of silence here before the error; the start now fails fast
    pytest.importorskip("mlflow")
    import socket
    import time as clock

    from lorart.training.reporting import Reporter
    from lorart.training.recipe import RunState
    with socket.socket() as s:   # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    r = Reporter(["mlflow"])
    t0 = clock.monotonic()
    with pytest.raises(ValueError, match=rf"--report-to mlflow: could not start the tracker: MlflowException: .*"
                                         rf"127\.0\.0\.1:{port}"):
        r.start(str(tmp_path), "run", RunState(), {"r": 4}, "r: 4\n")
    assert clock.monotonic() - t0 < 30
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ   # the run's later requests keep MLflow's retries


def test_report_to_values(env, tmp_path):
    from lorart.training import TrainOptions
    assert TrainOptions(report_to="none").validate().report_to == ()
    assert TrainOptions(report_to="wandb, tensorboard,wandb").validate().report_to == ("wandb", "tensorboard")
    assert TrainOptions(report_to=["mlflow"]).validate().report_to == ("mlflow",)
    for bad in ("comet", ["tensorboard", 3], 5):
        with pytest.raises(ValueError, match="argument `report_to`: expected 'none' or some of tensorboard, wandb, "
                                             "mlflow"):
            TrainOptions(report_to=bad).validate()
