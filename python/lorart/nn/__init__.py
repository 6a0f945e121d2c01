"""lorart.nn: modules (NF4Linear, ...)."""
from .nf4_linear import NF4Linear  # noqa: F401

__all__ = ["NF4Linear"]
