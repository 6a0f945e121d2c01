"""`lorart inspect` / `lorart.inspect_adapter`: the rank a trained LoRA adapter actually uses.

For every adapted layer, the singular values of the update dW = s * B @ A (B [out, r], A [r, in],
s = alpha / r, or alpha / sqrt(r) with rsLoRA) come from r x r cores, never from the [out, in] matrix:

    A^T = Qa Ra,  B = Qb Rb   (thin QR)   =>   s B A = Qb (s Rb Ra^T) Qa^T

Qa and Qb have orthonormal columns, so the singular values of dW are those of the r x r matrix s Rb Ra^T
(computed in float64). From them: ||dW||_F = sqrt(sum sigma^2), the effective rank at 90% and 99% of the energy
(the fewest singular values whose squares reach that share of sum sigma^2), and, with the base model, the
update's size relative to the frozen weight, ||dW||_F / ||W||_F. The suggested r is the smallest power of two
that holds 90% of the energy of every layer (never above the trained r; equal to r means r may be limiting).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np


MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class InspectError(ValueError):
    """A bad adapter folder or argument; the message names it."""


def update_spectrum(A, B, scale: float = 1.0) -> np.ndarray:
    """Singular values (descending, float64) of scale * B @ A from the r x r cores of the thin QRs of A^T and B.
    A: [r, in], B: [out, r] (numpy arrays or torch tensors)."""
    A = _np(A, "A")
    B = _np(B, "B")
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise InspectError(f"lorart.inspect: expected A [r, in] and B [out, r] with the same r, got A {list(A.shape)} "
                           f"and B {list(B.shape)}")
    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        raise InspectError("lorart.inspect: the adapter holds NaN or inf values")
    if A.size == 0 or B.size == 0:
        return np.zeros(0)
    ra = np.linalg.qr(A.T, mode="r")      # [min(in, r), r]
    rb = np.linalg.qr(B, mode="r")        # [min(out, r), r]
    core = rb @ ra.T                      # B A = Qb (Rb Ra^T) Qa^T
    return np.linalg.svd(core * float(scale), compute_uv=False)


def effective_rank(sigma, energy: float) -> int:
    """Fewest singular values whose squares hold `energy` (0..1] of the total (0 for a zero update)."""
    s2 = np.sort(np.asarray(sigma, dtype=np.float64) ** 2)[::-1]
    total = s2.sum()
    if total <= 0:
        return 0
    return int(min(np.searchsorted(np.cumsum(s2) / total, energy - 1e-12) + 1, len(s2)))


def _np(t, name: str) -> np.ndarray:
    try:
        import torch
        if isinstance(t, torch.Tensor):
            t = t.detach().to("cpu", torch.float64).numpy()
    except ImportError:   # pragma: no cover
        pass
    try:
        return np.asarray(t, dtype=np.float64)
    except (TypeError, ValueError):
        raise InspectError(f"lorart.inspect: argument `{name}`: expected a 2-d array, got {type(t).__name__}") from None


@dataclass
class LayerSpectrum:
    path: str                 # module path, e.g. model.layers.3.self_attn.q_proj
    layer: Optional[int]
    module: str
    r: int
    scale: float
    singular_values: list
    update_norm: float        # ||dW||_F
    rank90: int
    rank99: int
    base_norm: Optional[float] = None
    relative_norm: Optional[float] = None


@dataclass
class AdapterInspection:
    adapter_dir: str
    r: int
    layers: list = field(default_factory=list)
    suggested_r: int = 0
    png: Optional[str] = None
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rel = any(s.relative_norm is not None for s in self.layers)
        out = [f"lorart inspect: {self.adapter_dir} ({len(self.layers)} adapted layers, r={self.r})",
               f"  {'layer':>5s} {'module':10s} {'r':>4s} {'||dW||_F':>10s}" + (f" {'/||W||_F':>9s}" if rel else "")
               + f" {'sigma_1':>10s} {'rank@90%':>8s} {'rank@99%':>8s}  top singular values"]
        for s in self.layers:
            top = ", ".join(f"{v:.3g}" for v in s.singular_values[:4])
            out.append(f"  {'-' if s.layer is None else s.layer:>5} {s.module:10s} {s.r:>4d} {s.update_norm:>10.4g}"
                       + (f" {s.relative_norm:>9.3g}" if rel and s.relative_norm is not None else
                          (f" {'-':>9s}" if rel else ""))
                       + f" {(s.singular_values[0] if s.singular_values else 0.0):>10.4g} {s.rank90:>8d} {s.rank99:>8d}"
                       f"  {top}")
        r90 = [s.rank90 for s in self.layers]
        if r90:
            out.append(f"  rank@90% over layers: median {int(np.median(r90))}, max {max(r90)}; rank@99%: max "
                       f"{max(s.rank99 for s in self.layers)}")
        out.append(f"  suggested r: {self.suggested_r}" + (" (= the trained r: the adapter may be rank-limited; "
                                                            "try a larger r)" if self.suggested_r >= self.r else
                                                            f" (holds 90% of every layer's update energy; trained "
                                                            f"with r={self.r})"))
        if self.png:
            out.append(f"  heatmap: {self.png}")
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _read_adapter(directory: str):
    from .methods.base import read_json, read_safetensors, METHOD_FILE
    if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
        raise InspectError(f"lorart.inspect: argument `adapter_dir`: {directory!r} is not a folder")
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        meta = os.path.join(directory, METHOD_FILE)
        if os.path.isfile(meta):
            m = read_json(meta).get("method")
            raise InspectError(f"lorart.inspect: {directory}: a {m!r} artifact; inspect reads LoRA adapters "
                               "(lora / qlora), whose update is B @ A")
        raise InspectError(f"lorart.inspect: {directory}: no adapter_config.json (a PEFT LoRA folder)")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InspectError(f"lorart.inspect: {cfg_path}: key `peft_type`: expected 'LORA', got {cfg.get('peft_type')!r}")
    try:
        tensors = read_safetensors(os.path.join(directory, "adapter_model.safetensors"))
    except ValueError as e:
        raise InspectError(str(e).replace("lorart:", "lorart.inspect:", 1)) from None
    return cfg, tensors


def _scale(cfg: dict, path: str, r: int) -> float:
    alpha = cfg.get("lora_alpha", r)
    for pat, a in (cfg.get("alpha_pattern") or {}).items():   # PEFT: per-module alpha by key suffix / regex
        if re.fullmatch(rf"(.*\.)?{pat}", path):
            alpha = a
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise InspectError(f"lorart.inspect: adapter_config.json: key `lora_alpha`: expected a number, got {alpha!r}")
    return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _base_weights(base, paths: list) -> dict:
    """path -> the frozen weight [out, in] (numpy float64), from a model folder, "default", a .gguf or a module."""
    import torch
    from torch import nn
    if isinstance(base, nn.Module):
        sd = base.state_dict()
        get = lambda k: sd.get(k)  # noqa: E731
    else:
        from .models import load_model
        from .nn.lora import nf4_weight_of
        model, _ = load_model(None if base == "default" else os.fspath(base), dtype=torch.float32)
        mods = dict(model.named_modules())

        def get(k):
            m = mods.get(k[:-len(".weight")])
            if m is None:
                return None
            w = nf4_weight_of(m)
            return w.dequantize(torch.float32) if w is not None else m.weight
    out = {}
    for p in paths:
        w = get(p + ".weight")
        if w is None:
            w = get(p + ".base_layer.weight")
        if w is None:
            raise InspectError(f"lorart.inspect: argument `base`: the base model has no weight for {p}")
        out[p] = w.detach().to("cpu", torch.float64).numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
    return out


def inspect_adapter(adapter_dir, base=None, png: Optional[str] = None) -> AdapterInspection:
    """Singular values, effective ranks and (with `base`: a model folder, "default", a .gguf or an nn.Module) the
    relative size of every layer's LoRA update; a layer x module heatmap PNG when `png` is a path."""
    cfg, tensors = _read_adapter(adapter_dir)
    pairs: dict = {}
    for k, t in tensors.items():
        m = _KEY.match(k)
        if m:
            pairs.setdefault(m.group("path"), {})[m.group("ab")] = t
    bad = sorted(p for p, ab in pairs.items() if len(ab) != 2)
    if bad:
        raise InspectError(f"lorart.inspect: {adapter_dir}: {bad[0]} has lora_{'A' if 'A' in pairs[bad[0]] else 'B'} "
                           "but not its partner")
    if not pairs:
        raise InspectError(f"lorart.inspect: {adapter_dir}: adapter_model.safetensors holds no lora_A / lora_B weights")
    weights = _base_weights(base, sorted(pairs)) if base is not None else {}
    layers = []
    for path in sorted(pairs, key=_order):
        A, B = pairs[path]["A"], pairs[path]["B"]
        r = int(A.shape[0])
        s = _scale(cfg, path, r)
        try:
            sig = update_spectrum(A, B, s)
        except InspectError as e:
            raise InspectError(f"{e} (layer {path})") from None
        lm = _LAYER.search(path)
        ls = LayerSpectrum(path=path, layer=int(lm.group(1)) if lm else None, module=path.rsplit(".", 1)[-1], r=r,
                           scale=s, singular_values=[float(v) for v in sig],
                           update_norm=float(math.sqrt(float((sig ** 2).sum()))),
                           rank90=effective_rank(sig, 0.90), rank99=effective_rank(sig, 0.99))
        if path in weights:
            W = weights[path]
            if W.shape != (B.shape[0], A.shape[1]):
                raise InspectError(f"lorart.inspect: argument `base`: {path}: base weight {list(W.shape)} does not "
                                   f"match the adapter's [{B.shape[0]}, {A.shape[1]}]")
            ls.base_norm = float(np.linalg.norm(W))
            ls.relative_norm = ls.update_norm / ls.base_norm if ls.base_norm > 0 else float("inf")
        layers.append(ls)
    r_cfg = int(cfg.get("r") or max(s.r for s in layers))
    rep = AdapterInspection(adapter_dir=os.fspath(adapter_dir), r=r_cfg, layers=layers)
    need = max(s.rank90 for s in layers)
    rep.suggested_r = min(1 << max(need - 1, 0).bit_length(), max(s.r for s in layers)) if need else 1
    if all(s.update_norm == 0 for s in layers):
        rep.notes.append("every update is zero (B = 0): an untrained adapter")
    if png:
        rep.png = write_heatmap(rep, png)
    return rep


