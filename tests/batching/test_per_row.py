"""Per-row adapters: every row of a mixed batch equals that row run alone (``deltaw.using``) with its spec.

Each model carries three adapters of different ranks and partly different targets (so some layers see only some
adapters), randomized so every adapter changes the output. Every strategy is checked against the row-alone
result and against the reference strategy.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltaw
from deltaw.batching import STRATEGIES, MixedHeadsError, clear_cache, per_row
from deltaw.layers import base as layers_base
from deltaw.layers import native
from toy_models import EmbeddingNet, tiny_gpt2, tiny_llama
from toy_models import logits_of as _out
from toy_models import rows_alone as _alone

TOL = dict(rtol=1e-5, atol=1e-5)
FORCED = [s for s in STRATEGIES if s != "uniform"]  # "uniform" only applies to one-spec batches (tested below)

ROWS = ["a", None, "b", {"a": 0.5, "c": -1.0}, "c", "a", {"b": 0.7, "a": 0.3}, "b"]


def _randomize(model: nn.Module, name: str, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _llama():
    torch.manual_seed(0)
    m = tiny_llama().eval()
    deltaw.attach(m, deltaw.LoraConfig(r=4, alpha=8, target_modules="all-linear"), "a")
    deltaw.attach(m, deltaw.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj", "embed_tokens"]), "b")
    deltaw.attach(m, deltaw.LoraConfig(r=8, alpha=4, target_modules=["up_proj", "down_proj", "q_proj"],
                                       rank_pattern={"down_proj": 3}), "c")
    return m


def _gpt2():
    torch.manual_seed(0)
    m = tiny_gpt2().eval()
    deltaw.attach(m, deltaw.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]), "a")
    deltaw.attach(m, deltaw.LoraConfig(r=2, alpha=4, target_modules=["c_attn", "wte"]), "b")
    deltaw.attach(m, deltaw.LoraConfig(r=6, alpha=6, use_rslora=True, target_modules=["c_fc", "c_attn"]), "c")
    return m


def _embedding():
    torch.manual_seed(0)
    m = EmbeddingNet().eval()
    deltaw.attach(m, deltaw.LoraConfig(r=4, alpha=4, target_modules=["emb", "pos", "out"]), "a")
    deltaw.attach(m, deltaw.LoraConfig(r=2, alpha=4, target_modules=["emb"]), "b")
    deltaw.attach(m, deltaw.LoraConfig(r=5, alpha=5, target_modules=["emb", "out"]), "c")
    return m


MODELS = {"llama_linear": (_llama, 64), "gpt2_conv1d": (_gpt2, 64), "embedding": (_embedding, 10)}


@pytest.fixture(params=list(MODELS), scope="module")
def built(request):
    build, vocab = MODELS[request.param]
    model = build()
    for i, name in enumerate("abc"):
        _randomize(model, name, seed=10 + i)
    x = torch.randint(1, vocab, (len(ROWS), 6), generator=torch.Generator().manual_seed(3))
    return model, x


@pytest.fixture(params=["after", "first"])
def order(request, monkeypatch):
    """Where the deltas go: added after the base product (the usual order), or written first with the base product
    added into them (``LayerRows.start``, used from ``layers.base.START_MIN_TOKENS`` tokens; forced here)."""
    if request.param == "first":
        monkeypatch.setattr(layers_base, "START_MIN_TOKENS", 1)
    return request.param


@pytest.mark.parametrize("strategy", FORCED)
def test_each_row_equals_that_row_alone(built, strategy, order):
    model, x = built
    expected = _alone(model, x, ROWS)
    # the test means something only if the rows really differ from each other and from the base
    assert not torch.allclose(expected[0], expected[5 - 4], **TOL)
    with deltaw.disabled(model), torch.no_grad():
        base = _out(model, x)
    for i, spec in enumerate(ROWS):
        if spec is not None:
            assert not torch.allclose(expected[i], base[i], **TOL), f"row {i} ({spec}) has no effect"
    with per_row(model, ROWS, strategy=strategy), torch.no_grad():
        got = _out(model, x)
    torch.testing.assert_close(got, expected, **TOL)
    with per_row(model, ROWS, strategy=strategy), torch.inference_mode():
        torch.testing.assert_close(_out(model, x), expected, **TOL)
    assert deltaw.state(model).rows is None


@pytest.mark.parametrize("strategy", FORCED)
def test_strategies_agree_with_reference(built, strategy, order):
    model, x = built
    rows = ["c", "c", "b", "b", "a", "a", None, None]  # grouped order: the view-only path of "grouped"
    for spec_rows in (rows, ROWS, ["a", "b", "c", "a", "b", "c", "a", "b"]):
        with per_row(model, spec_rows, strategy="reference"), torch.no_grad():
            ref = _out(model, x)
        with per_row(model, spec_rows, strategy=strategy), torch.no_grad():
            got = _out(model, x)
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("rows", [["b"] * 8, [{"a": 0.5, "c": 0.25}] * 8, [None] * 8, ["a"] * 7 + [None]])
def test_uniform_and_degenerate_batches(built, rows, order):
    model, x = built
    expected = _alone(model, x, rows)
    for strategy in ("auto", "uniform", "dense", "grouped", "rowwise"):
        with per_row(model, rows, strategy=strategy), torch.no_grad():
            torch.testing.assert_close(_out(model, x), expected, **TOL)


def test_leading_dimension_k_per_row(order):
    """Beam search / num_return_sequences repeat each row k times in place (repeat_interleave)."""
    model = _llama()
    for i, name in enumerate("abc"):
        _randomize(model, name, seed=10 + i)
    rows = ["a", "b", None, {"c": 1.0, "a": -0.5}]
    x = torch.randint(1, 64, (4, 5), generator=torch.Generator().manual_seed(1))
    expected = _alone(model, x, rows).repeat_interleave(3, 0)
    for strategy in FORCED:
        with per_row(model, rows, strategy=strategy), torch.no_grad():
            torch.testing.assert_close(_out(model, x.repeat_interleave(3, 0)), expected, **TOL)
    with per_row(model, rows), torch.no_grad(), pytest.raises(deltaw.DeltawError, match="one entry per row"):
        _out(model, x[:3])


def test_unknown_adapter_raises_before_any_compute():
    model = _llama()
    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.modules()]
    x = torch.randint(1, 64, (3, 4))
    with pytest.raises(deltaw.AdapterNameError, match="row 2.*nope"):
        with per_row(model, ["a", None, {"b": 1.0, "nope": 0.5}]):
            model(x)
    with pytest.raises(deltaw.AdapterNameError):
        deltaw.batching.generate(model, x, adapters=["a", "zzz", None], max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown per_row strategy"):
        with per_row(model, ["a"] * 3, strategy="fastest"):
            model(x)
    for h in handles:
        h.remove()
    assert calls == [], "a forward ran before the bad row was reported"
    assert deltaw.state(model).rows is None


def test_context_restores_state_on_error_and_nests():
    model = _llama()
    st = deltaw.state(model)
    with pytest.raises(RuntimeError):
        with per_row(model, ["a", "b"]):
            raise RuntimeError("boom")
    assert st.rows is None
    with per_row(model, ["a", "b"]) as outer:
        with per_row(model, ["c"]) as inner:
            assert st.rows is inner
        assert st.rows is outer
    assert st.rows is None


def test_merged_adapters_follow_using_semantics(built, order):
    model, x = built
    deltaw.merge(model, {"a": 1.0})
    try:
        rows = ["a", "b", None, {"a": 0.5, "c": 1.0}, "c", "b", "a", None]
        expected = _alone(model, x, rows)
        for strategy in FORCED:
            with per_row(model, rows, strategy=strategy), torch.no_grad():
                torch.testing.assert_close(_out(model, x), expected, **TOL)
    finally:
        deltaw.unmerge(model)


def test_packs_are_reused_and_invalidated_by_in_place_updates(built, order):
    model, x = built
    clear_cache()
    rows = ["a", "b", "c", "a", "b", "c", None, "a"]
    with per_row(model, rows, strategy="rowwise"), torch.no_grad():
        first = _out(model, x)
    with per_row(model, rows, strategy="rowwise"), torch.no_grad():
        torch.testing.assert_close(_out(model, x), first, rtol=0, atol=0)
    before = [p.detach().clone() for p in deltaw.adapter_parameters(model, "b")]
    _randomize(model, "b", seed=99)  # in-place copy_: bumps the version, so the pack must be rebuilt
    try:
        expected = _alone(model, x, rows)
        for strategy in FORCED:
            with per_row(model, rows, strategy=strategy), torch.no_grad():
                got = _out(model, x)
            torch.testing.assert_close(got, expected, **TOL)
        assert not torch.allclose(got[1], first[1], **TOL)
    finally:
        with torch.no_grad():
            for p, old in zip(deltaw.adapter_parameters(model, "b"), before):
                p.copy_(old)


def test_packs_of_a_deleted_adapter_never_serve_its_successor():
    """An adapter deleted and attached again under its name may get the very same memory and version counters
    (here forced: the new factors are the old storage, rewritten through ``.data``); the packs built for the
    old one were served for the new one (row differences of 0.03-0.45 on reload loops)."""
    model = _llama()
    _randomize(model, "b", seed=5)
    clear_cache()
    rows = ["b", None, "a", "b"]
    x = torch.randint(1, 64, (len(rows), 6), generator=torch.Generator().manual_seed(4))
    with per_row(model, rows, strategy="grouped"), torch.no_grad():
        _out(model, x)  # packs "b"
    layers = deltaw.state(model).layers
    old = {p: layers[p].adapter_parameters("b") for p in deltaw.state(model).adapters["b"].modules}
    versions = {p: (a._version, b._version) for p, (a, b) in old.items()}
    config = deltaw.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj", "embed_tokens"])
    deltaw.delete(model, "b")
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for a, b in old.values():
            a.data.copy_(torch.randn(a.shape, generator=g) * 0.2)
            b.data.copy_(torch.randn(b.shape, generator=g) * 0.2)
    deltaw.attach(model, config, "b", factors={p: (a.data, b.data) for p, (a, b) in old.items()})
    with torch.no_grad():  # bring the new parameters' version counters to the old ones' values
        for p, (va, vb) in versions.items():
            for param, v in zip(layers[p].adapter_parameters("b"), (va, vb)):
                assert param.data_ptr() == old[p][param is layers[p].lora_B["b"]].data_ptr()
                while param._version < v:
                    param.mul_(1.0)
                assert param._version == v
    for strategy in FORCED:
        with per_row(model, rows, strategy=strategy), torch.no_grad():
            got = _out(model, x)
        torch.testing.assert_close(got, _alone(model, x, rows), **TOL)


def test_gradients_flow_per_row():
    """With grad enabled the reference path runs through the live parameters: each adapter gets gradient only
    from its rows, equal to the gradient of those rows run alone."""
    model = _llama()
    for i, name in enumerate("abc"):
        _randomize(model, name, seed=10 + i)
    x = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    deltaw.set_trainable(model, ["a", "b", "c"])
    params = {n: deltaw.adapter_parameters(model, n) for n in "abc"}
    with per_row(model, ["a", "b", None]):
        _out(model, x).sum().backward()
    got = {n: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in ps] for n, ps in params.items()}
    model.zero_grad(set_to_none=True)
    for i, spec in enumerate(["a", "b"]):
        with deltaw.using(model, spec):
            _out(model, x[i:i + 1]).sum().backward()
    for n in "ab":
        for g, p in zip(got[n], params[n]):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    assert all(torch.count_nonzero(g) == 0 for g in got["c"])


def test_modules_to_save_heads():
    torch.manual_seed(0)

    class Clf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model = Clf().eval()
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["body"], modules_to_save=("head",)), "h1")
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["body"]), "plain")
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["body"], modules_to_save=("head",)), "h2")
    for i, n in enumerate(["h1", "plain", "h2"]):
        _randomize(model, n, seed=i)
    x = torch.randn(3, 8)
    with pytest.raises(MixedHeadsError, match="head"):
        with per_row(model, ["h1", "h2", "h1"]):
            pass
    with pytest.raises(MixedHeadsError):
        with per_row(model, ["h1", None, "h1"]):
            pass
    rows = ["h1", {"plain": 1.0, "h1": 0.5}, "h1"]  # every row's first adapter with a head copy is h1
    expected = _alone(model, x, rows)
    with per_row(model, rows), torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)
    rows = ["plain", None, "plain"]  # nobody has a copy: the original head
    expected = _alone(model, x, rows)
    with per_row(model, rows), torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)
    # A merged adapter's copy runs for rows whose own spec has none, as it does alone (it ran the original).
    deltaw.merge(model, "h2")
    expected = _alone(model, x, rows)
    with per_row(model, rows), torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)
    with pytest.raises(MixedHeadsError):
        with per_row(model, ["h1", "plain"]):  # h1's copy vs the merged h2's
            pass


def test_conv_layers_use_the_reference_path():
    from toy_models import ConvNet
    torch.manual_seed(0)
    model = ConvNet().eval()
    deltaw.attach(model, deltaw.LoraConfig(r=3, target_modules=["conv1", "conv2", "fc"]), "a")
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["conv2"]), "b")
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    x = torch.randn(3, 3, 8, 8)
    rows = ["a", "b", {"a": 1.0, "b": 1.0}]
    expected = _alone(model, x, rows)
    # ConvNet folds H into the batch of conv1 (leading dim N·H, row-major): the k-per-row layout.
    with per_row(model, rows), torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)


@pytest.mark.parametrize("with_kernel", [True, False])
def test_auto_picks_by_batch_shape(monkeypatch, with_kernel):
    """Decode-shaped calls run the native row kernel where it applies, else group rows (each adapter read
    once); prefill-shaped ones go rowwise (no gather); one shared spec is a plain LoRA; embeddings use the
    masked dense lookup; autograd uses the reference."""
    if with_kernel and native.kernel() is None:
        pytest.skip("no native kernel on this machine")
    if not with_kernel:
        monkeypatch.setattr(native, "row_terms", lambda *args: None)
    decode_kernel = "native" if with_kernel else "grouped"
    model = _llama()
    rows = ["a", "b", "a", "b"]
    with per_row(model, rows) as plan, torch.no_grad():
        model(torch.randint(1, 64, (4, 1)))
        decode = plan.strategies_used()
    assert set(decode) == {decode_kernel, "dense"}  # dense: embed_tokens
    with per_row(model, rows) as plan, torch.no_grad():
        model(torch.randint(1, 64, (4, 12)))
        assert plan.strategies_used().get("rowwise")
    with per_row(model, ["a", "a", {"a": 0.5}, {"a": 0.5}]) as plan, torch.no_grad():
        model(torch.randint(1, 64, (4, 12)))  # already grouped in order on every layer: views, no copies
        assert set(plan.strategies_used()) == {"grouped"}
    with per_row(model, ["c"] * 4) as plan, torch.no_grad():
        model(torch.randint(1, 64, (4, 3)))
        assert set(plan.strategies_used()) == {"native" if with_kernel else "uniform"}
    with per_row(model, ["c"] * 4) as plan, torch.no_grad():
        model(torch.randint(1, 64, (4, 12)))
        assert set(plan.strategies_used()) == {"uniform"}
    with per_row(model, rows) as plan:
        model(torch.randint(1, 64, (4, 3)))
        assert plan.strategies_used() == {}, "with autograd on, the reference path runs (not recorded)"


def test_adapters_created_in_inference_mode():
    """Factors made under torch.inference_mode() keep no version counter: per_row's pack key raised
    "Inference tensors do not track version counter". Such packs are rebuilt every context instead (an
    in-place write in inference mode would go unseen by any key)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0", "1"]), "a")
        _randomize(model, "a", seed=1)
        rows = ["a", None, "a"]
        for _ in range(2):
            with per_row(model, rows, strategy="grouped"):
                got = model(x)
            torch.testing.assert_close(got, _alone(model, x, rows), **TOL)
            deltaw.adapter_parameters(model, "a")[1].mul_(2.0)  # seen by the next context


