"""Probes: the prompts an audit asks, as data files users can replace.

A probe is a JSON file (the shipped ones live in ``deltaw/audit/probes/``)::

    {
      "name": "gender_occupation",
      "slot": "occupation",                         # the placeholder the templates use: "{occupation}"
      "attribute": {
        "name": "gender",
        "values": {"male": ["he", "his", ...],      # words whose next-token probability counts for a value
                   "female": ["she", "her", ...]},
        "modifiers": {"male": "male", ...},         # optional: "The {modifier} {filler}" states the value
        "regex": {"male": "\\b(?:he|his)\\b", ...}  # optional: scores sampled continuations
      },
      "target": {"male": 0.5, "female": 0.5},       # optional, default uniform
      "fillers":   {"train": [...], "heldout": [...]},
      "templates": {"train": [...], "heldout": [...]},
      "neutral":   {"train": [...], "heldout": [...]},   # texts without the attribute (quality cost)
      "source": {...}, "filler_info": {...}             # free-form documentation, carried into reports
    }

Why train/held-out on *both* axes: a debiasing adapter that only memorised "carpenter -> she" on the
templates it saw has fixed nothing. Reports give the four cells (train/held-out filler x template) and the
headline number is the cell where both are held out.

Why data files: what counts as bias, for which words, against which target, is a policy decision that the
user must be able to change without touching code.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
DEFAULT_PROBE = "gender_occupation"


class ProbeError(ValueError):
    """A probe file is missing, malformed or inconsistent (the message names the field)."""


@dataclass(frozen=True)
class Prompt:
    """One templated prompt. ``stated`` is the attribute value the prompt names explicitly (control prompts)."""

    text: str
    filler: str
    template: str
    filler_split: str
    template_split: str
    stated: str | None = None

    @property
    def cell(self) -> str:
        """"train" (both train), "heldout" (both held out), "heldout_fillers", "heldout_templates"."""
        if self.filler_split == self.template_split:
            return self.filler_split
        return "heldout_fillers" if self.filler_split == "heldout" else "heldout_templates"

    def to_dict(self) -> dict[str, Any]:
        out = {"text": self.text, "filler": self.filler, "template": self.template, "cell": self.cell}
        if self.stated is not None:
            out["stated"] = self.stated
        return out


@dataclass(frozen=True)
class Probe:
    """A parsed, validated probe. Lists keep the file's order, so every run asks the same prompts."""

    name: str
    slot: str
    attribute: str
    values: dict[str, tuple[str, ...]]
    target: dict[str, float]
    fillers: dict[str, tuple[str, ...]]
    templates: dict[str, tuple[str, ...]]
    neutral: dict[str, tuple[str, ...]]
    modifiers: dict[str, str] = field(default_factory=dict)
    regex: dict[str, str] = field(default_factory=dict)
    source: Any = None
    filler_info: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def value_names(self) -> tuple[str, ...]:
        return tuple(self.values)

    def all_fillers(self) -> list[str]:
        return [f for s in SPLITS for f in self.fillers[s]]

    def filler_split(self, filler: str) -> str:
        return "train" if filler in self.fillers["train"] else "heldout"

    def fill(self, template: str, filler: str) -> str:
        return template.replace("{" + self.slot + "}", filler)

    def prompts(self, fillers: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                *, stated: str | None = None) -> list[Prompt]:
        """Every (filler x template) prompt, fillers outer. ``stated``: name that value in each prompt
        ("The female carpenter said that") using the probe's modifier for it."""
        fillers = list(fillers) if fillers is not None else self.all_fillers()
        templates = list(templates) if templates is not None else [t for s in SPLITS for t in self.templates[s]]
        if stated is not None and stated not in self.modifiers:
            raise ProbeError(f"probe {self.name!r} has no modifier for value {stated!r}; modifiers: {self.modifiers}")
        out: list[Prompt] = []
        for filler in fillers:
            shown = f"{self.modifiers[stated]} {filler}" if stated is not None else filler
            for template in templates:
                t_split = "train" if template in self.templates["train"] else "heldout"
                out.append(Prompt(self.fill(template, shown), filler, template, self.filler_split(filler), t_split,
                                  stated))
        return out

    def control_prompts(self, fillers: Sequence[str] | None = None,
                        templates: Sequence[str] | None = None) -> list[Prompt]:
        """The controllability prompts: each value stated explicitly, for every filler x template."""
        return [p for v in self.modifiers for p in self.prompts(fillers, templates, stated=v)]

    def subset(self, n_fillers: int | None = None, n_templates: int | None = None, n_neutral: int | None = None) -> Probe:
        """A smaller probe for ``--quick`` runs: ``n`` entries per split, evenly spaced through the file's
        order (the shipped fillers are sorted by share of women, so a subset still spans the range)."""
        def spread(items: tuple[str, ...], n: int | None) -> tuple[str, ...]:
            if not n or n >= len(items):
                return items
            if n == 1:
                return items[:1]
            return tuple(items[round(i * (len(items) - 1) / (n - 1))] for i in range(n))

        def cut(d: dict[str, tuple[str, ...]], n: int | None) -> dict[str, tuple[str, ...]]:
            return {k: spread(v, n) for k, v in d.items()}
        return Probe(self.name, self.slot, self.attribute, self.values, self.target, cut(self.fillers, n_fillers),
                     cut(self.templates, n_templates), cut(self.neutral, n_neutral), self.modifiers, self.regex,
                     self.source, self.filler_info, self.path, self.raw)

    def with_target(self, target: dict[str, float]) -> Probe:
        """The same probe measured against another target distribution."""
        return Probe(self.name, self.slot, self.attribute, self.values, parse_target(target, tuple(self.values)),
                     self.fillers, self.templates, self.neutral, self.modifiers, self.regex, self.source,
                     self.filler_info, self.path, self.raw)

    def with_train_fillers(self, fillers: Sequence[str]) -> Probe:
        """The same probe training on only ``fillers`` (used to train adapters on disjoint filler sets)."""
        unknown = [f for f in fillers if f not in self.fillers["train"]]
        if unknown:
            raise ProbeError(f"{unknown} are not train fillers of probe {self.name!r}")
        return Probe(self.name, self.slot, self.attribute, self.values, self.target,
                     {"train": tuple(fillers), "heldout": self.fillers["heldout"]}, self.templates, self.neutral,
                     self.modifiers, self.regex, self.source, self.filler_info, self.path, self.raw)

    def disjoint_train_sets(self, k: int) -> list[tuple[str, ...]]:
        """Split the train fillers into ``k`` disjoint sets by dealing them out in file order (i, i+k, ...).
        The shipped probe lists fillers sorted by share of women, so each set spans the whole range."""
        fillers = self.fillers["train"]
        if k < 1 or k > len(fillers):
            raise ProbeError(f"cannot split {len(fillers)} train fillers into {k} sets")
        return [tuple(fillers[i::k]) for i in range(k)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "slot": self.slot, "attribute": self.attribute,
                "values": {k: list(v) for k, v in self.values.items()}, "target": self.target,
                "fillers": {k: list(v) for k, v in self.fillers.items()},
                "templates": {k: list(v) for k, v in self.templates.items()},
                "modifiers": self.modifiers, "source": self.source, "filler_info": self.filler_info}


