"""A row of a mixed batch depends on its own adapters only: a broken adapter (NaN or inf factors) on other rows,
a factor swapped through ``.data`` while the context is open, or a lookup the model does once for every row must
not change what a row gets alone (found in review; each test failed before its fix)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltaw
from deltaw.batching import clear_cache, per_row
from toy_models import tiny_gpt2


class _One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _two_adapters(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    m = _One(layer).eval()
    for name in ("a", "b"):
        deltaw.attach(m, deltaw.LoraConfig(r=4, target_modules=["layer"]), name)
    with torch.no_grad():
        for p in deltaw.adapter_parameters(m):
            p.normal_()
    return m


def _input(kind: str, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, 8, generator=g) if kind == "linear" else torch.randint(0, 20, (n, 5), generator=g)


@pytest.mark.parametrize("bad", ["A", "B"])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
@pytest.mark.parametrize("strategy,grad", [("auto", True), ("reference", False), ("auto", False), ("dense", False),
                                           ("grouped", False), ("rowwise", False), ("native", False)])
def test_non_finite_adapter_stays_on_its_rows(kind, strategy, grad, bad):
    """Rows without the broken adapter equal their solo run; only its own row is NaN. Before, reference (every
    grad-enabled forward), dense (embeddings under auto) and grouped with unequal groups computed every adapter on
    every row and multiplied the unused ones by 0: NaN · 0 is NaN."""
    m = _two_adapters(nn.Linear(8, 8) if kind == "linear" else nn.Embedding(20, 8))
    layer = deltaw.state(m).layers["layer"]
    with torch.no_grad():
        (layer.lora_A if bad == "A" else layer.lora_B)["b"].fill_(float("nan"))
    x = _input(kind)
    rows = ["a", None, "a", "a", "a", "b"]  # groups of 4 and 1: grouped pads the smaller one
    with torch.set_grad_enabled(grad), per_row(m, rows, strategy=strategy):
        y = m(x)
    with torch.no_grad():
        for i, spec in enumerate(rows[:5]):
            with deltaw.using(m, spec):
                alone = m(x[i:i + 1])
            torch.testing.assert_close(y[i:i + 1].detach(), alone, rtol=1e-5, atol=1e-5, msg=f"row {i}")
    assert y[5].isnan().all()


def test_non_finite_adapter_leaves_other_rows_gradients_finite():
    """Under autograd (the reference path) the broken adapter's backward reaches only its own rows' inputs."""
    m = _two_adapters(nn.Linear(8, 8))
    with torch.no_grad():
        deltaw.state(m).layers["layer"].lora_B["b"].fill_(float("nan"))
    x = _input("linear").requires_grad_()
    with per_row(m, ["a", None, "a", "a", "a", "b"]):
        m(x)[:5].sum().backward()
    assert torch.isfinite(x.grad[:5]).all()  # (row 5's own input gets 0 · NaN through the broken B: NaN)
    assert torch.isfinite(deltaw.state(m).layers["layer"].lora_A["a"].grad).all()


def test_fp16_overflow_of_an_unused_adapter_does_not_reach_other_rows():
    """Finite fp16 factors whose product overflows to inf on a row that does not use them: zeroed exactly (masked),
    not multiplied by 0 (dense and padded grouped alike)."""
    m = _two_adapters(nn.Linear(8, 8)).half()
    with torch.no_grad():
        deltaw.state(m).layers["layer"].lora_A["b"].fill_(60000.0)  # x·Aᵀ overflows fp16 for any ordinary x
    x = _input("linear").half()
    rows = ["a", None, "a", "a", "a", "b"]
    for strategy in ("dense", "grouped"):
        with torch.no_grad(), per_row(m, rows, strategy=strategy):
            y = m(x)
        assert torch.isfinite(y[:5]).all(), strategy


@pytest.mark.parametrize("strategy", ["grouped", "native", "rowwise", "dense"])
def test_data_swap_inside_a_context_is_seen(strategy):
    """A ``.data`` swap keeps the version counter: the packs (and the native kernel's pointers) were kept."""
    m = _two_adapters(nn.Linear(8, 8))
    layer = deltaw.state(m).layers["layer"]
    rows, x = ["a", "b", "a", None], torch.randn(4, 1, 8)
    with torch.no_grad(), per_row(m, rows, strategy=strategy):
        m(x)
        layer.lora_B["a"].data = torch.randn(8, 4)
        got = m(x)
    with torch.no_grad(), deltaw.using(m, "a"):
        torch.testing.assert_close(got[:1], m(x[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["grouped", "rowwise", "dense"])
def test_clear_cache_reaches_an_open_context(strategy):
    """A write through ``.data`` in place changes neither storage nor version: ``clear_cache()`` is the documented
    remedy, and it now also makes an open context re-pack."""
    m = _two_adapters(nn.Linear(8, 8))
    layer = deltaw.state(m).layers["layer"]
    rows, x = ["a", "b", "a", None], torch.randn(4, 1, 8)
    with torch.no_grad(), per_row(m, rows, strategy=strategy):
        m(x)
        layer.lora_B["a"].data.mul_(3.0)
        clear_cache()
        got = m(x)
    with torch.no_grad(), deltaw.using(m, "a"):
        torch.testing.assert_close(got[:1], m(x[:1]), rtol=1e-5, atol=1e-5)


def _gpt2_with_embedding_adapter() -> nn.Module:
    torch.manual_seed(0)
    m = tiny_gpt2().eval()
    deltaw.attach(m, deltaw.LoraConfig(r=2, target_modules=["wte", "wpe"], init="gaussian"), "a")
    with torch.no_grad():
        for p in deltaw.adapter_parameters(m):
            p.normal_()
    return m


def test_a_real_batch_of_one_is_not_broadcast_to_the_rows():
    """GPT-2's (1, T) position ids are looked up once for every row and broadcast; token ids of a batch of one
    looked the same to the layer, so one input row with two specs came back as two rows."""
    m = _gpt2_with_embedding_adapter()
    ids = torch.randint(0, 64, (1, 5))
    with pytest.raises(deltaw.DeltawError, match="given 2 rows but a layer received a batch of 1"):
        with per_row(m, ["a", None]), torch.inference_mode():
            m(ids)
    assert not m._forward_pre_hooks, "per_row removes its hook"


def test_position_ids_broadcast_to_k_entries_per_row():
    """Beam layout (k consecutive entries per row) with GPT-2's (1, T) position ids: the lookup is broadcast to
    k·B entries, each with its row's delta (it was broadcast to B and the model failed on the shapes)."""
    m = _gpt2_with_embedding_adapter()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    with per_row(m, ["a", None]), torch.inference_mode():
        got = m(ids.repeat_interleave(2, 0)).logits
    with torch.inference_mode():
        for row, spec in enumerate(["a", None]):
            with deltaw.using(m, spec):
                alone = m(ids[row:row + 1]).logits
            for j in range(2):
                torch.testing.assert_close(got[2 * row + j:2 * row + j + 1], alone, rtol=1e-5, atol=1e-5)


def test_deleting_an_adapter_drops_its_packs():
    """Packs kept between contexts outlived a deleted adapter (up to 4 per layer): a serving LRU that deletes
    adapters to stay within a memory budget still held their copies (found in review). Other adapters' packs stay."""
    from deltaw.batching import cache_nbytes
    m = _two_adapters(nn.Linear(8, 8))
    deltaw.attach(m, deltaw.LoraConfig(r=4, target_modules=["layer"]), "c")
    clear_cache()
    x = torch.randn(4, 1, 8)
    with torch.no_grad():
        with per_row(m, ["a", "b", "a", None], strategy="grouped"):
            m(x)
        with per_row(m, ["c", "c", "a", None], strategy="grouped"):
            m(x)
    both = cache_nbytes()
    deltaw.delete(m, "b")
    kept = cache_nbytes()
    assert 0 < kept < both
    with torch.no_grad(), per_row(m, ["c", "c", "a", None], strategy="grouped"):
        m(x)
    assert cache_nbytes() == kept, "the pack of the other rows was kept, not rebuilt"


def test_finiteness_is_checked_once_per_pack_not_per_context(monkeypatch):
    """The check behind the fallback read every factor again in every new context (serving opens one whenever
    its rows change): +17 ms per context for 30 layers of 16 adapters (found in review). It is kept with the pack;
    a write to a factor (a new version, so a new pack) is checked again."""
    m = _two_adapters(nn.Linear(8, 8))
    x = torch.randn(4, 1, 8)
    rows = ["a", "b", "a", None]
    calls = []
    real = torch.isfinite

    def counting(t):
        calls.append(1)
        return real(t)

    monkeypatch.setattr(torch, "isfinite", counting)
    with torch.no_grad():
        with per_row(m, rows, strategy="dense"):
            m(x)
        assert calls
        calls.clear()
        with per_row(m, rows, strategy="dense"):
            m(x)
        assert calls == []
        deltaw.state(m).layers["layer"].lora_B["b"].mul_(2.0)
        with per_row(m, rows, strategy="dense"):
            m(x)
        assert calls


def test_data_swap_of_inference_mode_factors_is_seen():
    """Factors made under inference_mode keep no version counter and were not watched at all: their storage is."""
    torch.manual_seed(0)
    m = _One(nn.Linear(8, 8)).eval()
    with torch.inference_mode():
        for name in ("a", "b"):
            deltaw.attach(m, deltaw.LoraConfig(r=4, target_modules=["layer"]), name)
            for p in deltaw.adapter_parameters(m, name):
                p.normal_()
    layer = deltaw.state(m).layers["layer"]
    x = torch.randn(4, 1, 8)
    for strategy, rows in (("grouped", ["a", "b", "a", None]), ("native", ["a", "b", "a", None]),
                           ("uniform", ["a"] * 4)):
        with torch.inference_mode(), per_row(m, rows, strategy=strategy):
            m(x)
            with torch.inference_mode():
                layer.lora_B["a"].data = torch.randn(8, 4)
            got = m(x)
        with torch.inference_mode(), deltaw.using(m, "a"):
            torch.testing.assert_close(got[:1], m(x[:1]), rtol=1e-5, atol=1e-5, msg=strategy)


def test_a_pack_built_after_a_write_through_data_gets_its_own_verdict():
    """Kept per adapter identity, the verdict did not see a NaN written in place through ``.data`` (no version,
    no storage change): a new pack built from the NaN factor still counted as finite, and the NaN reached rows
    that never use the adapter (found in review). The verdict now belongs to the pack it was made on."""
    m = _two_adapters(nn.Linear(8, 8))
    layer = deltaw.state(m).layers["layer"]
    x = torch.randn(4, 1, 8)
    with torch.no_grad():
        with per_row(m, ["a", "a", "a", "b"], strategy="dense"):
            m(x)
        layer.lora_B["b"].data.fill_(float("nan"))
        for strategy, rows in (("dense", ["b", "a", "a", "a"]), ("grouped", ["a", "a", "a", "b"])):
            with per_row(m, rows, strategy=strategy):
                y = m(x)
            keep = [i for i, r in enumerate(rows) if r == "a"]
            assert torch.isfinite(y[keep]).all(), strategy
