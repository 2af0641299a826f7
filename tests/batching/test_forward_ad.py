"""Forward-mode AD through a per_row batch: the packed strategies built their packs from detached factors, so a
dual factor's tangent was lost (None) for every strategy but ``reference``."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

import deltaw
from deltaw.batching import per_row
from toy_models import Single, randomize


@pytest.mark.parametrize("strategy", ["auto", "uniform", "grouped", "dense", "rowwise", "native", "reference"])
@pytest.mark.parametrize("tokens", [1, 300], ids=["decode", "prefill"])
def test_per_row_keeps_the_factor_tangents(strategy: str, tokens: int) -> None:
    torch.manual_seed(0)
    model = Single(nn.Linear(8, 6)).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=2, target_modules=["layer"]), "a")
    randomize(model, "a")
    x = torch.randn(2, tokens, 8)
    a, b = (p.detach() for p in deltaw.adapter_parameters(model, "a"))
    tb = torch.randn_like(b)
    with torch.no_grad(), fwAD.dual_level(), per_row(model, ["a", None], strategy=strategy):
        out = functional_call(model, {"layer.lora_B.a": fwAD.make_dual(b, tb)}, (x,))
        tangent = fwAD.unpack_dual(out).tangent
    expected = torch.zeros(2, tokens, 6)
    expected[0] = model.layer.scaling["a"] * (x[0] @ a.T) @ tb.T
    assert tangent is not None
    torch.testing.assert_close(tangent, expected, rtol=1e-4, atol=1e-4)
