"""Every path that reads LoRA factors reads them as plain Parameters of ``lora_A`` / ``lora_B``. A factor that
left ``_parameters`` (``torch.nn.utils.parametrize``, or replaced by a plain attribute) must be refused with a
clear error on every path -- never skipped, which silently left the adapter out -- and a parametrized base weight
must be refused by merge (its ``.data`` is a fresh tensor each time, so the merged weight went nowhere)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import deltaw
from toy_models import Single, randomize


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 2


def _two_adapters() -> nn.Module:
    torch.manual_seed(0)
    model = Single(nn.Linear(40, 24)).eval()
    for i, name in enumerate(("a", "b")):
        deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules=["layer"]), name)
        randomize(model, name, seed=i)
    deltaw.activate(model, ["a", "b"])
    return model


@pytest.mark.parametrize("tokens", [1, 300], ids=["decode plan", "prefill order"])
@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_a_parametrized_factor_next_to_a_plain_adapter_is_refused(tokens: int, which: str) -> None:
    """With a second, plain adapter the decode plan and the prefill order had terms of their own and skipped the
    parametrized one: the output was base + the other adapter."""
    model = _two_adapters()
    parametrize.register_parametrization(getattr(model.layer, which), "b", nn.Identity())
    with torch.no_grad(), pytest.raises(deltaw.errors.TargetError, match="parametrized"):
        model(torch.randn(tokens, 40))


def test_a_factor_moved_out_of_parameters_is_refused() -> None:
    """``del`` + ``setattr`` of a plain tensor (how forward AD is often run over a module's parameters) took the
    factor out of ``_parameters``: forward left the adapter out and merge reported it merged, weight unchanged."""
    model = _two_adapters()
    factor = model.layer.lora_A.b
    delattr(model.layer.lora_A, "b")
    setattr(model.layer.lora_A, "b", factor.detach().clone())
    with torch.no_grad(), pytest.raises(deltaw.errors.TargetError, match="not a Parameter"):
        model(torch.randn(2, 40))
    with pytest.raises(deltaw.errors.TargetError):
        deltaw.merge(model, "b")
    assert deltaw.merged(model) == ()


@pytest.mark.parametrize("how", [nn.Identity, _Double], ids=["identity", "doubling"])
def test_merge_into_a_parametrized_base_weight_is_refused(how) -> None:
    """The merge wrote into the parametrization's freshly computed tensor: it reported success, the output was
    the base's (the adapter lost), and ``disabled()`` then raised KeyError: 'weight'."""
    model = _two_adapters()
    deltaw.activate(model, "a")
    parametrize.register_parametrization(model.layer.base_layer, "weight", how())
    x = torch.randn(2, 40)
    with torch.no_grad():
        live = model(x)
    with pytest.raises(deltaw.errors.MergeError, match="not a plain Parameter"):
        deltaw.merge(model, "a")
    assert deltaw.merged(model) == ()
    with torch.no_grad():
        torch.testing.assert_close(model(x), live)
        with deltaw.disabled(model):
            torch.testing.assert_close(model(x), model.layer.base_layer(x))


def test_parametrizing_the_base_after_a_merge_says_why_under_disabled() -> None:
    model = _two_adapters()
    deltaw.activate(model, "a")
    deltaw.merge(model, "a")
    parametrize.register_parametrization(model.layer.base_layer, "weight", nn.Identity())
    with torch.no_grad(), deltaw.disabled(model), pytest.raises(deltaw.errors.MergeError, match="no longer"):
        model(torch.randn(2, 40))


def test_layers_pickled_with_a_bool_plain_base_get_the_base_type_back() -> None:
    """``_plain_base`` was a bool before it held the base's type: such a layer, unpickled, compared the base's
    type with True and never ran the base directly again (right outputs, the slow path for good)."""
    import pickle
    model = _two_adapters()
    layer = model.layer
    object.__setattr__(layer, "_plain_base", True)
    thawed = pickle.loads(pickle.dumps(layer))
    assert thawed._plain_base is nn.Linear
    assert thawed.runs_directly(thawed.base_layer)


def test_delete_and_set_trainable_refuse_a_parametrized_factor_before_changing_anything() -> None:
    """``delete`` removed the name from the dict's keys, then failed on the parametrized property: the model was
    left half-deleted (the name neither usable nor free). ``set_trainable`` raised torch's non-leaf error midway."""
    model = _two_adapters()
    parametrize.register_parametrization(model.layer.lora_A, "b", nn.Identity())
    with pytest.raises(deltaw.errors.TargetError, match="parametrized"):
        deltaw.delete(model, "b")
    with pytest.raises(deltaw.errors.TargetError, match="parametrized"):
        deltaw.set_trainable(model, "a")
    assert deltaw.adapters(model) == ["a", "b"] and dict(deltaw.active(model)) == {"a": 1.0, "b": 1.0}
    assert [p.requires_grad for p in deltaw.adapter_parameters(model, "a")] == [True, True]
    parametrize.remove_parametrizations(model.layer.lora_A, "b")
    deltaw.delete(model, "b")
    assert deltaw.adapters(model) == ["a"]
