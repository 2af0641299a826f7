"""Quotas: exact per plan, unbiased across plans, and a convergence check that a biased method fails."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaw.plan import PlanError, assign_quotas, deal, load_axes, plan_scene
from deltaw.plan.quotas import normalise_weights, to_fraction

N_PLANS = 10_000

Assigner = Callable[[int, Mapping[str, int], random.Random], dict[str, int]]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 64),
    weights=st.lists(st.integers(0, 9), min_size=1, max_size=8).filter(lambda w: sum(w) > 0),
    seed=st.integers(0, 2**32),
)
def test_counts_are_exact_quotas(n: int, weights: list[int], seed: int) -> None:
    named = {f"v{i}": w for i, w in enumerate(weights)}
    counts = assign_quotas(n, named, random.Random(seed))
    assert list(counts) == list(named)  # order kept, zero-weight values listed
    assert sum(counts.values()) == n
    total = sum(weights)
    for key, w in named.items():
        quota = Fraction(n * w, total)
        assert counts[key] in (math.floor(quota), math.ceil(quota)), (key, quota, counts)
        if w == 0:
            assert counts[key] == 0


def test_same_rng_state_same_counts() -> None:
    weights = {"a": 1, "b": 1, "c": 1}
    assert [assign_quotas(5, weights, random.Random(s)) for s in range(50)] == [
        assign_quotas(5, weights, random.Random(s)) for s in range(50)
    ]


def test_weights_are_exact_fractions() -> None:
    assert to_fraction("1/3") == Fraction(1, 3)
    assert to_fraction(0.1) == Fraction(1, 10)
    assert to_fraction("0.25") == Fraction(1, 4)
    # 3 * (0.1 / 0.3) is 1 exactly: no float floor to 0
    assert assign_quotas(3, {"a": 0.1, "b": 0.2}, random.Random(0)) == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"a": -1, "b": 2}, "negative"),
        ({"a": 0, "b": 0}, "sum to 0"),
        ({}, "no values"),
        ({"a": float("nan")}, "finite"),
        ({"a": float("inf")}, "finite"),
        ({"a": "lots"}, "not a number"),
        ({"a": True}, "not a number"),
    ],
)
def test_bad_weights_are_named(weights: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        assign_quotas(3, weights, random.Random(0))


@pytest.mark.parametrize("n", [0, -1, 65, 1000])
def test_count_out_of_range(n: int) -> None:
    with pytest.raises(PlanError, match="out of range"):
        assign_quotas(n, {"a": 1}, random.Random(0))


def test_deal_is_a_shuffled_expansion() -> None:
    items = deal({"a": 2, "b": 3, "c": 0}, random.Random(1))
    assert sorted(items) == ["a", "a", "b", "b", "b"]


# ---- convergence -----------------------------------------------------------------------------------------------


def max_deviation_in_sigmas(assign: Assigner, n: int, weights: Mapping[str, int], plans: int = N_PLANS) -> float:
    """Largest |empirical share - target| over values, in units of the standard error of an unbiased method.

    Under the quota property each count is floor(n p) + Bernoulli(f), f = frac(n p), so the share of a value
    over ``plans`` plans has standard error sqrt(f (1 - f) / plans) / n. Values with f = 0 must be exact.
    """
    totals: Counter[str] = Counter()
    for seed in range(plans):
        totals.update(assign(n, weights, random.Random(seed)))
    probs = normalise_weights(weights)
    worst = 0.0
    for key, p in probs.items():
        share = totals[key] / (n * plans)
        f = float(n * p - math.floor(n * p))
        err = abs(share - float(p))
        if f == 0:
            if err > 1e-12:
                return math.inf
            continue
        worst = max(worst, err / (math.sqrt(f * (1 - f) / plans) / n))
    return worst


#: 5 sigma: an unbiased method exceeds it with probability < 1e-6 per value; any systematic bias of the size
#: that matters (a remainder seat that always goes to the same value) is hundreds of sigmas.
SIGMA_BOUND = 5.0

CASES = [
    (1, {"a": 5, "b": 3, "c": 2}),  # one seat, three remainders: the hard case for largest-remainder
    (7, {"a": 5, "b": 3, "c": 2}),
    (5, {"light": 1, "medium": 1, "dark": 1}),  # tied remainders
    (4, {"a": 1, "b": 0, "c": 1, "d": 1}),  # an excluded value
    (64, {"a": 1, "b": 2, "c": 4, "d": 8, "e": 16}),
]


@pytest.mark.parametrize(("n", "weights"), CASES)
def test_mix_converges_within_variance_bound(n: int, weights: dict[str, int]) -> None:
    assert max_deviation_in_sigmas(assign_quotas, n, weights) <= SIGMA_BOUND


def _largest_remainder_first_wins(n: int, weights: Mapping[str, int], rng: random.Random) -> dict[str, int]:
    """Textbook Hamilton with ties broken by position: exact per plan, biased across plans."""
    probs = normalise_weights(weights)
    counts = {k: math.floor(n * p) for k, p in probs.items()}
    order = sorted(probs, key=lambda k: -(n * probs[k] - counts[k]))  # stable: ties keep the first value first
    for key in order[: n - sum(counts.values())]:
        counts[key] += 1
    return counts


def _remainders_to_first(n: int, weights: Mapping[str, int], rng: random.Random) -> dict[str, int]:
    probs = normalise_weights(weights)
    counts = {k: math.floor(n * p) for k, p in probs.items()}
    counts[next(iter(counts))] += n - sum(counts.values())
    return counts


@pytest.mark.parametrize("biased", [_largest_remainder_first_wins, _remainders_to_first])
def test_convergence_check_rejects_biased_assignment(biased: Assigner) -> None:
    # The same check, on methods that are exact per plan but biased: it must fail them on the tied case
    # and on the one-seat case, or it would not be testing anything.
    assert max_deviation_in_sigmas(biased, 5, {"light": 1, "medium": 1, "dark": 1}, plans=2000) > 20
    assert max_deviation_in_sigmas(biased, 1, {"a": 5, "b": 3, "c": 2}, plans=2000) > 20


def test_team_mix_over_10000_plans() -> None:
    """The issue's example, end to end through plan_scene: each skin tone within 0.01 of 1/3.

    Standard error here is sqrt(2/9 / 10000) / 5 ~ 0.00094, so 0.01 is > 10 sigma for an unbiased planner,
    while remainder seats that always went to the first values would give 0.4 / 0.4 / 0.2 (error 0.067).
    The value in box 0 is checked too, so the mix cannot hide in positions: within 0.025 of 1/3 (5.3 sigma).
    """
    axes = load_axes()
    totals: Counter[str] = Counter()
    first_box: Counter[str] = Counter()
    for seed in range(N_PLANS):
        plan = plan_scene(
            "a female basketball team of five players",
            {"skin_tone": {"light": 1, "medium": 1, "dark": 1}},
            seed,
            axes=axes,
        )
        tones = [e.attributes["skin_tone"] for e in plan.entities]
        totals.update(tones)
        first_box[tones[0]] += 1
    for tone in ("light", "medium", "dark"):
        assert abs(totals[tone] / (5 * N_PLANS) - 1 / 3) <= 0.01, totals
        assert abs(first_box[tone] / N_PLANS - 1 / 3) <= 0.025, first_box


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        ("1e99999999", "finite"),  # Fraction() of this built a 10^8-digit integer: a hang
        ("1e5000", "finite"),
        ("1e-5000", "exponent"),
        ("1/1e99999999", "finite"),
        ("1" * 100, "characters long"),
        ("nan", "finite"),
        ("1/2/3", "not a number"),
    ],
)
def test_absurd_weight_text_is_refused_quickly(weight: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        to_fraction(weight)


def test_huge_exponent_in_mix_text_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="light.*finite"):
        plan_scene("five nurses", "skin_tone=light:1e99999999,dark:1")
    assert to_fraction("2.5e-3") == Fraction(1, 400) and to_fraction(" 1/3 ") == Fraction(1, 3)
