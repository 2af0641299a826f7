"""``generate`` with one adapter per row equals generating each row alone with its adapter (greedy, KV cache)."""

from __future__ import annotations

import pytest
import torch

import deltaw
from deltaw.batching import generate, per_row
from toy_models import tiny_llama


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_llama().eval()
    deltaw.attach(m, deltaw.LoraConfig(r=4, alpha=8, target_modules="all-linear"), "tech")
    deltaw.attach(m, deltaw.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), "sport")
    for i, name in enumerate(["tech", "sport"]):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in deltaw.adapter_parameters(m, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


ROWS = ["tech", "sport", None, {"tech": 0.5, "sport": 0.5}, "tech"]
GEN = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def _alone(model, ids, rows, **kw):
    outs = []
    for i, spec in enumerate(rows):
        with deltaw.using(model, spec), torch.inference_mode():
            outs.append(model.generate(input_ids=ids[i:i + 1], **{**GEN, **kw}))
    return torch.cat(outs)


@pytest.mark.parametrize("strategy", ["auto", "native", "dense", "grouped", "rowwise", "reference"])
def test_generate_mixed_equals_per_row(model, strategy):
    ids = torch.randint(1, 64, (len(ROWS), 6), generator=torch.Generator().manual_seed(5))
    expected = _alone(model, ids, ROWS)
    assert len({tuple(r.tolist()) for r in expected[:4]}) == 4, "adapters must lead to different generations"
    got = generate(model, ids, adapters=ROWS, strategy=strategy, **GEN)
    assert torch.equal(got, expected)
    with per_row(model, ROWS, strategy=strategy), torch.inference_mode():
        assert torch.equal(model.generate(input_ids=ids, **GEN), expected)
    assert deltaw.state(model).rows is None


def test_generate_mapping_inputs_and_beam_search(model):
    """Beam search expands each row to k consecutive entries; every entry keeps its row's adapter."""
    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(6))
    rows = ["sport", "tech", None]
    beams = dict(num_beams=2, num_return_sequences=2, max_new_tokens=5)
    got = generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, adapters=rows,
                   **{**GEN, **beams})
    expected = _alone(model, ids, rows, **beams)
    assert got.shape[0] == 6
    assert torch.equal(got, expected)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(62)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def test_generate_with_tokenizer_left_pads_prompts_of_different_lengths(model):
    tok = _word_tokenizer()
    prompts = ["w3 w9 w14 w2 w40", "w7", "w5 w5 w8", "w61 w60"]
    rows = ["tech", None, {"sport": 1.0}, {"tech": 0.5, "sport": -0.5}]
    texts = generate(model, tok, adapters=rows, prompts=prompts, max_new_tokens=6, do_sample=False)
    expected = []
    for prompt, spec in zip(prompts, rows):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with deltaw.using(model, spec), torch.inference_mode():
            out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert texts == expected
    assert tok.padding_side == "right", "the tokenizer's own padding side must be restored"
    with pytest.raises(ValueError, match="one prompt per adapter"):
        generate(model, tok, adapters=rows, prompts=prompts[:2])


def test_generate_needs_exactly_one_spec_per_input_row(model):
    """4 prompts with adapters ["tech", "sport"] ran silently, per_row reading them as 2 entries per spec (its
    beam layout): prompt 1 was generated with "tech". The tensor and mapping forms now refuse a count mismatch, as
    the tokenizer form did, with messages of the same shape (both counts)."""
    ids = torch.randint(1, 64, (4, 5), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="one input row per adapter spec: got 4 input rows for 2 adapter specs"):
        generate(model, ids, ["tech", "sport"], **GEN)
    with pytest.raises(ValueError, match="got 4 input rows for 8 adapter specs"):
        generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["tech"] * 8, **GEN)
    with pytest.raises(ValueError, match="not a single str"):
        generate(model, ids[:2], "ab", **GEN)  # a str is a sequence of two one-letter "specs"
    with pytest.raises(ValueError, match="one prompt per adapter spec: got 2 prompts for 4 adapter specs"):
        generate(model, _word_tokenizer(), adapters=ROWS[:4], prompts=["w1", "w2"])
    assert deltaw.state(model).rows is None  # refused before per_row opened
    # beams / num_return_sequences expand rows inside model.generate: one spec per *input* row is still right
    got = generate(model, ids[:2], ["tech", None], num_beams=2, num_return_sequences=2, **GEN)
    assert got.shape[0] == 4


def test_generate_with_a_tokenizer_that_makes_token_type_ids(model):
    """A tokenizer whose model inputs include token_type_ids made ``model.generate`` refuse the decoder's kwargs
    (found in review): only input_ids and attention_mask go in."""
    tok = _word_tokenizer()
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    assert "token_type_ids" in tok(["w1"], return_tensors="pt")
    texts = generate(model, tok, adapters=["tech", None], prompts=["w3 w4", "w5"], max_new_tokens=3,
                     do_sample=False)
    assert len(texts) == 2
