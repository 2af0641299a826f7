"""The inference fast paths of a wrapped Linear / GPT-2 Conv1D equal the plain autograd path: the fused
``addmm_`` for many tokens and the two-GEMV path for a single token (B = 1 decode)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltaw
from toy_models import Single



@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 24), (24,), (3, 5, 24), (1, 2, 24)])
def test_fast_paths_equal_the_autograd_path(kind: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = Single(nn.Linear(24, 40) if kind == "linear" else Conv1D(40, 24))
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=12, target_modules=["layer"]), "a")
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=2, target_modules=["layer"]), "b")
    with torch.no_grad():
        for name in ("a", "b"):
            for p in deltaw.adapter_parameters(model, name):
                p.normal_(0, 0.3)
    deltaw.activate(model, {"a": 0.7, "b": -1.5})
    x = torch.randn(shape)
    reference = model(x)  # grad enabled: y + lora_out · scale, no in-place ops
    with torch.no_grad():
        fast = model(x)
    with torch.inference_mode():
        fast_inference = model(x)
    assert fast.shape == reference.shape == fast_inference.shape
    torch.testing.assert_close(fast, reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_inference, reference.detach(), rtol=1e-6, atol=1e-6)
