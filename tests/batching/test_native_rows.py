"""The ``native`` per-row strategy (``dw_lora_rows_f32``): one kernel call per module for a mixed decode batch.

Beyond matching the reference (test_per_row's strategy-parametrised checks run it too), it promises more: a
row whose spec is one adapter gets bit for bit what it gets with that adapter active for the whole batch (both
go through the same per-row arithmetic), and it declines -- never misreads memory -- whatever it cannot take.
"""

from __future__ import annotations

import pytest
import torch

import deltaw
from deltaw.batching import per_row
from deltaw.layers import native
from thread_checks import assert_same_bits_for_any_thread_count
from toy_models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.skipif(native.kernel() is None, reason="no native kernel on this machine")

ROWS = ["a", None, "b", {"a": 0.5, "b": -1.0}, "a", "b"]


def _model(build=tiny_llama, targets="all-linear"):
    torch.manual_seed(0)
    m = build().eval()
    deltaw.attach(m, deltaw.LoraConfig(r=4, alpha=8, target_modules=targets), "a")
    deltaw.attach(m, deltaw.LoraConfig(r=11, alpha=4, target_modules=targets), "b")  # r % 8 != 0: masked tail
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("a", "b"):
            for p in deltaw.adapter_parameters(m, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def _decode_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_single_adapter_rows_equal_the_adapter_on_the_whole_batch_bit_for_bit(build):
    """Same batch shape, so the base layers round the same way: a row whose spec is one adapter gets exactly
    what it gets when that adapter is simply active for the whole batch (the decode kernel's per-row
    arithmetic does not depend on the other rows)."""
    targets = "all-linear" if build is tiny_llama else ["c_attn", "c_proj", "c_fc"]
    model = _model(build, targets)
    ids = torch.randint(1, 64, (len(ROWS), 1), generator=torch.Generator().manual_seed(1))
    with per_row(model, ROWS) as plan:
        got = _decode_logits(model, ids)
        assert plan.strategies_used().get("native"), plan.strategies_used()
    for i, spec in enumerate(ROWS):
        if isinstance(spec, str):
            with deltaw.using(model, spec):
                whole = _decode_logits(model, ids)
            assert torch.equal(got[i], whole[i]), f"row {i} ({spec})"
            with deltaw.using(model, spec):
                alone = _decode_logits(model, ids[i:i + 1])
            torch.testing.assert_close(got[i], alone[0], rtol=1e-5, atol=1e-5)
    with deltaw.disabled(model):
        base = _decode_logits(model, ids[1:2])
    torch.testing.assert_close(got[1], base[0], rtol=1e-5, atol=1e-5)  # the row with no adapter
    with deltaw.using(model, {"a": 0.5, "b": -1.0}):
        stacked = _decode_logits(model, ids[3:4])
    torch.testing.assert_close(got[3], stacked[0], rtol=1e-5, atol=1e-5)


def test_k_entries_per_row_and_a_few_tokens_per_row():
    """Beam-search layout (each row repeated k times, in order) and short prompts (T tokens per row)."""
    model = _model()
    rows = ["a", "b", None]
    ids = torch.randint(1, 64, (3, 2), generator=torch.Generator().manual_seed(2))
    beams = ids.repeat_interleave(2, 0)  # (6, 2): k = 2 entries per row
    with per_row(model, rows, strategy="reference"):
        expected = _decode_logits(model, beams)
    with per_row(model, rows) as plan:
        got = _decode_logits(model, beams)
        assert plan.strategies_used().get("native")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _grouped_matches_reference(model, rows, seed, tol):
    """auto picks grouped (not native) for this batch, and its decode step matches the reference strategy."""
    ids = torch.randint(1, 64, (len(rows), 1), generator=torch.Generator().manual_seed(seed))
    with per_row(model, rows, strategy="reference"):
        expected = _decode_logits(model, ids)
    with per_row(model, rows) as plan:
        got = _decode_logits(model, ids)
        used = plan.strategies_used()
    assert "native" not in used and used.get("grouped"), used
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_terms_beyond_the_kernel_fall_back_to_grouped():
    """More entries per (adapter, weight) than MAX_TOKENS: the batched torch kernels, same results."""
    _grouped_matches_reference(_model(), ["a"] * (native.MAX_TOKENS + 1) + ["b"], seed=3, tol=1e-5)


def test_row_terms_refuse_what_the_kernel_cannot_index_safely():
    a, b = torch.randn(4, 8), torch.randn(6, 4)
    assert native.row_terms([(a, b, 1.0, [0, 1])], entries=2) is not None
    refused = [
        [(a, b, 1.0, [0, 2])],  # an index past the entries
        [(a, b, 1.0, [-1])],  # negative
        [(a, b, 1.0, [1, 1])],  # repeated: the row would get the term twice
        [(a, b, 1.0, [])],  # nothing to do
        [(a.double(), b.double(), 1.0, [0])],  # not fp32
        [(torch.randn(8, 4).t(), b, 1.0, [0])],  # A not contiguous
        [(a, torch.randn(6, 5), 1.0, [0])],  # ranks disagree
        [(a, b, 1.0, [0]), (torch.randn(4, 9), torch.randn(6, 4), 1.0, [1])],  # another layer's shape
        [(a, b, 1.0, list(range(native.MAX_TOKENS + 1)))],  # more entries than the kernel takes
    ]
    for terms in refused:
        assert native.row_terms(terms, entries=native.MAX_TOKENS + 1 if len(terms[0][3]) > 2 else 2) is None, terms
    terms = native.row_terms([(a, b, 1.0, [0, 1])], entries=2)
    y, x = torch.zeros(2, 6), torch.randn(2, 8)
    for yy, xx in [(torch.zeros(3, 6), x), (y, torch.randn(3, 8)), (y.double(), x.double()),
                   (torch.zeros(6, 2).t(), x)]:  # wrong entry counts, dtype, layout: declined, untouched
        before = yy.clone()
        assert not native.lora_rows_(yy, xx, terms)
        assert torch.equal(yy, before)
    assert native.lora_rows_(y, x, terms)
    torch.testing.assert_close(y, x @ a.T @ b.T, rtol=1e-5, atol=1e-5)


def test_factors_written_in_place_are_seen_without_a_repack():
    """The kernel reads the live factors (no packed copy): an in-place write inside the context takes effect
    on the next forward, as on every other path."""
    model = _model()
    ids = torch.randint(1, 64, (2, 1), generator=torch.Generator().manual_seed(4))
    with per_row(model, ["a", "b"]):
        before = _decode_logits(model, ids)
        with torch.no_grad():
            for p in deltaw.adapter_parameters(model, "a"):
                p.mul_(2.0)
        after = _decode_logits(model, ids)
    with deltaw.using(model, "a"):
        alone = _decode_logits(model, ids[:1])
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(after[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)


def test_a_call_the_kernel_declines_runs_the_fallback():
    """A layer input the kernel cannot index (not contiguous) takes the grouped kernel for that call."""
    model = _model()
    layer = model.model.layers[0].mlp.down_proj  # a wrapped Linear
    rows = ["a", "b", None]
    x = torch.randn(3, 1, 2 * 48)[..., ::2]  # (3, 1, 48), strided
    with per_row(model, rows, strategy="reference"), torch.no_grad():
        expected = layer(x)
    with per_row(model, rows) as plan, torch.no_grad():
        got = layer(x)
        assert plan.strategies_used() == {"native": 1}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_half_precision_models_choose_another_kernel():
    """A bf16 model: the kernel is fp32 only, so the plan picks grouped up front."""
    _grouped_matches_reference(_model().to(torch.bfloat16), ["a", "b"], seed=6, tol=2e-2)


@pytest.mark.parametrize("out_f", [1541, 64])
def test_rows_split_over_threads_give_the_one_thread_bits(out_f: int):
    """From 8 entries the OpenMP build splits a mixed batch's update over torch's threads (every term's h, then
    the outputs, every term in order): a stacked row's terms must still be added in order and every value be the
    one-thread bits, for mixed ranks (r % 4, r % 8 tails), flush-to-zero on the workers included."""
    g = torch.Generator().manual_seed(out_f)
    in_f, entries = 577, 16
    ranks, rows = [16, 5, 12, 64, 1], [[0, 3, 7, 9], [1, 2, 3], list(range(4, 16)), [0, 15], [3]]  # 3: a stack
    terms = [(torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), 0.3 * (k + 1), idx)
             for k, (r, idx) in enumerate(zip(ranks, rows))]
    x, y0 = torch.randn(entries, in_f, generator=g), torch.randn(entries, out_f, generator=g)

    def update(y: torch.Tensor, xx: torch.Tensor, factor: float) -> bool:
        return native.lora_rows_(y, xx, native.row_terms([(a, b, s * factor, idx) for a, b, s, idx in terms], entries))

    assert_same_bits_for_any_thread_count(update, x, y0)
    expected = y0.double()  # (the terms' sums run to ~1e3: checked against fp64)
    for a, b, s, idx in terms:
        expected[idx] += s * (x[idx].double() @ a.T.double()) @ b.T.double()
    y = y0.clone()
    assert native.lora_rows_(y, x, native.row_terms(terms, entries))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-3)
