"""load_causal_lm / load_encoder: name resolution, local folders, and errors that name the path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltaw.models.local as local
from deltaw.models import ModelLoadError, load_causal_lm, load_encoder


def test_names_select_the_embedded_models(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(local, "load_smollm2", lambda device, dtype: seen.append(f"smollm2:{device}:{dtype}") or ("m", "t"))
    monkeypatch.setattr(local, "load_minilm", lambda device: seen.append(f"minilm:{device}") or ("e", "t"))
    for name in (None, "smollm2", " SmolLM2-135M-Instruct "):
        assert load_causal_lm(name) == ("m", "t")
    for name in (None, "minilm", "all-MiniLM-L6-v2"):
        assert load_encoder(name) == ("e", "t")
    assert seen == ["smollm2:cpu:torch.float32"] * 3 + ["minilm:cpu"] * 3


def test_missing_and_invalid_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"causal LM path .*no-such-model' does not exist.*'smollm2'"):
        load_causal_lm(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match=r"Hub ids are not downloaded"):
        load_encoder("org/some-hub-model")
    with pytest.raises(ModelLoadError, match=r"has no config\.json, so it is not a transformers model folder"):
        load_causal_lm(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"is a file; pass a transformers model folder or a \.gguf file"):
        load_causal_lm(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match=r"not a transformers model folder \(no config\.json\)"):
        load_encoder(tmp_path)


def test_local_folders_round_trip(tmp_path: Path) -> None:
    """A tiny random model saved with save_pretrained loads back identically, offline, with a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, "hello": 3, "world": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    lm.save_pretrained(tmp_path / "lm")
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path / "lm")
    model, tok = load_causal_lm(str(tmp_path / "lm"), dtype=torch.float32)
    assert tok.pad_token == "</s>"
    ids = torch.tensor([[3, 4, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lm.eval()(ids).logits)

    enc = BertModel(BertConfig(vocab_size=5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=32))
    enc.save_pretrained(tmp_path / "enc")
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(tmp_path / "enc")
    model, tok = load_encoder(tmp_path / "enc")
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, enc.eval()(ids).last_hidden_state)
