"""``LoraLinear``'s decode plan: a decode step (a few tokens, inference, fp32 CPU) runs the kernel on factors checked
once per activation. It must give the general path's bits, step aside wherever that path would do something else,
and follow every change of the factors, the scaling and the active set."""

from __future__ import annotations

import copy
import dataclasses
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn

import deltaw
from deltaw.batching import per_row
from deltaw.layers import native
from deltaw.layers.linear import LoraLinear
from toy_models import CASES, Single, logits_of, randomize

needs_kernel = pytest.mark.skipif(native.kernel() is None, reason="no C compiler / AVX2+FMA here: torch path only")
LINEAR_CASES = [c for c in CASES if c.name in ("mlp", "gpt2_conv1d", "llama", "bert")]


def _replan(model: nn.Module) -> None:
    for layer in deltaw.state(model).layers.values():
        object.__setattr__(layer, "_decode", None)


def _spy(monkeypatch: pytest.MonkeyPatch, model: nn.Module) -> list[int]:
    """Count the plan's kernel calls (plans made from now on call through the counter)."""
    calls: list[int] = []
    real = native.gemv_function()

    def counting(*args) -> int:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(native, "gemv_function", lambda: counting)
    _replan(model)
    return calls


def _general(model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch, grad: bool = False) -> torch.Tensor:
    """The output through ``LoraLayer.forward`` (no plan), plans restored afterwards."""
    with monkeypatch.context() as m:
        m.setattr(native, "gemv_function", lambda: None)
        _replan(model)
        with torch.set_grad_enabled(grad):
            out = logits_of(model, x)
    _replan(model)
    return out


def _single(rank: int = 4, bias: bool = True, in_f: int = 16, out_f: int = 12) -> nn.Module:
    torch.manual_seed(0)
    model = Single(nn.Linear(in_f, out_f, bias=bias)).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=rank, alpha=2 * rank, target_modules=["layer"]), "a")
    randomize(model, "a")
    deltaw.activate(model, "a")
    return model


@needs_kernel
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c.name for c in LINEAR_CASES])
def test_plan_gives_the_general_paths_bits(case, monkeypatch):
    """Linear and Conv1D layers, adapters of two ranks in a weighted stack whose weight-0 member holds NaN (it must
    add nothing): the planned decode step is the general path's, bit for bit."""
    model = case.build()
    deltaw.attach(model, case.config, "a")
    deltaw.attach(model, dataclasses.replace(case.config, r=case.config.r * 2), "b")
    deltaw.attach(model, case.config, "z")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, "z"):
            p.fill_(float("nan"))
    x = case.input()
    for active in ("a", {"a": 1.0, "b": -0.5, "z": 0.0}):
        deltaw.activate(model, active)
        calls = _spy(monkeypatch, model)
        with torch.no_grad():
            got = logits_of(model, x)
        assert calls, f"{case.name}: the decode step did not take the plan"
        assert torch.equal(got, _general(model, x, monkeypatch)), case.name


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3, native.SPLIT_TOKENS, native.MAX_TOKENS])
def test_plan_takes_every_decode_size_with_the_same_bits(tokens, monkeypatch):
    """From SPLIT_TOKENS tokens the kernel may split over torch's threads: still the general path's bits."""
    model = _single(rank=8)
    x = torch.randn(tokens, 1, 16)
    calls = _spy(monkeypatch, model)
    with torch.no_grad():
        got = model(x)
    assert calls
    assert torch.equal(got, _general(model, x, monkeypatch))


def _hooked(model):
    model.layer.base_layer.register_forward_hook(lambda mod, args, out: out * 2)
    return model


STEP_ASIDE = {
    "grad enabled": (lambda m: m, lambda x: x, True),
    "training with dropout": (lambda m: m, lambda x: x, False),
    "more tokens than a decode step": (lambda m: m, lambda x: torch.randn(native.MAX_TOKENS + 1, 16), False),
    "non-contiguous x": (lambda m: m, lambda x: torch.randn(16, 2).t(), False),
    "float64 model": (lambda m: m.double(), lambda x: x.double(), False),
    "a hook on the base layer": (_hooked, lambda x: x, False),
}


