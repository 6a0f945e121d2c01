"""The comparison table (Markdown, CSV, JSON) and chart (PNG) of `lorart compare`."""
from __future__ import annotations

import csv
import os
import statistics
from typing import Optional

from .._atomic import strict_json
from ..methods import METHODS

COLUMNS = [  # (header, key, format)
    ("method", "method", "{}"),
    ("trainable params", "trainable_params", "{:,}"),
    ("trainable %", "trainable_percent", "{:.3f}"),
    ("peak RSS MiB", "peak_rss_mb", "{:,.0f}"),
    ("step s", "step_time_s", "{:.2f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("artifact", "artifact_h", "{}"),
    ("fwd overhead", "forward_overhead", "{:+.0%}"),
    ("decode ms/tok", "decode_ms_per_token", "{:.1f}"),
    ("held-out loss", "heldout_loss", "{:.3f}"),
    ("format acc", "format_acc", "{:.0%}"),
    ("exact acc", "exact_acc", "{:.0%}"),
    ("general ppl (base -> after)", "general_h", "{}"),
    ("lr", "lr", "{:g}"),
]


def _size(n: int) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def base_row(rows: list) -> Optional[dict]:
    """The base model's metrics: the 'before' of a method that starts as the base model."""
    for r in rows:
        if METHODS[r["method"]].starts_as_base and r["before"].get("eval_loss") is not None:
            return r
    return None


def flatten(rows: list) -> list:
    base = base_row(rows)
    gen_base = base["before"].get("general_ppl") if base else None
    out = []
    if base is not None:
        # each method's overhead is against the base measured in its own process; the base row shows the median
        decode = statistics.median(r["base_decode_ms_per_token"] for r in rows)
        out.append({"method": "base model", "trainable_params": 0, "trainable_percent": 0.0,
                    "forward_overhead": 0.0, "decode_ms_per_token": decode,
                    "heldout_loss": base["before"]["eval_loss"], "format_acc": base["before"].get("format_accuracy"),
                    "exact_acc": base.get("exact_before"),
                    "general_h": f"{gen_base:.2f}" if gen_base is not None else None, "general_after": gen_base})
    for r in rows:
        g_after = r["after"].get("general_ppl")
        g_before = gen_base if gen_base is not None else r["before"].get("general_ppl")
        out.append({
            **{k: r[k] for k in ("method", "trainable_params", "trainable_percent", "peak_rss_mb", "step_time_s",
                                 "tokens_per_s", "decode_ms_per_token", "lr", "artifact_bytes")},
            "artifact_h": _size(r["artifact_bytes"]),
            "forward_overhead": r["forward_ms"] / r["base_forward_ms"] - 1 if r["base_forward_ms"] else None,
            "merged": r["merged_for_latency"],
            "heldout_loss": r["after"]["eval_loss"], "heldout_loss_before": r["before"]["eval_loss"],
            "format_acc": r["after"].get("format_accuracy"), "exact_acc": r.get("exact_after"),
            "general_before": g_before, "general_after": g_after,
            "general_h": (f"{g_before:.2f} -> {g_after:.2f}" if g_after is not None and g_before is not None
                          else None),
            "added_biases": r.get("added_biases"),
        })
    return out


def markdown(flat: list, settings: dict) -> str:
    head = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" if k == "method" else "---:" for _, k, _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in flat:
        cells = []
        for _, k, f in COLUMNS:
            v = r.get(k)
            cells.append("–" if v is None else f.format(v))
        if r.get("merged"):
            cells[0] += " (merged)"
        lines.append("| " + " | ".join(cells) + " |")
    s = settings
    lines += ["", f"Settings: model {s['model']}, data {s['data']}, {s['max_steps']} steps of batch {s['batch_size']}, "
              f"max_seq_len {s['max_seq_len']}, seed {s['seed']}; accuracy over {s['num_samples']} held-out prompts "
              "(greedy); `(merged)`: latency measured after merging the method into the weights."]
    notes = [r for r in flat if r.get("added_biases")]
    for r in notes:
        lines.append(f"BitFit: the model has no biases; {r['added_biases']} zero-initialised biases were added to "
                     "the linear layers and trained.")
    return "\n".join(lines) + "\n"


def write_csv(flat: list, path: str) -> None:
    keys = ["method", "trainable_params", "trainable_percent", "peak_rss_mb", "step_time_s", "tokens_per_s",
            "artifact_bytes", "forward_overhead", "merged", "decode_ms_per_token", "heldout_loss_before",
            "heldout_loss", "format_acc", "exact_acc", "general_before", "general_after", "lr", "added_biases"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in flat:
            w.writerow({k: r.get(k) for k in keys})


def write_chart(flat: list, path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart was written"
    rows = [r for r in flat if r["method"] != "base model"]
    names = [r["method"] for r in rows]
    panels = [("trainable parameters (% of base, log)", [max(r["trainable_percent"], 1e-6) for r in rows], True),
              ("held-out loss after training", [r["heldout_loss"] for r in rows], False),
              ("step time (s)", [r["step_time_s"] for r in rows], False),
              ("artifact size (MiB, log)", [r["artifact_bytes"] / 2**20 for r in rows], True),
              ("exact accuracy on held-out", [r["exact_acc"] or 0.0 for r in rows], False),
              ("general-text perplexity after", [r["general_after"] or 0.0 for r in rows], False)]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (title, vals, log) in zip(axes.flat, panels):
        ax.bar(names, vals, color="tab:blue")
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    base = next((r for r in flat if r["method"] == "base model"), None)
    if base is not None:
        axes.flat[1].axhline(base["heldout_loss"], color="gray", ls="--", lw=1, label="base")
        axes.flat[1].legend(fontsize=8)
        if base.get("general_after"):
            axes.flat[5].axhline(base["general_after"], color="gray", ls="--", lw=1, label="base")
            axes.flat[5].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_reports(rows: list, settings: dict, out: str) -> dict:
    flat = flatten(rows)
    paths = {"markdown": os.path.join(out, "comparison.md"), "csv": os.path.join(out, "comparison.csv"),
             "json": os.path.join(out, "comparison.json")}
    md = markdown(flat, settings)
    note = write_chart(flat, os.path.join(out, "comparison.png"))
    if note:
        md += f"\nNote: {note}.\n"
    else:
        paths["chart"] = os.path.join(out, "comparison.png")
    with open(paths["markdown"], "w") as f:
        f.write(md)
    write_csv(flat, paths["csv"])
    with open(paths["json"], "w") as f:
        f.write(strict_json({"settings": settings, "rows": rows}, indent=2) + "\n")
    return paths
