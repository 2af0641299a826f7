"""Shared checks over the toy-model table: init, hand-written reference, merge, switch, stack, disable. The table's
checks run on ``DELTAW_TEST_DEVICE`` (conftest.py; default cpu)."""

import dataclasses

import numpy as np
import pytest
import torch

import deltaw
from toy_models import CASE_IDS, CASES, plain_copy_with, randomize, reference_weights

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(params=[pytest.param(c, marks=pytest.mark.device) for c in CASES], ids=CASE_IDS)
def case(request):
    """A row of the model table, on the ``device`` fixture's device (these checks run on CUDA too)."""
    return request.param


def test_output_equals_base_at_init(case, device):
    model, x = case.build(device=device), case.input(device=device)
    base = case.run(model, x)
    info = deltaw.attach(model, case.config, "a")
    assert info.modules, "nothing was wrapped"
    assert torch.equal(case.run(model, x), base)


def test_only_adapter_parameters_are_trainable(case, device):
    model = case.build(device=device)
    deltaw.attach(model, case.config, "a")
    adapter_ids = {id(p) for p in deltaw.adapter_parameters(model, "a")}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == adapter_ids and adapter_ids
    assert deltaw.count_parameters(model) == sum(p.numel() for p in deltaw.adapter_parameters(model))


def test_live_output_equals_hand_written_reference(case, device):
    model, x = case.build(device=device), case.input(device=device)
    deltaw.attach(model, case.config, "a")
    randomize(model, "a")
    expected = case.run(plain_copy_with(model, case, reference_weights(model, {"a": 1.0})), x)
    got = case.run(model, x)
    assert not torch.allclose(got, case.run(case.build(device=device), x), **TOL), "adapter had no effect"
    torch.testing.assert_close(got, expected, **TOL)


def test_stack_switch_deactivate(case, device):
    model, x = case.build(device=device), case.input(device=device)
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


def test_merge_unmerge_exact_and_disabled(case, device):
    model, x = case.build(device=device), case.input(device=device)
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


def test_merge_and_unload_gives_plain_model(case, device):
    model, x = case.build(device=device), case.input(device=device)
    deltaw.attach(model, case.config, "a")
    randomize(model, "a")
    live = case.run(model, x)
    plain = deltaw.merge_and_unload(model)
    assert not any(isinstance(m, deltaw.layers.LoraLayer) for m in plain.modules())
    assert deltaw.adapters(plain) == []
    fresh_keys = set(case.build(device=device).state_dict())
    assert set(plain.state_dict()) == fresh_keys
    torch.testing.assert_close(case.run(plain, x), live, **TOL)


def test_delete_removes_parameters(case, device):
    model, x = case.build(device=device), case.input(device=device)
    base = case.run(model, x)
    deltaw.attach(model, case.config, "a")
    deltaw.attach(model, case.config, "b")
    randomize(model, "a")
    n_before = deltaw.count_parameters(model)
    deltaw.delete(model, "a")
    assert deltaw.adapters(model) == ["b"] and deltaw.active(model) == ()
    assert deltaw.count_parameters(model) == n_before // 2
    assert torch.equal(case.run(model, x), base)


def test_training_with_dropout_updates_only_adapter(case, device):
    """One optimizer step in train mode with dropout: adapters move, base weights do not (embeddings included:
    dropout must not be applied to integer ids)."""
    import dataclasses
    model, x = case.build(device=device), case.input(device=device)
    deltaw.attach(model, dataclasses.replace(case.config, dropout=0.1), "a")
    randomize(model, "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)
    # A fixed random projection: BERT's output is a LayerNorm's, whose mean square is ~1 whatever the weights
    # (its gradient was rounding noise, so whether a step changed a factor depended on the dropout mask)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out.float() * w).mean().backward()
    opt.step()
    after = model.state_dict()
    adapter_keys = {k for k in after if ".lora_A." in k or ".lora_B." in k}
    assert adapter_keys and any(not torch.equal(after[k], before[k]) for k in adapter_keys)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in adapter_keys)


