"""lorart.nn: modules (NF4Linear, LoRALinear, BottleneckAdapter, ...)."""
from .nf4_linear import NF4Linear  # noqa: F401
from .lora import LoRALinear  # noqa: F401
from .bottleneck import BottleneckAdapter  # noqa: F401

__all__ = ["NF4Linear", "LoRALinear", "BottleneckAdapter"]