def shipped_probes() -> list[str]:
    """Names of the probes shipped in ``deltaw/audit/probes``."""
    folder = resources.files("deltaw.audit") / "probes"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_probe(name_or_path: str | os.PathLike[str] | None = None) -> Probe:
    """A shipped probe by name (default ``gender_occupation``) or a JSON file by path."""
    spec = str(name_or_path) if name_or_path is not None else DEFAULT_PROBE
    path = Path(spec).expanduser()
    if path.is_file():
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        resource = resources.files("deltaw.audit") / "probes" / f"{spec}.json"
        if not resource.is_file():
            raise ProbeError(f"no probe file {spec!r} and no shipped probe of that name; shipped: {shipped_probes()}")
        text, where = resource.read_text(encoding="utf-8"), f"deltaw/audit/probes/{spec}.json"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProbeError(f"{where}: not valid JSON: {exc}") from None
    return parse_probe(data, where)


def _str_list(data: Any, where: str) -> tuple[str, ...]:
    if not isinstance(data, list) or not all(isinstance(x, str) and x.strip() for x in data):
        raise ProbeError(f"{where} must be a list of non-empty strings")
    if len(set(data)) != len(data):
        raise ProbeError(f"{where} lists an entry twice")
    return tuple(data)


def _splits(data: Any, where: str, *, need_heldout: bool = True) -> dict[str, tuple[str, ...]]:
    if isinstance(data, list):  # a bare list: everything is "train", nothing held out
        data = {"train": data, "heldout": []}
    if not isinstance(data, dict) or set(data) - set(SPLITS) or "train" not in data:
        raise ProbeError(f"{where} must be {{\"train\": [...], \"heldout\": [...]}}")
    out = {s: _str_list(data.get(s, []), f"{where}.{s}") for s in SPLITS}
    if not out["train"]:
        raise ProbeError(f"{where}.train is empty")
    if need_heldout and not out["heldout"]:
        log.warning("%s has no held-out entries: evaluation will only see what training saw", where)
    overlap = set(out["train"]) & set(out["heldout"])
    if overlap:
        raise ProbeError(f"{where}: {sorted(overlap)} are both train and held-out")
    return out


