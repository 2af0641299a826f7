"""Exact proportional quotas: how many of ``n`` entities get each value.

Why code and not a language model: asked for "a mix", generative models drift towards whatever their
training data over-represents, and extra LoRAs only fight that drift. Counting is arithmetic, so we do it
exactly here and hand the image model one already-decided prompt per person.

The method is Hamilton's (largest remainder) with the remainder seats drawn at random, as in Grimmett's
stochastic apportionment (G. Grimmett, "Stochastic apportionment", Amer. Math. Monthly 111(4), 2004):

* every value first gets ``floor(n * p)`` seats (its lower quota);
* the ``r`` seats left over go to values with probability equal to their fractional remainder
  ``n * p - floor(n * p)``, by systematic sampling over a random order of the values.

Consequences, which the tests check:

* each count is ``floor(n*p)`` or ``ceil(n*p)`` (the quota property: never more than one seat off);
* the counts add up to ``n`` exactly;
* the expected count of each value is exactly ``n * p``, so over many plans the empirical mix converges to the
  target. Plain largest-remainder does not have this property: with ``n = 1`` and weights 5:3:2 it would hand
  the single seat to the first value every time, and a mix of one-person plans would be 100 % that value;
* values with weight 0 never get a seat; when remainders tie (e.g. thirds with ``n = 5``) the seats go to a
  uniformly random subset of the tied values.

Arithmetic is exact: weights are scaled to integers with the same ratios (via :class:`fractions.Fraction`
for decimals and ratios), so ``n * p`` never floors ``2.9999999`` to 2, and the random point used for the
remainder seats is an integer too.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Hashable, Mapping
from fractions import Fraction
from typing import TypeVar

from deltaw.plan.errors import PlanError

K = TypeVar("K", bound=Hashable)
Weight = int | float | Fraction | str

MAX_COUNT = 64


def to_fraction(weight: Weight, *, label: str = "weight") -> Fraction:
    """Parse one weight exactly: ints, decimal strings ("0.25"), ratios ("1/3"), floats (via their shortest repr).

    Rejects negatives, NaN and infinities, and text whose float value is not finite or whose exponent or
    length is absurd (see :func:`_checked_text`), with a :class:`PlanError` naming ``label``.
    """
    if isinstance(weight, bool):
        raise PlanError(f"{label}: {weight!r} is not a number")
    if isinstance(weight, float) and not math.isfinite(weight):
        raise PlanError(f"{label}: {weight!r} is not a finite number")
    try:
        if isinstance(weight, float):
            value = Fraction(repr(weight))  # 0.1 -> 1/10, not the binary expansion
        elif isinstance(weight, (int, Fraction)):
            value = Fraction(weight)
        elif isinstance(weight, str):
            value = Fraction(_checked_text(weight.strip(), label))
        else:
            raise PlanError(f"{label}: {weight!r} is not a number")
    except PlanError:  # a ValueError too, but already says what is wrong
        raise
    except (ValueError, ZeroDivisionError, OverflowError):
        raise PlanError(f"{label}: {weight!r} is not a number (use e.g. 1, 0.25 or 1/3)") from None
    if value < 0:
        raise PlanError(f"{label}: {weight!r} is negative; weights must be >= 0")
    return value


MAX_WEIGHT_TEXT = 64  # characters in a weight as text; longer is a paste accident, not a proportion
MAX_EXPONENT = 400  # |e| in "1e-400"; Fraction("1e99999999") would build a 100-million-digit integer


def _checked_text(text: str, label: str) -> str:
    """``text`` if it is a number or ratio Fraction can parse *quickly*, else a :class:`PlanError`.

    Why: ``Fraction`` turns "1e99999999" into an integer with 10^8 digits -- a hang, not an error. Each side
    of an optional ``/`` must read as a finite float first, with a bounded exponent and length.
    """
    if len(text) > MAX_WEIGHT_TEXT:
        raise PlanError(f"{label}: {text[:20]!r}... is {len(text)} characters long; give a short number such as "
                        "1, 0.25 or 1/3")
    parts = text.split("/")
    if len(parts) > 2:
        raise PlanError(f"{label}: {text!r} is not a number (use e.g. 1, 0.25 or 1/3)")
    for part in parts:
        try:
            number = float(part)
        except ValueError:
            raise PlanError(f"{label}: {text!r} is not a number (use e.g. 1, 0.25 or 1/3)") from None
        if not math.isfinite(number):
            raise PlanError(f"{label}: {text!r} is not a finite number")
        exponent = re.search(r"[eE]\s*([+-]?\d+)\s*$", part)
        if exponent is not None and abs(int(exponent.group(1))) > MAX_EXPONENT:
            raise PlanError(f"{label}: the exponent of {text!r} is out of range (at most {MAX_EXPONENT} either way)")
    return text


def normalise_weights(weights: Mapping[K, Weight], *, what: str = "weights") -> dict[K, Fraction]:
    """Exact probabilities from weights. Raises :class:`PlanError` if empty, negative, or not summing above 0."""
    ints = integer_weights(weights, what=what)
    total = sum(ints.values())
    return {key: Fraction(w, total) for key, w in ints.items()}


def integer_weights(weights: Mapping[K, Weight], *, what: str = "weights") -> dict[K, int]:
    """The weights scaled to integers with the same ratios (exact), validated like :func:`normalise_weights`.

    Why integers: the apportionment below then runs on ``divmod`` alone, exactly and fast enough to plan
    tens of thousands of scenes in a test.
    """
    if not weights:
        raise PlanError(f"{what}: no values given")
    exact: dict[K, int | Fraction] = {}
    for key, w in weights.items():
        if type(w) in (int, Fraction) and w >= 0:  # already exact (the common case): no conversion
            exact[key] = w  # type: ignore[assignment]
        else:
            exact[key] = to_fraction(w, label=f"{what}: weight of {key!r}")
    scale = math.lcm(*(w.denominator for w in exact.values()))
    ints = {key: w.numerator * (scale // w.denominator) for key, w in exact.items()}
    total = sum(ints.values())
    if total <= 0:
        raise PlanError(f"{what}: weights sum to {total}; at least one value needs a positive weight")
    return ints  # type: ignore[return-value]


def check_count(n: int) -> None:
    """Raise :class:`PlanError` unless ``1 <= n <= MAX_COUNT``."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise PlanError(f"count must be an integer, not {n!r}")
    if not 1 <= n <= MAX_COUNT:
        raise PlanError(f"count {n} is out of range: a plan holds 1 to {MAX_COUNT} entities")


