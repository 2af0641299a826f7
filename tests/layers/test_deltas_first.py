"""The prefill order of Linear-style layers: from ``START_MIN_TOKENS`` tokens, bias + the live deltas are written
first and the base product is added into them (``_deltas_first``, ``base_into``). It must give the usual order's
result up to rounding on every model of the shared table, and step aside wherever it would compute something else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltaw
from deltaw.layers import base as layers_base
from deltaw.layers.linear import LoraConv1D, LoraLinear
from toy_models import CASE_IDS, CASES, Single, randomize

TOL = dict(rtol=1e-5, atol=1e-5)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    for cls in (LoraLinear, LoraConv1D):
        real = cls.base_into
        monkeypatch.setattr(cls, "base_into", lambda self, d, x, w, real=real: calls.append(1) or real(self, d, x, w))
    return calls


def _both(model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch, grad: bool = False):
    outs = []
    for threshold in (1 << 40, 1):  # the usual order, then the deltas first (forced)
        monkeypatch.setattr(layers_base, "START_MIN_TOKENS", threshold)
        with torch.set_grad_enabled(grad):
            out = model(x)
        outs.append(getattr(out, "logits", out))
    return outs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_deltas_first_equals_the_usual_order(case, monkeypatch):
    """A weighted stack with a weight-0 member holding NaN (which must add nothing, as in the usual order)."""
    model = case.build()
    for i, name in enumerate(("a", "b", "z")):
        deltaw.attach(model, case.config, name)
        randomize(model, name, seed=i)
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, "z"):
            p.fill_(float("nan"))
    deltaw.activate(model, {"a": 1.0, "b": -0.5, "z": 0.0})
    calls = _spy(monkeypatch)
    after, first = _both(model, case.input(), monkeypatch)
    torch.testing.assert_close(first, after, **TOL)
    linear_style = any(isinstance(layer, LoraLinear) for layer in deltaw.state(model).layers.values())
    assert bool(calls) is linear_style, case.name


@pytest.mark.parametrize("bias", [True, False])
def test_deltas_first_steps_aside_where_it_would_differ(bias, monkeypatch):
    model = Single(nn.Linear(16, 12, bias=bias)).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules=["layer"], dropout=0.5), "a")
    randomize(model, "a")
    deltaw.activate(model, "a")
    calls = _spy(monkeypatch)
    x = torch.randn(3, 5, 16)
    after, first = _both(model, x, monkeypatch)
    torch.testing.assert_close(first, after, **TOL)
    assert calls
    calls.clear()
    after, first = _both(model, x, monkeypatch, grad=True)  # autograd: the usual order
    torch.testing.assert_close(first, after, **TOL)
    assert not calls
    model.train()  # dropout in training: the usual order (its own random mask)
    with torch.no_grad():
        model(x)
    model.eval()
    assert not calls
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast: the usual order
        model(x)
    assert not calls
    model.to(torch.bfloat16)  # half precision (factors too): the usual order, the same bits
    after, first = _both(model, x.bfloat16(), monkeypatch)
    assert torch.equal(first, after) and not calls


def test_a_subclass_with_its_own_projection_does_not_inherit_the_order():
    class OwnProjection(LoraLinear):
        def project_in(self, x, a):
            return super().project_in(x, a) * 2

    class OwnBaseForward(LoraLinear):
        def base_forward(self, x, weight):
            return super().base_forward(x, weight) * 2

    class OwnAddLora(LoraLinear):  # the inference path's hook (a review: its clamp was skipped from 256 tokens)
        def add_lora_(self, y, x, name, scale):
            return super().add_lora_(y, x, name, scale).clamp_(-1, 1)

    assert LoraLinear._base_into_matches() and LoraConv1D._base_into_matches()
    assert not any(c._base_into_matches() for c in (OwnProjection, OwnBaseForward, OwnAddLora))


def test_deltas_first_scales_inside_the_product(monkeypatch):
    """alpha · (h·Bᵀ), as ``addmm_(alpha=)`` in the usual order: h·alpha first would overflow (2.4e38 · 8)."""
    model = Single(nn.Linear(16, 12)).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=16, target_modules=["layer"]), "a")
    a, b = deltaw.adapter_parameters(model, "a")
    with torch.no_grad():
        a.fill_(1.0)
        b.fill_(1e-4)
    deltaw.activate(model, {"a": 2.0})
    calls = _spy(monkeypatch)
    after, first = _both(model, torch.full((4, 5, 16), 1.5e37), monkeypatch)
    assert calls and torch.isfinite(after).all() and torch.isfinite(first).all()
    torch.testing.assert_close(first, after)
