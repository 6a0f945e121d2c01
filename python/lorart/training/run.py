"""`lorart.train(...)`: one run of the recipe (recipe.py)."""
from __future__ import annotations

from typing import Callable, Optional

from .options import TrainOptions
from .recipe import Recipe
from .result import TrainResult


def train(model=None, data=None, *, tokenizer=None, eval_data=None, output_dir: str = "lorart-output",
          device: str = "auto", resume=False, overwrite: bool = False, general_data=True, progress: bool = True,
          stream=None, callback: Optional[Callable[[dict], Optional[bool]]] = None, **options) -> TrainResult:
    """Fine-tune `model` on `data` with a lorart.methods method: "lora" (default), "qlora", "full", "adapter",
    "prefix", "prompt" or "bitfit" (its own options in `method_options=`, e.g. {"bottleneck": 64}).

    model: None / "default" (the embedded SmolLM2-135M-Instruct), an HF folder or .gguf path, or a loaded
        nn.Module (lorart's LlamaForCausalLM or a transformers causal LM) with `tokenizer=`.
    data: a data file (.jsonl/.json/.parquet/.csv), a folder or glob of them, records (any iterable of dicts), or
        None / "default" (the bundled answer-format set; its held-out file is the eval set); formats in
        docs/train.md "Data". eval_data: the same kinds; without it `eval_fraction` of data is held out.
        general_data: True (the bundled general text), a path, or False: the perplexity before/after that checks
        forgetting.
    output_dir: a folder holding a previous run is refused unless `resume` or `overwrite`.
    resume: True (the newest intact checkpoint in output_dir, if any) or a checkpoint folder; continues to
        exactly the result of an uninterrupted run, and refuses a checkpoint of another model, data or options.
    overwrite: replace the previous run in output_dir. callback(record) after each step; True stops training.
    options: see lorart.training.TrainOptions (r, alpha, dropout, targets, lr, epochs, max_steps, batch_size,
        grad_accum, max_seq_len, warmup, schedule, weight_decay, max_grad_norm, skip_nonfinite, eval_every,
        save_every, early_stopping_patience, gradient_checkpointing, packing, seed, eval_fraction, num_samples, ...).
    Writes output_dir/{adapter/, metrics.jsonl, loss.png, samples.md, summary.json, checkpoints/}.
    Raises ValueError/TypeError for bad arguments, lorart.training.TrainingError when the run cannot go on
    (NonFiniteError: a non-finite loss or gradient; a failed write: disk full, read-only)."""
    recipe = Recipe(TrainOptions.from_keywords(options), output_dir, device=device, progress=progress, stream=stream,
                    callback=callback)
    try:
        recipe.setup(model, data, tokenizer=tokenizer, eval_data=eval_data, general_data=general_data,
                     resume=resume, overwrite=overwrite)
        recipe.train()
        result = recipe.finish()
    except BaseException:
        recipe.close(failed=True)
        raise
    recipe.close()
    return result
