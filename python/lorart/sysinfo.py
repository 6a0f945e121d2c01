"""What this machine and installation offer lorart: optional extras, the CPU's bf16 support, the GPUs and
whether the CUDA kernels were compiled for them (`lorart info`); `require` (a missing extra is one clear error)
and `gpu_problem` (a GPU the kernels were not compiled for is refused at start, not at the first kernel)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform

from . import _core

# pyproject.toml's optional extras: extra -> (distribution, module) pairs (tests check the two agree)
EXTRAS = {
    "models": (("gguf", "gguf"), ("tokenizers", "tokenizers"), ("jinja2", "jinja2"), ("matplotlib", "matplotlib"),
               ("tqdm", "tqdm"), ("pyyaml", "yaml")),
    "data": (("pyarrow", "pyarrow"),),
    "serve": (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus-client", "prometheus_client")),
    "tensorboard": (("tensorboard", "tensorboard"),),
    "wandb": (("wandb", "wandb"),),
    "mlflow": (("mlflow-skinny", "mlflow"),),
    "test": (("pytest", "pytest"), ("bitsandbytes", "bitsandbytes"), ("peft", "peft"),
             ("transformers", "transformers"), ("pyarrow", "pyarrow"), ("tensorboard", "tensorboard"),
             ("wandb", "wandb"), ("mlflow-skinny", "mlflow"), ("openai", "openai"), ("httpx", "httpx"),
             ("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus-client", "prometheus_client")),
}


def extra_for(module: str):
    """(extra, distribution) that provides the top-level `module` (the first extra other than `test` listing it),
    or None when no extra does."""
    top = module.split(".")[0]
    for extra, pkgs in sorted(EXTRAS.items(), key=lambda kv: kv[0] == "test"):
        for dist, mod in pkgs:
            if mod == top:
                return extra, dist
    return None


def missing_module_message(module: str, what: str = "this") -> str:
    """One line for a module that is not installed: the extra to install when an extra provides it."""
    top = module.split(".")[0]
    found = extra_for(top)
    if found is None:
        return f"{what} needs the Python module `{top}`, which is not installed"
    extra, dist = found
    how = f'pip install "lorart[{extra}]"' if extra != "test" else f"pip install {dist}"
    return f"{what} needs the `{dist}` package, which is not installed: {how}"


def require(module: str, what: str):
    """Import `module` (e.g. "tensorboard", "yaml") or raise MissingExtraError naming the extra to install; `what`
    says what needs it ("--report-to tensorboard")."""
    import importlib

    from .errors import MissingExtraError
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or module.split(".")[0] != e.name.split(".")[0]:
            raise   # the module is there but one of its own dependencies is missing: not an extra's fault
        raise MissingExtraError(f"lorart: {missing_module_message(module, what)}") from None


def _version(dist: str, module: str):
    """The installed version of `dist`, or None when its module cannot be imported (not installed)."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def extras() -> dict:
    """extra -> {"installed": bool, "missing": [distributions], "versions": {dist: version}}."""
    out = {}
    for extra, pkgs in EXTRAS.items():
        versions = {d: _version(d, m) for d, m in pkgs}
        missing = [d for d, v in versions.items() if v is None]
        out[extra] = {"installed": not missing, "missing": missing,
                      "versions": {d: v for d, v in versions.items() if v is not None}}
    return out