@needs_kernel
@pytest.mark.parametrize("why", list(STEP_ASIDE))
def test_plan_steps_aside(why, monkeypatch):
    """Where the general path does something else (autograd terms, dropout, the torch GEMMs, another dtype, the
    base layer's hooks), the plan does not run and the output is the general path's."""
    torch.manual_seed(0)
    model = Single(nn.Linear(16, 12)).eval()
    dropout = 0.5 if why == "training with dropout" else 0.0
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules=["layer"], dropout=dropout), "a")
    randomize(model, "a")
    deltaw.activate(model, "a")
    prepare, make_x, grad = STEP_ASIDE[why]
    model = prepare(model)
    x = make_x(torch.randn(2, 16))
    if why == "training with dropout":
        model.train()
    calls = _spy(monkeypatch, model)
    torch.manual_seed(5)
    with torch.set_grad_enabled(grad):
        got = model(x)
    assert calls == [], why
    torch.manual_seed(5)
    expected = _general(model, x, monkeypatch, grad=grad)
    assert torch.equal(got, expected), why


@needs_kernel
def test_plan_steps_aside_under_autocast_per_row_and_disabled(monkeypatch):
    model = _single()
    x = torch.randn(2, 16)
    calls = _spy(monkeypatch, model)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x)
        with per_row(model, ["a", None]):
            rows = model(x)
        with deltaw.disabled(model):
            off = model(x)
    assert calls == []
    assert auto.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(off, model.layer.base_layer(x))
        torch.testing.assert_close(rows[1], model.layer.base_layer(x[1:])[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rows[0], model(x[:1])[0], rtol=1e-6, atol=1e-6)


@needs_kernel
def test_plan_follows_every_change_of_the_factors_and_scaling(monkeypatch):
    """After a planned step: in-place edits, a replaced parameter, a ``.data`` swap, a new scaling and another
    active set each show in the next step (compared with the general path on the same state)."""
    model = _single()
    layer = model.layer
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=2, target_modules=["layer"]), "b")
    randomize(model, "b", seed=9)
    x = torch.randn(3, 16)
    calls = _spy(monkeypatch, model)

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    first = step()
    changes = [
        lambda: layer.lora_A["a"].data.mul_(2.0),
        lambda: layer.lora_B.__setitem__("a", nn.Parameter(torch.randn(12, 4))),
        lambda: setattr(layer.lora_A["a"], "data", torch.randn(4, 16)),
        lambda: layer.scaling.__setitem__("a", 0.25),
        lambda: deltaw.activate(model, {"a": 0.5, "b": 2.0}),
        lambda: deltaw.activate(model, "b"),
    ]
    before = first
    for i, change in enumerate(changes):
        change()
        calls.clear()
        got = step()
        assert calls, f"change {i}: a replaced factor is planned again in the same step"
        assert not torch.equal(got, before), f"change {i} did not show"
        assert torch.equal(got, _general(model, x, monkeypatch)), f"change {i}"
        before = step()  # (a plan on the changed state, for the next change to find)


@needs_kernel
def test_delete_frees_the_factors_a_plan_held(monkeypatch):
    """A plan holds the factors it checks; deleting the adapter must still free them (before the fix the plan
    kept the deleted adapter's memory alive until the layer's next forward)."""
    model = _single()
    with torch.no_grad():
        model(torch.randn(1, 16))
    assert model.layer._decode.terms
    refs = [weakref.ref(p) for p in deltaw.adapter_parameters(model, "a")]
    deltaw.delete(model, "a")
    gc.collect()
    assert all(r() is None for r in refs)


@needs_kernel
def test_moving_the_model_and_copies_make_their_own_plan():
    """``.to()`` drops the plan (the factors move); copies and pickles carry none (it names the original's memory)."""
    model = _single()
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = model(x)
    assert model.layer._decode is not None
    twin = copy.deepcopy(model)
    thawed = pickle.loads(pickle.dumps(model))
    assert "_decode" not in twin.layer.__dict__ and "_decode" not in thawed.layer.__dict__
    with torch.no_grad():
        assert torch.equal(twin(x), expected) and torch.equal(thawed(x), expected)
    model.double()
    assert model.layer._decode is None
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), expected.double(), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_a_subclass_with_its_own_update_is_not_planned(monkeypatch):
    """The plan stands in for LoraLinear's own ``add_lora_``: a subclass that overrides it gets its override."""
    seen = []

    class Mine(LoraLinear):
        def add_lora_(self, y, x, name, scale):
            seen.append(name)
            return super().add_lora_(y, x, name, scale)

    model = _single()
    layer = model.layer
    layer.__class__ = Mine
    calls = _spy(monkeypatch, model)
    with torch.no_grad():
        model(torch.randn(1, 16))
    assert seen == ["a"] and calls == []


