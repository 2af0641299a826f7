"""The requested attribute mix: per-axis weights (independent) or a table over combinations (joint).

Text syntax, as typed on the command line::

    skin_tone=light:1,medium:1,dark:1          one axis; weights may be ints, decimals or ratios (1/3)
    skin_tone=light,medium,dark                 a value without ':w' weighs 1
    skin_tone=light:2,dark:1;gender=female:1,male:1   several axes, ';'-separated (or repeat --mix)

A joint table (``--joint-table FILE``) gives a weight per combination, as CSV with one column per axis and a
``weight`` column, or JSON ``{"axes": [...], "cells": [{"<axis>": "<value>", ..., "weight": w}, ...]}``.
Combinations the table does not list have weight 0, which is how a user excludes a specific pairing.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

from deltaw.plan.axes import AxisRegistry
from deltaw.plan.errors import PlanError
from deltaw.plan.quotas import Weight, normalise_weights, to_fraction

MixSpec = Mapping[str, Mapping[str, Weight]]


@dataclass(frozen=True)
class JointTable:
    """Weights over combinations of values of ``axes`` (a cell key lists one value per axis, in ``axes`` order)."""

    axes: tuple[str, ...]
    weights: Mapping[tuple[str, ...], Fraction]

    def __post_init__(self) -> None:
        if not self.axes:
            raise PlanError("joint table: no axes")
        if len(set(self.axes)) != len(self.axes):
            raise PlanError(f"joint table: an axis is listed twice in {list(self.axes)}")
        cells: dict[tuple[str, ...], Fraction] = {}
        for key, weight in self.weights.items():
            key = tuple(key)
            if len(key) != len(self.axes):
                raise PlanError(f"joint table: cell {key} has {len(key)} values for {len(self.axes)} axes")
            cells[key] = to_fraction(weight, label=f"joint table: weight of {'/'.join(key)}")
        normalise_weights(cells, what="joint table")  # rejects an empty table or all-zero weights
        object.__setattr__(self, "axes", tuple(self.axes))
        object.__setattr__(self, "weights", MappingProxyType(cells))

    def validate(self, registry: AxisRegistry) -> None:
        """Raise :class:`PlanError` for an unknown axis or value anywhere in the table."""
        for axis in self.axes:
            registry.axis(axis)
        for key in self.weights:
            for axis, value in zip(self.axes, key):
                registry.check_value(axis, value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "axes": list(self.axes),
            "cells": [{**dict(zip(self.axes, key)), "weight": str(w)} for key, w in self.weights.items()],
        }


def parse_mix(specs: str | Iterable[str]) -> dict[str, dict[str, Fraction]]:
    """Parse the ``--mix`` syntax (see the module docstring) into ``{axis: {value: weight}}``, order kept."""
    if isinstance(specs, str):
        specs = [specs]
    out: dict[str, dict[str, Fraction]] = {}
    for spec in specs:
        for part in spec.split(";"):
            part = part.strip()
            if not part:
                continue
            axis, sep, body = part.partition("=")
            axis = axis.strip()
            if not sep or not axis:
                raise PlanError(f"mix {part!r}: expected AXIS=VALUE:WEIGHT,... e.g. skin_tone=light:1,dark:1")
            if axis in out:
                raise PlanError(f"mix: axis {axis!r} is given twice")
            weights: dict[str, Fraction] = {}
            for item in body.split(","):
                item = item.strip()
                if not item:
                    raise PlanError(f"mix for {axis!r}: empty entry in {body!r}")
                value, sep, weight = item.partition(":")
                value = value.strip()
                if not value:
                    raise PlanError(f"mix for {axis!r}: entry {item!r} has no value name")
                if value in weights:
                    raise PlanError(f"mix for {axis!r}: value {value!r} is given twice")
                weights[value] = to_fraction(weight if sep else "1", label=f"mix for {axis!r}: weight of {value!r}")
            out[axis] = weights
    return out


def normalise_mix(mix: str | Sequence[str] | MixSpec | None) -> dict[str, dict[str, int | Fraction]]:
    """Accept the text syntax (one string, or one per ``--mix``) or a mapping; return exact weights and check
    that each axis sums to a positive number."""
    if mix is None:
        return {}
    if isinstance(mix, (str, list, tuple)):
        parsed = parse_mix(mix)
    elif not isinstance(mix, Mapping):
        raise PlanError(f"mix must be text like 'skin_tone=light:1,dark:1' or a mapping, not {type(mix).__name__}")
    else:
        for axis, values in mix.items():
            if not isinstance(values, Mapping):
                raise PlanError(f"mix for {axis!r} must map each value to a weight, e.g. {{'light': 1, 'dark': 1}}, "
                                f"not {type(values).__name__} {values!r}")
        parsed = {
            str(axis): {
                str(v): w if type(w) is int and w >= 0 else to_fraction(w, label=f"mix for {axis!r}: weight of {v!r}")
                for v, w in values.items()
            }
            for axis, values in mix.items()
        }
    for axis, weights in parsed.items():
        normalise_weights(weights, what=f"mix for {axis!r}")
    return parsed


def validate_mix(mix: Mapping[str, Mapping[str, Fraction]], registry: AxisRegistry) -> None:
    """Raise :class:`PlanError` for an unknown axis or value."""
    for axis, weights in mix.items():
        registry.axis(axis)
        for value in weights:
            registry.check_value(axis, value)


def product_table(mix: Mapping[str, Mapping[str, Fraction]]) -> JointTable:
    """The joint table whose cell weights are the products of the per-axis probabilities (``--joint``)."""
    axes = tuple(mix)
    cells: dict[tuple[str, ...], Fraction] = {(): Fraction(1)}
    for axis in axes:
        probs = normalise_weights(mix[axis], what=f"mix for {axis!r}")
        cells = {key + (value,): w * p for key, w in cells.items() for value, p in probs.items()}
    return JointTable(axes, cells)


def load_joint_table(path: str | Path) -> JointTable:
    """Read a joint table from CSV or JSON (by extension; see the module docstring for the layouts).

    Raises :class:`PlanError` for anything unreadable (a folder, non-UTF-8 text) or mis-shaped (cells that
    are not objects, ``axes`` that is not a list of names), never a bare traceback.
    """
    path = Path(path)
    where = f"joint table {str(path)!r}"
    if not path.exists():
        raise PlanError(f"{where} does not exist")
    if not path.is_file():
        raise PlanError(f"{where} is not a file")
    try:
        if path.suffix.lower() == ".json":
            rows, axes = _joint_json(path.read_text(encoding="utf-8"), where)
        else:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                rows = list(reader)
                axes = tuple(name.strip() for name in (reader.fieldnames or []) if name.strip() != "weight")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{where} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except (OSError, csv.Error) as exc:
        raise PlanError(f"{where} cannot be read: {exc}") from None
    if not rows:
        raise PlanError(f"{where} has no rows")
    cells: dict[tuple[str, ...], Weight] = {}
    for i, row in enumerate(rows, start=1):
        row = {str(k).strip(): v for k, v in row.items()}
        if "weight" not in row:
            raise PlanError(f"{where}: row {i} has no 'weight'")
        missing = [axis for axis in axes if not row.get(axis)]
        if missing:
            raise PlanError(f"{where}: row {i} has no value for {', '.join(missing)}")
        bad = [axis for axis in axes if not isinstance(row[axis], str)]
        if bad:
            raise PlanError(f"{where}: row {i}: the value for {', '.join(bad)} must be a value name (text), "
                            f"not {row[bad[0]]!r}")
        key = tuple(row[axis].strip() for axis in axes)
        if key in cells:
            raise PlanError(f"{where}: combination {'/'.join(key)} is listed twice")
        weight = row["weight"]
        if weight is None or isinstance(weight, (bool, list, dict)):
            raise PlanError(f"{where}: row {i}: weight {weight!r} is not a number")
        cells[key] = weight.strip() if isinstance(weight, str) else weight
    return JointTable(axes, cells)


def _joint_json(text: str, where: str) -> tuple[list[Mapping[str, Any]], tuple[str, ...]]:
    """The rows and axes of a JSON joint table, shape-checked."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("cells"), list):
        raise PlanError(f"{where}: expected {{'axes': [...], 'cells': [...]}}")
    rows = data["cells"]
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise PlanError(f"{where}: cell {i} must be an object like {{'skin_tone': 'light', 'weight': 1}}, "
                            f"not {row!r}")
    if data.get("axes"):
        names = data["axes"]
        # A bare string would be read letter by letter ("skin_tone" -> s, k, i, ...).
        if not isinstance(names, list) or not all(isinstance(a, str) and a.strip() for a in names):
            raise PlanError(f"{where}: 'axes' must be a list of axis names, e.g. [\"skin_tone\"], not {names!r}")
        axes = tuple(a.strip() for a in names)
    else:
        axes = tuple(str(k) for k in rows[0] if k != "weight") if rows else ()
    return rows, axes
