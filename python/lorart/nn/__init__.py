"""lorart.nn: modules (LoRA / QLoRA layers)."""
from .lora import LoRALinear  # noqa: F401

__all__ = ["LoRALinear"]
