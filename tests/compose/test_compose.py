"""compose / compose_dirs: exactness against live stacking, reported errors, TIES/DARE properties, PEFT format."""

from __future__ import annotations

import json
import math

import pytest
import torch

import deltaw
from deltaw.compose import compose, compose_dirs
from deltaw.compose.methods import dare_merge, ties_merge

from compose_helpers import make_tiny, randomize
from toy_models import NestedPaths

W = {"a": 1.0, "b": -0.5}


def out(model, spec, ids):
    with torch.no_grad(), deltaw.using(model, spec):
        return model(ids)


def delta(model, name: str) -> dict[str, torch.Tensor]:
    """Scaled ΔW per module in the base weight layout, from the resident layers."""
    st = deltaw.state(model)
    res = {}
    for path in st.adapters[name].modules:
        layer = st.layers[path]
        a, b = (t.detach().double() for t in layer.adapter_parameters(name))
        res[path] = layer.delta_weight(a, b) * layer.scaling[name]
    return res


def exact_sum(model, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for n, w in weights.items():
        for p, d in delta(model, n).items():
            total[p] = total.get(p, 0) + w * d
    return total


def test_linear_equals_live_stacking(tiny_two, ids):
    report = compose(tiny_two, W, "linear", name="combo")
    assert set(report.modules) == {"emb", "fc1", "proj", "conv"}  # union of targets
    assert report.modules["fc1"].rank == 5 and report.modules["emb"].rank == 2 and report.modules["conv"].rank == 4
    torch.testing.assert_close(out(tiny_two, "combo", ids), out(tiny_two, W, ids), atol=1e-5, rtol=1e-5)
    for p, ref in exact_sum(tiny_two, W).items():
        torch.testing.assert_close(delta(tiny_two, "combo")[p], ref, atol=1e-6, rtol=1e-6)
    assert deltaw.active(tiny_two) == (("a", 1.0),)  # compose does not change the activation


def test_linear_rank_overflow_is_still_exact(ids):
    model = make_tiny()
    for i, n in enumerate(("x", "y")):  # fc1 is Linear(8, 12): max rank 8 < 6 + 6
        deltaw.attach(model, deltaw.LoraConfig(r=6, alpha=3.0, target_modules=["fc1"]), n)
        randomize(model, n, seed=10 + i)
    report = compose(model, {"x": 0.7, "y": 1.3}, "linear", name="xy")
    assert report.modules["fc1"].rank == 8
    assert report.max_rel_error < 1e-10
    torch.testing.assert_close(out(model, "xy", ids), out(model, {"x": 0.7, "y": 1.3}, ids), atol=1e-5, rtol=1e-5)


def test_svd_full_rank_is_exact(tiny_two, ids):
    report = compose(tiny_two, W, "svd", name="full", rank=64)  # capped per module at min(Σr, out, in')
    assert report.max_rel_error < 1e-10 and report.mean_energy_kept == pytest.approx(1.0)
    torch.testing.assert_close(out(tiny_two, "full", ids), out(tiny_two, W, ids), atol=1e-5, rtol=1e-5)


def test_svd_reported_error_is_the_measured_error(tiny_two):
    report = compose(tiny_two, W, "svd", name="low", rank=1)
    ref = exact_sum(tiny_two, W)
    got = delta(tiny_two, "low")
    for p, r in ref.items():
        measured = float((r - got[p]).norm() / r.norm())
        m = report.modules[p]
        assert m.rank == 1
        assert m.rel_error == pytest.approx(measured, rel=1e-5, abs=1e-7)
        assert m.deviation == pytest.approx(measured, rel=1e-5, abs=1e-7)
        s = torch.linalg.svdvals(r.reshape(r.shape[0], -1))
        assert m.energy_kept == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), rel=1e-6)
        assert m.rel_error == pytest.approx(math.sqrt(1 - m.energy_kept), rel=1e-5, abs=1e-7)
    assert max(m.rel_error for m in report.modules.values()) > 0.05  # rank 1 really truncates something


def test_svd_default_rank_is_max_source_rank(tiny_two):
    report = compose(tiny_two, W, "svd", name="d")
    assert report.modules["fc1"].rank == 3 and report.modules["emb"].rank == 2


