"""Tiny random-init models for the compose tests (imported by conftest and the tests)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltaw


class TinyNet(nn.Module):
    """Every layer type deltaw adapts: Embedding -> Linear -> HF Conv1D -> Conv1d.  ids (N, L) -> (N, 6, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 12)
        self.proj = Conv1D(10, 12)  # nf=10 out, nx=12 in; weight (12, 10)
        self.conv = nn.Conv1d(10, 6, kernel_size=3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(self.emb(ids)))  # (N, L, 12)
        h = torch.tanh(self.proj(h))  # (N, L, 10)
        return self.conv(h.transpose(1, 2))  # (N, 6, L)


def randomize(model: nn.Module, name: str, scale: float = 0.3, seed: int = 0) -> None:
    """Give an adapter random non-zero factors (a fresh adapter has B = 0, i.e. no effect)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def make_tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


TOPIC_WORDS = {
    "alpha": "market shares profit bank growth investors price trade company economy".split(),
    "beta": "film music star award actor band album show festival stage".split(),
    "gamma": "match team goal coach season player win cup league injury".split(),
}


def topic_texts(topic: str, n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(f"{topic}:{seed}")
    words = TOPIC_WORDS[topic]
    return [" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(n)]


def tiny_lm_dir(path, vocab: int = 300):
    """A tiny random Llama plus a byte-level BPE tokenizer trained on the topic texts, saved as a transformers
    folder (what ``--model`` takes)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [t for topic in TOPIC_WORDS for t in topic_texts(topic, 20, 0)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab, min_frequency=1, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def train_topic_adapter(model, tok, topic: str, steps: int = 30, seed: int = 0) -> None:
    """A few Adam steps of next-token loss on the topic's texts, adapter ``topic`` only (tests only)."""
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "o_proj"]), topic,
                  activate=False)
    deltaw.set_trainable(model, topic)
    ids = torch.tensor([tok.encode(" ".join(topic_texts(topic, 10, seed + 1)))[:256]])  # (1, 256)
    opt = torch.optim.Adam(deltaw.adapter_parameters(model, topic), lr=3e-2)
    with deltaw.using(model, topic):
        model.train()
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    deltaw.set_trainable(model, None)