_U_BITS = 53  # random.random() resolution; U = m / 2**53 with m uniform on [0, 2**53)


def assign_quotas(n: int, weights: Mapping[K, Weight], rng: random.Random) -> dict[K, int]:
    """Counts per value for ``n`` entities in proportion to ``weights`` (see the module docstring for the method).

    Returns a dict in the order of ``weights`` (zero-weight values included, with count 0). ``rng`` is a
    :class:`random.Random`; the same ``rng`` state gives the same counts.
    """
    check_count(n)
    ints = integer_weights(weights)
    total = sum(ints.values())
    counts: dict[K, int] = {}
    remainders: dict[K, int] = {}  # fractional part of each quota, in units of 1/total
    for key, w in ints.items():
        counts[key], remainders[key] = divmod(n * w, total)
    seats_left = n - sum(counts.values())  # equals sum(remainders) / total, an integer in [0, len(weights))
    if seats_left:
        # Systematic sampling over a random order: points U, U+1, ..., U+r-1 fall in half-open intervals laid
        # end to end, each as long as its value's remainder (< 1), so each value gets at most one extra seat,
        # and gets it with probability exactly its remainder. The random order makes ties symmetric.
        # In integers: lengths are scaled by total * 2**53 and U = m / 2**53, so no rounding anywhere.
        order = [key for key, rem in remainders.items() if rem]
        rng.shuffle(order)
        point = rng.getrandbits(_U_BITS) * total
        step = total << _U_BITS
        edge = 0
        for key in order:
            edge += remainders[key] << _U_BITS
            if point < edge:
                counts[key] += 1
                point += step
    assert sum(counts.values()) == n, "apportionment must place every entity"
    return counts


def deal(counts: Mapping[K, int], rng: random.Random) -> list[K]:
    """The counts as a list of ``sum(counts)`` values in random order, so position carries no information."""
    items = [key for key, c in counts.items() for _ in range(c)]
    rng.shuffle(items)
    return items