def test_dare_p0_equals_linear(tiny_two, ids):
    compose(tiny_two, W, "dare", name="dare0", drop_rate=0.0)
    torch.testing.assert_close(out(tiny_two, "dare0", ids), out(tiny_two, W, ids), atol=1e-5, rtol=1e-5)


def test_dare_is_seeded_and_reports_refactor_error(tiny_two):
    r1 = compose(tiny_two, W, "dare", name="d1", drop_rate=0.5, seed=3)
    compose(tiny_two, W, "dare", name="d2", drop_rate=0.5, seed=3)
    compose(tiny_two, W, "dare", name="d3", drop_rate=0.5, seed=4)
    d1, d2, d3 = (delta(tiny_two, n) for n in ("d1", "d2", "d3"))
    assert all(torch.equal(d1[p], d2[p]) for p in d1)
    assert any(not torch.allclose(d1[p], d3[p]) for p in d1)
    ref = exact_sum(tiny_two, W)
    for p, m in r1.modules.items():  # deviation = measured distance from the exact sum
        assert m.deviation == pytest.approx(float((d1[p] - ref[p]).norm() / ref[p].norm()), rel=1e-5)
        assert 0.0 <= m.energy_kept <= 1.0


def test_dare_unbiased():
    deltas = torch.randn(2, 3, 4, dtype=torch.float64)
    mean = sum(dare_merge(deltas, 0.6, [s, s + 10_000]) for s in range(4000)) / 4000
    torch.testing.assert_close(mean, deltas.sum(0), atol=0.12, rtol=0)


def test_ties_sign_election_by_hand():
    # 3 tasks, 4 entries; density 0.5 keeps the 2 largest |x| per task.
    deltas = torch.tensor([[3.0, -1.0, 0.5, 2.0],     # keeps 3.0 (e0), 2.0 (e3)
                           [-4.0, 2.0, 0.1, -0.2],    # keeps -4.0 (e0), 2.0 (e1)
                           [1.0, 0.3, -5.0, 0.4]],    # keeps -5.0 (e2), 1.0 (e0)
                          dtype=torch.float64)
    # e0: trimmed 3, -4, 1 -> sum 0 ... elected sign 0 -> 0.  Make e0 decisive by nudging task 2.
    deltas[2, 0] = 1.5  # e0: 3 - 4 + 1.5 = 0.5 > 0 -> agree {3, 1.5} -> mean 2.25
    got = ties_merge(deltas, 0.5)
    # e1: only task 1 keeps it (2.0) -> 2.0; e2: only task 2 (-5.0) -> -5.0; e3: only task 0 (2.0) -> 2.0
    torch.testing.assert_close(got, torch.tensor([2.25, 2.0, -5.0, 2.0], dtype=torch.float64))
    # a zero elected sign gives 0; a disagreeing minority is dropped, not averaged in
    torch.testing.assert_close(ties_merge(torch.tensor([[1.0], [-1.0]]), 1.0), torch.tensor([0.0]))
    torch.testing.assert_close(ties_merge(torch.tensor([[2.0], [4.0], [-1.0]]), 1.0), torch.tensor([3.0]))


def test_ties_single_adapter_full_density_is_identity(tiny_two, ids):
    report = compose(tiny_two, {"a": 1.0}, "ties", name="t", density=1.0)
    assert report.max_rel_error < 1e-10
    torch.testing.assert_close(out(tiny_two, "t", ids), out(tiny_two, "a", ids), atol=1e-5, rtol=1e-5)


def test_ties_in_model_matches_hand_merge(tiny_two):
    report = compose(tiny_two, W, "ties", name="t", density=0.3, rank=64)
    da, db = delta(tiny_two, "a"), delta(tiny_two, "b")
    got = delta(tiny_two, "t")
    for p in got:
        parts = [d[p] * w for d, w in ((da, 1.0), (db, -0.5)) if p in d]
        want = ties_merge(torch.stack(parts), 0.3)
        torch.testing.assert_close(got[p], want, atol=1e-6, rtol=1e-5)  # full rank: lossless up to fp32 storage
        assert report.modules[p].rel_error < 1e-10


def test_negation(tiny_two, ids):
    compose(tiny_two, {"a": -1.0}, "svd", name="neg")
    neg, pos = delta(tiny_two, "neg"), delta(tiny_two, "a")
    for p in pos:
        torch.testing.assert_close(neg[p], -pos[p], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out(tiny_two, "neg", ids), out(tiny_two, {"a": -1.0}, ids), atol=1e-5, rtol=1e-5)