@needs_kernel
def test_export_first_then_eager_steps_take_the_plan(monkeypatch):
    """Export traces forward with fake tensors: no plan may be made from them (a fake factor has no memory), and
    eager steps afterwards plan on the real factors."""
    model = _single()
    x = torch.randn(1, 16)
    calls = _spy(monkeypatch, model)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        assert model.layer._decode is None
        got = model(x)
        torch.testing.assert_close(exported.module()(x), got, rtol=1e-5, atol=1e-5)
    assert calls
    assert torch.equal(got, _general(model, x, monkeypatch))


# ---- found in review (each failed before its fix) --------------------------------------------------------------
def test_a_base_weight_of_another_shape_is_refused_not_overrun():
    """The plan's sizes were never compared with y again: a base weight replaced by a smaller one made the kernel
    write 4096 floats per token into a y of 2 (heap corruption). Now the general path runs and refuses it."""
    model = _single(rank=8, in_f=64, out_f=4096)
    x = torch.randn(1, 64)
    with torch.no_grad():
        model(x)
        model.layer.base_layer.weight = nn.Parameter(torch.randn(2, 64), requires_grad=False)
        model.layer.base_layer.bias = nn.Parameter(torch.randn(2), requires_grad=False)
        with pytest.raises(RuntimeError):
            model(x)


@needs_kernel
def test_a_factor_re_viewed_at_the_same_address_is_seen(monkeypatch):
    """``.data`` set to a view of the same memory keeps the data pointer: the plan read rank 4 from a rank-2,
    non-contiguous B. Layout and dtype are checked per call too."""
    model = _single()
    x = torch.randn(1, 16)
    with torch.no_grad():
        model(x)
    a, b = model.layer.lora_A["a"], model.layer.lora_B["a"]
    a.data, b.data = a.data[:2], b.data[:, :2]
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, _general(model, x, monkeypatch))


@needs_kernel
def test_replaced_factor_dicts_are_seen(monkeypatch):
    """The plan held the old ``_parameters`` dicts: a new ParameterDict left it on the old factors for good."""
    model = _single()
    x = torch.randn(1, 16)
    with torch.no_grad():
        before = model(x)
    model.layer.lora_A = nn.ParameterDict({"a": nn.Parameter(torch.randn(4, 16))})
    model.layer.lora_B = nn.ParameterDict({"a": nn.Parameter(torch.randn(12, 4))})
    with torch.no_grad():
        got = model(x)
    assert not torch.equal(got, before)
    assert torch.equal(got, _general(model, x, monkeypatch))


@needs_kernel
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_of_a_fresh_model_passes_its_check():
    """Making a plan inside the traced call read the factors in another order than the check run:
    TracingCheckError ("Graphs differed across invocations")."""
    model = _single(rank=16, in_f=256, out_f=128)
    x = torch.randn(1, 256)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_declining_kernel_keeps_the_update(monkeypatch):
    """When the kernel declines (an allocation failed), the update goes through ``add_lora_``: its result was
    dropped, so the output was the base layer's."""
    model = _single()
    model.layer.scaling["a"] = 1.0
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=2, target_modules=["layer"]), "b")
    randomize(model, "b", seed=4)
    deltaw.activate(model, {"a": 1.0, "b": 0.5})
    x = torch.randn(2, 16)
    expected = _general(model, x, monkeypatch)
    monkeypatch.setattr(native, "gemv_function", lambda: lambda *args: -1)
    _replan(model)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, model.layer.base_layer(x))


