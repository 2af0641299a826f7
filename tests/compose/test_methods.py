"""The per-module arithmetic (deltaw.compose.methods), on plain tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaw.compose.methods import Term, compose_module, factored_svd, refactor, stacked, top_svd


def _terms(seed: int, out: int, inp: int, ranks: list[int], coefs: list[float]) -> list[Term]:
    g = torch.Generator().manual_seed(seed)
    return [Term(torch.randn(r, inp, generator=g, dtype=torch.float64),
                 torch.randn(out, r, generator=g, dtype=torch.float64), c, str(i))
            for i, (r, c) in enumerate(zip(ranks, coefs))]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), out=st.integers(1, 12), inp=st.integers(1, 12),
       ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3), k=st.integers(1, 6))
def test_linear_exact_and_svd_error_is_eckart_young(seed, out, inp, ranks, k):
    coefs = [(-1.0) ** i * (0.5 + i) for i in range(len(ranks))]
    terms = _terms(seed, out, inp, ranks, coefs)
    exact = sum(t.coef * t.b @ t.a for t in terms)
    cap = min(out, inp)
    lin = compose_module(terms, "linear", rank=None, max_rank=cap)
    torch.testing.assert_close(lin.b @ lin.a, exact, atol=1e-9, rtol=1e-9)
    res = compose_module(terms, "svd", rank=k, max_rank=cap)
    s = torch.linalg.svdvals(exact)
    kk = min(k, cap, sum(ranks))
    want = math.sqrt(float((s[kk:] ** 2).sum() / (s ** 2).sum()))
    measured = float((exact - res.b @ res.a).norm() / exact.norm())
    assert res.rank == kk
    assert res.rel_error == pytest.approx(want, abs=1e-9)
    assert measured == pytest.approx(want, abs=1e-9)
    assert res.energy_kept == pytest.approx(1 - want ** 2, abs=1e-9)


def test_factored_svd_matches_full_svd():
    terms = _terms(0, 40, 30, [3, 5], [1.0, -2.0])
    a, b = stacked(terms)
    u, s, vh = factored_svd(a, b)
    torch.testing.assert_close(s[:8], torch.linalg.svdvals(b @ a)[:8], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, b @ a, atol=1e-10, rtol=1e-10)


def test_randomised_top_svd_is_optimal_on_lora_like_updates():
    """A TIES/DARE-like target (low rank plus spread noise) at 300x400: the randomised path (used when k is small)
    finds the signal exactly and the Eckart-Young optimum to 1e-4 within the flat noise tail."""
    g = torch.Generator().manual_seed(1)
    low = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 400, generator=g, dtype=torch.float64)
    target = low + 0.05 * torch.randn(300, 400, generator=g, dtype=torch.float64)
    res = refactor(target, low, 8)
    s = torch.linalg.svdvals(target)
    optimum = math.sqrt(float((s[8:] ** 2).sum() / (s ** 2).sum()))
    assert res.rel_error == pytest.approx(optimum, rel=1e-4)  # randomised: near-optimal, and measured
    assert res.energy_kept == pytest.approx(float((s[:8] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
    u, s2, vh = top_svd(target, 8)
    torch.testing.assert_close(s2[:6], s[:6], rtol=1e-10, atol=0)  # the signal directions: exact


def test_dare_p0_and_ties_density1_single_are_exact():
    terms = _terms(3, 20, 24, [4, 2], [1.5, -0.5])
    exact = sum(t.coef * t.b @ t.a for t in terms)
    d0 = compose_module(terms, "dare", rank=None, max_rank=20, drop_rate=0.0)
    torch.testing.assert_close(d0.b @ d0.a, exact, atol=1e-9, rtol=1e-9)
    assert d0.deviation < 1e-10
    t1 = compose_module(terms[:1], "ties", rank=None, max_rank=20, density=1.0)
    torch.testing.assert_close(t1.b @ t1.a, terms[0].coef * terms[0].b @ terms[0].a, atol=1e-9, rtol=1e-9)
