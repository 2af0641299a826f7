"""A template grammar that generates (text -> :class:`ParsedScene`) pairs, and the parser evaluator.

Why generate rather than collect: the parse has a canonical form (see :mod:`deltaw.plan.parsing`), so a
grammar can emit the text and its exact answer together, in any quantity, reproducibly from a seed. The
same pairs train a learned parser (a LoRA on a small causal LM) and score every parser, rules included.

Why a held-out split of *templates*: a parser that has only memorised phrasings fails on new ones. The
``heldout`` split uses templates that never occur in ``train`` (new lead-ins, "who are", "made up of",
"consisting of", setting-first sentences, comma lists, "five-player team" compounds, noun-less collectives),
and it also draws on nouns, collectives, activities and settings that the train split never uses.

The grammar (slots in braces; ``|`` separates alternatives the generator picks from)::

    COUNT     := DIGITS | NUMBER-WORD ("twelve", "twenty-one", "twenty one") | "a dozen" | "half a dozen"
               | "two dozen" | "a pair of" | "a couple of" | "a trio of" | "a" | "one" | "a single"
               (the article and collective forms only where grammatical: at the start of a clause)
    NOUN      := [ADJECTIVE] PLURAL-NOUN          (SINGULAR-NOUN when COUNT is one)
    GROUP     := collective with modifiers, e.g. "female basketball team", "school choir", "small group"
    ACTIVITY  := -ing verb phrase without a preposition, e.g. "playing basketball", "posing for a photo"
    SETTING   := PREPOSITION place, e.g. "in a park", "at the beach", "on a stage"

    train templates                                  held-out templates
    COUNT NOUN                                       draw COUNT NOUN who are ACTIVITY SETTING
    COUNT NOUN SETTING                               an image of a GROUP with COUNT NOUN SETTING
    COUNT NOUN ACTIVITY                              SETTING, COUNT NOUN ACTIVITY
    COUNT NOUN ACTIVITY SETTING                      a GROUP made up of COUNT NOUN
    a GROUP of COUNT NOUN                            a picture showing COUNT NOUN ACTIVITY
    a GROUP of COUNT NOUN SETTING                    there are COUNT NOUN SETTING
    a GROUP of COUNT NOUN ACTIVITY SETTING           COUNT NOUN, ACTIVITY, SETTING
    a photo of COUNT NOUN ACTIVITY SETTING           a COUNT-MEMBER GROUP SETTING      ("a five-player team")
    a photo of a GROUP of COUNT NOUN SETTING         generate a realistic photo of COUNT NOUN that are ...
    create COUNT NOUN SETTING                        A GROUP consisting of COUNT NOUN ACTIVITY
                                                     a GROUP of COUNT SETTING           (member implied)
                                                     COUNT NOUN SETTING, ACTIVITY
                                                     please draw me COUNT NOUN ACTIVITY
                                                     a GROUP of COUNT NOUN all ACTIVITY SETTING

Every example carries its canonical parse; :func:`evaluate_parser` scores exact match of all five fields.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deltaw.plan.errors import PlanError
from deltaw.plan.parsing import MEMBER_OF, ParsedScene, Parser, with_article

Split = Literal["train", "heldout"]

#: The instruction a learned parser is prompted with; the completion is :meth:`ParsedScene.to_target`.
PARSE_INSTRUCTION = (
    "Read the image request and answer with JSON holding: count (how many people or things), noun (one of "
    "them, singular), scene (the group they form, or null), activity (or null), setting (from its "
    "preposition, or null).\nRequest: {text}\nJSON: "
)


@dataclass(frozen=True)
class Template:
    """One sentence pattern. ``group`` says which collectives fill ``{group}``: ``"member"`` ones imply their
    member noun ("team" -> "player"), ``"any"`` also allows generic ones ("group", "crowd")."""

    id: str
    pattern: str
    split: Split
    group: Literal["none", "any", "member"] = "none"
    count_context: Literal["clause", "after", "compound"] = "clause"

    def __post_init__(self) -> None:
        if self.split not in ("train", "heldout"):
            raise PlanError(f"template {self.id}: split must be 'train' or 'heldout'")
        if ("{group}" in self.pattern or "{a_group}" in self.pattern or "{A_group}" in self.pattern) == (
            self.group == "none"
        ):
            raise PlanError(f"template {self.id}: group kind {self.group!r} does not match its pattern")


TEMPLATES: tuple[Template, ...] = (
    Template("t01", "{count} {noun}", "train"),
    Template("t02", "{count} {noun} {setting}", "train"),
    Template("t03", "{count} {noun} {activity}", "train"),
    Template("t04", "{count} {noun} {activity} {setting}", "train"),
    Template("t05", "{a_group} of {count} {noun}", "train", group="any", count_context="after"),
    Template("t06", "{a_group} of {count} {noun} {setting}", "train", group="any", count_context="after"),
    Template("t07", "{a_group} of {count} {noun} {activity} {setting}", "train", group="any", count_context="after"),
    Template("t08", "a photo of {count} {noun} {activity} {setting}", "train"),
    Template("t09", "a photo of {a_group} of {count} {noun} {setting}", "train", group="any", count_context="after"),
    Template("t10", "create {count} {noun} {setting}", "train"),
    # Each structure the held-out split uses (setting first, a relative clause, an implied member, a compound
    # count, trailing or comma-separated clauses, a lead-in) appears here in at least one other wording, so the
    # held-out set measures new phrasings of known structures with new vocabulary, not structures never shown.
    Template("t11", "{Setting}: {count} {noun} {activity}", "train"),
    Template("t12", "{Setting} we see {a_group} of {count} {noun}", "train", group="any", count_context="after"),
    Template("t13", "{count} {noun} who {be} {activity}", "train"),
    Template("t14", "{a_group} of {count}", "train", group="member", count_context="after"),
    Template("t15", "a {count}-{member} {group} {activity}", "train", group="member", count_context="compound"),
    Template("t16", "{count} {noun} {setting} {activity}", "train"),
    Template("t17", "{a_group} of {count} {noun}, {setting}", "train", group="any", count_context="after"),
    Template("t18", "show me {count} {noun} {activity}", "train"),
    Template("t19", "an illustration of {a_group} that has {count} {noun}", "train", group="any",
             count_context="after"),
    Template("t20", "{count} {noun}; {activity}; {setting}", "train"),
    Template("h01", "draw {count} {noun} who {be} {activity} {setting}", "heldout"),
    Template(
        "h02", "an image of {a_group} with {count} {noun} {setting}", "heldout", group="any", count_context="after"
    ),
    Template("h03", "{Setting}, {count} {noun} {activity}", "heldout"),
    Template("h04", "{a_group} made up of {count} {noun}", "heldout", group="any", count_context="after"),
    Template("h05", "a picture showing {count} {noun} {activity}", "heldout"),
    Template("h06", "there {be} {count} {noun} {setting}", "heldout"),
    Template("h07", "{count} {noun}, {activity}, {setting}", "heldout"),
    Template("h08", "a {count}-{member} {group} {setting}", "heldout", group="member", count_context="compound"),
    Template("h09", "generate a realistic photo of {count} {noun} that {be} {activity} {setting}.", "heldout"),
    Template("h10", "{A_group} consisting of {count} {noun} {activity}", "heldout", group="any", count_context="after"),
    Template("h11", "{a_group} of {count} {setting}", "heldout", group="member", count_context="after"),
    Template("h12", "{count} {noun} {setting}, {activity}", "heldout"),
    Template("h13", "please draw me {count} {noun} {activity}", "heldout"),
    Template(
        "h14", "{a_group} of {count} {noun} all {activity} {setting}", "heldout", group="any", count_context="after"
    ),
)

# Vocabulary: (train, held-out-only). Nouns are (singular, plural) so irregular plurals are exercised.
# fmt: off
_NOUNS_TRAIN: tuple[tuple[str, str], ...] = (
    ("person", "people"), ("man", "men"), ("woman", "women"), ("child", "children"), ("nurse", "nurses"),
    ("doctor", "doctors"), ("firefighter", "firefighters"), ("police officer", "police officers"),
    ("student", "students"), ("teacher", "teachers"), ("soldier", "soldiers"), ("dancer", "dancers"),
    ("chef", "chefs"), ("musician", "musicians"), ("scientist", "scientists"),
    ("construction worker", "construction workers"), ("farmer", "farmers"), ("athlete", "athletes"),
    ("runner", "runners"), ("hiker", "hikers"), ("tourist", "tourists"), ("friend", "friends"),
    ("businessman", "businessmen"), ("actress", "actresses"), ("lady", "ladies"), ("baby", "babies"),
    ("teenager", "teenagers"), ("coach", "coaches"), ("hero", "heroes"), ("wolf", "wolves"), ("kid", "kids"),
    ("boss", "bosses"), ("detective", "detectives"), ("monk", "monks"), ("girl", "girls"), ("boy", "boys"),
)
_NOUNS_HELDOUT: tuple[tuple[str, str], ...] = (
    ("surgeon", "surgeons"), ("astronaut", "astronauts"), ("lifeguard", "lifeguards"), ("librarian", "librarians"),
    ("cowboy", "cowboys"), ("knight", "knights"), ("thief", "thieves"), ("goalie", "goalies"),
    ("fisherman", "fishermen"), ("waitress", "waitresses"), ("businesswoman", "businesswomen"),
    ("grandparent", "grandparents"), ("rookie", "rookies"), ("elf", "elves"), ("witch", "witches"),
    ("salesperson", "salespeople"), ("mechanic", "mechanics"), ("pilot", "pilots"),
)
_ADJECTIVES = (
    "young", "tired", "happy", "elderly", "smiling", "tall", "cheerful", "uniformed", "off-duty", "excited",
)
# (collective with modifiers, member singular, member plural)
_GROUPS_TRAIN: tuple[tuple[str, str, str], ...] = (
    ("basketball team", "player", "players"), ("female basketball team", "player", "players"),
    ("soccer team", "player", "players"), ("volleyball team", "player", "players"),
    ("rock band", "musician", "musicians"), ("school choir", "singer", "singers"),
    ("film crew", "crew member", "crew members"), ("class", "student", "students"),
    ("dance troupe", "dancer", "dancers"), ("platoon", "soldier", "soldiers"), ("relay team", "runner", "runners"),
    ("orchestra", "musician", "musicians"),
)
_GROUPS_HELDOUT: tuple[tuple[str, str, str], ...] = (
    ("hockey team", "player", "players"), ("jazz band", "musician", "musicians"),
    ("church choir", "singer", "singers"), ("surgical team", "surgeon", "surgeons"),
    ("cheerleading squad", "cheerleader", "cheerleaders"), ("debate team", "student", "students"),
    ("women's rugby team", "player", "players"), ("marching band", "musician", "musicians"),
)
_GENERIC_TRAIN = (
    "group", "small group", "crowd", "line",
)
_GENERIC_HELDOUT = (
    "large group", "circle", "big crowd", "row",
)
_ACTIVITIES_TRAIN = (
    "playing", "playing basketball", "dancing", "laughing", "walking", "running", "talking", "cooking dinner",
    "reading books", "singing", "working", "waiting", "cheering", "marching", "posing for a photo", "eating lunch",
    "smiling", "holding umbrellas", "wearing scrubs", "studying", "practicing", "celebrating a victory",
    "drinking coffee", "chatting", "waving", "talking to each other", "listening to a speech", "waiting for a bus",
    "looking for a ball", "writing letters", "throwing a frisbee", "riding bicycles", "pointing to the sky",
)
_ACTIVITIES_HELDOUT = (
    "taking a selfie", "carrying backpacks", "stretching", "painting a mural", "drawing pictures", "shaking hands",
    "clapping", "jumping", "building a snowman", "listening to music",
)
_SETTINGS_TRAIN = (
    "in a hospital", "in a park", "at the beach", "on a stage", "on a basketball court", "in a kitchen",
    "at a train station", "in an office", "on a snowy mountain", "in a classroom", "at a wedding", "in a forest",
    "on a city street", "in a library", "at a cafe", "in the rain", "on a football field", "in a busy market",
    "in a laboratory", "in a garden", "on a rooftop", "inside a museum", "near a lake", "at a concert",
    "in a dining hall", "in a parking lot", "at a bus stop", "in a living room", "at a swimming pool",
    "in a shopping mall", "outside a bakery", "beside a fountain", "under a tree",
)
_SETTINGS_HELDOUT = (
    "under a bridge", "at a construction site", "beside a river", "in a hospital waiting room", "outside a school",
    "at the airport", "on a sailing boat", "in a desert", "at a farmers market", "inside a space station",
)
_SMALL = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)
_TENS = (
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
)
# fmt: on


def number_words(n: int, *, sep: str = "-") -> str:
    """0..99 in words: 21 -> 'twenty-one' (or 'twenty one' with ``sep=' '``)."""
    if not 0 <= n < 100:
        raise PlanError(f"number_words covers 0..99, not {n}")
    if n < 20:
        return _SMALL[n]
    tens, unit = divmod(n, 10)
    return _TENS[tens] + (sep + _SMALL[unit] if unit else "")


def render_count(n: int, rng: random.Random, context: str) -> str:
    """One way of writing ``n`` that is grammatical in ``context`` (see :class:`Template`)."""
    if context == "compound":  # "a 5-player team", "a five-player team"
        return rng.choice([str(n), number_words(n)]) if n <= 20 or n % 10 == 0 else str(n)
    forms = [str(n), number_words(n)]
    if n > 20 and n % 10:
        forms.append(number_words(n, sep=" "))
    if n in (12, 24, 36, 48):
        forms.append("a dozen" if n == 12 else f"{number_words(n // 12)} dozen")
    if n == 6:
        forms.append("half a dozen")
    if context == "clause":
        if n == 1:
            forms += ["a", "a single"]
        if n == 2:
            forms += ["a pair of", "a couple of"]
        if n == 3:
            forms.append("a trio of")
    return rng.choice(forms)


def _sample_count(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.1:
        return 1
    if r < 0.7:
        return rng.randint(2, 12)
    return rng.randint(13, 64)


@dataclass(frozen=True)
class ParseExample:
    """One generated pair: the request text and its canonical parse."""

    text: str
    parse: ParsedScene
    template: str
    split: Split

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise PlanError("generated example has empty text")

    @property
    def prompt(self) -> str:
        """The prompt a learned parser sees."""
        return PARSE_INSTRUCTION.format(text=self.text)

    @property
    def completion(self) -> str:
        """The completion a learned parser is trained to produce."""
        return self.parse.to_target()

    def to_record(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "parse": self.parse.to_dict(),
            "template": self.template,
            "split": self.split,
            "prompt": self.prompt,
            "completion": self.completion,
        }


def _fill(template: Template, rng: random.Random, split: Split) -> ParseExample:
    heldout = split == "heldout"
    nouns = _NOUNS_TRAIN + (_NOUNS_HELDOUT if heldout else ())
    member_groups = _GROUPS_TRAIN + (_GROUPS_HELDOUT if heldout else ())
    generic = _GENERIC_TRAIN + (_GENERIC_HELDOUT if heldout else ())
    activities = _ACTIVITIES_TRAIN + (_ACTIVITIES_HELDOUT if heldout else ())
    settings = _SETTINGS_TRAIN + (_SETTINGS_HELDOUT if heldout else ())

    count = _sample_count(rng)
    scene: str | None = None
    if template.group == "member" or (template.group == "any" and rng.random() < 0.6):
        candidates = member_groups
        if template.count_context == "compound":
            candidates = tuple(g for g in candidates if " " not in g[1])
        if "{noun}" not in template.pattern:  # the member is implied by the collective's head
            candidates = tuple(g for g in candidates if MEMBER_OF.get(g[0].split()[-1]) == g[1])
        scene, sg, pl = rng.choice(candidates)
    else:
        sg, pl = rng.choice(nouns)
        if template.group == "any":
            scene = rng.choice(generic)
    noun_sg = sg
    noun_text = sg if count == 1 else pl
    if "{noun}" in template.pattern and rng.random() < 0.2:
        adjective = rng.choice(_ADJECTIVES)
        noun_sg, noun_text = f"{adjective} {noun_sg}", f"{adjective} {noun_text}"
    activity = rng.choice(activities) if "{activity}" in template.pattern else None
    setting = rng.choice(settings) if "{setting}" in template.pattern or "{Setting}" in template.pattern else None
    count_text = render_count(count, rng, template.count_context)
    if count_text in ("a", "a single"):
        count_text = with_article(noun_text).split()[0] if count_text == "a" else count_text
    slots = {
        "count": count_text,
        "noun": noun_text,
        "member": sg,
        "group": scene or "",
        "a_group": with_article(scene) if scene else "",
        "A_group": with_article(scene).capitalize() if scene else "",
        "activity": activity or "",
        "setting": setting or "",
        "Setting": (setting or "").capitalize(),
        "be": "is" if count == 1 else "are",
    }
    text = " ".join(template.pattern.format(**slots).split())
    parse = ParsedScene(count=count, noun=noun_sg, scene=scene, activity=activity, setting=setting)
    return ParseExample(text=text, parse=parse, template=template.id, split=split)


def templates_for(split: Split) -> tuple[Template, ...]:
    """The templates of one split (train and held-out share none)."""
    if split not in ("train", "heldout"):
        raise PlanError(f"split must be 'train' or 'heldout', not {split!r}")
    return tuple(t for t in TEMPLATES if t.split == split)


def generate_examples(n: int, *, seed: int, split: Split = "train") -> list[ParseExample]:
    """``n`` examples of ``split``, cycling through its templates in a seeded random order.

    The same ``(n, seed, split)`` always gives the same list. Templates are used in near-equal shares so no
    phrasing dominates a small evaluation set.
    """
    if n < 0:
        raise PlanError(f"number of examples must be >= 0, not {n}")
    rng = random.Random(f"deltaw.plan.grammar/{split}/{seed}")
    templates = list(templates_for(split))
    out: list[ParseExample] = []
    while len(out) < n:
        rng.shuffle(templates)
        for template in templates[: n - len(out)]:
            out.append(_fill(template, rng, split))
    return out


@dataclass(frozen=True)
class ParseReport:
    """Exact-match accuracy of a parser over examples, per field, with the first failures for reading."""

    n: int
    accuracy: float
    per_field: dict[str, float]
    per_template: dict[str, float]
    failures: tuple[tuple[str, str, str], ...] = field(default=())  # (text, expected, got)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "per_field": self.per_field,
            "per_template": self.per_template,
            "failures": [list(f) for f in self.failures],
        }


def evaluate_parser_report(parser: Parser, examples: Iterable[ParseExample], *, keep_failures: int = 20) -> ParseReport:
    """Score ``parser`` on ``examples``: a parse counts only if all five fields match; an error counts as wrong."""
    names = ("count", "noun", "scene", "activity", "setting")
    examples = list(examples)
    if not examples:
        raise PlanError("no examples to evaluate on")
    right = 0
    field_right = dict.fromkeys(names, 0)
    by_template: dict[str, list[int]] = {}
    failures: list[tuple[str, str, str]] = []
    for example in examples:
        try:
            got: ParsedScene | None = parser.parse(example.text)
        except PlanError as exc:
            got, message = None, f"PlanError: {exc}"
        ok = got is not None and got.fields() == example.parse.fields()
        right += ok
        stats = by_template.setdefault(example.template, [0, 0])
        stats[0] += ok
        stats[1] += 1
        if got is not None:
            for name, a, b in zip(names, got.fields(), example.parse.fields()):
                field_right[name] += a == b
            message = got.to_target()
        if not ok and len(failures) < keep_failures:
            failures.append((example.text, example.parse.to_target(), message))
    n = len(examples)
    return ParseReport(
        n=n,
        accuracy=right / n,
        per_field={k: v / n for k, v in field_right.items()},
        per_template={k: v[0] / v[1] for k, v in sorted(by_template.items())},
        failures=tuple(failures),
    )


def evaluate_parser(parser: Parser, examples: Iterable[ParseExample]) -> float:
    """Exact-match accuracy (all five fields) of ``parser`` on ``examples``, in [0, 1]."""
    return evaluate_parser_report(parser, examples).accuracy


def write_jsonl(examples: Sequence[ParseExample], path: str | Path) -> Path:
    """Write examples as JSON lines (``text``, ``parse``, ``prompt``, ``completion``, ...) for a trainer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.to_record(), ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[ParseExample]:
    """Read examples written by :func:`write_jsonl`."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append(ParseExample(rec["text"], ParsedScene.from_dict(rec["parse"]), rec["template"], rec["split"]))
    return out