def test_walk_is_named_modules_without_wrapper_insides(case, device):
    """``api._walk`` (the short walk that loading uses) lists what ``named_modules`` lists, in the same order,
    minus the modules inside a wrapper; a module reachable twice appears once."""
    from deltaw.api import _walk
    from deltaw.layers import LoraLayer, ModulesToSave

    model = case.build(device=device)
    model.shared_alias = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    deltaw.attach(model, case.config, "a")
    wrappers = [p for p, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]
    expected = [(p, m) for p, m in model.named_modules() if not any(p.startswith(w + ".") for w in wrappers)]
    got = _walk(model)
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert all(a is b for (_, a), (_, b) in zip(got, expected))
    assert len(got) < len(list(model.named_modules()))


@pytest.mark.parametrize("weight, error", [
    (float("nan"), deltaw.NonFiniteError), (float("inf"), deltaw.NonFiniteError), (1e39, deltaw.NonFiniteError),
    ("x", TypeError), ("0.5", TypeError), (True, TypeError), (None, TypeError),
    # float() reads all three as numbers (found in review): numpy's and torch's bools, a one-element tensor
    (np.True_, TypeError), (torch.tensor(True), TypeError), (torch.tensor([0.5]), TypeError),
    (np.array([0.5]), TypeError),
])
def test_stack_weights_must_be_finite_real_numbers(weight, error):
    """A NaN weight was accepted: merge then reported ('a', nan) with weights changed as if it were 1 (MKL's
    addmm ignores a NaN alpha on large matrices), and 1e39 failed inside torch's scalar conversion."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), "a")
    w0 = model[0].base_layer.weight.clone()
    for call in (deltaw.activate, deltaw.merge, deltaw.merge_and_unload):
        with pytest.raises(error, match="'a'"):
            call(model, {"a": weight})
    assert deltaw.active(model) == (("a", 1.0),) and deltaw.merged(model) == ()
    assert torch.equal(model[0].base_layer.weight, w0)


def test_numeric_scalars_are_weights():
    """numpy and 0-d torch scalars stay accepted (the refusals above are bools and arrays, not numeric types)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), "a")
    for weight in (np.float32(0.5), np.int64(2), torch.tensor(0.25), torch.tensor(3)):
        deltaw.activate(model, {"a": weight})
        assert deltaw.active(model) == (("a", float(weight)),)


def test_a_spec_of_the_wrong_type_says_what_a_spec_is():
    """``activate(model, 5)`` raised "'int' object is not iterable" (found in review)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), "a")
    for spec in (5, 3.0, torch.tensor([1.0]), b"a"):
        with pytest.raises(TypeError, match="an adapter spec is an adapter name, a list of names"):
            deltaw.activate(model, spec)
    assert deltaw.active(model) == (("a", 1.0),)


def test_adapter_names_in_a_spec_must_be_strings():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), "a")
    for spec in ([1], {1: 1.0}, [None]):
        with pytest.raises(deltaw.AdapterNameError, match="strings"):
            deltaw.activate(model, spec)


def test_merge_and_unload_names_an_unknown_adapter():
    """It raised a bare KeyError from deep inside the merge."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), "a")
    with pytest.raises(deltaw.AdapterNameError, match="unknown adapter 'nope'"):
        deltaw.merge_and_unload(model, "nope")
    assert deltaw.adapters(model) == ["a"]