class _Tagged(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


@needs_kernel
def test_a_tensor_subclass_output_takes_the_general_path(monkeypatch):
    """A base weight of a tensor subclass gives a subclass y: the plan wrote into it through a raw pointer,
    around the subclass's own ``__torch_function__``."""
    model = _single()
    weight = model.layer.base_layer.weight
    model.layer.base_layer.weight = nn.Parameter(weight.detach().as_subclass(_Tagged), requires_grad=False)
    x = torch.randn(1, 16)
    calls = _spy(monkeypatch, model)
    with torch.no_grad():
        got = model(x)
    assert calls == []
    assert torch.equal(got.as_subclass(torch.Tensor), _general(model, x, monkeypatch).as_subclass(torch.Tensor))


@needs_kernel
def test_dropout_set_after_the_plan_applies_in_training(monkeypatch):
    model = _single()
    model.train()
    x = torch.randn(1, 16)
    with torch.no_grad():
        model(x)
    model.layer.dropout_p["a"] = 0.5
    torch.manual_seed(3)
    with torch.no_grad():
        got = model(x)
    torch.manual_seed(3)
    assert torch.equal(got, _general(model, x, monkeypatch))


@needs_kernel
def test_subclass_overrides_are_honoured_even_after_a_plan(monkeypatch):
    """A class swapped in after the plan was made, and a subclass with its own ``runs_directly``, get their own
    methods (the plan inlined ``runs_directly`` and was kept across ``__class__`` changes)."""
    seen: list[str] = []

    class Mine(LoraLinear):
        def add_lora_(self, y, x, name, scale):
            seen.append(name)
            return super().add_lora_(y, x, name, scale)

    class Called(LoraLinear):
        def runs_directly(self, base):
            seen.append("base(x)")
            return False

    model = _single()
    x = torch.randn(1, 16)
    with torch.no_grad():
        model(x)
        model.layer.__class__ = Mine
        model(x)
        assert seen == ["a"]
        model.layer.__class__ = Called
        seen.clear()
        model(x)
    assert "base(x)" in seen


@needs_kernel
def test_a_plan_refused_for_swapped_in_tensors_is_made_again_once_they_are_back(monkeypatch):
    """A call under ``functional_call`` with plain tensors for the factors refuses the plan (a refused plan was
    kept until the next activation change: every later step took the general path)."""
    model = _single()
    x = torch.randn(1, 16)
    calls = _spy(monkeypatch, model)
    a, b = (p.detach().clone() for p in deltaw.adapter_parameters(model, "a"))
    with torch.no_grad():
        swapped = torch.func.functional_call(model, {"layer.lora_A.a": a, "layer.lora_B.a": b}, (x,))
        assert calls == []
        got = model(x)
    assert calls, "the plan was not made again"
    assert torch.equal(got, swapped)


@needs_kernel
def test_switching_among_resident_adapters_plans_nothing_again(monkeypatch):
    """The plan was made per active set: the first step after every switch planned all 210 layers of a 135M
    model again (~1.6 ms, where ``activate`` itself takes ~1 µs; found in review of the switch benchmark). Each
    adapter is now planned once per layer; switching back and forth plans nothing and keeps the general path's
    bits."""
    model = _single()
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=2, target_modules=["layer"]), "b")
    randomize(model, "b", seed=9)
    x = torch.randn(1, 16)
    planned: list[str] = []
    real = LoraLinear._plan_term

    def counting(self, plan, name):
        planned.append(name)
        return real(self, plan, name)

    monkeypatch.setattr(LoraLinear, "_plan_term", counting)
    specs = ["a", "b", {"a": 0.5, "b": -1.0}, "a", "b"]
    with torch.no_grad():
        for spec in specs[:3]:
            deltaw.activate(model, spec)
            model(x)
    assert sorted(planned) == ["a", "b"]
    planned.clear()
    got = []
    for spec in specs:
        deltaw.activate(model, spec)
        with torch.no_grad():
            got.append(model(x))
    assert planned == []
    for spec, out in zip(specs, got):
        deltaw.activate(model, spec)
        assert torch.equal(out, _general(model, x, monkeypatch)), spec


@needs_kernel
def test_a_factor_cast_away_and_back_is_planned_again(monkeypatch):
    """A factor refused for its dtype when the plan was made (``.data`` cast to fp64, then an activation) stayed
    refused until the next activation change after it was cast back; the refusal is now stamped with the
    tensors, memory and dtypes it saw."""
    model = _single()
    layer = model.layer
    x = torch.randn(1, 16)
    calls = _spy(monkeypatch, model)
    with torch.no_grad():
        model(x)
        assert calls
        layer.lora_A["a"].data = layer.lora_A["a"].data.double()
        deltaw.activate(model, "a")  # (a new active set: the old design planned it here, refused)
        calls.clear()
        with pytest.raises(RuntimeError):  # (the general path multiplies fp32 by fp64: torch refuses)
            model(x)
        assert calls == []
        layer.lora_A["a"].data = layer.lora_A["a"].data.float()
        got = model(x)
    assert calls, "the plan stayed refused"
    assert torch.equal(got, _general(model, x, monkeypatch))


