"""Experiment trackers for a run: `report_to=` / `--report-to` tensorboard, wandb, mlflow (each an optional extra).

Every tracker gets the same things: the run's resolved configuration at the start; per optimizer step
`train/loss`, `train/grad_norm`, `train/learning_rate`, `train/tokens_per_s` (throughput), `train/tokens`,
`train/epoch`, `train/skipped_steps` and, with float16, `train/loss_scale` and `train/overflow_steps`, and the peak
memory (`memory/peak_rss_mb`, `memory/peak_gpu_allocated_mb` on CUDA); per evaluation `eval/loss`, `eval/ppl`;
the metrics before training (`before/*`, step 0) and after (`after/*`, the last step) with the before/after table
as Markdown text.

- tensorboard: event files in OUTPUT_DIR/tensorboard/RUN (`tensorboard --logdir OUTPUT_DIR/tensorboard`; RUN is
  the time the run started, kept in its checkpoints); a resumed run purges the events logged past its checkpoint,
  so its curves continue as if uninterrupted; a run that overwrites the folder gets a RUN of its own.
- wandb: W&B's own settings apply (WANDB_PROJECT, default "lorart"; WANDB_ENTITY; WANDB_MODE=offline needs no
  account, `wandb sync` uploads later); local files in OUTPUT_DIR/wandb.
- mlflow: MLFLOW_TRACKING_URI when set, else a local file store OUTPUT_DIR/mlruns (`mlflow ui
  --backend-store-uri OUTPUT_DIR/mlruns`); experiment MLFLOW_EXPERIMENT_NAME, default "lorart".
A resumed run continues its TensorBoard curves and starts a new W&B / MLflow run (named "... resumed at step N").
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from typing import Optional

from ..errors import InputError
from ..sysinfo import require
from .outputs import peak_memory

MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# MLflow's HTTP settings while its run starts (_mlflow_fails_fast): one retry, 10 s per request
START_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
TABLE_ROWS = (("held-out loss", "eval_loss", "{:.4f}"), ("held-out perplexity", "eval_ppl", "{:.2f}"),
              ("format accuracy", "format_accuracy", "{:.0%}"),
              ("general-text perplexity (forgetting check)", "general_ppl", "{:.2f}"))


def check_installed(names) -> None:
    """MissingExtraError (`pip install "lorart[NAME]"`) for a tracker whose package is missing (called before
    anything loads)."""
    for n in names:
        require(MODULES[n], f"--report-to {n}")


def _finite(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def step_metrics(rec: dict, memory: dict, extra: Optional[dict] = None) -> dict:
    """The tracker metrics of one metrics.jsonl record (a step's or an evaluation's)."""
    if "eval_loss" in rec:
        return {"eval/loss": rec["eval_loss"], "eval/ppl": rec["eval_ppl"]}
    out = {"train/loss": rec["loss"], "train/grad_norm": rec["grad_norm"], "train/learning_rate": rec["lr"],
           "train/tokens_per_s": rec["tokens_per_s"], "train/tokens": rec["tokens"], "train/epoch": rec["epoch"]}
    out.update({f"memory/{k}": v for k, v in memory.items()})
    out.update(extra or {})
    return out


def table_markdown(before: dict, after: dict) -> str:
    """The before/after table as Markdown."""
    lines = ["| metric | before | after |", "|---|---:|---:|"]
    for label, key, fmt in TABLE_ROWS:
        b, a = before.get(key), after.get(key)
        if b is not None or a is not None:
            cell = [fmt.format(v) if v is not None else "-" for v in (b, a)]
            lines.append(f"| {label} | {cell[0]} | {cell[1]} |")
    return "\n".join(lines) + "\n"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def _new_subfolder(root: str) -> str:
    base = time.strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while os.path.exists(os.path.join(root, name)):
        n += 1
        name = f"{base}-{n}"
    return name


class TensorBoard:
    name = "tensorboard"

    def __init__(self, output_dir: str, run_name: str, state):
        from torch.utils.tensorboard import SummaryWriter
        root = os.path.join(output_dir, "tensorboard")
        sub = state.trackers.get("tensorboard") if state.step else None
        if sub is None or os.path.basename(sub) != sub:
            sub = state.trackers["tensorboard"] = _new_subfolder(root)
        # resumed after step `state.step`: the events a killed run logged past its checkpoint are dropped
        self.dir, self.fresh, self.logged = os.path.join(root, sub), not state.step, False
        self.w = SummaryWriter(log_dir=self.dir, purge_step=state.step + 1 if state.step else None)

    def config(self, config: dict, text: str) -> None:
        self.w.add_text("config", "```yaml\n" + text + "\n```", 0)

    def log(self, metrics: dict, step: int) -> None:
        self.logged = True
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)

    def table(self, markdown: str, step: int) -> None:
        self.w.add_text("before_after", markdown, step)

    def finish(self, summary: dict) -> None:
        self.w.flush()

    def close(self, ok: bool) -> None:
        self.w.close()
        if not ok and self.fresh and not self.logged:   # a run that failed before its first metric: no empty run
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.dir))   # only when no other run is there


class WandB:
    name = "wandb"

    def __init__(self, output_dir: str, run_name: str, state):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "lorart", dir=output_dir, name=run_name,
                              reinit="create_new", settings=wandb.Settings(console="off"))

    def config(self, config: dict, text: str) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def table(self, markdown: str, step: int) -> None:
        rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in markdown.splitlines()[2:]]
        self.run.log({"before_after": self.wandb.Table(columns=["metric", "before", "after"], data=rows)}, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update(summary)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


@contextlib.contextmanager
def _mlflow_fails_fast():
    """While the MLflow run starts, an unreachable server is an error within seconds: by default MLflow retries a
    request 7 times with a doubling backoff (measured: 4 min 17 s of silence before the error). The user's own
    MLFLOW_HTTP_REQUEST_* settings win; the run's later requests keep MLflow's retries."""
    quick = {k: v for k, v in START_HTTP.items() if k not in os.environ}
    os.environ.update(quick)
    try:
        yield
    finally:
        for k in quick:
            os.environ.pop(k, None)


class MLflow:
    name = "mlflow"

    def __init__(self, output_dir: str, run_name: str, state):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:   # a local file store in the output folder (MLflow 3 asks for this opt-in to use one)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = "file:" + os.path.join(output_dir, "mlruns")
        self.Metric, self.Param = Metric, Param
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lorart"
        with _mlflow_fails_fast():
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def config(self, config: dict, text: str) -> None:
        params = [self.Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):   # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, text, "config.yaml")

    def log(self, metrics: dict, step: int) -> None:
        ts = int(time.time() * 1000)
        ms = [self.Metric(k, v, ts, step) for k, v in _finite(metrics).items()]
        if ms:
            self.client.log_batch(self.run_id, metrics=ms)

    def table(self, markdown: str, step: int) -> None:
        self.client.log_text(self.run_id, markdown, "before_after.md")

    def finish(self, summary: dict) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Reporter:
    """The trackers of one run (none: every call does nothing)."""

    def __init__(self, names=()):
        self.names = tuple(names)
        self.trackers: list = []
        check_installed(self.names)

    def start(self, output_dir: str, run_name: str, state, config: dict, config_text: str) -> None:
        """Open every tracker (`state`: the run's RunState, resumed or new; a tracker keeps its run's name in
        `state.trackers`) and give it the configuration."""
        for n in self.names:
            try:
                t = TRACKERS[n](output_dir, run_name, state)
                t.config(config, config_text)
            except InputError:
                raise
            except Exception as e:   # a tracker that cannot start (no W&B account, an unreachable server)
                hint = " (for W&B without an account: WANDB_MODE=offline)" if n == "wandb" else ""
                raise InputError(f"lorart: --report-to {n}: could not start the tracker: {type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:300]}{hint}") from e
            self.trackers.append(t)

    def log(self, metrics: dict, step: int) -> None:
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        for t in self.trackers:
            t.log(metrics, step)

    def log_records(self, records: list, state, scaler, device) -> None:
        """The metrics.jsonl `records` of a step, with the run's counts (`state`: a RunState), the loss scale and
        the peak memory."""
        if not self.trackers:
            return
        extra = {"train/skipped_steps": len(state.skipped)}
        if scaler.enabled:
            extra.update({"train/loss_scale": scaler.scale, "train/overflow_steps": len(state.overflow_steps)})
        mem = peak_memory(device)
        for r in records:
            self.log(step_metrics(r, mem, extra), r["step"])

    def before(self, before: dict) -> None:
        self.log({f"before/{k}": v for k, v in before.items()}, 0)

    def finish(self, before: dict, after: dict, step: int, summary: dict) -> None:
        """The metrics after training, the before/after table and the run's summary numbers."""
        self.log({f"after/{k}": v for k, v in after.items()}, step)
        table = table_markdown(before, after)
        numbers = _finite({**{f"before/{k}": v for k, v in before.items()},
                           **{f"after/{k}": v for k, v in after.items()},
                           **{k: summary.get(k) for k in ("steps", "train_loss", "train_time_s", "tokens_per_s")},
                           **{f"memory/{k}": v for k, v in (summary.get("memory") or {}).items()}})
        for t in self.trackers:
            t.table(table, step)
            t.finish(numbers)

    def close(self, ok: bool) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close(ok)
            except Exception:   # noqa: BLE001 - closing must not hide the run's own outcome
                if ok:
                    raise


__all__ = ["Reporter", "TRACKERS", "check_installed", "step_metrics", "table_markdown"]