def test_layers_that_torch_transformer_blocks_read_directly_are_left_alone():
    """nn.MultiheadAttention reads out_proj.weight itself, nn.TransformerEncoderLayer linear1/linear2 on its
    fast path: "all-linear" wrapped them and the first forward died with a bare AttributeError. They are
    skipped by "all-linear" and refused by name, with the reason."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1),
        torch.nn.Linear(16, 3),
    ).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        base = model(x)
    info = deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules="all-linear"), "a")
    assert info.modules == ("1",)
    randomize(model, "a")
    with torch.no_grad():
        assert not torch.allclose(model(x), base)
        with deltaw.disabled(model):
            torch.testing.assert_close(model(x), base)
    for target, owner in (["out_proj"], "MultiheadAttention"), (["linear2", "1"], "TransformerEncoderLayer"):
        with pytest.raises(deltaw.TargetError, match=owner):
            deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=target), "b")
    assert deltaw.adapters(model) == ["a"]
    # when nothing else is left, the error must not offer the refused layers as targets
    only_blocks = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    with pytest.raises(deltaw.TargetError, match="targeted \\(by name suffix\\): none"):
        deltaw.attach(only_blocks, deltaw.LoraConfig(r=2, target_modules="all-linear"), "a")


def test_failed_attach_leaves_no_wrapper_and_restores_requires_grad():
    """The layer whose factors were refused stayed wrapped (only the layers before it were unwrapped), and a
    failed first attach left every base parameter frozen."""
    from deltaw.layers import LoraLayer
    from toy_models import tiny_llama

    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # a mix of flags to restore
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = deltaw.LoraConfig(r=4, target_modules=["q_proj"])
    paths = [p for p, _ in model.named_modules() if p.endswith("q_proj")]
    a, b = (torch.zeros(4, 32), torch.zeros(32, 4))
    with pytest.raises(ValueError, match="do not fit rank"):
        deltaw.attach(model, config, "a", factors={paths[0]: (a, b), paths[1]: (torch.zeros(4, 31), b)})
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert "_deltaw_state" not in model.__dict__
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    deltaw.attach(model, config, "a")  # and the model still takes an adapter


def test_new_wrappers_take_the_models_train_or_eval_mode(case, device, tmp_path):
    """A new nn.Module starts in train mode: wrappers attached to (or loaded into) an eval-mode model kept
    their adapter dropout on, so inference was random (every model from from_pretrained is in eval mode)."""
    config = dataclasses.replace(case.config, dropout=0.5)
    model, x = case.build(device=device).eval(), case.input(device=device)
    deltaw.attach(model, config, "a")
    randomize(model, "a")
    deltaw.save(model, tmp_path / "a", "a")
    fresh = case.build(device=device).eval()
    deltaw.load(fresh, tmp_path / "a", "a")
    for m in (model, fresh):
        assert not any(module.training for module in m.modules())
        with torch.no_grad():
            torch.testing.assert_close(case.run(m, x), case.run(m, x), rtol=0, atol=0)
    model.train()
    assert all(layer.training for layer in deltaw.state(model).layers.values())
    trained = case.build(device=device).train()
    deltaw.attach(trained, config, "a")
    assert all(module.training for module in trained.modules())


def test_wrappers_expose_the_base_layers_weight_and_bias(case, device):
    """Model code reads ``module.weight`` of layers it owns (T5's feed-forward checks ``wo.weight.dtype``):
    on a wrapper that raised AttributeError."""
    model = case.build(device=device)
    deltaw.attach(model, case.config, "a")
    for layer in deltaw.state(model).layers.values():
        assert layer.weight is layer.base_layer.weight
        assert layer.bias is getattr(layer.base_layer, "bias", None)


def test_t5_feed_forward_runs_with_an_adapter_on_wo():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2)
    model = T5ForConditionalGeneration(cfg).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["wo"]), "a")
    randomize(model, "a")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids).logits
        with deltaw.disabled(model):
            base = model(input_ids=ids, decoder_input_ids=ids).logits
    assert not torch.allclose(out, base)


def test_no_lora_inside_a_module_trained_in_full(tmp_path):
    """A target inside a modules_to_save module got a wrapper that the saved copies then carried: the file held
    keys like 'mlp.up_proj.lora_A.a' that neither deltaw nor PEFT could load. PEFT skips such targets."""
    from toy_models import tiny_llama
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = deltaw.LoraConfig(r=2, target_modules=["up_proj"], modules_to_save=["layers.1.mlp"])
    info = deltaw.attach(model, config, "a")
    assert info.modules == ("model.layers.0.mlp.up_proj",)
    randomize(model, "a")
    with torch.no_grad():
        for p in deltaw.state(model).saved_modules["model.layers.1.mlp"].modules_to_save["a"].parameters():
            p.add_(0.1)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(ids).logits
    deltaw.save(model, tmp_path / "a", "a")
    torch.manual_seed(0)
    fresh = tiny_llama().eval()
    deltaw.load(fresh, tmp_path / "a", "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=0)
    # a target that another adapter saves in full: refused, not skipped (the adapter silently lacked it)
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "s")
    with pytest.raises(deltaw.TargetError, match="'lm_head' is wrapped to be trained in full.*'s'"):
        deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]), "t")
    deltaw.delete(model, "s")
    # the other way round: a module to save that already holds another adapter's LoRA layer
    with pytest.raises(deltaw.TargetError, match="holds LoRA layer"):
        deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["layers.0.mlp"]), "b")
    assert deltaw.adapters(model) == ["a"]


def test_a_merged_adapters_head_runs_in_forward_as_merge_and_unload_keeps_it():
    """A merged adapter's modules_to_save copy was ignored by forward unless the adapter was also active, while
    merge_and_unload kept it: one merged state, two different models. The shared rule: the copy of the first
    active adapter that has one, else of the first merged adapter that has one, else the original."""
    from toy_models import MLP
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 12)
    config = deltaw.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"])
    for n in ("a", "b"):
        deltaw.attach(model, config, n, activate=False)
        randomize(model, n, seed=ord(n))
    wrapper = deltaw.state(model).saved_modules["head"]
    with torch.no_grad():
        with deltaw.using(model, "a"):
            adapter_out = model(x)
        deltaw.merge(model, "a")  # in the weights, not active
        assert deltaw.active(model) == ()
        torch.testing.assert_close(model(x), adapter_out, **TOL)
        with deltaw.using(model, "b"):  # an active adapter's copy comes first
            assert wrapper.current() is wrapper.modules_to_save["b"]
        with deltaw.disabled(model):
            assert wrapper.current() is wrapper.original_module
        merged_out = model(x)
        plain = deltaw.merge_and_unload(model)
        assert plain.head is wrapper.modules_to_save["a"]
        torch.testing.assert_close(plain(x), merged_out, rtol=0, atol=0)


def test_merge_and_unload_drops_a_live_unmerged_adapters_head_with_its_update():
    """a merged (no head), b live and unmerged with a head: the plain model carries a's update only, so it must
    not keep b's head either (it would be half of b)."""
    from toy_models import MLP
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 12)
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["fc1"]), "a", activate=False)
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["fc2"], modules_to_save=["head"]), "b",
                  activate=False)
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    wrapper = deltaw.state(model).saved_modules["head"]
    with torch.no_grad():
        deltaw.merge(model, "a")
        with deltaw.using(model, None):
            only_a = model(x)
        deltaw.activate(model, "b")
        assert wrapper.current() is wrapper.modules_to_save["b"]  # live: b's head runs in forward
        plain = deltaw.merge_and_unload(model)
        assert plain.head is wrapper.original_module
        torch.testing.assert_close(plain(x), only_a, rtol=0, atol=0)


def test_merge_and_unload_with_a_spec_adds_to_what_is_merged():
    """merge_and_unload(model, spec) replaced the merged set with spec: an adapter merged earlier was taken back
    out of the returned model. A spec adds to what is merged, as in merge; an empty one adds nothing."""
    from toy_models import MLP
    x = torch.randn(3, 12)
    outputs = []
    for spec in ("b", {}):
        torch.manual_seed(0)
        model = MLP().eval()
        for n in ("a", "b"):
            deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["fc1", "fc2"]), n)
            randomize(model, n, seed=ord(n))
        deltaw.merge(model, "a")
        with torch.no_grad():
            with deltaw.using(model, "b" if spec else None):  # a merged (+ b live)
                expected = model(x)
            outputs.append((deltaw.merge_and_unload(model, spec)(x), expected))
    for got, expected in outputs:
        torch.testing.assert_close(got, expected, **TOL)