@needs_kernel
def test_an_adapter_attached_to_a_layer_after_it_skipped_the_name_is_added(monkeypatch):
    """A live adapter with no factors on a layer is skipped there; attaching one under that name later must
    reach the layer (``add_adapter`` drops the layer's plan)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 12)).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=4, target_modules=["0", "1"]), "a")
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    deltaw.activate(model, ["a", "b"])
    x = torch.randn(1, 16)
    with torch.no_grad():
        model(x)  # layer 1 skips "b"
    deltaw.delete(model, "b")
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0", "1"]), "b")
    randomize(model, "b", seed=3)
    deltaw.activate(model, ["a", "b"])
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, _general(model, x, monkeypatch))
    with torch.no_grad(), deltaw.using(model, "a"):
        assert not torch.equal(got, model(x)), "b's delta on layer 1 is missing"


# ---- found in review of the per-adapter plan (each test failed on its first version) -------------------------
def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 12)).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules=["0", "1"]), "a")
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules=["0"]), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    return model


@needs_kernel
def test_vmap_over_functional_call_factors_takes_the_general_path():
    """Batched factors under vmap have no storage: stamping their refusal read their data pointer and raised."""
    model = _single()
    params = {k: torch.stack([v, 2 * v]) for k, v in model.named_parameters()}  # an ensemble of two

    def f(p, x):
        return torch.func.functional_call(model, p, (x,))

    x = torch.randn(1, 16)
    with torch.no_grad():
        got = torch.func.vmap(f, in_dims=(0, None))(params, x)
        for i in range(2):
            one = {k: v[i] for k, v in params.items()}
            torch.testing.assert_close(got[i], torch.func.functional_call(model, one, (x,)), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_factors_set_directly_on_a_layer_that_skipped_the_name_are_used(monkeypatch):
    """A live adapter with no factors on a layer is skipped there; factors set on it later by hand (not through
    attach) were skipped for good."""
    model = _two_layers()
    deltaw.activate(model, {"a": 1.0, "b": 1.0})
    x = torch.randn(1, 16)
    with torch.no_grad():
        model(x)
    layer = model[1]
    layer.lora_A["b"] = nn.Parameter(torch.randn(4, 16))
    layer.lora_B["b"] = nn.Parameter(torch.randn(12, 4))
    layer.scaling["b"], layer.dropout_p["b"], layer.serial["b"] = 2.0, 0.0, 10**9
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, _general(model, x, monkeypatch))


@needs_kernel
def test_the_plan_keeps_no_factor_alive():
    """Entries held the factors they checked: a factor replaced while its adapter was not live
    (``load_state_dict(assign=True)``) stayed in memory, as did a tensor swapped in by ``functional_call``."""
    model = _two_layers()
    x = torch.randn(1, 16)
    for spec in ("a", "b"):
        deltaw.activate(model, spec)
        with torch.no_grad():
            model(x)
    old = weakref.ref(model[0].lora_A["a"])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    with torch.no_grad():
        model(x)  # "b" live: "a"'s entry is not looked at
    swapped = torch.randn(4, 16)
    seen = weakref.ref(swapped)
    with torch.no_grad():
        torch.func.functional_call(model, {"0.lora_A.b": swapped}, (x,))
    del swapped
    gc.collect()
    assert old() is None and seen() is None


def test_deleted_adapters_leave_no_entries_on_layers_they_were_not_on():
    """Every layer noted a live adapter it does not carry; deleting the adapter reset only the layers that
    carried it, so a server that loads adapters under new names grew every other layer's plan without end."""
    model = _two_layers()
    x = torch.randn(1, 16)
    for i in range(20):
        deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), f"u{i}")
        deltaw.activate(model, {"a": 1.0, f"u{i}": 1.0})
        with torch.no_grad():
            model(x)
        deltaw.delete(model, f"u{i}")
    plan = model[1]._decode
    assert plan is None or len(plan.terms) <= 2


@needs_kernel
def test_a_refusal_lifts_when_the_layout_comes_back_in_place(monkeypatch):
    """The refusal stamp compared memory and dtype, not the layout: a factor re-viewed non-contiguous and
    restored in place (``set_``) stayed refused."""
    model = _single()
    x = torch.randn(1, 16)
    calls = _spy(monkeypatch, model)
    a = model.layer.lora_A["a"]
    with torch.no_grad():
        model(x)
        a.set_(a.untyped_storage(), 0, (4, 16), (1, 4))
        model(x)
        a.set_(a.untyped_storage(), 0, (4, 16), (16, 1))
        calls.clear()
        got = model(x)
    assert calls, "still refused"
    assert torch.equal(got, _general(model, x, monkeypatch))
