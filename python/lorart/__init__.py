"""lorart: LoRA/QLoRA fine-tuning runtime (placeholder; the real package init is written elsewhere)."""
