"""Loading of the compiled core (lorart._C) and what the build contains (lorart.sysinfo: the machine)."""
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
