"""The core fast paths issue 4 added for the performance suite: fused inference add, merge without a full
finiteness pass, linear-time target matching, and zero-copy loading. Each must behave exactly like the plain
path it replaces."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import deltaw
from deltaw import api
from toy_models import CASE_IDS, CASES, _logits, randomize


@pytest.mark.parametrize("one_row", [False, True], ids=["batch", "one_row"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fused_inference_add_equals_autograd_path(case, one_row):
    """``one_row``: a single row (B = 1, one token: the decode case)."""
    model, x = case.build(), case.input()
    if one_row:
        x = x[:1, :1] if x.dim() == 2 and not x.is_floating_point() else x[:1]
    deltaw.attach(model, case.config, "a")
    deltaw.attach(model, case.config, "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    deltaw.activate(model, {"a": 0.7, "b": -1.3})
    with torch.enable_grad():  # the out-of-place, autograd path
        slow = _logits(model(x))
        assert slow.requires_grad
    with torch.no_grad():
        fast = case.run(model, x)
    with torch.inference_mode():
        fast_inf = case.run(model, x)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_inf, slow.detach(), rtol=1e-5, atol=1e-5)


def test_merge_still_refuses_a_non_finite_result_after_a_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), "a")
    randomize(model, "a")
    deltaw.merge(model, "a")
    deltaw.unmerge(model)
    with torch.no_grad():
        model[0].base_layer.weight[0, 0] = float("inf")
    with pytest.raises(deltaw.NonFiniteError):
        deltaw.merge(model, "a")
    assert not deltaw.merged(model)


_name = hs.sampled_from(["q_proj", "v", "proj", "layers", "0", "1", "attn", "q", "model", "a_b"])


@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.lists(_name, min_size=1, max_size=3).map(".".join), min_size=1, max_size=6),
       hs.lists(_name, min_size=1, max_size=5).map(".".join))
def test_target_matching_equals_the_suffix_rule(keys, path):
    expected = any(path == key or path.endswith("." + key) for key in keys)
    assert api._matches(tuple(keys), path) == expected


def test_load_reads_a_private_copy(tmp_path):
    from toy_models import tiny_llama
    torch.manual_seed(0)
    model = tiny_llama().eval()
    deltaw.attach(model, deltaw.LoraConfig(r=4, target_modules="all-linear"), "a")
    randomize(model, "a")
    deltaw.save(model, tmp_path / "a", "a")
    deltaw.load(model, tmp_path / "a", "b")
    for p, q in zip(deltaw.adapter_parameters(model, "a"), deltaw.adapter_parameters(model, "b")):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\0" * 64)  # later edits of the file are not seen
    for p, q in zip(deltaw.adapter_parameters(model, "a"), deltaw.adapter_parameters(model, "b")):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mlp", "gpt2_conv1d", "llama")],
                         ids=lambda c: c.name)
def test_direct_base_call_equals_module_call_and_respects_hooks(case, monkeypatch):
    """A plain nn.Linear / transformers Conv1D base runs through ``base_forward`` directly; the output must
    equal the module call bit for bit, and any hook (on the base or global) must send it through __call__."""
    from deltaw.layers import LoraLayer

    model, x = case.build(), case.input()
    deltaw.attach(model, case.config, "a")
    randomize(model, "a", seed=3)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert any(m._plain_base for m in layers)
    with torch.no_grad():
        fast = case.run(model, x)
        for m in layers:
            object.__setattr__(m, "_plain_base", False)
        slow = case.run(model, x)
        for m in layers:
            object.__setattr__(m, "_plain_base", m.is_plain_base(m.base_layer))
        assert torch.equal(fast, slow)
        seen: list[str] = []
        handle = layers[0].base_layer.register_forward_hook(lambda mod, args, out: seen.append("local"))
        case.run(model, x)
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, args, out: seen.append("global") if mod is layers[0].base_layer else None)
        case.run(model, x)
        handle.remove()
        base = layers[0].base_layer
        plain_forward = base.forward

        def patched(*args, **kwargs):  # what accelerate's add_hook_to_module does to offloaded layers
            seen.append("instance")
            return plain_forward(*args, **kwargs)

        base.forward = patched
        case.run(model, x)
        del base.forward
        assert seen == ["local", "global", "instance"]


def test_linear_subclass_with_its_own_forward_is_called():
    class Doubling(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(Doubling(4, 3))
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), "a")
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert not model[0]._plain_base
        assert torch.equal(model(x), 2 * torch.nn.functional.linear(x, model[0].base_layer.weight,
                                                                    model[0].base_layer.bias))


def test_finiteness_pass_does_not_overflow_on_half_precision_blocks():
    """The one-pass NaN/inf check sums whole buffers; in fp16 a sum of ordinary values passes 65504."""
    from deltaw.io.peft import _all_finite

    assert _all_finite([torch.ones(100_000, dtype=torch.float16)])
    assert _all_finite([torch.ones(100_000, dtype=torch.bfloat16)])
    assert not _all_finite([torch.tensor([1.0, float("nan")], dtype=torch.float16)])
