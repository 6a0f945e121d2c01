"""Optimizers on lorart's fused kernels: PagedAdamW (states resident on the GPU within a
budget, paged from pinned host memory beyond it)."""
from .paged_adamw import PagedAdamW

__all__ = ["PagedAdamW"]
