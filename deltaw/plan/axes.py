"""Attribute axes: which attributes the planner may assign, their allowed values, and how each reads in a prompt.

Why a data file rather than free text: proportions are only meaningful over a closed set of values. If a user
could type any value, a typo ("meduim") would silently become its own category and the mix would be wrong
without anyone noticing. The shipped ``axes.json`` fixes the vocabulary; ``--axes FILE`` extends it explicitly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from deltaw.plan.errors import PlanError

log = logging.getLogger(__name__)

Position = Literal["before", "after"]
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


def _words(text: str) -> str:
    """Lower case, hyphens read as spaces, single spaces: the form noun phrases and implying words compare in."""
    return " ".join(text.lower().replace("-", " ").split())


@dataclass(frozen=True)
class AxisSpec:
    """One axis: its allowed values, each with the phrase it contributes to an entity prompt.

    ``position`` is ``"before"`` for adjectives placed before the noun ("elderly nurse") and ``"after"`` for
    noun phrases joined in a "with ..." clause ("nurse with dark skin and curly hair").
    """

    name: str
    position: Position
    values: Mapping[str, str]
    description: str = ""
    #: value -> words that already fix this axis when the entity noun phrase contains them ("men" -> male);
    #: see :meth:`implying_words`. Optional; a value without words is implied only by its own phrase.
    implied_by: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise PlanError(f"axis name {self.name!r} must be lower-case letters, digits, '_' or '-'")
        if self.position not in ("before", "after"):
            raise PlanError(f"axis {self.name!r}: position must be 'before' or 'after', not {self.position!r}")
        if not self.values:
            raise PlanError(f"axis {self.name!r} lists no values")
        for value, phrase in self.values.items():
            if not isinstance(value, str) or not _NAME.match(value):
                raise PlanError(
                    f"axis {self.name!r}: value name {value!r} must be lower-case letters, digits, '_' or '-'"
                )
            if not isinstance(phrase, str) or not phrase.strip():
                raise PlanError(f"axis {self.name!r}: value {value!r} needs a non-empty prompt phrase")
        if not isinstance(self.implied_by, Mapping):
            raise PlanError(f"axis {self.name!r}: 'implied_by' must map value -> list of words")
        implied: dict[str, tuple[str, ...]] = {}
        for value, words in self.implied_by.items():
            if value not in self.values:
                raise PlanError(
                    f"axis {self.name!r}: 'implied_by' names unknown value {value!r}; known values: "
                    f"{', '.join(self.values)}"
                )
            if isinstance(words, str) or not isinstance(words, (list, tuple)) or not all(
                isinstance(w, str) and w.strip() for w in words
            ):
                raise PlanError(f"axis {self.name!r}: 'implied_by' for {value!r} must be a list of non-empty words")
            implied[value] = tuple(_words(w) for w in words)
        # Freeze the mappings so a registry shared between plans cannot be changed under them.
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "implied_by", MappingProxyType(implied))

    def implying_words(self) -> dict[str, str]:
        """Word (or hyphen-free word sequence) -> value, for every word that fixes this axis in a noun phrase:
        the ``implied_by`` words, and each value's own prompt phrase (for ``"before"`` axes its separate
        words, since the adjectives stand alone in a noun phrase: "young adult" -> "young", "adult"; for
        ``"after"`` axes the whole phrase without its article: "a shaved head" -> "shaved head")."""
        out: dict[str, str] = {}
        for value, phrase in self.values.items():
            words = _words(phrase).split()
            if self.position == "before":
                for word in words:
                    out.setdefault(word, value)
            else:
                if words and words[0] in ("a", "an", "the"):
                    words = words[1:]
                if words:
                    out.setdefault(" ".join(words), value)
        for value, implying in self.implied_by.items():
            for word in implying:
                out.setdefault(word, value)
        return out

    def phrase(self, value: str) -> str:
        """The prompt phrase for ``value``; raises :class:`PlanError` naming the known values if unknown."""
        try:
            return self.values[value]
        except KeyError:
            raise PlanError(
                f"unknown value {value!r} for axis {self.name!r}; known values: {', '.join(self.values)}"
            ) from None


@dataclass(frozen=True)
class AxisRegistry(Mapping[str, AxisSpec]):
    """The set of axes a plan may use, keyed by name, in file order (that order is also prompt order)."""

    axes: Mapping[str, AxisSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, spec in self.axes.items():
            if name != spec.name:
                raise PlanError(f"axis registered as {name!r} is named {spec.name!r}")
        object.__setattr__(self, "axes", MappingProxyType(dict(self.axes)))

    def __getitem__(self, name: str) -> AxisSpec:
        return self.axes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.axes)

    def __len__(self) -> int:
        return len(self.axes)

    def axis(self, name: str) -> AxisSpec:
        """The axis called ``name``; raises :class:`PlanError` listing the known axes if there is none."""
        try:
            return self.axes[name]
        except KeyError:
            raise PlanError(
                f"unknown axis {name!r}; known axes: {', '.join(self.axes)} (add your own with --axes FILE)"
            ) from None

    def check_value(self, axis: str, value: str) -> None:
        """Raise :class:`PlanError` unless ``value`` is a known value of the known axis ``axis``."""
        self.axis(axis).phrase(value)

    def merged(self, other: AxisRegistry) -> AxisRegistry:
        """Axes of ``self`` updated by ``other``: new axes are appended; for an axis in both, ``other``'s values
        are added (and its phrases win), while the position must agree so existing prompts keep their shape."""
        out = dict(self.axes)
        for name, spec in other.axes.items():
            if name in out:
                base = out[name]
                if spec.position != base.position:
                    raise PlanError(
                        f"axis {name!r}: added file says position {spec.position!r}, "
                        f"shipped axis says {base.position!r}"
                    )
                implied = {v: tuple(base.implied_by.get(v, ())) + tuple(spec.implied_by.get(v, ()))
                           for v in {**base.implied_by, **spec.implied_by}}
                out[name] = AxisSpec(
                    name, base.position, {**base.values, **spec.values}, spec.description or base.description,
                    implied,
                )
            else:
                out[name] = spec
        return AxisRegistry(out)


def registry_from_dict(data: Mapping[str, Any], *, source: str = "<dict>") -> AxisRegistry:
    """Build a registry from the ``axes.json`` structure: ``{"axes": {name: {"position", "values", ...}}}``."""
    if not isinstance(data, Mapping) or not isinstance(data.get("axes"), Mapping):
        raise PlanError(f"{source}: expected a JSON object with an 'axes' object inside")
    axes: dict[str, AxisSpec] = {}
    for name, body in data["axes"].items():
        if not isinstance(body, Mapping) or not isinstance(body.get("values"), Mapping):
            raise PlanError(f"{source}: axis {name!r} needs a 'values' object mapping value -> prompt phrase")
        axes[name] = AxisSpec(
            name=name,
            position=body.get("position", "after"),
            values=dict(body["values"]),
            description=str(body.get("description", "")),
            implied_by=body.get("implied_by", {}),
        )
    return AxisRegistry(axes)


def load_axes_file(path: str | Path) -> AxisRegistry:
    """Read an axes file in the ``axes.json`` format."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"axes file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise PlanError(f"axes file {str(path)!r} is a directory; give the JSON file") from None
    except UnicodeDecodeError as exc:
        raise PlanError(f"axes file {str(path)!r} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise PlanError(f"axes file {str(path)!r} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"axes file {str(path)!r} is not valid JSON: {exc}") from None
    return registry_from_dict(data, source=str(path))


def default_axes() -> AxisRegistry:
    """The axes shipped in ``deltaw/plan/axes.json``."""
    text = resources.files("deltaw.plan").joinpath("axes.json").read_text(encoding="utf-8")
    return registry_from_dict(json.loads(text), source="deltaw/plan/axes.json")


def load_axes(extra: str | Path | Iterable[str | Path] | None = None) -> AxisRegistry:
    """Shipped axes, extended by each extra file in turn (the ``--axes FILE`` option)."""
    registry = default_axes()
    if extra is None:
        return registry
    paths = [extra] if isinstance(extra, (str, Path)) else list(extra)
    for path in paths:
        registry = registry.merged(load_axes_file(path))
        log.info("axes extended from %s", path)
    return registry