def test_stack_packs_keep_every_adapter_in_its_own_precision():
    """Attach, then ``model.half()``: that adapter's factors become fp16, one attached later gets fp32 (half
    bases get fp32 factors). The stack pack took the first adapter's dtype and rounded the fp32 one to fp16."""
    from deltaw.batching.kernels import LayerRows
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), "early")
    model.half()
    deltaw.attach(model, deltaw.LoraConfig(r=3, target_modules=["0"]), "late")
    _randomize(model, "early", seed=1)
    _randomize(model, "late", seed=2)
    layer = model[0]
    assert (layer.lora_A["early"].dtype, layer.lora_A["late"].dtype) == (torch.float16, torch.float32)
    clear_cache()
    a_st, b_st, _ = LayerRows(layer, ((("early", 1.0),), (("late", 1.0), ("early", 0.5))), "grouped")._pack_stacks()
    assert a_st.dtype == b_st.dtype == torch.float32
    assert torch.equal(a_st[1, :, :3], layer.lora_A["late"].detach().t())
    assert torch.equal(b_st[1, :3], layer.lora_B["late"].detach().t() * layer.scaling["late"])
    clear_cache()


@pytest.mark.parametrize("strategy", ["reference", "grouped", "dense", "rowwise"])
def test_layout_constants_reach_other_devices_once_and_outlive_inference_mode(strategy):
    """On a GPU each kernel build copied its row indexes / masks with blocking host-to-device copies (and the
    reference path did so on every forward); they are now made once per content and device. A meta-device model
    takes that path here: the first forward runs under inference_mode, and a later grad-enabled forward reuses the
    same constants (inference tensors would refuse to be saved for backward)."""
    from deltaw.batching import kernels
    torch.manual_seed(0)
    model = _llama().to("meta")
    rows = ["a", "b", None, {"a": 0.5, "c": -1.0}]
    x = torch.zeros(len(rows), 5, dtype=torch.long, device="meta")
    kernels._device_const.cache_clear()
    clear_cache()
    with torch.inference_mode(), per_row(model, rows, strategy=strategy):
        assert _out(model, x).device.type == "meta"
    built = kernels._device_const.cache_info()
    assert built.currsize > 0
    kernels._CACHE.clear()  # packs and kernels are built again: from the same contents, nothing is copied again
    with torch.inference_mode(), per_row(model, rows, strategy=strategy):
        _out(model, x)
    after = kernels._device_const.cache_info()
    assert after.misses == built.misses and after.hits > built.hits
    with per_row(model, rows, strategy=strategy):  # with autograd (the reference path reuses its weights)
        out = _out(model, x)
    assert out.requires_grad and out.device.type == "meta"
    a = kernels._const([1, 2], torch.long, torch.device("meta"))
    assert a is kernels._const([1, 2], torch.long, torch.device("meta")) and not a.is_inference()


