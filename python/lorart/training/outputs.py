"""Reports a run leaves in output_dir: loss.png, samples.md, the before/after table, peak memory."""
from __future__ import annotations

import resource
from typing import Optional

import torch

from .._atomic import atomic_file
from .evaluate import short_prompt


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated GPU memory (MiB)."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def write_plot(path: str, history: list) -> Optional[str]:
    """loss (train) and eval_loss against step as a PNG; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'lorart[models]'): no loss plot was written"
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return None


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def samples_markdown(before: list, after: list, acc_before=None, acc_after=None) -> str:
    lines = ["# Sample generations on held-out prompts (greedy)", ""]
    if acc_before is not None or acc_after is not None:
        fa = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        lines += [f"Answer-format accuracy: before {fa(acc_before)}, after {fa(acc_after)}", ""]
    lines += ["| # | prompt | reference | before | after |", "|---|---|---|---|---|"]
    for i, a in enumerate(after if after else before, 1):   # `before` is empty with eval_before=False
        b = before[i - 1] if i <= len(before) else None
        a = a if after else None
        ref = b or a
        lines.append(f"| {i} | {_cell(short_prompt(ref['prompt']))} | {_cell(ref['reference'])} | "
                     f"{_cell(b['output']) if b else '-'} | {_cell(a['output']) if a else '-'} |")
    return "\n".join(lines) + "\n"


def write_samples(path: str, before: list, after: list, acc_before=None, acc_after=None) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(samples_markdown(before, after, acc_before, acc_after))


def comparison_table(before: dict, after: dict) -> str:
    """Before/after metrics as aligned text (task metrics beside the forgetting check)."""
    rows = [("held-out loss", "eval_loss", "{:.4f}"), ("held-out perplexity", "eval_ppl", "{:.2f}"),
            ("format accuracy", "format_accuracy", "{:.0%}"),
            ("general-text perplexity (forgetting check)", "general_ppl", "{:.2f}")]
    out = [f"{'':44s} {'before':>10s} {'after':>10s}"]
    for label, key, f in rows:
        b, a = before.get(key), after.get(key)
        if b is None and a is None:
            continue
        out.append(f"{label:44s} {f.format(b) if b is not None else '-':>10s} "
                   f"{f.format(a) if a is not None else '-':>10s}")
    return "\n".join(out)
