"""A tiny random Llama with a small byte-level BPE tokenizer (ChatML template), saved as an HF folder:
fast enough for real training runs in tests."""
from __future__ import annotations

import json
import os

import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer(vocab_size: int = 384):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lorart.data import default_dataset_paths
    from lorart.models import Tokenizer

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                         "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = []
    for k, p in default_dataset_paths().items():
        with open(p, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                texts += [m["content"] for m in rec.get("messages", [])] + ([rec["text"]] if "text" in rec else [])
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                     chat_template=CHATML)


def tiny_model(tok, seed: int = 0, layers: int = 2, hidden: int = 64):
    from lorart.models import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id)
    return LlamaForCausalLM(cfg).eval()


def tiny_folder(path, seed: int = 0) -> str:
    from lorart.models import save_hf_folder
    tok = tiny_tokenizer()
    save_hf_folder(tiny_model(tok, seed), os.fspath(path), tok)
    return os.fspath(path)
