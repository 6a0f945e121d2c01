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

This module sets the run up and closes it; Recipe's other parts are its bases, one module each: the step loop
(recipe_steps.py), the evaluations and early stopping (recipe_eval.py), checkpoints and resume
(recipe_checkpoints.py), the end of the run and its outputs (recipe_finish.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Optional

import torch

from ..errors import InputError, MissingExtraError
from ..methods import method_class
from ..methods.base import make_config
from ..optim import PagedAdamW
from ..planner.measure import (PeakMeter, choose_malloc, predict_run, process_bytes, return_freed_memory,
                               step_time_check, tensor_bytes, warm_rss)
from .config import CONFIG_FILE, config_header, dump_config, resolved_config
from .distributed import Distributed
from .fingerprint import examples_fingerprint, model_fingerprint, tensors_digest
from .folder import RunFolder
from .options import TrainOptions
from .precision import LossScaler, check_method
from .progress import Progress
from .recipe_checkpoints import Checkpointing
from .recipe_eval import Evaluation
from .recipe_finish import Finishing
from .recipe_steps import NonFiniteError, TrainingSteps, lr_lambda
from .reporting import Reporter
from .run_state import RunState
from .setup import attach_method, format_regex_for, load_base, load_data, method_config, resolve_device, resolve_dtype

__all__ = ["Recipe", "RunState", "NonFiniteError", "lr_lambda"]   # the last three: from their own modules


class Recipe(Checkpointing, Evaluation, TrainingSteps, Finishing):
    """One fine-tuning run: setup(), train(), finish(), close() (the module's docstring)."""

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
        self._order: dict = {}       # the step loop's batch order of the current epoch (recipe_steps.py)
        self._finished = False       # set by finish() (recipe_finish.py)

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

    def time_check(self) -> dict:
        """The plan's step-time estimate beside the measured step times (summary.json's `step_time`)."""
        return step_time_check(self.time_plan, self.state.history)

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
            self.restore(found[1] if found else None)
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

    def close(self, failed: bool = False) -> None:
        self.progress.close()
        try:
            self.reporter.close(ok=self._finished)
        finally:
            self.folder.release()
            self.dist.close(failed)