def _cpu_flags() -> set:
    """The CPU feature flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(val.split())
    except OSError:
        pass
    return set()


def cpu_info() -> dict:
    """name, cores, the vector ISA torch's kernels use, and native bf16 support: AVX512-BF16 / AMX-BF16 on x86,
    the BF16 extension on Arm. Without it bf16 math on the CPU is emulated (often slower than fp32)."""
    import torch
    caps = {}
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get is not None:
        try:
            caps = dict(get())
        except Exception:  # noqa: BLE001 - an informational probe
            caps = {}
    flags = _cpu_flags()
    has = lambda cap, flag: bool(caps.get(cap)) if cap in caps else flag in flags  # noqa: E731
    info = {"name": caps.get("cpu_name") or platform.processor() or platform.machine(),
            "architecture": platform.machine(), "logical_cores": os.cpu_count(),
            "torch_isa": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": has("avx512_bf16", "avx512_bf16"), "amx_bf16": has("amx_bf16", "amx_bf16"),
            "arm_bf16": "bf16" in flags}
    info["native_bf16"] = info["avx512_bf16"] or info["amx_bf16"] or info["arm_bf16"]
    return info


def _parse_archs(spec: str) -> list:
    """CMAKE_CUDA_ARCHITECTURES entries ("80", "90a", "86-real", "90-virtual") -> [(cc, sass, ptx, exact)]."""
    out = []
    for a in (spec or "").replace(";", ",").split(","):
        a = a.strip()
        if not a:
            continue
        base, _, kind = a.partition("-")
        exact = base.endswith(("a", "f"))
        digits = base.rstrip("af")
        if not digits.isdigit():
            continue
        out.append((int(digits), kind != "virtual", kind != "real", exact))
    return out


def arch_support(cc: int, compiled: str) -> str:
    """How lorart's kernels run on a GPU of compute capability `cc` (e.g. 86) given the compiled architectures:
    "native" (a binary for it or an earlier one of the same major version), "ptx" (JIT-compiled by the driver
    from an earlier architecture's PTX at first use) or "none"."""
    archs = _parse_archs(compiled)
    if any(sass and (a == cc if exact else a // 10 == cc // 10 and a <= cc) for a, sass, _, exact in archs):
        return "native"
    if any(ptx and not exact and a <= cc for a, _, ptx, exact in archs):
        return "ptx"
    return "none"


def gpu_problem(cc: int, name: str, compiled: str, cuda_compiled: bool, usable: int = 1, why: str = ""):
    """Why lorart's kernels cannot run on a GPU of compute capability `cc` (e.g. 86), or None when they can:
    a build without CUDA kernels, a GPU the runtime cannot use (`usable` devices, reason `why`), or an
    architecture neither compiled nor reachable through PTX (`arch_support` "none"). "ptx" is allowed: the
    driver JIT-compiles the kernels at first use."""
    sm = f"sm_{cc}"
    if not cuda_compiled:
        return (f"this lorart build has no CUDA kernels (nvcc was not found when it was built); reinstall with CUDA "
                f"available (LORART_CUDA=ON, CUDAARCHS={cc}) or use the CPU (--device cpu)")
    if usable < 1:
        return f"lorart's CUDA kernels cannot use the GPU: {why or 'no usable device'}"
    if arch_support(cc, compiled) == "none":
        archs = ", ".join(f"sm_{a}" for a in (compiled or "").replace(";", ",").split(",") if a.strip()) or "none"
        return (f"GPU {name} ({sm}) is not an architecture lorart's CUDA kernels were compiled for ({archs}), and "
                f"no compiled PTX can be JIT-compiled for it; rebuild for it (CUDAARCHS={cc} pip install "
                f"--no-build-isolation .) or use the CPU (--device cpu)")
    return None


def check_gpu(device) -> None:
    """Raise InputError when lorart's CUDA kernels cannot run on the torch.device `device` (see gpu_problem):
    called when a run or a command starts on a GPU, so that the user reads why instead of a kernel error."""
    import torch

    from .errors import InputError
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    info = _core.build_info()
    problem = gpu_problem(major * 10 + minor, torch.cuda.get_device_name(index),
                          str(info.get("cuda_architectures", "")), bool(info["cuda_compiled"]),
                          int(info["cuda_devices"]), str(info.get("gpu_unusable_reason", "")))
    if problem is not None:
        raise InputError(f"lorart: device {device}: {problem}")


def gpu_info(compiled: str) -> list:
    """One dict per GPU torch sees: index, name, compute capability, memory, how lorart's kernels run on it."""
    import torch
    out = []
    if not torch.cuda.is_available():
        return out
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cc = p.major * 10 + p.minor
        out.append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1), "kernels": arch_support(cc, compiled)})
    return out


def format_info(info: dict) -> list:
    """The lines `lorart info` adds for the CPU, the GPUs and the extras."""
    lines = []
    c = info["cpu"]
    bf16 = ("yes (" + ", ".join(k for k in ("avx512_bf16", "amx_bf16", "arm_bf16") if c[k]) + ")" if c["native_bf16"]
            else "no: bf16 math is emulated on this CPU (fp32 is usually as fast or faster)")
    lines.append(f"  CPU: {c['name']} ({c['architecture']}, {c['logical_cores']} logical cores, torch kernels "
                 f"{c['torch_isa']}); native bf16: {bf16}; AMX: {'yes' if c['amx_bf16'] else 'no'}")
    how = {"native": "lorart kernels compiled for it",
           "ptx": "no binary for it: the driver JIT-compiles the PTX of an earlier architecture at first use",
           "none": "lorart's CUDA kernels were NOT compiled for it (rebuild with CUDAARCHS=<its sm>)"}
    for g in info["gpus"]:
        sm = g["compute_capability"].replace(".", "")
        lines.append(f"  GPU {g['index']}: {g['name']} (sm_{sm}, {g['memory_gib']} GiB): {how[g['kernels']]}")
    if not info["gpus"]:
        lines.append("  GPUs visible to torch: none")
    for extra, e in info["extras"].items():
        state = "installed" if e["installed"] else (f"missing {', '.join(e['missing'])} "
                                                    f"(pip install \"lorart[{extra}]\")")
        lines.append(f"  extra [{extra}]: {state}")
    return lines


def system_info() -> dict:
    """build_info() plus the machine and installation: the CPU (native bf16 / AMX), each GPU torch sees with
    how lorart's kernels run on it, and the optional extras installed."""
    info = _core.build_info()
    info["cpu"] = cpu_info()
    info["gpus"] = gpu_info(info.get("cuda_architectures", "") if info["cuda_compiled"] else "")
    info["extras"] = extras()
    return info


def format_build_info(info: dict | None = None) -> str:
    info = info or _core.build_info()
    lines = [f"lorart {info['version']}"]
    if info["cuda_compiled"]:
        rt = info["cuda_runtime_version"]
        lines.append(
            f"  CUDA kernels: compiled for sm_{info['cuda_architectures'].replace(',', ', sm_')} "
            f"(CUDA runtime {rt // 1000}.{rt % 1000 // 10})"
        )
    else:
        lines.append("  CUDA kernels: not compiled (CPU only)")
    if info["gpu_usable"]:
        lines.append(f"  GPU usable now: yes ({info['cuda_devices']} device(s))")
    else:
        lines.append(f"  GPU usable now: no ({info.get('gpu_unusable_reason', '')})")
    lines.append(f"  torch {info['torch_version']} (torch.cuda available: {info['torch_cuda']})")
    lines.append(f"  CPU kernel threads: {info['cpu_threads']}")
    if "cpu" in info:
        lines += format_info(info)
    return "\n".join(lines)
