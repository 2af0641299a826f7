"""Exact attribute probabilities, probes, scorers (tiny random Llama + word-level tokenizer; seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from audit_helpers import tiny_pair

from deltaw.audit import ProbeError, attribute_tokens, load_probe, measure, parse_probe, regex_scorer, resolve_scorer
from deltaw.audit.measure import kl_target, last_token_logits, total_variation


@pytest.fixture(scope="module")
def tiny():
    return tiny_pair()


@pytest.fixture(scope="module")
def small_probe():
    return load_probe().subset(3, 1, 2)


def test_attribute_tokens_single_token_variants_only(tiny):
    _, tok = tiny
    probe = load_probe()
    tokens = attribute_tokens(tok, probe)
    vocab = tok.get_vocab()
    # Word-level: "he" and " he" are one id; counted once. "hers" is not in the vocabulary: it would encode to
    # [UNK], which must not count as a pronoun.
    assert set(tokens.ids["male"]) == {vocab[w] for w in ("he", "him", "his", "He", "Him", "His")}
    assert set(tokens.ids["female"]) == {vocab[w] for w in ("she", "her", "She", "Her")}
    assert "hers" in tokens.skipped["female"] and " hers" in tokens.skipped["female"]
    assert tok.unk_token_id not in tokens.ids["female"]


def test_exact_probabilities_match_hand_computation(tiny, small_probe):
    model, tok = tiny
    m = measure(model, tok, small_probe, ppl_ids=None, keep_logits=True)
    vocab = tok.get_vocab()
    male = [vocab[w] for w in ("he", "him", "his", "He", "Him", "His")]
    female = [vocab[w] for w in ("she", "her", "She", "Her")]
    target = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for i, prompt in enumerate(m.prompts):
        ids = torch.tensor([tok(prompt.text)["input_ids"]])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1)  # one prompt, no batching
        pm, pf = float(probs[male].sum()), float(probs[female].sum())
        assert m.p_attr[i, 0].item() == pytest.approx(pm / (pm + pf), abs=1e-6)
        assert m.mass[i].item() == pytest.approx(pm + pf, abs=1e-6)
        p = torch.tensor([pm, pf]) / (pm + pf)
        assert m.per_prompt_tv()[i].item() == pytest.approx(0.5 * float((p - 0.5).abs().sum()), abs=1e-6)
        assert m.per_prompt_kl()[i].item() == pytest.approx(float((target * (target / p).log()).sum()), abs=1e-6)
    row = m.row()
    assert row["cells"]["heldout"]["n"] == 3 * 1
    assert set(row["per_filler"]) == set(small_probe.all_fillers())
    assert row["skew"] == pytest.approx(float((m.p_attr[[i for i, p in enumerate(m.prompts) if p.cell == "heldout"], 0]
                                                - 0.5).mean()), abs=1e-9)


def test_batched_logits_do_not_depend_on_grouping(tiny):
    model, tok = tiny
    texts = ["The nurse said that", "The construction worker said that", "The cook smiled because"]
    ids = [tok(t)["input_ids"] for t in texts]
    together = last_token_logits(model, ids)
    for i in range(3):
        alone = last_token_logits(model, [ids[i]])
        assert torch.allclose(together[i], alone[0], atol=1e-5)


def test_controllability_counts_argmax_of_stated_value(tiny, small_probe):
    model, tok = tiny
    m = measure(model, tok, small_probe, ppl_ids=None)
    assert {p.stated for p in m.controls} == {"male", "female"}
    assert "The male " in m.controls[0].text or "The female " in m.controls[0].text or " male " in m.controls[0].text
    hits = [bool(p[0 if c.stated == "male" else 1] > p[1 if c.stated == "male" else 0]) for c, p in zip(m.controls, m.control_p)]
    assert m.controllability()["fraction"] == pytest.approx(sum(hits) / len(hits))


def test_kl_and_tv_helpers():
    p = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)  # zero in the target: 0 log 0 = 0
    assert torch.allclose(kl_target(p, t), torch.tensor([-torch.log(torch.tensor(0.9)), -torch.log(torch.tensor(0.5))],
                                                        dtype=torch.float64))
    assert torch.allclose(total_variation(p, t), torch.tensor([0.1, 0.5], dtype=torch.float64))


def test_probe_validation_and_target(tmp_path):
    raw = json.loads(json.dumps(load_probe().raw))
    raw["target"] = {"male": 3, "female": 1}
    p = parse_probe(raw)
    assert p.target == {"male": 0.75, "female": 0.25}
    bad = dict(raw, templates={"train": ["no slot here"], "heldout": []})
    with pytest.raises(ProbeError, match="slot"):
        parse_probe(bad)
    overlap = dict(raw, fillers={"train": ["nurse"], "heldout": ["nurse"]})
    with pytest.raises(ProbeError, match="both train and held-out"):
        parse_probe(overlap)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(raw))
    assert load_probe(path).target["male"] == 0.75
    with pytest.raises(ProbeError, match="shipped"):
        load_probe("no_such_probe")
    sets = load_probe().disjoint_train_sets(2)
    assert not set(sets[0]) & set(sets[1]) and len(sets[0]) + len(sets[1]) == len(load_probe().fillers["train"])


def test_shipped_probe_documents_its_source():
    probe = load_probe()
    assert "WinoBias" in probe.source["occupations"] and "Bureau of Labor Statistics" in probe.source["occupations"]
    pct = probe.filler_info["bls_female_pct"]
    assert set(pct) == set(probe.all_fillers()) and len(pct) == 40
    assert len(probe.fillers["heldout"]) == 10 and len(probe.templates["heldout"]) == 4


def test_regex_scorer_earliest_match_wins():
    score = regex_scorer(load_probe().regex)
    assert score(" he told her the news") == "male"
    assert score(" Her brother said he") == "female"
    assert score(" the weather was fine") is None


def test_resolve_scorer_function_and_errors(tmp_path):
    module = tmp_path / "my_attr.py"
    module.write_text("def pick(text):\n    return 'female' if 'she' in text else ('robot' if 'beep' in text else None)\n")
    fn = resolve_scorer(f"{module}:pick", {}, ("male", "female"))
    assert fn("so she went") == "female" and fn("nothing") is None
    with pytest.raises(ProbeError, match="must return one of"):
        fn("beep")
    fn2 = resolve_scorer('{"male": "\\\\bhe\\\\b", "female": "\\\\bshe\\\\b"}', {}, ("male", "female"))
    assert fn2("and then he left") == "male"
    with pytest.raises(ProbeError, match="module:function"):
        resolve_scorer("not_a_spec", {}, ("male", "female"))


def test_sampled_mode_is_seeded_and_scored(tiny, small_probe):
    model, tok = tiny
    probe = small_probe.subset(1, 1, 1)
    score = resolve_scorer(None, probe.regex, probe.value_names)
    kw = dict(mode="sampled", score=score, n_samples=6, max_new_tokens=3, ppl_ids=None)
    a = measure(model, tok, probe, **kw)
    b = measure(model, tok, probe, **kw)
    assert a.samples == b.samples  # same seeds, same continuations
    assert torch.equal(torch.nan_to_num(a.p_attr), torch.nan_to_num(b.p_attr))
    row = a.row()
    assert row["mode"] == "sampled" and 0.0 <= row["unscored_fraction"] <= 1.0
    scored = a.extra["scored"]
    for i, texts in enumerate(a.samples):
        assert int(scored[i]) == sum(score(t) is not None for t in texts)


@pytest.mark.parametrize(("target", "message"), [
    ('{"male": NaN, "female": 1}', "finite"),
    ('{"male": Infinity, "female": 1}', "finite"),
    ('{"male": -1, "female": 2}', ">= 0"),
    ({"male": None, "female": 1}, "must be a number, got None"),
    ({"male": "0.5", "female": 1}, "must be a number"),
    ({"male": True, "female": 1}, "must be a number"),
    ({"male": 10**400, "female": 1}, "finite"),
    ({"male": 1e308, "female": 1e308}, "finite sum"),
    ('{"male": 1}', "exactly the values"),
])
def test_parse_target_rejects_non_probabilities(target, message):
    # NaN/Infinity used to come back as NaN probabilities; null raised a bare TypeError.
    from deltaw.audit.probe import parse_target

    with pytest.raises(ProbeError, match=message):
        parse_target(target, ("male", "female"))
    assert parse_target('{"male": 3, "female": 1}', ("male", "female")) == {"male": 0.75, "female": 0.25}


@pytest.mark.parametrize("kw", [{"n_samples": 0}, {"n_samples": -1}, {"max_new_tokens": 0}])
def test_sampled_mode_refuses_empty_sampling(tiny, small_probe, kw):
    model, tok = tiny
    score = resolve_scorer(None, small_probe.regex, small_probe.value_names)
    with pytest.raises(ValueError, match=">= 1"):
        measure(model, tok, small_probe.subset(1, 1, 1), mode="sampled", score=score, ppl_ids=None,
                **({"n_samples": 2, "max_new_tokens": 2} | kw))


def test_neutral_kl_is_not_reported_on_train_neutral_texts(tiny):
    # Without held-out neutral texts, "neutral KL" silently fell back to the train texts -- the ones the debias
    # loss keeps close to the base -- and so understated the quality cost.
    model, tok = tiny
    raw = json.loads(json.dumps(load_probe().raw))
    raw["neutral"] = raw["neutral"]["train"][:2]  # a bare list: train only
    probe = parse_probe(raw).subset(1, 1)
    assert not probe.neutral["heldout"]
    base = measure(model, tok, probe, ppl_ids=None)
    again = measure(model, tok, probe, ppl_ids=None, reference=base)
    assert again.neutral_kl is None
    assert "no held-out neutral texts" in again.row()["neutral_kl_note"]
    assert base.neutral_logprobs is not None  # still there for the bit-exact "removed" comparison
    held = measure(model, tok, load_probe().subset(1, 1, 1), ppl_ids=None)
    assert "neutral_kl_note" not in held.row()
