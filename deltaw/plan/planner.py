"""The scene plan: per-entity attributes decided by exact quotas, one prompt and one box per entity.

Why plan instead of prompting: "a diverse team of five" in one prompt leaves the mix to the image model's
token statistics. Here the mix is decided by :func:`~deltaw.plan.quotas.assign_quotas`, each person gets a
prompt that states their attributes, and a layout-conditioned model (GLIGEN, LMD) draws each prompt in its own
box. The plan exports to those models' input formats (:meth:`ScenePlan.to_gligen`, :meth:`ScenePlan.to_lmd`).

Determinism: everything random is drawn from :class:`random.Random` streams seeded by ``(seed, purpose)``, so
the same text, mix and seed give the same plan on any machine, and adding an axis does not reshuffle the others.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from deltaw.plan.axes import AxisRegistry, load_axes
from deltaw.plan.errors import PlanError
from deltaw.plan.layout import Box, LayoutSpec, check_boxes, grid_layout
from deltaw.plan.mix import JointTable, MixSpec, normalise_mix, product_table, validate_mix
from deltaw.plan.parsing import ParsedScene, Parser, RuleParser, singularize, with_article
from deltaw.plan.quotas import MAX_COUNT, assign_quotas, check_count, deal, normalise_weights

log = logging.getLogger(__name__)

Mode = Literal["none", "independent", "joint"]

#: Default negative prompt: the usual failure modes of diffusion models on crowds of people.
DEFAULT_NEGATIVE = "low quality, blurry, deformed, extra limbs, duplicated people, merged bodies"
#: LMD's layouts are given on a 512 x 512 canvas.
LMD_CANVAS = 512
LAYOUT_PNG = "layout.png"
STALE_RENDER = "render.png"  # written by `deltaw plan --render` after `write`; stale once the plan is rewritten


@dataclass(frozen=True)
class Entity:
    """One person (or thing) in the scene: its attributes, the prompt that states them, and its box."""

    noun: str
    attributes: Mapping[str, str]
    prompt: str
    box: Box

    def __post_init__(self) -> None:
        if not self.noun.strip() or not self.prompt.strip():
            raise PlanError("an entity needs a noun and a prompt")
        box = tuple(float(v) for v in self.box)
        if len(box) != 4 or not (0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0):
            raise PlanError(f"entity box {self.box!r} is not [x0, y0, x1, y1] inside the canvas [0, 1]")
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    def to_dict(self) -> dict[str, Any]:
        return {"noun": self.noun, "attributes": dict(self.attributes), "prompt": self.prompt, "box": list(self.box)}


@dataclass(frozen=True)
class ScenePlan:
    """A complete plan; validated on construction (1..64 entities, boxes inside the canvas and apart).

    ``mix`` holds the target probability of each value (per axis; for a joint table also per combination in
    ``joint``), ``quotas`` the counts actually assigned, so a reader of ``plan.json`` can check the mix.
    """

    text: str
    caption: str
    entities: tuple[Entity, ...]
    background: str
    negative: str
    seed: int
    parse: ParsedScene
    mode: Mode = "none"
    mix: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    quotas: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    joint: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "entities", tuple(self.entities))
        check_count(len(self.entities))
        check_boxes([e.box for e in self.entities])
        if self.mode not in ("none", "independent", "joint"):
            raise PlanError(f"plan mode must be none, independent or joint, not {self.mode!r}")
        if not self.caption.strip():
            raise PlanError("plan caption is empty")

    # ---- exports ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``plan.json`` structure: entities, background and negative first, provenance after."""
        return {
            "entities": [e.to_dict() for e in self.entities],
            "background": self.background,
            "negative": self.negative,
            "caption": self.caption,
            "text": self.text,
            "seed": self.seed,
            "parse": self.parse.to_dict(),
            "mode": self.mode,
            "mix": {a: dict(v) for a, v in self.mix.items()},
            "quotas": {a: dict(v) for a, v in self.quotas.items()},
            "joint": [dict(c) for c in self.joint],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """``plan.json`` as text."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScenePlan:
        """Rebuild a plan from :meth:`to_dict` output (e.g. to render a plan edited by hand)."""
        try:
            return cls(
                text=data["text"],
                caption=data["caption"],
                entities=tuple(
                    Entity(e["noun"], e["attributes"], e["prompt"], tuple(e["box"])) for e in data["entities"]
                ),
                background=data["background"],
                negative=data["negative"],
                seed=int(data["seed"]),
                parse=ParsedScene.from_dict(data["parse"]),
                mode=data.get("mode", "none"),
                mix=data.get("mix", {}),
                quotas=data.get("quotas", {}),
                joint=tuple(data.get("joint", ())),
            )
        except (KeyError, TypeError) as exc:
            raise PlanError(f"not a plan: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> ScenePlan:
        return cls.from_dict(json.loads(text))

    def to_gligen(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' ``StableDiffusionGLIGENPipeline``: ``prompt``, ``negative_prompt``,
        ``gligen_phrases`` (one per box) and ``gligen_boxes`` (normalised ``[xmin, ymin, xmax, ymax]``, origin
        top-left)."""
        return {
            "prompt": self.caption,
            "negative_prompt": self.negative,
            "gligen_phrases": [e.prompt for e in self.entities],
            "gligen_boxes": [list(e.box) for e in self.entities],
        }

    def to_lmd(self, canvas: int = LMD_CANVAS) -> dict[str, Any]:
        """The layout in LLM-grounded Diffusion's format (Lian et al., 2023, arXiv:2305.13655).

        LMD's first stage asks an LLM for a caption, a list of ``(phrase, [x, y, w, h])`` boxes in pixels on a
        512 x 512 canvas (``x, y`` the top-left corner), a background prompt and a negative prompt; its second
        stage (and diffusers' community ``LLMGroundedDiffusionPipeline``) reads exactly that. We fill it from the
        plan instead of from an LLM. :meth:`to_lmd_text` gives the same as the text an LMD stage 1 returns.
        """
        objects = []
        for e in self.entities:
            x0, y0, x1, y1 = (round(v * canvas) for v in e.box)
            objects.append([e.prompt, [x0, y0, x1 - x0, y1 - y0]])
        return {
            "caption": self.caption,
            "objects": objects,
            "background_prompt": self.background,
            "negative_prompt": self.negative,
            "canvas": [canvas, canvas],
        }

    def to_lmd_text(self, canvas: int = LMD_CANVAS) -> str:
        """LMD's stage-1 response text: ``Caption:`` / ``Objects: [('phrase', [x, y, w, h]), ...]`` /
        ``Background prompt:`` / ``Negative prompt:`` (the Objects line is a Python literal)."""
        lmd = self.to_lmd(canvas)
        objects = "[" + ", ".join(f"({phrase!r}, {box})" for phrase, box in lmd["objects"]) + "]"
        return (
            f"Caption: {lmd['caption']}\nObjects: {objects}\n"
            f"Background prompt: {lmd['background_prompt']}\nNegative prompt: {lmd['negative_prompt']}\n"
        )

    def write(self, out_dir: str | Path, *, layout_png: bool = True) -> dict[str, Path]:
        """Write ``plan.json``, ``gligen.json``, ``lmd.json``, ``lmd.txt`` and ``layout.png`` into ``out_dir``.

        A ``layout.png`` this call does not write (``layout_png=False``) and any ``render.png`` are removed:
        both would show an earlier plan next to this one. Render after writing (``deltaw plan --render`` does).
        No other file in ``out_dir`` is touched.
        """
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise PlanError(f"output {str(out)!r} exists and is not a directory; choose a directory path")
        out.mkdir(parents=True, exist_ok=True)
        stale = [STALE_RENDER] + ([] if layout_png else [LAYOUT_PNG])
        for name in stale:
            old = out / name
            if old.is_file() or old.is_symlink():
                old.unlink()
                log.info("removed %s left by an earlier plan", old)
        paths = {
            "plan": out / "plan.json",
            "gligen": out / "gligen.json",
            "lmd": out / "lmd.json",
            "lmd_text": out / "lmd.txt",
        }
        paths["plan"].write_text(self.to_json() + "\n", encoding="utf-8")
        paths["gligen"].write_text(json.dumps(self.to_gligen(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        paths["lmd"].write_text(json.dumps(self.to_lmd(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        paths["lmd_text"].write_text(self.to_lmd_text(), encoding="utf-8")
        if layout_png:
            from deltaw.plan.draw import draw_layout  # matplotlib only when a picture is asked for

            paths["layout"] = draw_layout(self, out / LAYOUT_PNG)
        return paths


# ---- planning ------------------------------------------------------------------------------------------------


def _stream(seed: int, purpose: str) -> random.Random:
    # String seeds go through SHA-512 in CPython (version 2 seeding): stable across runs and machines.
    return random.Random(f"deltaw.plan/{seed}/{purpose}")


def _compose_prompt(subject: str, attributes: Mapping[str, str], registry: AxisRegistry, activity: str | None) -> str:
    """ "young female basketball player with dark skin and curly hair, playing": adjectives before the noun
    in registry order, the rest in one "with" clause."""
    before, after = [], []
    for axis in registry:
        if axis in attributes:
            spec = registry[axis]
            (before if spec.position == "before" else after).append(spec.phrase(attributes[axis]))
    core = " ".join(before + [subject])
    if after:
        tail = after[0] if len(after) == 1 else ", ".join(after[:-1]) + " and " + after[-1]
        core = f"{core} with {tail}"
    prompt = with_article(core)
    return f"{prompt}, {activity}" if activity else prompt


def _check_conflicts(subject: str, axes: Iterable[str], registry: AxisRegistry, text: str = "") -> None:
    """Refuse an axis that the entity noun phrase already fixes: by a value's own phrase ("female team" +
    a gender mix would give "a male female player") or by an implying word from the axis's ``implied_by``
    ("five men" + a gender mix -> "a female man"; "bald nurses" + a hair mix -> "a bald nurse with long hair").
    Every axis is checked, whatever its position. Only the subject is looked at, not the activity or setting
    ("nurses playing with children" fixes no age)."""
    tokens = subject.lower().replace("-", " ").split()
    variants = [tokens, [singularize(t) for t in tokens]]  # "men" / "man": a parser may give either form
    text_words = text.lower().replace(",", " ").split()
    for axis in axes:
        spec = registry[axis]
        for phrase, value in spec.implying_words().items():
            words = phrase.split()
            k = len(words)
            if not any(toks[i : i + k] == words for toks in variants for i in range(len(toks) - k + 1)):
                continue
            shown = phrase
            if k == 1:  # quote the word as the user wrote it ("men", not the parsed "man")
                shown = next((w for w in text_words if w.strip(".!?;:") and singularize(w.strip(".!?;:")) == phrase
                              and w.strip(".!?;:") != phrase), phrase)
                shown = shown.strip(".!?;:")
            elif phrase.replace(" ", "-") in text.lower():  # "dark-skinned", as written
                shown = phrase.replace(" ", "-")
            raise PlanError(
                f"axis {axis!r} conflicts with the text: the text already fixes {axis} ({shown!r}, "
                f"value {value!r}); drop the {axis} mix or the word"
            )


def _parse(parser: Parser, text: str, count: int | None) -> ParsedScene:
    """``parser.parse(text)``; with a caller's ``count``, a text that says no count is fine.

    Why: ``count`` overrides the text, so "a team of basketball players" with ``count=5`` must not fail for
    lacking a number. A parser that cannot read the text then is retried as the rule parser with the count
    filled in (the rule parser is also what the learned parser falls back to).
    """
    if count is None:
        return parser.parse(text)
    if isinstance(parser, RuleParser):
        return parser.parse(text, count=count)
    try:
        return parser.parse(text)
    except PlanError:
        return RuleParser().parse(text, count=count)


def _resolve_axes(axes: AxisRegistry | str | Path | Iterable[str | Path] | None) -> AxisRegistry:
    if isinstance(axes, AxisRegistry):
        return axes
    return load_axes(axes)


def plan_scene(
    text: str,
    mix: str | Sequence[str] | MixSpec | None = None,
    seed: int = 0,
    *,
    joint: bool = False,
    joint_table: JointTable | None = None,
    parser: Parser | None = None,
    axes: AxisRegistry | str | Path | Iterable[str | Path] | None = None,
    count: int | None = None,
    negative: str | None = None,
    layout: LayoutSpec | None = None,
) -> ScenePlan:
    """Plan a scene: parse ``text``, assign attributes in the proportions of ``mix``, lay out one box each.

    Args:
        text: the request, e.g. ``"a female basketball team of five players"``.
        mix: per-axis weights, as ``{"skin_tone": {"light": 1, "dark": 1}}`` or the ``--mix`` text syntax.
        seed: everything random (remainder seats, shuffles) follows from it.
        joint: quotas over the Cartesian product of the axes (weights = product of the per-axis ones), so the
            combinations, not only the margins, are in proportion.
        joint_table: explicit weights per combination (implies ``joint``; give it instead of ``mix``).
        parser: defaults to :class:`~deltaw.plan.parsing.RuleParser`.
        axes: the axis registry, or extra axes file(s) on top of the shipped ones.
        count: overrides the parsed count.
        negative: negative prompt; defaults to :data:`DEFAULT_NEGATIVE`.
        layout: grid parameters.

    Raises:
        PlanError: count outside 1..64, bad weights, unknown axis or value, uncountable text, a mix axis that
            the text contradicts.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PlanError(f"seed must be an integer, not {seed!r}")
    registry = _resolve_axes(axes)
    if count is not None:
        check_count(count)
    parsed = _parse(parser or RuleParser(), text, count)
    n = parsed.count if count is None else count
    if isinstance(n, int) and not isinstance(n, bool) and not 1 <= n <= MAX_COUNT:
        where = f" (read from {text!r})" if count is None else ""
        raise PlanError(f"count {n} is out of range: a plan holds 1 to {MAX_COUNT} entities{where}")
    check_count(n)

    weights = normalise_mix(mix)
    if joint_table is not None and weights:
        raise PlanError("give either a mix or a joint table, not both (the table already fixes every axis)")
    validate_mix(weights, registry)
    if joint_table is not None:
        joint_table.validate(registry)
    elif joint and not weights:
        raise PlanError(
            "joint quotas need axes: give a mix (e.g. skin_tone=light,dark;gender=female,male) or a joint table"
        )
    subject = parsed.subject()
    _check_conflicts(subject, list(weights) or (joint_table.axes if joint_table else ()), registry, text)

    attributes: list[dict[str, str]] = [{} for _ in range(n)]
    mix_out: dict[str, dict[str, float]] = {}
    joint_out: list[dict[str, Any]] = []
    mode: Mode = "none"
    if joint or joint_table is not None:
        mode = "joint"
        table = joint_table if joint_table is not None else product_table(weights)
        if not weights:
            weights = _marginals(table)
        rng = _stream(seed, "joint")
        cells = assign_quotas(n, table.weights, rng)
        for i, cell in enumerate(deal(cells, rng)):
            attributes[i] = dict(zip(table.axes, cell))
        probs = normalise_weights(table.weights, what="joint table")
        joint_out = [
            {"attributes": dict(zip(table.axes, key)), "p": float(probs[key]), "count": cells[key]}
            for key in table.weights
        ]
    elif weights:
        mode = "independent"
        for axis, axis_weights in weights.items():
            rng = _stream(seed, f"axis/{axis}")
            for i, value in enumerate(deal(assign_quotas(n, axis_weights, rng), rng)):
                attributes[i][axis] = value
    for axis, axis_weights in weights.items():
        mix_out[axis] = {v: float(p) for v, p in normalise_weights(axis_weights, what=f"mix for {axis!r}").items()}
    axes_used = list(mix_out)
    quotas = {axis: {v: 0 for v in mix_out[axis]} | dict(Counter(a[axis] for a in attributes)) for axis in axes_used}

    boxes = grid_layout(n, layout)
    entities = tuple(
        Entity(
            noun=subject, attributes=attrs, prompt=_compose_prompt(subject, attrs, registry, parsed.activity), box=box
        )
        for attrs, box in zip(attributes, boxes)
    )
    caption = " ".join(text.split()).rstrip(".!?;: ")
    background = f"a realistic scene {parsed.setting}" if parsed.setting else "a realistic scene"
    plan = ScenePlan(
        text=text,
        caption=caption,
        entities=entities,
        background=background,
        negative=DEFAULT_NEGATIVE if negative is None else negative,
        seed=seed,
        parse=parsed,
        mode=mode,
        mix=mix_out,
        quotas=quotas,
        joint=tuple(joint_out),
    )
    log.debug("planned %d x %r (%s) with seed %d", n, subject, mode, seed)
    return plan


def _marginals(table: JointTable) -> dict[str, dict[str, Fraction]]:
    """Per-axis weights implied by a joint table (for reporting the mix of each axis)."""
    out: dict[str, dict[str, Fraction]] = {axis: {} for axis in table.axes}
    for key, w in table.weights.items():
        for axis, value in zip(table.axes, key):
            out[axis][value] = out[axis].get(value, Fraction(0)) + w
    return out
