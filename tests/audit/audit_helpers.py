"""A tiny random-init Llama and a word-level tokenizer whose vocabulary covers the shipped probe, built offline."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from deltaw.audit.probe import load_probe


def probe_words() -> list[str]:
    probe = load_probe()
    texts: list[str] = []
    for split in ("train", "heldout"):
        texts += list(probe.fillers[split]) + list(probe.templates[split]) + list(probe.neutral[split])
    texts += [w for words in probe.values.values() for w in words if w not in ("Hers", "hers")]
    texts += list(probe.modifiers.values())
    words: list[str] = []
    for text in texts:
        for w in re.findall(r"\w+|[^\w\s]", text.replace("{occupation}", "")):
            if w not in words:
                words.append(w)
    return words


def make_tokenizer():
    """WordLevel over the probe's words ("hers"/"Hers" deliberately absent: they must be skipped, not UNK)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2}
    for w in probe_words():
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def make_model(vocab_size: int, seed: int = 0, layers: int = 2, init: float = 0.2):
    """A 2-block Llama with a large init range, so prompts get clearly different (skewed) pronoun odds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=init, tie_word_embeddings=False, pad_token_id=1, eos_token_id=2,
                         bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def tiny_pair(seed: int = 0):
    tok = make_tokenizer()
    return make_model(len(tok), seed), tok


def save_tiny(folder: Path, seed: int = 0) -> Path:
    """The tiny model + tokenizer as a transformers folder (what ``--model`` and the merged reload read)."""
    model, tok = tiny_pair(seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