def test_large_layout_constants_are_copied_per_build_not_cached(monkeypatch):
    """The device cache holds small constants only (a (B, R) mask of a large batch would pin device memory)."""
    from deltaw.batching import kernels
    monkeypatch.setattr(kernels, "_CONST_CACHED_MAX", 2)
    kernels._device_const.cache_clear()
    small = kernels._const([1, 2], torch.long, torch.device("meta"))
    big = kernels._const([[1.0, 2.0], [3.0, 4.0]], torch.float32, torch.device("meta"))
    assert kernels._device_const.cache_info().currsize == 1
    assert small.device.type == big.device.type == "meta" and big.shape == (2, 2)
    assert kernels._const([[1.0, 2.0], [3.0, 4.0]], torch.float32, torch.device("meta")) is not big


def test_layout_constants_are_keyed_on_their_bits():
    """-0.0 == 0.0 as Python floats: a cache keyed on values handed one for the other."""
    from deltaw.batching import kernels
    meta = torch.device("meta")
    kernels._device_const.cache_clear()
    pos, neg = kernels._const([0.0, 1.0], torch.float32, meta), kernels._const([-0.0, 1.0], torch.float32, meta)
    assert pos is not neg and kernels._device_const.cache_info().currsize == 2
    assert kernels._const([0.0, 1.0], torch.float32, meta) is pos
    clear_cache()
    assert kernels._device_const.cache_info().currsize == 0


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_prefill_starts_from_the_deltas_and_adds_the_base_product_into_them(build, monkeypatch):
    """From START_MIN_TOKENS tokens (a prefill), Linear and Conv1D layers on the uniform, rowwise and in-order
    grouped strategies take that order (``base_into`` runs), and give the rows-alone result; below it, and with
    autograd on, the usual order."""
    from deltaw.layers.linear import LoraLinear
    model = build()
    for i, name in enumerate("abc"):
        _randomize(model, name, seed=20 + i)
    calls = []
    for cls in {type(layer) for layer in deltaw.state(model).layers.values()}:
        if "base_into" in cls.__dict__:
            real = cls.base_into
            monkeypatch.setattr(cls, "base_into", lambda self, d, x, w, real=real: calls.append(1) or real(self, d, x, w))
    x = torch.randint(1, 64, (8, 6), generator=torch.Generator().manual_seed(5))
    cases = [(["a", "b", None, {"a": 0.5, "c": -1.0}] * 2, "rowwise"), (["c"] * 4 + ["b"] * 4, "grouped"),
             ([{"a": 0.5, "b": 0.25}] * 8, "uniform")]
    for rows, strategy in cases:
        expected = _alone(model, x, rows)
        for threshold, used in ((48, True), (49, False)):  # 8 rows × 6 tokens
            monkeypatch.setattr(layers_base, "START_MIN_TOKENS", threshold)
            calls.clear()
            with per_row(model, rows, strategy=strategy), torch.inference_mode():
                torch.testing.assert_close(_out(model, x), expected, **TOL)
            assert bool(calls) is used, (strategy, threshold)
        monkeypatch.setattr(layers_base, "START_MIN_TOKENS", 1)
        calls.clear()
        with per_row(model, rows, strategy=strategy):  # autograd on: the reference path
            torch.testing.assert_close(_out(model, x), expected, **TOL)
        assert not calls
    assert LoraLinear._base_into_matches()

    class OwnForward(LoraLinear):  # overrides the base product only: an inherited base_into would not match it
        def base_forward(self, x, weight):
            return super().base_forward(x, weight) * 2

    assert not OwnForward._base_into_matches()