def _order(path: str):
    lm = _LAYER.search(path)
    mod = path.rsplit(".", 1)[-1]
    return (int(lm.group(1)) if lm else -1, MODULE_ORDER.index(mod) if mod in MODULE_ORDER else 99, path)


def write_heatmap(rep: AdapterInspection, path: str) -> str:
    """Layer x module heatmaps of the effective rank at 90% energy (and of ||dW||/||W|| when known) as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InspectError("lorart.inspect: --png needs matplotlib (pip install 'lorart[models]')") from None
    import tempfile
    mods = [m for m in MODULE_ORDER if any(s.module == m for s in rep.layers)]
    mods += sorted({s.module for s in rep.layers} - set(mods))
    idx = sorted({s.layer if s.layer is not None else -1 for s in rep.layers})
    panels = [("effective rank (90% energy)", "rank90")]
    if any(s.relative_norm is not None for s in rep.layers):
        panels.append(("||dW||_F / ||W||_F", "relative_norm"))
    else:
        panels.append(("||dW||_F", "update_norm"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3 + 1.1 * len(mods) * len(panels), 1.5 + 0.28 * len(idx)),
                             dpi=100, squeeze=False)
    for ax, (title, attr) in zip(axes[0], panels):
        grid = np.full((len(idx), len(mods)), np.nan)
        for s in rep.layers:
            v = getattr(s, attr)
            grid[idx.index(s.layer if s.layer is not None else -1), mods.index(s.module)] = np.nan if v is None else v
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(mods)), [m.replace("_proj", "") for m in mods])
        ax.set_yticks(range(len(idx)), [str(i) if i >= 0 else "-" for i in idx])
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax)
        if attr == "rank90" and len(idx) * len(mods) <= 400:
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, int(v), ha="center", va="center", fontsize=7, color="white")
    fig.suptitle(f"LoRA update spectrum (r={rep.r}): {os.path.basename(os.path.normpath(rep.adapter_dir))}",
                 fontsize=10)
    fig.tight_layout()
    out = os.path.abspath(os.fspath(path))
    d = os.path.dirname(out)
    if not os.path.isdir(d):
        plt.close(fig)
        raise InspectError(f"lorart.inspect: argument `png`: folder {d} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def add_subcommand(sub) -> None:
    c = sub.add_parser("inspect", help="singular values and effective rank of a trained LoRA adapter's updates "
                                       "(table, heatmap, a suggested r)")
    c.add_argument("adapter_dir", help="a LoRA adapter folder (lorart train's adapter/, or any PEFT LoRA folder)")
    c.add_argument("--base", help="the base model (folder, .gguf or default): adds ||dW|| / ||W|| (default: none)")
    c.add_argument("--png", help="write the layer x module heatmap here (default: none)")
    c.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    c.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    rep = inspect_adapter(args.adapter_dir, base=args.base, png=args.png)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep.table())
    return 0


__all__ = ["inspect_adapter", "update_spectrum", "effective_rank", "AdapterInspection", "LayerSpectrum",
           "InspectError", "write_heatmap"]
