"""Loading of the compiled core (lorart._C) and what the build contains."""
from __future__ import annotations

import functools

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "lorart's compiled core (lorart._C) is missing: install the package with `pip install .` "
        "(or build in place: cmake -S . -B build/dev -DLORART_PYTHON=ON -DLORART_DEV_INPLACE=ON "
        f"&& cmake --build build/dev). Original error: {e}"
    ) from e


@functools.lru_cache(maxsize=None)
def cuda_compiled() -> bool:
    return bool(_C.build_info()["cuda_compiled"])


@functools.lru_cache(maxsize=None)
def cuda_status() -> tuple[int, str]:
    """(number of GPUs lorart's kernels can use, reason when 0)."""
    n, why = _C.cuda_device_count()
    return int(n), str(why)


def cuda_usable() -> bool:
    return cuda_status()[0] > 0


def set_num_threads(n: int) -> None:
    """Threads of lorart's own CPU kernels (its thread pool; torch's are set with torch.set_num_threads). On a
    machine shared with other busy processes, 1 avoids waiting for descheduled workers."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"lorart: set_num_threads: argument `n`: expected an integer >= 1, got {n!r}")
    _C.set_num_threads(n)


def get_num_threads() -> int:
    return int(_C.get_num_threads())


def build_info() -> dict:
    """Version, whether CUDA kernels were compiled, for which architectures, and
    whether a GPU is usable now."""
    import torch

    info = dict(_C.build_info())
    n, why = cuda_status()
    info["cuda_devices"] = n
    info["gpu_usable"] = n > 0
    if n == 0:
        info["gpu_unusable_reason"] = why
    info["torch_version"] = torch.__version__
    info["torch_cuda"] = torch.cuda.is_available()
    info["cpu_threads"] = _C.get_num_threads()
    return info


def system_info() -> dict:
    """build_info() plus the machine and installation: the CPU (native bf16 / AMX), each GPU torch sees with
    how lorart's kernels run on it, and the optional extras installed."""
    from . import sysinfo

    info = build_info()
    info["cpu"] = sysinfo.cpu_info()
    info["gpus"] = sysinfo.gpu_info(info.get("cuda_architectures", "") if info["cuda_compiled"] else "")
    info["extras"] = sysinfo.extras()
    return info


def format_build_info(info: dict | None = None) -> str:
    info = info or build_info()
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
        from .sysinfo import format_info
        lines += format_info(info)
    return "\n".join(lines)
