"""Helpers for the planner's tests: models built the way lorart.train builds them, exact saved-tensor bytes
(autograd's saved-tensor hooks) and the exact peak of live tensor bytes (torch's profiler memory events)."""
from __future__ import annotations

import contextlib

import torch

SMALL = dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True)
# (method, lorart.train keywords): every method, LoRA also on all linear layers, the adapter's other activation
CASES = [("full", {}), ("lora", {"r": 8}), ("lora", {"r": 4, "targets": "all-linear"}), ("qlora", {"r": 8}),
         ("adapter", {}), ("adapter", {"method_options": {"activation": "relu", "bottleneck": 16}}),
         ("prefix", {}), ("prefix", {"method_options": {"projection": True}}), ("prompt", {}), ("bitfit", {})]


def build_like_train(config: dict, method: str, model_dtype=torch.float32, seed: int = 0, **options):
    """(model, method, TrainOptions): a random lorart Llama with `method` attached as lorart.train attaches it
    (the method's base factory, attach_method: float32 masters, gradient checkpointing)."""
    from lorart.models import LlamaConfig
    from lorart.training.options import TrainOptions
    from lorart.training.setup import random_model_with_method

    opts = TrainOptions(method=method, **options).validate()
    torch.manual_seed(seed)
    model, meth = random_model_with_method(LlamaConfig(**config), opts, model_dtype)
    return model.train(), meth, opts


def saved_bytes(model, B: int, T: int, autocast=None) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward (weights excluded)."""
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(input_ids=ids, labels=ids, loss_reduction="sum", return_logits=False)
    return sum(v for k, v in seen.items() if k not in weights)


def live_tensor_peak(fn) -> int:
    """Peak of live tensor bytes allocated while `fn` runs, above the bytes live when it starts (the CPU
    allocator's events in torch's profiler: exact, no allocator caching)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def train_step_fn(model, meth, opts, autocast=None):
    """One lorart.train step (forward/backward of the chunked loss, clipping, PagedAdamW, zero_grad) as a
    closure over a fixed random batch of opts.batch_size x opts.max_seq_len tokens."""
    from lorart.optim import PagedAdamW
    params = meth.trainable_parameters()
    opt = PagedAdamW(params, lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (opts.batch_size, opts.max_seq_len),
                        generator=torch.Generator().manual_seed(2))

    def step():
        for _ in range(opts.grad_accum):
            ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
            with ctx:
                out = model(input_ids=ids, labels=ids, loss_reduction="sum", return_logits=False)
            out.loss.backward()
            del out
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step
