"""The Plan: one method's predicted memory by part, parameters, artifact size and step time, as a table/dict."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from .memory import Memory

CUDA_CONTEXT = 512 << 20     # CUDA context + kernel images: outside torch's allocator (nvidia-smi shows it)
CUDA_FRAGMENTATION = 0.05    # caching-allocator slack between allocated and reserved, as a margin


def human(n: Optional[float]) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


@dataclass
class Plan:
    model: str
    method: str
    device: str
    dtype: str
    options: dict
    base_params: int
    trainable_params: int
    trainable_percent: float
    adapter_bytes: int                 # the trained artifact's folder on disk (method.save)
    memory: Memory
    framework_bytes: int               # CPU: the process without the model (RSS); CUDA: context estimate
    framework_what: str
    predicted_peak_bytes: int          # CPU: RSS; CUDA: torch.cuda.max_memory_allocated
    time: dict
    fit: Optional[dict] = None
    notes: list = field(default_factory=list)

    @property
    def needed_bytes(self) -> int:
        """Memory the device must have: on CUDA the allocator peak + fragmentation margin + the context."""
        if self.device == "cuda":
            return int(self.predicted_peak_bytes * (1 + CUDA_FRAGMENTATION)) + self.framework_bytes
        return self.predicted_peak_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"] = asdict(self.memory)
        d["needed_bytes"] = self.needed_bytes
        return d

    def table(self) -> str:
        o = self.options
        m = self.memory
        head = (f"lorart plan: {self.method} on {self.model} ({self.device}, {self.dtype}); batch {o['batch_size']} x "
                f"{o['max_seq_len']} tokens" + (f" x {o['grad_accum']} accumulated" if o["grad_accum"] > 1 else "")
                + (", gradient checkpointing" if o["gradient_checkpointing"] else "")
                + (f", {o['optimizer_state_bits']}-bit optimizer states" if o["optimizer_state_bits"] != 32 else "")
                + (", paged optimizer states" if o["paged"] else ""))
        lines = [head, f"  trainable parameters {self.trainable_params:,} of {self.base_params:,} "
                       f"({self.trainable_percent:.3f}%); artifact on disk {human(self.adapter_bytes)}", ""]
        where = "GPU (torch allocator)" if self.device == "cuda" else "host RAM"
        lines.append(f"  {'part (at the peak, during ' + m.phase + ')':52s} {where:>22s}")
        for k, v in m.parts.items():
            if v:
                lines.append(f"  {k:52s} {human(v):>22s}")
        lines.append(f"  {'= predicted peak of tensors':52s} {human(m.peak):>22s}")
        lines.append(f"  {self.framework_what:52s} {human(self.framework_bytes):>22s}")
        if self.device == "cuda":
            what = "= needed on the GPU (+5% allocator slack + context)"
            lines.append(f"  {what:52s} {human(self.needed_bytes):>22s}")
        else:
            lines.append(f"  {'= predicted peak RSS':52s} {human(self.predicted_peak_bytes):>22s}")
        for k, v in m.host.items():
            lines.append(f"  {k:52s} {human(v):>22s}  (host)")
        ph = ", ".join(f"{k} {human(v)}" for k, v in m.phases.items())
        lines.append(f"  phases (tensors): {ph}")
        t = self.time
        if t.get("step_s") is not None:
            lines.append(f"  time per step >= {t['step_s']:.3g} s ({t['flops']['total'] / 1e12:.3g} TFLOP at "
                         f"{t['gemm_tflops']:.3g} TFLOP/s, {t['source']})")
        else:
            lines.append(f"  time per step: {t['flops']['total'] / 1e12:.3g} TFLOP; {t['source']}")
        if m.fsdp:
            f = m.fsdp
            lines.append(f"  --fsdp {f['gpus']}: ~{human(f['per_gpu_peak'])} per GPU. NOTE: {f['note']}")
        if self.fit:
            lines.append("")
            lines.extend("  " + a for a in self.fit["advice"])
        for n in self.notes:
            lines.append("  note: " + n)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def summary_table(plans: list) -> str:
    """One line per method (lorart plan without --method)."""
    p0 = plans[0]
    rows = [f"lorart plan: {p0.model} ({p0.device}, {p0.dtype}); batch {p0.options['batch_size']} x "
            f"{p0.options['max_seq_len']}" + (", gradient checkpointing" if p0.options["gradient_checkpointing"]
                                              else ""), ""]
    mem_col = "needed (GPU)" if p0.device == "cuda" else "peak RSS"
    rows.append(f"  {'method':8s} {'trainable':>14s} {'%':>8s} {'artifact':>11s} {'weights':>11s} {'grads+optim':>12s} "
                f"{'activations':>12s} {mem_col:>12s} {'step s':>8s}" + ("  fits" if p0.fit else ""))
    for p in plans:
        parts = p.memory.parts
        w = sum(v for k, v in parts.items() if k in ("base weights", "NF4 base (codes + scales)", "trainable weights"))
        go = sum(v for k, v in parts.items() if k == "gradients" or k.startswith("optimizer states"))
        act = sum(v for k, v in parts.items() if k.startswith("activations"))
        step = p.time.get("step_s")
        fit = ""
        if p.fit:
            fit = "  yes" if p.fit["fits"] else ("  with " + p.fit["fix"] if p.fit.get("fix") else "  no")
        rows.append(f"  {p.method:8s} {p.trainable_params:>14,} {p.trainable_percent:>8.3f} "
                    f"{human(p.adapter_bytes):>11s} "
                    f"{human(w):>11s} {human(go):>12s} {human(act):>12s} {human(p.needed_bytes):>12s} "
                    f"{(f'{step:.3g}' if step is not None else '-'):>8s}{fit}")
    return "\n".join(rows)