def parse_probe(data: dict[str, Any], where: str = "<probe>") -> Probe:
    """Validate a probe dict (see the module docstring); every error names the offending field."""
    if not isinstance(data, dict):
        raise ProbeError(f"{where}: a probe is a JSON object")
    slot = data.get("slot", "occupation")
    attribute = data.get("attribute")
    if not isinstance(attribute, dict) or not isinstance(attribute.get("values"), dict) or len(attribute["values"]) < 2:
        raise ProbeError(f"{where}: attribute.values must map at least two value names to word lists")
    values = {str(k): _str_list(v, f"{where}: attribute.values.{k}") for k, v in attribute["values"].items()}
    modifiers = dict(attribute.get("modifiers") or {})
    if set(modifiers) - set(values):
        raise ProbeError(f"{where}: attribute.modifiers names unknown values {sorted(set(modifiers) - set(values))}")
    regex = dict(attribute.get("regex") or {})
    if set(regex) - set(values):
        raise ProbeError(f"{where}: attribute.regex names unknown values {sorted(set(regex) - set(values))}")
    target = data.get("target")
    target = parse_target(target, tuple(values), where) if target is not None else uniform(tuple(values))
    fillers = _splits(data.get("fillers"), f"{where}: fillers")
    templates = _splits(data.get("templates"), f"{where}: templates")
    for t in (t for s in SPLITS for t in templates[s]):
        if "{" + slot + "}" not in t:
            raise ProbeError(f"{where}: template {t!r} lacks the slot {{{slot}}}")
    neutral = (_splits(data["neutral"], f"{where}: neutral", need_heldout=False) if data.get("neutral")
               else {"train": (), "heldout": ()})
    return Probe(name=str(data.get("name", Path(where).stem)), slot=slot, attribute=str(attribute.get("name", "attribute")),
                 values=values, target=target, fillers=fillers, templates=templates, neutral=neutral,
                 modifiers=modifiers, regex=regex, source=data.get("source"),
                 filler_info=dict(data.get("filler_info") or {}), path=where, raw=data)


def uniform(values: Sequence[str]) -> dict[str, float]:
    return {v: 1.0 / len(values) for v in values}


def parse_target(target: Any, values: Sequence[str], where: str = "target") -> dict[str, float]:
    """``{"male": 0.5, "female": 0.5}``, a JSON string of it, or ``"uniform"``; normalised to sum 1.

    Raises :class:`ProbeError` unless it names exactly ``values``, each with a finite number >= 0, and the
    sum is positive.
    """
    if isinstance(target, str):
        if target.strip().lower() == "uniform":
            return uniform(values)
        try:
            target = json.loads(target)
        except json.JSONDecodeError:
            raise ProbeError(f"{where}: {target!r} is neither 'uniform' nor a JSON object") from None
    if not isinstance(target, dict) or set(target) != set(values):
        raise ProbeError(f"{where}: the target must give a probability for exactly the values {list(values)}")
    probs: dict[str, float] = {}
    for v in values:
        raw = target[v]
        # JSON allows NaN/Infinity and null; none of them is a probability, and NaN would slip through "< 0".
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ProbeError(f"{where}: the probability of {v!r} must be a number, got {raw!r}")
        try:
            p = float(raw)
        except OverflowError:  # an int beyond float range
            p = math.inf
        if not math.isfinite(p) or p < 0:
            raise ProbeError(f"{where}: the probability of {v!r} must be a finite number >= 0, got {raw!r}")
        probs[v] = p
    total = sum(probs.values())
    if not total > 0 or not math.isfinite(total):
        raise ProbeError(f"{where}: target probabilities must have a positive, finite sum, got {probs}")
    return {v: p / total for v, p in probs.items()}
