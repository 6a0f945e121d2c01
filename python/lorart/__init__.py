"""lorart: parameter-efficient fine-tuning on a C++/CUDA core.

    import lorart
    print(lorart.build_info())
"""
from ._core import build_info, cuda_compiled, cuda_usable  # noqa: F401
from ._core import set_num_threads, get_num_threads  # noqa: F401
from .sysinfo import system_info, format_build_info  # noqa: F401
from . import ops  # noqa: F401  (registers torch.ops.lorart.*)
from . import nf4  # noqa: F401,E402
from . import optim  # noqa: F401  (lorart.optim.PagedAdamW)
from .inject import inject, trainable_report, set_adapter, disable_adapters, enable_adapters, merge, unmerge, adapter_ids  # noqa: F401,E501
from .adapters import save_adapter, load_adapter  # noqa: F401
from .training import train, TrainResult  # noqa: F401
from . import methods  # noqa: F401,E402  (lorart.methods.prepare / load: full, lora, qlora, adapter, prefix, prompt, bitfit)
from .training.compare import compare  # noqa: F401,E402
from .export import merge_and_unload, export  # noqa: F401,E402

from ._core import _C as _C_core

__version__ = _C_core.build_info()["version"]
del _C_core

__all__ = ["build_info", "system_info", "format_build_info", "cuda_compiled", "cuda_usable", "set_num_threads",
           "get_num_threads", "ops", "__version__",
           "inject", "trainable_report", "set_adapter", "disable_adapters", "enable_adapters", "merge", "unmerge",
           "adapter_ids", "save_adapter", "load_adapter", "nf4", "optim", "train", "TrainResult",
           "methods", "compare", "merge_and_unload", "export"]