def test_composed_adapter_saves_and_loads(tiny_two, ids, tmp_path):
    compose(tiny_two, W, "svd", name="combo", rank=2)
    deltaw.save(tiny_two, tmp_path / "combo", "combo")
    cfg = json.loads((tmp_path / "combo" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2.0 and cfg["target_modules"] == ["conv", "emb", "fc1", "proj"]
    fresh = make_tiny()
    deltaw.load(fresh, tmp_path / "combo", "combo")
    torch.testing.assert_close(out(fresh, "combo", ids), out(tiny_two, "combo", ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["linear", "svd", "ties", "dare"])
def test_compose_dirs_matches_in_model(tiny_two, ids, tmp_path, method):
    deltaw.save(tiny_two, tmp_path / "a", "a")
    deltaw.save(tiny_two, tmp_path / "b", "b")
    kw = {"rank": 3, "density": 0.4, "drop_rate": 0.3, "seed": 7}
    report = compose_dirs({tmp_path / "a": 1.0, tmp_path / "b": -0.5}, tmp_path / "ab", method, **kw)
    in_model = compose(tiny_two, W, method, name="ab", **kw)
    assert {p: m.rank for p, m in report.modules.items()} == {p: m.rank for p, m in in_model.modules.items()}
    for p, m in report.modules.items():
        assert m.rel_error == pytest.approx(in_model.modules[p].rel_error, rel=1e-5, abs=1e-9)
    fresh = make_tiny()
    deltaw.load(fresh, tmp_path / "ab", "ab")
    torch.testing.assert_close(out(fresh, "ab", ids), out(tiny_two, "ab", ids), atol=1e-5, rtol=1e-5)
    if method == "linear":
        torch.testing.assert_close(out(fresh, "ab", ids), out(tiny_two, W, ids), atol=1e-5, rtol=1e-5)


def test_compose_dirs_refuses_mixed_bases(tiny_two, tmp_path):
    deltaw.save(tiny_two, tmp_path / "a", "a")
    other = make_tiny(seed=1)
    deltaw.attach(other, deltaw.LoraConfig(r=2, target_modules=["fc1"]), "c")
    randomize(other, "c")
    deltaw.save(other, tmp_path / "c", "c")
    with pytest.raises(deltaw.BaseModelMismatchError):
        compose_dirs({tmp_path / "a": 1.0, tmp_path / "c": 1.0}, tmp_path / "ac")
    compose_dirs({tmp_path / "a": 1.0, tmp_path / "c": 1.0}, tmp_path / "ac", allow_base_mismatch=True)


def test_bad_arguments(tiny_two):
    with pytest.raises(ValueError, match="unknown compose method"):
        compose(tiny_two, W, "mean")
    with pytest.raises(ValueError, match="density"):
        compose(tiny_two, W, "ties", density=0.0)
    with pytest.raises(ValueError, match="drop_rate"):
        compose(tiny_two, W, "dare", drop_rate=1.0)
    with pytest.raises(deltaw.AdapterNameError):
        compose(tiny_two, W, name="a")
    with pytest.raises(deltaw.AdapterNameError):
        compose(tiny_two, {"zz": 1.0})
    assert deltaw.adapters(tiny_two) == ["a", "b"]  # refused calls change nothing


def test_peft_library_loads_composed_adapter(tmp_path):
    """The composed directory (with rank_pattern / alpha_pattern) means the same thing to PEFT itself."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=4.0, target_modules=["v_proj", "o_proj"], use_rslora=True), "b")
    randomize(model, "a", 0.2, 1)
    randomize(model, "b", 0.2, 2)
    compose(model, W, "linear", name="ab")  # ranks 2 (q), 6 (v), 4 (o): needs rank_pattern
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    want = out(model, W, x).logits
    deltaw.save(model, tmp_path / "ab", "ab")
    deltaw.merge_and_unload(model, {})  # back to the plain base (nothing merged)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ab"))
    with torch.no_grad():
        got = pm(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compose_adapts_exactly_the_source_modules_when_one_path_is_a_suffix_of_another():
    """compose re-attached by target_modules = the paths, matched by suffix: "fc" pulled in "sub.fc" too (and
    failed there: rank 8 > its 2 outputs)."""
    torch.manual_seed(0)
    model = NestedPaths().eval()
    deltaw.attach(model, deltaw.LoraConfig(r=8, target_modules="fc"), "a")  # a regex: the top-level fc only
    randomize(model, "a")
    compose(model, {"a": 1.0}, method="linear", name="combo")
    assert deltaw.state(model).adapters["combo"].modules == ("fc",)
    x = torch.randn(3, 16)
    torch.testing.assert_close(out(model, "combo", x), out(model, "a", x), rtol=1e-5, atol=1e-5)


class _Suffixes(torch.nn.Module):
    """16 -> 16 Linears at "fc", "sub.fc" and "other": the path "fc" is a dotted suffix of "sub.fc"."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.sub, self.other = torch.nn.Linear(16, 16), torch.nn.Module(), torch.nn.Linear(16, 16)
        self.sub.fc = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.sub.fc(self.fc(x)))


def test_composed_rank_pattern_keys_match_their_own_module_only(tmp_path):
    """rank_pattern keys were escaped paths, but keys match as dotted suffixes ((.*\\.)?(key)$, PEFT's rule): the
    key for "fc" (rank 4) also gave "sub.fc" (rank 2) rank 4, so compose failed and compose_dirs wrote a config
    neither deltaw nor PEFT could load. Anchored keys give each module its own rank under both rules."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = _Suffixes().eval()
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=2.0, target_modules=["fc", "sub.fc", "other"]), "a")
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=2.0, target_modules="fc"), "b")  # regex: top-level fc only
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    x = torch.randn(3, 16)
    want = out(model, W, x)
    ranks = {"fc": 4, "sub.fc": 2, "other": 2}
    report = compose(model, W, "linear", name="ab")
    assert {p: report.config.rank_for(p) for p in ranks} == ranks
    torch.testing.assert_close(out(model, "ab", x), want, atol=1e-5, rtol=1e-5)
    deltaw.save(model, tmp_path / "a", "a")
    deltaw.save(model, tmp_path / "b", "b")
    report = compose_dirs({tmp_path / "a": W["a"], tmp_path / "b": W["b"]}, tmp_path / "ab")
    assert {p: report.config.rank_for(p) for p in ranks} == ranks
    torch.manual_seed(0)
    fresh = _Suffixes().eval()  # the same base weights
    deltaw.load(fresh, tmp_path / "ab", "ab")
    torch.testing.assert_close(out(fresh, "ab", x), want, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(_Suffixes().eval(), str(tmp_path / "ab")).eval()
    inner = pm.base_model.model
    assert {p: inner.get_submodule(p).lora_A["default"].weight.shape[0] for p in ranks} == ranks
    with torch.no_grad():
        torch.testing.assert_close(pm(x), want, atol=1e-5, rtol=1e-5)


def test_compose_dirs_of_sources_leaving_out_a_suffix_module_writes_an_exact_target(tmp_path):
    """Sources covering top-level "fc" and "other" but not "sub.fc" (their files say so with an exact regex):
    compose_dirs wrote target_modules ["fc", "other"], and "fc" also targets "sub.fc" by PEFT's suffix rule, so
    deltaw refused to load the composed file (no factors for sub.fc) and PEFT adapted sub.fc from its init."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = _Suffixes().eval()
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=2.0, target_modules="fc|other"), "a")  # regex: top level
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=2.0, target_modules="fc"), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    x = torch.randn(3, 16)
    want = out(model, W, x)
    deltaw.save(model, tmp_path / "a", "a")
    deltaw.save(model, tmp_path / "b", "b")
    compose_dirs({tmp_path / "a": W["a"], tmp_path / "b": W["b"]}, tmp_path / "ab")
    torch.manual_seed(0)
    fresh = _Suffixes().eval()
    deltaw.load(fresh, tmp_path / "ab", "ab")
    assert sorted(deltaw.state(fresh).adapters["ab"].modules) == ["fc", "other"]
    torch.testing.assert_close(out(fresh, "ab", x), want, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(_Suffixes().eval(), str(tmp_path / "ab")).eval()
    assert not hasattr(pm.base_model.model.sub.fc, "lora_A")
    with torch.no_grad():
        torch.testing.assert_close(pm(x), want, atol=1e-5, rtol=1e-5)
