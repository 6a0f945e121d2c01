"""The fine-tuning recipe behind `lorart.train` and `lorart train` (shaped like torchtune's recipes).

    recipe = Recipe(TrainOptions(method="lora", max_steps=30).validate(), "out")
    recipe.setup(model, data)    # output folder, base model + method, data, optimizer; resume; evaluation before
    recipe.train()               # step() after step(); evaluate_step() and save_checkpoint() on their schedule
    result = recipe.finish()     # best weights, final evaluation, adapter and reports -> TrainResult
    recipe.close()

`recipe.state` (RunState) is what a checkpoint restores besides the weights, optimizer, scheduler and RNG
states; `recipe.fingerprint` says which run this is (model, data, trajectory options: fingerprint.py).
Under torchrun the same recipe runs on every rank (`recipe.dist`, distributed.py): the global batch is split across
the ranks, rank 0 alone writes, checkpoints hold whole tensors whatever the world size.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

import torch

from .._atomic import strict_json
from ..data import batch_indices, collate
from ..methods import method_class
from ..methods.base import make_config
from ..errors import InputError, MissingExtraError
from ..optim import PagedAdamW
from . import sharding
from .checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                         remove_checkpoints_after, rng_state, save_checkpoint, set_rng_state)
from .config import CONFIG_FILE, config_header, dump_config, resolved_config
from .distributed import Distributed
from .evaluate import autocast_ctx, batch_nll_sum, eval_loss, format_accuracy, generate_samples, target_tokens
from .fingerprint import describe_differences, examples_fingerprint, model_fingerprint, tensors_digest
from .folder import RunFolder, TrainingError
from .options import TrainOptions
from .outputs import comparison_table, peak_memory, write_plot, write_samples
from ..planner.measure import (PeakMeter, choose_malloc, predict_run, process_bytes, return_freed_memory,
                               step_time_check, tensor_bytes, warm_rss)
from .precision import LossScaler, check_method
from .progress import Progress
from .reporting import Reporter
from .result import TrainResult, format_metrics
from .setup import attach_method, format_regex_for, load_base, load_data, method_config, resolve_device, resolve_dtype


class NonFiniteError(TrainingError):
    """A non-finite loss, gradient norm or weight stopped the run; nothing non-finite was written."""


@dataclass
class RunState:
    """The progress of a run, saved in every checkpoint."""
    step: int = 0                  # optimizer steps done
    epoch: int = 0
    pos: int = 0                   # micro-batches of this epoch's order consumed
    tokens: int = 0
    train_time_s: float = 0.0
    history: list = field(default_factory=list)         # the metrics.jsonl records
    before: Optional[dict] = None                       # metrics before training
    samples_before: list = field(default_factory=list)
    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0
    best_weights: Optional[dict] = None                 # with early stopping: the trainable weights of best_step
    stopped_early: bool = False
    skipped: list = field(default_factory=list)         # steps skipped for a non-finite loss / gradient norm
    overflow_steps: list = field(default_factory=list)  # float16: steps skipped for a loss-scale overflow
    trackers: dict = field(default_factory=dict)        # the experiment trackers' run names (reporting.py)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def lr_lambda(opts: TrainOptions, total: int, warmup: int) -> Callable[[int], float]:
    floor = opts.min_lr_ratio

    def f(step: int) -> float:  # `step` optimizer steps done; the factor applies to the next one
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if opts.schedule == "constant" or total <= warmup:
            return 1.0
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        if opts.schedule == "linear":
            return floor + (1 - floor) * (1 - prog)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


class Recipe:
    def __init__(self, opts: TrainOptions, output_dir="lorart-output", *, device="auto", progress: bool = True,
                 stream=None, callback: Optional[Callable[[dict], Optional[bool]]] = None):
        self.opts = opts
        self.reporter = Reporter(opts.trackers())   # a tracker's missing package fails here, before any loading
        self.folder = RunFolder(output_dir)
        self.device_arg = device
        self.dist, self.device = Distributed.from_env(resolve_device(device), opts.dist_timeout, opts.fsdp)
        self.dtype = resolve_dtype(opts, self.device, method_class(opts.method).keeps_dtypes)
        check_method(method_class(opts.method), self.dtype)   # float16 needs float32 trainable weights
        self.callback = callback
        self.progress = Progress(0, stream=stream if stream is not None else sys.stderr, log_every=opts.log_every,
                                 enabled=progress and self.dist.is_main)
        self.state = RunState()
        self.notes: list = []
        self._order: dict = {}
        self._finished = False

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self, model=None, data=None, *, tokenizer=None, eval_data=None, general_data=True, resume=False,
              overwrite: bool = False) -> "Recipe":
        """Load everything, then take the output folder: resume its run, replace it (`overwrite`) or start one;
        evaluate before training."""
        t0 = time.perf_counter()
        dist = self.dist
        with dist.guard(lambda: "during setup"):
            # before any loading: a refused folder fails fast
            dist.on_main(lambda: self.folder.check_allowed(resume, overwrite))
            if self.device.type == "cpu":
                return_freed_memory()   # LORART_MALLOC=return: RSS follows the live tensors (planner.measure)
            self.meter = PeakMeter(self.device)
            # the process before the model, once torch's training code is resident (CPU; a model passed in was
            # already resident): the floor of the plan's framework part
            self._framework = 0
            if self.device.type == "cpu":
                own = tensor_bytes(model) if isinstance(model, torch.nn.Module) else 0
                self._framework = max((warm_rss(self.opts.method, self.dtype) or 0) - own, 0)
            dist.agree(lambda: self._setup_model(model, tokenizer))
            dist.agree(lambda: self._setup_data(data, eval_data, general_data))
            self._check_ranks(resume, overwrite)
            self._predict_memory()
            self.train_model = dist.wrap(self.model)   # DDP, or sharded in place by FSDP2; the model itself alone
            self._setup_optimizer()
            self._take_folder(resume, overwrite)
            dist.on_main(lambda: self._start_reporting(model, data, eval_data, general_data))   # rank 0's trackers
            o, d = self.opts, self.data
            ranks = "" if dist.single else (f"; {dist.world_size} processes ({dist.backend}, "
                                            f"{'FSDP2' if dist.fsdp else 'DDP'})")
            self.progress.message(
                f"lorart train: {o.method} r={o.r} on {self.model_name or type(self.model).__name__} ({self.device}, "
                f"{str(self.dtype).replace('torch.', '')}{ranks}); {len(d.train)} train / {len(d.eval)} eval "
                f"examples; {self.total} steps of {o.batch_size}x{o.grad_accum}; "
                f"setup {time.perf_counter() - t0:.1f} s")
            self.evaluate_before()
        return self

    def _setup_model(self, model, tokenizer) -> None:
        opts = self.opts
        cls = method_class(opts.method)
        config = make_config(cls, method_config(opts, cls))
        base = load_base(model, tokenizer, opts, self.device, self.dtype, cls.base_linear_factory(config, self.dtype))
        if opts.packing and not base.is_lorart:
            raise ValueError("lorart.train: argument `packing`: packing needs lorart's LlamaForCausalLM (its "
                             "block-diagonal masks); pass packing=False for other models")
        self.fingerprint = {"model": model_fingerprint(base.model, base.name), "options": opts.fingerprint()}
        self.method = attach_method(base, cls, config, opts)
        self.model, self.tokenizer, self.model_name, self.is_lorart = (base.model, base.tokenizer, base.name,
                                                                       base.is_lorart)
        self.pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id

    def _setup_data(self, data, eval_data, general_data) -> None:
        o = self.opts
        self.data = d = load_data(data, eval_data, self.tokenizer, o, general_data)
        self.regex = format_regex_for(o, d)
        self.fingerprint["data"] = {"train": examples_fingerprint(d.train, d.train_path),
                                    "eval": examples_fingerprint(d.eval, d.eval_path),
                                    "general": examples_fingerprint(d.general, d.general_path)}
        self.batches_per_epoch = math.ceil(len(d.train) / o.batch_size)
        self.total = o.max_steps or o.epochs * math.ceil(self.batches_per_epoch / o.grad_accum)
        self.eval_every = o.eval_every or max(1, self.total // 4)
        self.save_every = o.save_every or self.eval_every

    def _predict_memory(self) -> None:
        """lorart.plan's prediction of a training step's peak for this very model, method and options, on a
        micro-batch of batch_size x the longest training example (collate pads to the longest): checked against
        the measured peak in summary.json's `memory`."""
        # the process without the model, read now: what loading left resident counts (CPU)
        fw = process_bytes(self.model, self._framework) if self.device.type == "cpu" else 0
        longest = max((len(e) for e in self.data.train), default=1)
        self.memory_plan, self.time_plan = predict_run(self.model, self.method, self.opts, self.device,
                                                       self.opts.batch_size, max(longest, 2), fw)
        if self.device.type == "cpu":   # glibc's heap kept (fastest) unless the plan says it would not fit
            why = choose_malloc(self.memory_plan)
            if why:
                self.notes.append(why)
                self.progress.message(f"lorart train: {why}")

    def memory_check(self) -> dict:
        """The plan's predicted peak beside the measured one (bytes; summary.json's `memory`)."""
        plan = dict(self.memory_plan)
        measured = self.meter.peak or None   # None: no step ran in this process (a resumed, finished run)
        pred = plan.get("predicted_peak_bytes")
        plan.update(measured_peak_bytes=measured, measured_what=self.meter.what,
                    prediction_error=(pred / measured - 1) if pred and measured else None)
        return plan

    def _check_ranks(self, resume, overwrite: bool) -> None:
        """Every rank must run the same run: options, model, data, the trainable weights' initial values."""
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.dist.check_same({"options": self.opts.to_dict(), "fingerprint": self.fingerprint,
                              "trainable weights": tensors_digest(trainable), "resume": str(resume),
                              "overwrite": overwrite, "device type": self.device.type, "dtype": str(self.dtype),
                              "torch": torch.__version__})

    def _setup_optimizer(self) -> None:
        o = self.opts
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = PagedAdamW(list(self.params.values()), lr=o.lr, weight_decay=o.weight_decay)
        warmup = min(o.warmup_steps(self.total), self.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o, self.total, warmup))
        self.scaler = LossScaler(self.device, self.dtype, self.optimizer)   # float16: dynamic loss scaling

    def _take_folder(self, resume, overwrite: bool) -> None:
        """Rank 0 takes the folder (lock, overwrite) and reads the checkpoint to resume; every rank restores it."""
        found = self.dist.on_main(lambda: self._claim_folder(resume, overwrite))
        folder = self.dist.broadcast(found[0] if found else None)
        if folder is not None:
            self._restore(self._shared(found[1] if found else None), folder)
        self.dist.on_main(lambda: self.folder.open_metrics(self.state.history))

    def _claim_folder(self, resume, overwrite: bool) -> Optional[tuple]:
        self.folder.claim()
        if overwrite and self.folder.previous_run():
            self.progress.message(f"overwrite: removed the previous run's {', '.join(self.folder.clear_previous())}")
        found = self.find_checkpoint(resume) if resume else None
        if resume and found is None:
            self.progress.message(f"no checkpoint in {self.folder.path}: starting from the beginning")
            self.folder.clear_previous()
        return found

    def _start_reporting(self, model, data, eval_data, general_data) -> None:
        """config.yaml (the resolved configuration, which repeats the run) and the experiment trackers."""
        cfg = resolved_config(self.opts, model=model, data=data, eval_data=eval_data, general_data=general_data,
                              output_dir=self.folder.path, device=self.device_arg)
        try:
            text = dump_config(cfg, config_header(self.device_arg, self.device, self.opts.dtype, self.dtype))
            self.folder.write_text(CONFIG_FILE, text)
        except MissingExtraError as e:   # no pyyaml: the run goes on, and says so
            self.notes.append(f"{CONFIG_FILE} was not written: {str(e).removeprefix('lorart: ')}")
            text = json.dumps(cfg, indent=2)
        name = os.path.basename(self.folder.path) + (f" (resumed at step {self.state.step})" if self.state.step
                                                     else "")
        try:
            self.reporter.start(self.folder.path, name, self.state, cfg, text)
        except InputError:
            self.reporter.close(ok=False)
            if not self.state.step:   # nothing trained yet: leave no run behind (a retry needs no --overwrite)
                self.folder.clear_previous()
            raise

    def find_checkpoint(self, checkpoint=True) -> Optional[tuple]:
        """(folder, state) of the newest intact checkpoint of the output folder (`checkpoint=True`; damaged ones
        are skipped and reported) or of the given checkpoint folder. Refuses a checkpoint of another run. None:
        no checkpoint. Checkpoints past it are deleted (that future is recomputed)."""
        explicit = checkpoint is not True
        candidates = [os.path.abspath(os.fspath(checkpoint))] if explicit else list_checkpoints(self.folder.path)
        damaged = []
        for folder in candidates:
            try:
                manifest, saved = load_checkpoint(folder)
            except CheckpointError as e:
                if explicit:
                    raise ValueError(f"lorart.train: argument `resume`: {e}") from None
                damaged.append(str(e))
                continue
            diff = describe_differences(manifest.get("run") or {}, json.loads(strict_json(self.fingerprint)))
            if diff:
                raise ValueError(f"lorart.train: argument `resume`: the checkpoint {folder} belongs to another run: "
                                 f"{'; '.join(diff)}. Resume with the same model, data and options, or pass "
                                 "overwrite=True (--overwrite) to start over")
            missing = set(self.params) - set(saved["weights"])
            if missing:
                raise ValueError(f"lorart.train: argument `resume`: {folder} lacks weights {sorted(missing)[:4]}")
            if damaged:
                self.notes.append(f"skipped damaged checkpoints ({'; '.join(damaged)}); resumed from "
                                  f"{os.path.basename(folder)}, the newest intact one")
                self.progress.message("resume: " + self.notes[-1])
            step = saved["state"]["step"]
            remove_checkpoints_after(self.folder.path, step)
            ranks = saved.get("world_size", 1)
            self.progress.message(f"resumed from {folder} at step {step}/{self.total}" + (
                f" (saved by {ranks} processes, resumed by {self.dist.world_size})"
                if ranks != self.dist.world_size else ""))
            return folder, saved
        if damaged:
            raise ValueError(f"lorart.train: argument `resume`: no intact checkpoint in {self.folder.path} "
                             f"({'; '.join(damaged)}); pass overwrite=True (--overwrite) to start over")
        return None

    def _shared(self, saved: Optional[dict]) -> dict:
        """Rank 0's checkpoint on every rank, weights and optimizer states as each rank's part (distributed.py);
        the early-stopping weights stay whole on rank 0."""
        if self.dist.single:
            return saved
        best = saved["state"].pop("best_weights", None) if saved is not None else None
        order = [p for g in self.optimizer.param_groups for p in g["params"]]

        def like(path):
            if len(path) == 2 and path[0] == "weights":
                return self.params.get(path[1])
            if len(path) == 4 and path[:2] == ("optimizer", "state") and path[3] in ("exp_avg", "exp_avg_sq"):
                return order[path[2]]
            return None
        out = self.dist.share_checkpoint(saved, like)
        out["state"]["best_weights"] = best
        return out

    def _restore(self, saved: dict, folder: str) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                sharding.local_of(p).copy_(saved["weights"][n])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved.get("scaler") or {})
        ranks = saved.get("rng_ranks") or [saved["rng"]]
        if len(ranks) == self.dist.world_size:   # the same world size: each rank's own dropout stream
            set_rng_state(ranks[self.dist.rank], self.device)
        elif self.dist.is_main:
            set_rng_state(saved["rng"], self.device)
        else:   # another world size: ranks > 0 start new dropout streams
            torch.manual_seed(self.opts.seed + self.dist.rank + 1_000_003 * saved["state"]["step"])
        if len(ranks) != self.dist.world_size and self.opts.dropout > 0:
            self.notes.append(f"resumed by {self.dist.world_size} processes from a checkpoint of {len(ranks)}: "
                              "the ranks' dropout masks differ from an uninterrupted run's")
        self.state = RunState.from_dict(saved["state"])

    # -- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, known_eval: Optional[dict] = None) -> tuple:
        """Held-out loss/ppl, general-text ppl, greedy samples and their format accuracy: (metrics, samples)."""
        o, d, dist = self.opts, self.data, self.dist
        ev = known_eval or eval_loss(self.model, d.eval, self.pad, self.device, self.dtype, o.batch_size, dist)
        gen = eval_loss(self.model, d.general, self.pad, self.device, self.dtype, o.batch_size, dist)
        samples = []
        if o.num_samples and d.eval:
            samples = generate_samples(self.model, self.tokenizer, d.eval, o.num_samples, o.sample_max_new_tokens,
                                       self.device, self.dtype, self.is_lorart, o.batch_size, dist)
        return {"eval_loss": ev and ev["loss"], "eval_ppl": ev and ev["ppl"], "general_ppl": gen and gen["ppl"],
                "format_accuracy": format_accuracy(samples, self.regex)}, samples

    def evaluate_before(self) -> None:
        st = self.state
        if st.before is None:
            if self.opts.eval_before:
                t0 = time.perf_counter()
                st.before, st.samples_before = self.evaluate()
                self.progress.message(f"before training: {format_metrics(st.before)} "
                                      f"({time.perf_counter() - t0:.1f} s)")
                self.reporter.before(st.before)
            else:
                st.before = {"eval_loss": None, "eval_ppl": None, "general_ppl": None, "format_accuracy": None}
            # the dropout stream starts here (one per rank); checkpoints hold its state
            torch.manual_seed(self.opts.seed + self.dist.rank)

    def evaluate_step(self) -> list:
        """The periodic held-out evaluation and the early-stopping bookkeeping: [record] or []."""
        o, st = self.opts, self.state
        ev = eval_loss(self.model, self.data.eval, self.pad, self.device, self.dtype, o.batch_size, self.dist)
        if ev is None:
            return []
        improved = st.best_loss is None or ev["loss"] < st.best_loss - o.early_stopping_min_delta
        if math.isfinite(ev["loss"]) and improved:
            st.best_loss, st.best_step, st.bad_evals = ev["loss"], st.step, 0
            if o.early_stopping_patience:   # whole tensors, on rank 0 only
                st.best_weights = self.dist.full_state(self.params) or None
        else:
            st.bad_evals += 1
        msg = f"step {st.step}: eval loss {ev['loss']:.4f} (ppl {ev['ppl']:.2f})"
        if o.early_stopping_patience and st.bad_evals >= o.early_stopping_patience:
            st.stopped_early = True
            msg += (f"; no improvement in {st.bad_evals} evaluations: early stop (best {st.best_loss:.4f} "
                    f"at step {st.best_step})")
        self.progress.message(msg)
        return [{"step": st.step, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"]}]

    # -- training ---------------------------------------------------------------------------------------------
    def next_batches(self) -> tuple:
        """The micro-batches of the next optimizer step (collated) and their example indices."""
        st, o = self.state, self.opts
        if st.epoch not in self._order:
            self._order = {st.epoch: batch_indices([len(e) for e in self.data.train], o.batch_size, shuffle=True,
                                                   seed=o.seed, epoch=st.epoch)}
        order = self._order[st.epoch]
        idx = order[st.pos:st.pos + o.grad_accum]
        st.pos += len(idx)
        if st.pos >= len(order):
            st.epoch, st.pos = st.epoch + 1, 0
        return [collate([self.data.train[i] for i in b], self.pad) for b in idx], idx

    def forward_backward(self, batches: list) -> tuple:
        """Accumulate the gradient of the mean next-token loss over all target tokens of `batches` (one optimizer
        step's micro-batches): each micro-batch's summed loss is divided by the step's total target count, so
        grad_accum=k of batch b equals one batch of k*b. With several ranks each runs its rows of every micro-batch
        (`dist.rows`) and the gradients are summed over the ranks: the same gradient. Returns (summed loss of this
        rank's rows, target tokens of the whole step)."""
        ntgt = sum(target_tokens(b["labels"]) for b in batches)
        total = 0.0
        if self.dist.fsdp:   # an evaluation's forward leaves the root unsharded: each step gathers what it uses
            sharding.reshard(self.model)
        with self.dist.counting_step():   # its collectives' bytes (summary.json's `distributed`)
            for k, b in enumerate(batches):
                part, weight = self.dist.rows(b)
                with self.dist.no_sync(self.train_model, last=k == len(batches) - 1):
                    with autocast_ctx(self.device, self.dtype):
                        nll, _ = batch_nll_sum(self.model, part, self.device, self.train_model)
                    self.scaler.backward(nll * weight / max(ntgt, 1))   # float16: times the loss scale
                total += float(nll.detach()) * weight
                del nll
        return total, ntgt

    def grad_norm(self) -> float:
        """The gradients' total L2 norm, clipped to max_grad_norm when it is set."""
        params = [p for p in self.params.values() if p.grad is not None]
        if not params:
            return 0.0
        norm = sharding.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))  # FSDP: over ranks
        if self.opts.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.opts.max_grad_norm, norm)
        return float(norm)

    def step(self) -> dict:
        """One optimizer step; its metrics record. A non-finite loss or gradient norm is never applied: with
        float16, an overflow of the loss scale skips the step and lowers the scale (precision.py); otherwise the
        step is skipped (within `skip_nonfinite`) or the run stops with NonFiniteError."""
        st = self.state
        t0 = time.perf_counter()
        batches, idx = self.next_batches()
        self.meter.start()
        loss_sum, ntgt = self.forward_backward(batches)
        loss_sum = self.dist.sum([loss_sum])[0]
        self.scaler.unscale()
        loss, gnorm = loss_sum / max(ntgt, 1), self.grad_norm()
        lr = self.optimizer.param_groups[0]["lr"]
        scale = self.scaler.scale
        outcome = self.scaler.outcome(loss, gnorm)
        self.scaler.step(outcome)   # the update when "ok"; the loss scale adjusted
        with warnings.catch_warnings():   # a skipped first step is meant: torch would warn the order is wrong
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
            self.scheduler.step()   # a skipped step still advances the schedule: lr stays a function of the step
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.stop()
        st.step += 1
        dt = time.perf_counter() - t0
        ntok = sum(len(self.data.train[i]) for b in idx for i in b)
        st.tokens += ntok
        st.train_time_s += dt
        rec = {"step": st.step, "epoch": round(st.epoch + st.pos / self.batches_per_epoch, 4), "loss": loss,
               "grad_norm": gnorm, "lr": lr, "tokens": ntok, "tokens_per_s": ntok / dt,
               "elapsed_s": round(st.train_time_s, 3)}
        if self.scaler.enabled:
            rec["loss_scale"] = scale
        if outcome == "overflow":
            rec["overflow"] = True
            st.overflow_steps.append(st.step)
            self.progress.message(f"step {st.step}: float16 gradients overflowed at loss scale {scale:g}: step "
                                  f"skipped, scale lowered to {self.scaler.scale:g} ({len(st.overflow_steps)} "
                                  "overflow steps so far)")
        elif outcome == "nonfinite":
            self._non_finite(rec)
        return rec

    def _non_finite(self, rec: dict) -> None:
        st, o = self.state, self.opts
        what = f"the loss is {rec['loss']}" if not math.isfinite(rec["loss"]) else \
            f"the gradient norm is {rec['grad_norm']}" + (
                f" even at the smallest float16 loss scale ({rec['loss_scale']:g})" if "loss_scale" in rec else "")
        st.skipped.append(st.step)
        rec["skipped"] = True
        if len(st.skipped) <= o.skip_nonfinite:
            self.progress.message(f"step {st.step}: {what}: step skipped, no update "
                                  f"({len(st.skipped)} of {o.skip_nonfinite} allowed skips used)")
            return
        st.history.append(rec)
        if self.dist.is_main:
            self.folder.append_metrics([rec])
        self.reporter.log_records([rec], self.state, self.scaler, self.device)   # trackers: rank 0's only
        raise self._agreed(NonFiniteError(
            f"lorart.train: step {st.step}: {what} (not finite): training stopped without applying it; no adapter "
            f"was written; newest checkpoint kept: {latest_checkpoint(self.folder.path) or 'none'}. Lower lr or "
            "max_grad_norm and start over, or skip such steps: skip_nonfinite=N (--skip-nonfinite N)"
            + (f" (skipped so far: steps {st.skipped[:-1]})" if len(st.skipped) > 1 else "")))

    def _agreed(self, e: Exception) -> Exception:
        """An error every rank raises alike: rank 0 reports it (the CLI prints it there only)."""
        if not self.dist.is_main:
            e.reported_by = 0
        return e

    def train(self) -> None:
        """Steps until max_steps / the epochs, early stopping or the callback; evaluations and checkpoints on
        their schedule; metrics.jsonl gets each record as it comes."""
        st, pg = self.state, self.progress
        pg.total, pg.start_step, pg.t0 = self.total, st.step, time.perf_counter()
        self.model.train()
        try:
            with self.dist.guard(lambda: f"at step {st.step + 1} (newest checkpoint kept: "
                                         f"{latest_checkpoint(self.folder.path) or 'none'})"):
                self._train_loop()
        finally:
            pg.close()

    def _train_loop(self) -> None:
        st, pg = self.state, self.progress
        while st.step < self.total and not st.stopped_early:
            rec = self.step()
            pg.update(st.step, rec["loss"], rec["lr"], st.tokens / st.train_time_s)
            records = [rec]
            if st.step % self.eval_every == 0 or st.step == self.total:
                records += self.evaluate_step()
            st.history.extend(records)
            if self.dist.is_main:
                self.folder.append_metrics(records)
            self.reporter.log_records(records, st, self.scaler, self.device)   # trackers: rank 0's only
            if st.step % self.save_every == 0 or st.step == self.total or st.stopped_early:
                self.save_checkpoint()
            # a callback on any rank stops them all
            if self.dist.any(self.callback is not None and bool(self.callback(rec))):
                pg.message(f"stopped by the callback at step {st.step}")
                break

    # -- saving -----------------------------------------------------------------------------------------------
    def check_finite_weights(self) -> None:
        bad = self.dist.non_finite(self.params)
        if bad:
            raise self._agreed(NonFiniteError(
                f"lorart.train: step {self.state.step}: {len(bad)} trainable tensors hold non-finite values (first: "
                f"{bad[0]}); nothing was written; newest checkpoint kept: "
                f"{latest_checkpoint(self.folder.path) or 'none'}. Lower lr or max_grad_norm and start over"))

    def save_checkpoint(self) -> Optional[str]:
        """checkpoints/step-N/: state.pt, the method's artifact in adapter/, the manifest (checkpoint.py). Whole
        tensors, gathered from every rank, written by rank 0 (whose path is returned; None on the others)."""
        self.check_finite_weights()
        st, dist = self.state, self.dist
        state = {"weights": dist.full_state(self.params),
                 "optimizer": dist.full_optimizer_state(self.optimizer.state_dict()),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": rng_state(self.device), "state": st.to_dict()}
        if not dist.single:
            state.update(world_size=dist.world_size, rng_ranks=dist.gather(rng_state(self.device)))

        def write():
            with self.folder.writing(f"checkpoint step-{st.step:07d}"):
                return save_checkpoint(self.folder.path, st.step, state, run=self.fingerprint,
                                       write_adapter=self.method.save, keep=self.opts.keep_checkpoints)
        with self.whole_weights(state["weights"]):
            return dist.on_main(write)

    def whole_weights(self, have: Optional[dict] = None):
        """While inside, rank 0's model holds whole weights where FSDP shards them (the trainable ones, or all for
        a method whose artifact is the whole model), for the method's own `save`. `have`: the trainable weights
        already gathered (full_state: whole on rank 0, {} elsewhere)."""
        if have is not None and not self.dist.is_main:
            have = dict.fromkeys(self.params)   # the same names on every rank: the same gathers
        return sharding.full_params_on_main(self.model, self.dist.is_main, not self.method.saves_whole_model, have)

    def finish(self) -> TrainResult:
        """Restore the best weights (early stopping), evaluate, write adapter/, metrics, plot, samples, summary
        (rank 0; every rank returns the same TrainResult)."""
        with self.dist.guard(lambda: "while finishing the run"):
            return self._finish()

    def _finish(self) -> TrainResult:
        st, pg, out, dist = self.state, self.progress, self.folder, self.dist
        restore = bool(self.opts.early_stopping_patience) and st.best_step is not None and st.best_step != st.step
        if restore:   # decided alike on every rank: the whole best weights live on rank 0
            dist.load_full(self.params, st.best_weights)
            self.notes.insert(0, f"restored the adapter of step {st.best_step} (the best eval loss)")
            pg.message(self.notes[0])
        t0 = time.perf_counter()
        last = st.history[-1] if st.history else {}
        known = None  # the evaluation of the final step, when it saw these very weights
        if not restore and last.get("step") == st.step and "eval_loss" in last:
            known = {"loss": last["eval_loss"], "ppl": last["eval_ppl"]}
        after, samples_after = self.evaluate(known)
        pg.message(f"after training: {format_metrics(after)} ({time.perf_counter() - t0:.1f} s)")
        self.check_finite_weights()
        with self.whole_weights():
            files = dist.broadcast(dist.on_main(lambda: self._write_outputs(samples_after, after)))
        if files["note"]:
            self.notes.append(files["note"])
        losses = [h["loss"] for h in st.history if "loss" in h and not h.get("skipped")]
        mem = {**peak_memory(self.device), **self.memory_check()}
        tps = st.tokens / st.train_time_s if st.train_time_s else 0.0
        res = TrainResult(
            output_dir=out.path, adapter_dir=files["adapter_dir"], metrics_path=files["metrics_path"],
            summary_path=out.join("summary.json"), samples_path=files["samples_path"], plot_path=files["plot_path"],
            steps=st.step, total_steps=self.total,
            epochs=next((h["epoch"] for h in reversed(st.history) if "epoch" in h), 0.0),
            stopped_early=st.stopped_early, best_step=st.best_step, before=st.before, after=after,
            train_loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None, train_time_s=st.train_time_s,
            tokens_per_s=tps, memory=mem, history=st.history, samples_before=st.samples_before,
            samples_after=samples_after, notes=self.notes, model=self.model, tokenizer=self.tokenizer,
            method=self.method, skipped_steps=list(st.skipped), overflow_steps=list(st.overflow_steps))
        mem_ranks = dist.gather(mem)

        def write_summary():
            summary = self.summary(res, mem_ranks)
            out.write_json("summary.json", summary)
            self.reporter.finish(st.before, after, st.step, summary)
        dist.on_main(write_summary)
        pg.message(comparison_table(st.before, after))
        mem_txt = ", ".join(f"{k} {v:,.0f}" for k, v in mem.items() if k.endswith("_mb"))
        fp16 = f"; {len(st.overflow_steps)} float16 overflow steps skipped" if self.scaler.enabled else ""
        pg.message(f"{st.step} steps in {st.train_time_s:.1f} s ({tps:,.0f} tok/s); {mem_txt}{fp16}; outputs in "
                   f"{out.path}")
        if mem.get("predicted_peak_bytes") and mem.get("measured_peak_bytes"):
            pg.message(f"memory of a step: predicted {mem['predicted_peak_bytes'] / 2**20:,.0f} MiB (lorart plan), "
                       f"measured {mem['measured_peak_bytes'] / 2**20:,.0f} MiB ({mem['measured_what']}; "
                       f"{100 * mem['prediction_error']:+.1f}%)")
        for n in self.notes[1 if self.notes and self.notes[0].startswith("restored") else 0:]:
            pg.message("note: " + n)
        self._finished = True
        return res

    def _write_outputs(self, samples_after: list, after: dict) -> dict:
        """Rank 0: adapter/, metrics.jsonl, loss.png, samples.md; their paths (and a note if the plot is skipped)."""
        st, out = self.state, self.folder
        with out.writing("the adapter"):
            adapter_dir = self.method.save(out.join("adapter"))
        metrics_path = out.write_json("metrics.jsonl", st.history, lines=True)
        plot_path = out.join("loss.png")
        with out.writing("loss.png"):
            note = write_plot(plot_path, st.history)
        samples_path = None
        if st.samples_before or samples_after:
            samples_path = out.join("samples.md")
            with out.writing("samples.md"):
                write_samples(samples_path, st.samples_before, samples_after, st.before.get("format_accuracy"),
                              after.get("format_accuracy"))
        return {"adapter_dir": adapter_dir, "metrics_path": metrics_path, "plot_path": None if note else plot_path,
                "samples_path": samples_path, "note": note}

    def summary(self, res: TrainResult, memory_per_rank: Optional[list] = None) -> dict:
        """summary.json: the result's numbers, the method's report, the run's settings and fingerprint, the ranks
        (`distributed`: world_size, backend, fsdp; each rank's peak memory)."""
        d = self.data
        out = {k: getattr(res, k) for k in ("output_dir", "adapter_dir", "metrics_path", "samples_path", "plot_path",
                                            "steps", "total_steps", "stopped_early", "best_step", "before", "after",
                                            "train_loss", "train_time_s", "tokens_per_s", "memory", "skipped_steps",
                                            "overflow_steps", "notes")}
        out["step_time"] = step_time_check(self.time_plan, self.state.history)   # lorart plan's estimate beside
        out.update({"method": self.method.report(), "artifact_bytes": self.method.storage_bytes(res.adapter_dir),
                    "model": self.model_name, "device": str(self.device),
                    "dtype": str(self.dtype).replace("torch.", ""), "train_data": d.train_path,
                    "eval_data": d.eval_path, "data_files": d.files, "train_examples": len(d.train),
                    "eval_examples": len(d.eval),
                    "options": self.opts.to_dict(), "fingerprint": self.fingerprint,
                    "distributed": {**self.dist.describe(), "memory_per_rank": memory_per_rank or [res.memory]}})
        return out

    def close(self, failed: bool = False) -> None:
        self.progress.close()
        try:
            self.reporter.close(ok=self._finished)
        finally:
            self.folder.release()
            self.dist.close(failed)
