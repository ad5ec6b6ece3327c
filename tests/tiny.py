"""Tiny models built from configs (no network) for three families that name projections differently."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, Qwen2Config

VOCAB = 128

# bitsandbytes quantizes in blocks of 64, so hidden sizes stay multiples of 64 for the NF4 rows.
CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    ),
        "opt": lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
}

FAMILIES = ("llama", "qwen2", "opt")


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=dtype)
    return model.eval()


def tiny_inputs(model, batch: int = 2, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def save_tiny(family: str, path, seed: int = 0, extra_words: tuple[str, ...] = ()):
    """Save a tiny model plus a small word-level tokenizer to ``path`` (a local model folder).

    ``extra_words`` take the places of the first filler words (e.g. label words for classification)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model(family, seed)
    fillers = [f"w{i}" for i in range(VOCAB - 3 - 26)]
    fillers[: len(extra_words)] = extra_words
    words = ["<pad>", "<unk>", "<eos>"] + fillers + list("abcdefghijklmnopqrstuvwxyz")
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    model.config.pad_token_id, model.config.eos_token_id = 0, 2
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
