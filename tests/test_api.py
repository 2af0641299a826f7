"""Shared checks over the toy-model table: init, hand-written reference, merge, switch, stack, disable."""

import pytest
import torch

import deltaw
from toy_models import CASE_IDS, CASES, plain_copy_with, randomize, reference_weights

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    return request.param


def test_output_equals_base_at_init(case):
    model, x = case.build(), case.input()
    base = case.run(model, x)
    info = deltaw.attach(model, case.config, "a")
    assert info.modules, "nothing was wrapped"
    assert torch.equal(case.run(model, x), base)


def test_only_adapter_parameters_are_trainable(case):
    model = case.build()
    deltaw.attach(model, case.config, "a")
    adapter_ids = {id(p) for p in deltaw.adapter_parameters(model, "a")}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == adapter_ids and adapter_ids
    assert deltaw.count_parameters(model) == sum(p.numel() for p in deltaw.adapter_parameters(model))


def test_live_output_equals_hand_written_reference(case):
    model, x = case.build(), case.input()
    deltaw.attach(model, case.config, "a")
    randomize(model, "a")
    expected = case.run(plain_copy_with(model, case, reference_weights(model, {"a": 1.0})), x)
    got = case.run(model, x)
    assert not torch.allclose(got, case.run(case.build(), x), **TOL), "adapter had no effect"
    torch.testing.assert_close(got, expected, **TOL)


def test_stack_switch_deactivate(case):
    model, x = case.build(), case.input()
    base = case.run(model, x)
    deltaw.attach(model, case.config, "a")
    deltaw.attach(model, case.config, "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    assert deltaw.adapters(model) == ["a", "b"]
    deltaw.activate(model, {"a": 1.0, "b": -0.5})
    expected = case.run(plain_copy_with(model, case, reference_weights(model, {"a": 1.0, "b": -0.5})), x)
    torch.testing.assert_close(case.run(model, x), expected, **TOL)
    deltaw.activate(model, "b")
    expected_b = case.run(plain_copy_with(model, case, reference_weights(model, {"b": 1.0})), x)
    torch.testing.assert_close(case.run(model, x), expected_b, **TOL)
    with deltaw.using(model, "a"):
        assert not torch.allclose(case.run(model, x), expected_b, **TOL)
    torch.testing.assert_close(case.run(model, x), expected_b, **TOL)
    deltaw.deactivate(model)
    assert torch.equal(case.run(model, x), base)


def test_merge_unmerge_exact_and_disabled(case):
    model, x = case.build(), case.input()
    base = case.run(model, x)
    deltaw.attach(model, case.config, "a")
    deltaw.attach(model, case.config, "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    deltaw.activate(model, {"a": 1.0, "b": 0.7})
    live = case.run(model, x)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    deltaw.merge(model)
    assert deltaw.merged(model) == (("a", 1.0), ("b", 0.7))
    torch.testing.assert_close(case.run(model, x), live, **TOL)  # not applied twice
    with deltaw.disabled(model):
        assert torch.equal(case.run(model, x), base)
    assert deltaw.merged(model) == (("a", 1.0), ("b", 0.7)), "forward/disabled must not change merge state"
    deltaw.unmerge(model, "b")
    deltaw.unmerge(model)
    after = model.state_dict()
    for k, v in weights_before.items():
        assert torch.equal(after[k], v), k
    assert torch.equal(case.run(model, x), live)


def test_merge_and_unload_gives_plain_model(case):
    model, x = case.build(), case.input()
    deltaw.attach(model, case.config, "a")
    randomize(model, "a")
    live = case.run(model, x)
    plain = deltaw.merge_and_unload(model)
    assert not any(isinstance(m, deltaw.layers.LoraLayer) for m in plain.modules())
    assert deltaw.adapters(plain) == []
    fresh_keys = set(case.build().state_dict())
    assert set(plain.state_dict()) == fresh_keys
    torch.testing.assert_close(case.run(plain, x), live, **TOL)


def test_delete_removes_parameters(case):
    model, x = case.build(), case.input()
    base = case.run(model, x)
    deltaw.attach(model, case.config, "a")
    deltaw.attach(model, case.config, "b")
    randomize(model, "a")
    n_before = deltaw.count_parameters(model)
    deltaw.delete(model, "a")
    assert deltaw.adapters(model) == ["b"] and deltaw.active(model) == ()
    assert deltaw.count_parameters(model) == n_before // 2
    assert torch.equal(case.run(model, x), base)


def test_training_with_dropout_updates_only_adapter(case):
    """One optimizer step in train mode with dropout: adapters move, base weights do not (embeddings included:
    dropout must not be applied to integer ids)."""
    import dataclasses
    model, x = case.build(), case.input()
    deltaw.attach(model, dataclasses.replace(case.config, dropout=0.1), "a")
    randomize(model, "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)
    out.float().pow(2).mean().backward()
    opt.step()
    after = model.state_dict()
    adapter_keys = {k for k in after if ".lora_A." in k or ".lora_B." in k}
    assert adapter_keys and any(not torch.equal(after[k], before[k]) for k in adapter_keys)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in adapter_keys)


def test_walk_is_named_modules_without_wrapper_insides(case):
    """``api._walk`` (the short walk that loading uses) lists what ``named_modules`` lists, in the same order,
    minus the modules inside a wrapper; a module reachable twice appears once."""
    from deltaw.api import _walk
    from deltaw.layers import LoraLayer, ModulesToSave

    model = case.build()
    model.shared_alias = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    deltaw.attach(model, case.config, "a")
    wrappers = [p for p, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]
    expected = [(p, m) for p, m in model.named_modules() if not any(p.startswith(w + ".") for w in wrappers)]
    got = _walk(model)
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert all(a is b for (_, a), (_, b) in zip(got, expected))
    assert len(got) < len(list(model.named_modules()))
