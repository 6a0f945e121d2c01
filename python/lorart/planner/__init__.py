"""`lorart.plan`: memory and time of a fine-tuning run before it runs, from a config alone.

    p = lorart.plan("llama-2-7b", method="qlora", device="cuda", batch_size=4, max_seq_len=2048, memory="24GB")
    print(p)                       # parts at the peak, trainable parameters, artifact size, time per step, fit
    p.predicted_peak_bytes, p.memory.parts, p.trainable_params, p.adapter_bytes, p.time["step_s"], p.fit
    lorart.plan_methods("default", memory="2GB")    # every method, one Plan each

The model is a bundled config name (`lorart.planner.bundled_configs()`: smollm2-135m, llama-2-7b, llama-3-8b,
llama-65b, llama-2-70b), a config.json, an HF folder, a .gguf, or None / "default" (the embedded SmolLM2-135M).
Options are lorart.train's (method, method_options, r, alpha, targets, batch_size, max_seq_len, grad_accum,
gradient_checkpointing, dtype, ...) plus device ("auto" | "cpu" | "cuda"), optimizer_state_bits (32 | 8),
paged, fsdp, memory (what the device has: fit advice) and gemm_tflops (instead of measuring). docs/plan.md
explains the model and its measured accuracy.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Optional

from . import memory as _memory
from . import speed as _speed
from .measure import malloc_mode
from .report import CUDA_CONTEXT, Plan, human, summary_table
from .spec import PlanError, Setup, artifact_tensors, build, bundled_configs, make_options, options_dict, parse_bytes

METHOD_NAMES = ("full", "lora", "qlora", "adapter", "prefix", "prompt", "bitfit")
_ST_DTYPES = {1: "U8", 2: "BF16", 4: "F32", 8: "F64"}


def current_rss() -> Optional[int]:
    """Resident memory of this process now (bytes), from /proc (None where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmRSS:\s+(\d+)\s+kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def safetensors_bytes(tensors: dict) -> int:
    """Size of a safetensors file holding tensors {name: (shape, itemsize)} (format "pt" metadata)."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, itemsize) in tensors.items():
        n = itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_DTYPES.get(itemsize, "F32"), "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = len(json.dumps(header, separators=(",", ":")))
    return 8 + h + (-h % 8) + off


def artifact_bytes(setup: Setup) -> int:
    """Bytes on disk of what `method.save()` writes: its weights file (full: the whole HF model folder) and the
    small JSON files beside it (lorart_method.json, the PEFT or HF config)."""
    from ..methods.base import model_shape
    method = setup.method
    if method.name == "full":
        tensors = {k: (tuple(v.shape), v.element_size()) for k, v in setup.model.state_dict().items()
                   if not (k == "lm_head.weight" and setup.config.tie_word_embeddings)}
        dt = setup.model.get_input_embeddings().weight.element_size()
        tensors = {k: (s, dt if i > 1 else i) for k, (s, i) in tensors.items()}
    else:
        tensors = artifact_tensors(setup)
    meta = {"format_version": 1, "method": method.name, "config": method.config_dict(),
            "base_model": model_shape(setup.model), "base_model_name_or_path": None}
    side = len(json.dumps(meta, indent=2, sort_keys=True, default=str))
    side += 0 if method.name in ("adapter", "bitfit") else 1100   # adapter_config.json / config.json files
    return safetensors_bytes(tensors) + side


def _plan_setup(setup: Setup, framework_bytes: Optional[int] = None, with_time: bool = True,
                with_fit: bool = True) -> Plan:
    o = setup.opts
    mem = _memory.estimate(setup)
    notes = []
    if o.device == "cuda":
        fw, what = CUDA_CONTEXT, "+ CUDA context (outside the allocator; estimate)"
    else:
        if framework_bytes is None:
            from .measure import warm_rss
            fw, what = warm_rss(setup.method.name, o.dtype) or 0, "+ process without the model (RSS after a tiny step)"
        else:
            fw, what = framework_bytes, "+ process without the model (given)"
    predicted = mem.peak + (fw if o.device == "cpu" else 0)
    rep = setup.method.report()   # base_params: counted before the method was attached
    if o.optimizer_state_bits == 8:
        notes.append("8-bit optimizer states are lorart.optim.PagedAdamW(state_bits=8) (Python API); "
                     "`lorart train` uses 32-bit states")
    if o.device == "cpu" and malloc_mode() != "return":
        notes.append("glibc's heap keeps freed activations: the measured RSS can exceed this by up to ~85% (SmolLM2: "
                     "17-81%); lorart train gives freed memory back by itself where that would not fit (RSS then "
                     "follows this plan, at +25-55% time per step), LORART_MALLOC=return always (docs/plan.md)")
    if o.device == "cuda":
        notes.append("the CUDA terms (allocator peak, autocast copies, cuBLAS workspace, context) are not yet checked "
                     "against a measured GPU run (docs/plan.md)")
    if o.paged and o.device != "cuda":
        notes.append("paging moves optimizer states from GPU to host memory: on the CPU it changes nothing")
    if o.fsdp > 1:
        notes.append(mem.fsdp["note"])
    tm = _speed.estimate(setup) if with_time else {"flops": _speed.step_flops(setup), "step_s": None,
                                                   "source": "not estimated"}
    p = Plan(model=setup.label, method=setup.method.name, device=o.device, dtype=str(o.dtype)[6:],
             options=options_dict(o), base_params=rep["base_params"], trainable_params=rep["trainable_params"],
             trainable_percent=rep["trainable_percent"],
             adapter_bytes=artifact_bytes(setup), memory=mem, framework_bytes=fw, framework_what=what,
             predicted_peak_bytes=predicted, time=tm, notes=notes)
    if with_fit and o.memory is not None:
        p.fit = _fit(setup, p, fw)
    return p


def plan(model=None, method: str = "lora", *, framework_bytes: Optional[int] = None, time: bool = True,
         **options) -> Plan:
    """Predict memory (by part), trainable parameters, artifact size and time per step of `lorart train` with
    `method` on `model`; with memory=..., whether it fits and which options make it fit."""
    opts = make_options(method, **options)
    return _plan_setup(build(model, opts), framework_bytes, with_time=time)


def plan_methods(model=None, methods=METHOD_NAMES, **options) -> list:
    """plan() for every method (the same options; each method's own defaults)."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    return [plan(model, m, **options) for m in methods]


# ---- fit advice ---------------------------------------------------------------------------------------------
def _levers(setup: Setup) -> list:
    o = setup.opts
    out = []
    if o.optimizer_state_bits == 32 and setup.trainable:
        out.append(("8-bit optimizer states", {"optimizer_state_bits": 8}))
    if not o.train.gradient_checkpointing:
        out.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if o.device == "cuda" and not o.paged and setup.trainable:
        out.append(("--paged", {"paged": True}))
    return out


def _with(setup: Setup, changes: dict) -> Setup:
    train_keys = {k: v for k, v in changes.items() if k in ("gradient_checkpointing", "batch_size", "grad_accum")}
    opts = dataclasses.replace(setup.opts, **{k: v for k, v in changes.items() if k not in train_keys})
    if train_keys:
        opts = dataclasses.replace(opts, train=dataclasses.replace(setup.opts.train, **train_keys))
    return dataclasses.replace(setup, opts=opts)


def _needed(setup: Setup, fw: int) -> int:
    mem = _memory.estimate(setup)
    if setup.opts.device == "cuda":
        return int(mem.peak * 1.05) + fw
    return mem.peak + fw


def _fit(setup: Setup, p: Plan, fw: int) -> dict:
    """Does the run fit `memory`? If not, the fewest of lorart's memory options (then smaller micro-batches
    with gradient accumulation, keeping the effective batch) that make it fit."""
    from itertools import combinations
    M = setup.opts.memory
    need = p.needed_bytes
    res = {"memory": M, "needed": need, "fits": need <= M, "fix": None, "advice": []}
    if res["fits"]:
        res["advice"].append(f"fits in {human(M)}: needs {human(need)} ({100 * need / M:.0f}%)")
        return res
    levers = _levers(setup)
    B, acc = setup.opts.train.batch_size, setup.opts.train.grad_accum
    batches = [(B >> i, acc << i) for i in range(0, B.bit_length()) if B >> i >= 1 and (B >> i) * (acc << i) == B * acc]
    every = {k: v for _, c in levers for k, v in c.items()}
    b_min, a_min = batches[-1]
    if _needed(_with(setup, {**every, "batch_size": b_min, "grad_accum": a_min}), fw) > M:
        batches = []   # not even the lightest combination fits: no need to search
    for b, a in batches:
        for n in range(len(levers) + 1):
            for combo in combinations(levers, n):
                ch = {k: v for _, c in combo for k, v in c.items()}
                names = [nm for nm, _ in combo]
                if b != B:
                    ch.update(batch_size=b, grad_accum=a)
                    names.append(f"--batch-size {b} --grad-accum {a}")
                if not names:
                    continue
                nd = _needed(_with(setup, ch), fw)
                if nd <= M:
                    res["fix"] = " + ".join(names)
                    res["advice"].append(f"does not fit in {human(M)} as configured (needs {human(need)}); fits "
                                         f"with {res['fix']}: {human(nd)}")
                    return res
    res["advice"].append(f"does not fit in {human(M)} (needs {human(need)}), not even with every memory option and "
                         "batch size 1: use a lighter method (qlora, lora, adapter) or a smaller model / sequence")
    return res


__all__ = ["plan", "plan_methods", "Plan", "PlanError", "bundled_configs", "parse_bytes", "summary_table", "human",
           "current_rss", "safetensors_bytes", "METHOD_NAMES"]