def _both_orders(model, x, rows, monkeypatch, strategy="auto"):
    """The output with the deltas added after the base product, then with them written first (forced)."""
    outs = []
    for threshold in (1 << 40, 1):
        monkeypatch.setattr(layers_base, "START_MIN_TOKENS", threshold)
        with per_row(model, rows, strategy=strategy), torch.inference_mode():
            outs.append(model(x))
    return outs


def _single(seed: int = 0) -> nn.Module:
    from toy_models import Single
    torch.manual_seed(seed)
    m = Single(nn.Linear(16, 12)).eval()
    deltaw.attach(m, deltaw.LoraConfig(r=4, alpha=16, target_modules=["layer"]), "a")
    _randomize(m, "a", seed=seed)
    return m


@pytest.mark.parametrize("strategy", ["uniform", "rowwise", "grouped"])
def test_prefill_order_under_cpu_autocast(strategy, monkeypatch):
    """Autocast runs the deltas' matmuls in bf16 while x and W stay fp32: the in-place base GEMM into a bf16 output
    raised 'self and mat2 must have the same dtype' (from a review); autocast takes the usual order."""
    model = _single()
    rows = ["a"] * 4 if strategy == "uniform" else (["a", "a", None, None] if strategy == "grouped"
                                                      else ["a", None, "a", None])
    x = torch.randn(4, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after, first = _both_orders(model, x, rows, monkeypatch, strategy)
    assert first.dtype == after.dtype == torch.bfloat16
    torch.testing.assert_close(first, after)


def test_prefill_order_leaves_weight_subclasses_their_own_linear(monkeypatch):
    """A weight subclass with its own ``F.linear`` (as quantized weights have) must keep computing the base product:
    ``addmm_`` on its raw data gave another result (from a review)."""
    import torch.nn.functional as F

    class HalfScale(nn.Parameter):  # stored at half scale, dequantized by its linear
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is F.linear:
                bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
                return F.linear(args[0], args[1].as_subclass(torch.Tensor) * 2, bias)
            return super().__torch_function__(func, types, args, kwargs or {})

    model = _single()
    base = model.layer.base_layer
    base.weight = HalfScale(base.weight.detach() / 2, requires_grad=False)
    after, first = _both_orders(model, torch.randn(4, 5, 16), ["a", None, "a", None], monkeypatch, "rowwise")
    torch.testing.assert_close(first, after, **TOL)


@pytest.mark.parametrize("strategy", ["uniform", "rowwise", "grouped"])
def test_prefill_order_scales_inside_the_product(strategy, monkeypatch):
    """The uniform start scaled h before the product: h·alpha overflowed (2.4e38 · 8) where alpha · (h·Bᵀ) is finite,
    as the usual order's ``addmm_(alpha=)`` computes it (from a review, in fp16 first; fp32 shown here, since half
    precision now takes the usual order)."""
    model = _single()
    a, b = deltaw.adapter_parameters(model, "a")
    with torch.no_grad():
        a.fill_(1.0)
        b.fill_(1e-4)
    x = torch.full((4, 5, 16), 1.5e37)  # h = 2.4e38 per rank; scaling 4, weight 2
    after, first = _both_orders(model, x, [{"a": 2.0}] * 4, monkeypatch, strategy)
    assert torch.isfinite(after).all() and torch.isfinite(first).all()
    torch.testing.assert_close(first, after)
