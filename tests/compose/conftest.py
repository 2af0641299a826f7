"""Fixtures for the compose tests (all CPU, milliseconds)."""

from __future__ import annotations

import pytest
import torch
from compose_helpers import TinyNet, make_tiny, randomize

import deltaw


@pytest.fixture
def tiny_two() -> TinyNet:
    """TinyNet with adapters "a" (r=2, alpha 4, emb/fc1/proj) and "b" (r=3, rsLoRA, rank/alpha patterns,
    fc1/conv): different ranks, targets and scaling rules."""
    model = make_tiny()
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=4.0, target_modules=["emb", "fc1", "proj"]), "a")
    deltaw.attach(model, deltaw.LoraConfig(r=3, alpha=5.0, target_modules=["fc1", "conv"], use_rslora=True,
                                           rank_pattern={"conv": 4}, alpha_pattern={"conv": 2.0}), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    return model


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(5))
