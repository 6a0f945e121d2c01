"""Llama-family models: config, plain-torch causal LM, loading (HF folder, GGUF), generation."""
from .config import LlamaConfig
from .generate import chat, generate, left_pad, sample_next
from .gguf_import import gguf_config, gguf_tokenizer, load_gguf
from .hub import apply_linear_factory, base_model_id, cache_dir, default_model_path, load_model, nf4_factory
from .llama import IGNORE_INDEX, CausalLMOutput, KVCache, LlamaForCausalLM, causal_lm_loss
from .loading import build_model, load_hf_folder, save_hf_folder
from .tokenizer import Tokenizer

__all__ = [
    "LlamaConfig", "LlamaForCausalLM", "CausalLMOutput", "KVCache", "IGNORE_INDEX", "causal_lm_loss",
    "Tokenizer", "load_model", "nf4_factory", "apply_linear_factory", "load_hf_folder", "save_hf_folder", "build_model", "load_gguf",
    "gguf_config", "gguf_tokenizer", "default_model_path", "cache_dir", "base_model_id", "generate", "chat",
    "left_pad", "sample_next",
]
