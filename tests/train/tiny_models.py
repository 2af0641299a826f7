"""Tiny random-init models, a byte-level tokenizer and toy data, so training tests run in seconds offline.

The tokenizer maps every byte to one token (ByteLevel pre-tokenizer + BPE without merges); the models are a
2-layer Llama (tied embeddings, like SmolLM2) and a 2-layer BERT, built from configs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<cls>", "<sep>", "<unk>"]


def byte_tokenizer(with_cls: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    if with_cls:
        core.post_processor = processors.TemplateProcessing(
            single="<cls> $A <sep>", special_tokens=[("<cls>", vocab["<cls>"]), ("<sep>", vocab["<sep>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   cls_token="<cls>", sep_token="<sep>", model_max_length=4096)


VOCAB = len(SPECIALS) + 256


def tiny_llama(seed: int = 0, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config).eval(), byte_tokenizer()


def tiny_bert_classifier(num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, num_labels=num_labels, pad_token_id=0)
    return BertForSequenceClassification(config).eval(), byte_tokenizer(with_cls=True)


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    model, tok = tiny_llama(seed)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def save_tiny_bert(path: Path, seed: int = 0) -> Path:
    model, tok = tiny_bert_classifier(2, seed)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


WORDS = "the cat sat on a mat and saw one red dog run to its warm bed at night".split()


def toy_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(n)]


def write_text_jsonl(path: Path, n: int = 40, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in toy_texts(n, seed)))
    return path


def write_prompt_jsonl(path: Path, n: int = 30, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        lines.append(json.dumps({"prompt": f"Q: {a}+{b}=", "response": f" {a + b}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_labeled_jsonl(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        label = "vowels" if i % 2 else "digits"
        pool = "aeiou" if label == "vowels" else "0123456789"
        lines.append(json.dumps({"text": "".join(rng.choice(pool) for _ in range(rng.randint(8, 20))), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path
