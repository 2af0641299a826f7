"""The language stage: free text -> :class:`ParsedScene` (how many of what, forming what, doing what, where).

Why a protocol with a rule parser first: the planner only needs four or five fields, and a deterministic
parser gets the common phrasings right with no model at all (``--no-llm``). A learned parser (a LoRA on a small
causal LM, trained from :mod:`deltaw.plan.grammar`) can plug in later through :class:`Parser` and the
:data:`PARSERS` registry, and both are scored by the same :func:`deltaw.plan.grammar.evaluate_parser`.

The canonical parse (what the grammar generator emits and the evaluator compares, field by field):

``count``     how many entities (``"a dozen"`` -> 12, ``"a trio of"`` -> 3, ``"a nurse"`` -> 1)
``noun``      the entity noun phrase, singular, as written (``"player"``, ``"young nurse"``, ``"police officer"``)
``scene``     the collective the entities form, without article, or ``None``
              (``"female basketball team"``, ``"group"``; count words such as "trio" or "dozen" are not scenes)
``activity``  what they are doing, without "who are"/"that are", or ``None`` (``"playing basketball"``)
``setting``   where, from its preposition on, or ``None`` (``"in a park"``, ``"at the beach"``)
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from deltaw.plan.errors import PlanError

log = logging.getLogger(__name__)

_FIELDS = ("count", "noun", "scene", "activity", "setting")


def _clean(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class ParsedScene:
    """The structured reading of a scene request; see the module docstring for what each field holds.

    Validated on construction (non-negative integer count, non-empty noun) and normalised to lower case with
    single spaces, so that two parses compare equal exactly when they mean the same thing.
    """

    count: int
    noun: str
    scene: str | None = None
    activity: str | None = None
    setting: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise PlanError(f"parsed count must be a non-negative integer, not {self.count!r}")
        if not isinstance(self.noun, str) or not self.noun.strip():
            raise PlanError("parsed scene has no entity noun")
        object.__setattr__(self, "noun", _clean(self.noun))
        for name in ("scene", "activity", "setting"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise PlanError(f"parsed {name} must be text or None, not {value!r}")
            object.__setattr__(self, name, _clean(value) or None if value is not None else None)

    def fields(self) -> tuple[int, str, str | None, str | None, str | None]:
        """The compared fields, in a fixed order."""
        return (self.count, self.noun, self.scene, self.activity, self.setting)

    def subject(self) -> str:
        """The per-entity noun phrase for prompts: the group's modifiers carried onto each member.

        "female basketball team" of "player" -> "female basketball player"; a generic collective ("group",
        "crowd") carries nothing. Why: an image model prompted per box sees only that box's phrase, so a box
        that says just "player" would lose "female basketball".
        """
        if not self.scene:
            return self.noun
        words = self.scene.split()
        head, mods = words[-1], words[:-1]
        if head not in MEMBER_OF or head in GENERIC_COLLECTIVES or not mods:
            return self.noun
        noun_words = self.noun.split()
        if head in noun_words:  # "film crew" of "crew member" -> "film crew member"
            return " ".join(mods + noun_words)
        if any(m in noun_words for m in mods):
            return self.noun
        return " ".join(noun_words[:-1] + mods + noun_words[-1:])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_target(self) -> str:
        """Compact JSON with keys in a fixed order: the completion a learned parser is trained to emit."""
        return json.dumps({k: getattr(self, k) for k in _FIELDS}, ensure_ascii=False, separators=(", ", ": "))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParsedScene:
        try:
            count = data["count"]
            if isinstance(count, str) and count.strip().isdigit() and len(count.strip()) <= MAX_COUNT_DIGITS:
                try:
                    count = int(count)
                except ValueError:  # superscript digits: left as text, refused below as not an integer
                    pass
            return cls(
                count=count,
                noun=data["noun"],
                scene=data.get("scene"),
                activity=data.get("activity"),
                setting=data.get("setting"),
            )
        except KeyError as exc:
            raise PlanError(f"parse is missing the field {exc.args[0]!r}") from None

    @classmethod
    def from_target(cls, text: str) -> ParsedScene:
        """Read a learned parser's completion: the first JSON object in ``text`` (models add chatter)."""
        start = text.find("{")
        depth = 0
        for i in range(max(start, 0), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    try:
                        return cls.from_dict(json.loads(text[start : i + 1]))
                    except json.JSONDecodeError as exc:
                        raise PlanError(f"parser output is not valid JSON: {exc}") from None
        raise PlanError(f"parser output holds no JSON object: {text[:80]!r}")


@runtime_checkable
class Parser(Protocol):
    """Anything that turns scene text into a :class:`ParsedScene`.

    Implementations raise :class:`PlanError` when the text names nothing countable. They should not clamp
    the count: range checks (1..64) belong to the planner, so the error can say what the user actually wrote.
    """

    name: str

    def parse(self, text: str) -> ParsedScene: ...


# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# fmt: off

MAX_COUNT_DIGITS = 12  # a count written with more digits is out of range anyway; int() of 4,300+ digits raises

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
#: Magnitude words: they multiply the count before them ("two hundred", "ten thousand") or stand for one of
#: themselves after "a"/"an"/"one" ("a thousand"). Every one makes a count the planner refuses as out of range,
#: but it must be read as a count, or "a thousand people" would plan one "thousand people".
_MAGNITUDES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
#: Collective words that are really counts: "a trio of musicians" is three musicians, not a scene.
COUNT_COLLECTIVES = {
    "pair": 2, "couple": 2, "duo": 2, "trio": 3, "quartet": 4, "quintet": 5, "sextet": 6, "septet": 7, "octet": 8,
}
#: Collective -> default member noun, used when the text gives no noun ("a basketball team of five").
MEMBER_OF = {
    "team": "player", "squad": "member", "band": "musician", "choir": "singer", "crew": "crew member",
    "class": "student", "troupe": "performer", "orchestra": "musician", "ensemble": "performer", "club": "member",
    "family": "family member", "platoon": "soldier", "unit": "member", "gang": "member", "party": "guest",
    "staff": "staff member", "committee": "member", "panel": "panelist", "cast": "actor", "group": "person",
    "crowd": "person", "line": "person", "row": "person", "circle": "person", "bunch": "person",
    "gathering": "person", "queue": "person", "set": "person", "collection": "person",
}
#: Collectives that say nothing about their members, so their modifiers ("small group") stay with the group.
GENERIC_COLLECTIVES = {"group", "crowd", "line", "row", "circle", "bunch", "gathering", "queue", "set", "collection"}
_MEDIA = {
    "artwork", "cartoon", "composition", "depiction", "drawing", "frame", "illustration", "image", "images",
    "painting", "photo", "photograph", "photos", "picture", "pictures", "portrait", "poster", "render", "rendering",
    "scene", "selfie", "shot", "sketch", "snapshot", "still", "view",
}
SETTING_PREPS = {
    "across", "along", "amid", "among", "around", "at", "atop", "behind", "beneath", "beside", "by", "during", "in",
    "indoors", "inside", "into", "near", "on", "onto", "outdoors", "outside", "under", "underneath", "within",
}
_CONNECTORS = (  # between a collective and its count: "team of five", "team made up of five", ...
    ("made", "up", "of"), ("consisting", "of"), ("composed", "of"), ("comprised", "of"), ("formed", "of"),
    ("comprising",), ("of",), ("with",), ("featuring",), ("including",), ("that", "has"), ("that", "includes"),
)
_RELATIVE = (  # between the noun and the activity: "nurses who are smiling"
    ("who", "are"), ("that", "are"), ("which", "are"), ("who", "were"), ("who", "is"), ("that", "is"), ("which", "is"),
    ("who", "was"), ("who're",), ("are",), ("is",), ("all",),
    ("who",), ("that",), ("which",), ("while",), ("busy",),
)
_COMPOUND_HEADS = {  # nouns that an -ing word often modifies: "waiting room", "dining hall", "parking lot"
    "alley", "area", "bag", "board", "booth", "cart", "class", "court", "field", "floor", "ground", "grounds", "hall",
    "lane", "line", "lot", "machine", "pool", "range", "rink", "room", "ship", "shop", "space", "station", "table",
    "track", "trail", "wall", "yard", "zone",
}
_NP_STOP = {
    ",", "all", "and", "are", "as", "both", "busy", "each", "for", "from", "is", "that", "together", "were", "which",
    "while", "who", "who're", "with",
} | SETTING_PREPS
_ING_NOUNS = {
    "anything", "awning", "being", "bing", "bling", "boxing", "building", "ceiling", "changeling", "clothing",
    "darling", "drawing", "dressing", "duckling", "dumpling", "earring", "earthling", "evening", "everything",
    "fencing", "filling", "fledgling", "foundling", "frosting", "gathering", "gosling", "hatchling", "herring",
    "icing", "inkling", "king", "landing", "lightning", "ling", "lodging", "meeting", "morning", "nestling",
    "nothing", "offspring", "painting", "ping", "pudding", "railing", "ring", "sapling", "scaffolding", "seedling",
    "setting", "sibling", "sling", "something", "spring", "starling", "sterling", "string", "stuffing", "swing",
    "thing", "underling", "viewing", "viking", "weakling", "wedding", "whiting", "wing", "wrestling", "youngling",
}
_IRREGULAR = {
    "people": "person", "persons": "person", "men": "man", "women": "woman", "children": "child", "teeth": "tooth",
    "feet": "foot", "mice": "mouse", "geese": "goose", "oxen": "ox", "alumni": "alumnus", "cacti": "cactus",
    "fungi": "fungus", "dice": "die", "criteria": "criterion", "phenomena": "phenomenon", "passers-by": "passer-by",
    "lice": "louse", "buses": "bus", "gases": "gas", "octopi": "octopus", "brethren": "brother", "kine": "cow",
    "series": "series", "species": "species", "aircraft": "aircraft",
}
_INVARIANT = {
    "bison", "cattle", "crew", "deer", "elk", "fish", "folk", "moose", "offspring", "personnel", "police", "salmon",
    "sheep", "staff", "swine", "trout", "youth",
}
_VES = {
    "wolves": "wolf", "elves": "elf", "thieves": "thief", "wives": "wife", "knives": "knife", "leaves": "leaf",
    "halves": "half", "calves": "calf", "loaves": "loaf", "shelves": "shelf", "selves": "self", "dwarves": "dwarf",
    "scarves": "scarf", "lives": "life", "hooves": "hoof", "sheaves": "sheaf",
}
_OES = {
    "buffaloes", "dominoes", "echoes", "heroes", "mangoes", "mosquitoes", "potatoes", "superheroes", "tomatoes",
    "tornadoes", "torpedoes", "vetoes", "volcanoes",
}
_IE = {
    "auntie", "aussie", "baddie", "barbie", "beanie", "bestie", "birdie", "bogie", "boogie", "bookie", "bowie",
    "brownie", "calorie", "collie", "cookie", "cowrie", "cutie", "die", "eerie", "foodie", "freebie", "genie",
    "girlie", "goalie", "goodie", "groupie", "hippie", "hoodie", "hottie", "indie", "junkie", "kiddie", "kiwi",
    "laddie", "lassie", "lie", "magpie", "movie", "newbie", "oldie", "pie", "pixie", "prairie", "rookie", "roomie",
    "selfie", "smoothie", "sortie", "specie", "surfie", "sweetie", "talkie", "techie", "tie", "townie", "trekkie",
    "valkyrie", "walkie", "yogi", "yuppie", "zombie",
}
_ES_EXCEPT = {
    "ache", "avalanche", "cache", "cliche", "creche", "headache", "microfiche", "moustache", "mustache", "niche",
    "panache", "psyche", "quiche",
}
_MEN_SINGULAR = {
    "abdomen", "acumen", "albumen", "amen", "bitumen", "hymen", "omen", "ramen", "regimen", "semen", "specimen",
    "stamen", "yemen",
}
# fmt: on


def singularize(word: str) -> str:
    """English plural -> singular for one word (the head of a noun phrase); singular words come back unchanged."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if w in _INVARIANT or len(w) <= 2:
        return w
    for plural, single in (("people", "person"), ("children", "child"), ("women", "woman")):
        if w.endswith(plural):
            return w[: -len(plural)] + single
    if w.endswith("men") and w not in _MEN_SINGULAR:
        return w[:-3] + "man"
    if w.endswith("ies") and len(w) > 4:
        return w[:-1] if w[:-1] in _IE else w[:-3] + "y"
    for plural, single in _VES.items():
        if w.endswith(plural):
            return w[: -len(plural)] + single
    if w.endswith("oes"):
        return w[:-2] if w in _OES else w[:-1]
    if w.endswith(("sses", "ches", "shes", "xes", "zzes")):
        return w[:-1] if w[:-1] in _ES_EXCEPT else w[:-2]
    if w.endswith(("ss", "us", "is", "ous")):
        return w
    if w.endswith("s"):
        return w[:-1]
    return w


def pluralize(word: str) -> str:
    """Singular -> plural for one word; the inverse of :func:`singularize` on the vocabulary the grammar uses."""
    w = word.lower()
    inverse = {v: k for k, v in _IRREGULAR.items() if k not in ("persons",)}
    if w in inverse:
        return inverse[w]
    if w in _INVARIANT:
        return w
    for single, plural in (("person", "people"), ("child", "children"), ("woman", "women")):
        if w.endswith(single):
            return w[: -len(single)] + plural
    if w.endswith("man") and w not in ("human", "german", "shaman", "talisman", "caiman", "ottoman"):
        return w[:-3] + "men"
    for plural, single in _VES.items():
        if w.endswith(single) and single not in ("life",):
            return w[: -len(single)] + plural
    if w in {p[:-2] for p in _OES}:
        return w + "es"
    if w.endswith("y") and len(w) > 2 and w[-2] not in "aeiou":
        return w[:-1] + "ies"
    if w.endswith(("s", "x", "z", "ch", "sh")):
        return w + "es"
    return w + "s"


def with_article(phrase: str) -> str:
    """``"a"`` or ``"an"`` + phrase, by the sound of its first word (an elderly nurse, a uniformed officer)."""
    first = phrase.split()[0].lower() if phrase.split() else ""
    vowel_sound = bool(first) and first[0] in "aeiou"
    if first.startswith(("uni", "use", "usu", "uti", "eu", "one", "ewe", "uro")):
        vowel_sound = False
    if first.startswith(("hour", "honest", "honor", "heir")):
        vowel_sound = True
    return f"{'an' if vowel_sound else 'a'} {phrase}"


def _word_number(token: str) -> int | None:
    """'seven' -> 7, 'twenty-one' -> 21, '12' -> 12; None if the token is not a number."""
    if token.isdigit():
        # Past a few digits it is no count anyone plans (and int() of 4,300+ digits raises ValueError).
        if len(token) > MAX_COUNT_DIGITS:
            raise PlanError(f"count {token[:12]}... ({len(token)} digits) is out of range")
        try:
            return int(token)
        except ValueError:  # digits int() does not read, such as superscripts ("²")
            return None
    if token in _UNITS:
        return _UNITS[token]
    if token in _TENS:
        return _TENS[token]
    if "-" in token:
        tens, _, unit = token.partition("-")
        if tens in _TENS and unit in _UNITS and 0 < _UNITS[unit] < 10:
            return _TENS[tens] + _UNITS[unit]
    return None


def _magnify(value: int, word: str, words: list[str]) -> int:
    """``value`` times the magnitude ``word``; a count past 12 digits ("a million million ...") is refused here,
    before it grows into a number too long to print."""
    value *= _MAGNITUDES[word]
    if value >= 10**MAX_COUNT_DIGITS:
        raise PlanError(f"count {' '.join(words)[:40]!r} is out of range")
    return value


@dataclass(frozen=True)
class _Count:
    start: int
    end: int  # exclusive: first token after the count expression
    value: int
    compound_noun: str | None = None  # "five-player" -> "player"


def _find_count(tokens: list[str]) -> _Count | None:
    """The first count expression among ``tokens`` (see :class:`RuleParser` for the forms)."""
    n = len(tokens)
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < n else ""
        nxt2 = tokens[i + 2] if i + 2 < n else ""
        # "half a dozen", "a dozen", "two dozen"
        if tok == "half" and nxt in ("a", "an") and nxt2 == "dozen":
            return _Count(i, i + 3, 6)
        if tok in ("a", "an") and nxt == "dozen":
            return _Count(i, i + 2, 12)
        if tok in ("a", "an", "one") and nxt in _MAGNITUDES:  # "a hundred", "a thousand", "one million"
            end = i + 2
            value = _MAGNITUDES[nxt]
            while end < n and tokens[end] in _MAGNITUDES:  # "a hundred thousand"
                value = _magnify(value, tokens[end], tokens[i : end + 1])
                end += 1
            return _Count(i, end, value)
        if tok in ("a", "an") and nxt in ("single", "lone", "solitary"):
            return _Count(i, i + 2, 1)
        # "a pair of", "a trio of", "pair of"
        if tok in ("a", "an") and nxt in COUNT_COLLECTIVES and nxt2 == "of":
            return _Count(i, i + 3, COUNT_COLLECTIVES[nxt])
        if tok in COUNT_COLLECTIVES and nxt == "of" and (i == 0 or tokens[i - 1] not in ("a", "an", "the")):
            return _Count(i, i + 2, COUNT_COLLECTIVES[tok])
        value = _word_number(tok)
        if value is not None:
            end = i + 1
            # "twenty one" written as two words
            if tok in _TENS and nxt in _UNITS and 0 < _UNITS[nxt] < 10:
                value += _UNITS[nxt]
                end += 1
            if end < n and tokens[end] == "dozen":
                value *= 12
                end += 1
            else:  # "two hundred", "ten thousand", "five hundred thousand"
                while end < n and tokens[end] in _MAGNITUDES:
                    value = _magnify(value, tokens[end], tokens[i : end + 1])
                    end += 1
            return _Count(i, end, value)
        # "five-player", "5-person", "twenty-one-member"
        if "-" in tok:
            head, _, tail = tok.rpartition("-")
            value = _word_number(head)
            if value is not None and tail.isalpha() and tail not in _UNITS:
                return _Count(i, i + 1, value, compound_noun=singularize(tail))
    return None


_DETERMINERS = {  # words after an -ing word that show it is a verb with an object: "building a snowman"
    "a", "an", "the", "some", "their", "his", "her", "its", "our", "two", "three", "many", "each", "together", "up",
    "out", "down", "with",
}  # fmt: skip


def _is_ing_verb(token: str, after: str = "", before: str = "") -> bool:
    """Whether an -ing word starts an activity. Words that are usually nouns ("building", "painting") count as
    verbs when an object follows ("building a snowman", "drawing pictures") or a plural noun precedes them
    ("artists painting")."""
    if not token.endswith("ing") or len(token) <= 4:
        return False
    if token not in _ING_NOUNS:
        return True
    if after in _DETERMINERS or (after.endswith("s") and not after.endswith("ss") and after not in SETTING_PREPS):
        return True
    return bool(before) and singularize(before) != before


def _strip_prefix(tokens: list[str], options: tuple[tuple[str, ...], ...]) -> list[str]:
    for option in options:
        if tuple(tokens[: len(option)]) == option:
            return tokens[len(option) :]
    return tokens


def _join(tokens: list[str]) -> str | None:
    text = " ".join(t for t in tokens).replace(" ,", ",").strip(" ,")
    text = re.sub(r",(\s*,)+", ",", text)
    return text or None


_LEADINS = (
    re.compile(
        r"^(?:please\s+)?(?:(?:can|could|would|will)\s+you\s+)?(?:please\s+)?"
        r"(?:draw|generate|create|render|make|paint|show|depict|illustrate|sketch|produce|design|imagine|"
        r"visualize|visualise|picture|give|photograph|shoot|capture)(?:\s+(?:me|us))?\s+"
    ),
    re.compile(r"^(?:i\s+(?:want|need|would like|'d like)|i'd like|we\s+(?:want|need))(?:\s+to\s+see)?\s+"),
    re.compile(r"^(?:there\s+(?:are|is|were|was)|here\s+(?:are|is)|we\s+see|you\s+see)\s+"),
    re.compile(
        r"^(?:(?:a|an|the|one|some)\s+)?(?:[a-z'-]+\s+){0,3}?"
        r"(?:" + "|".join(sorted(_MEDIA, key=len, reverse=True)) + r")\s+"
        r"(?:of|showing|with|depicting|featuring|that\s+shows|which\s+shows|where|in\s+which)\s+"
    ),
)


_CLAUSE_LEADINS = 3  # the first three _LEADINS ("draw", "i want", "we see" ...) can follow a leading setting;
# the media one ("a photo of") cannot


class RuleParser:
    """Deterministic parser for scene requests (``--no-llm``).

    Counts it reads: digits ("12"), number words up to ninety-nine ("sixty-four", "twenty one"), "a dozen",
    magnitudes ("a hundred", "ten thousand", "a million": read, then refused by the planner as out of range),
    "half a dozen", "two dozen", "a pair/couple/duo/trio/quartet/quintet of", "a single", "five-player" compounds,
    and a bare "a/an" (one). Shapes it reads::

        [lead-in] [COLLECTIVE (of|with|made up of|consisting of|...)] COUNT NOUN [who are] [ACTIVITY] [SETTING]
        [lead-in] SETTING , COUNT NOUN [ACTIVITY]
        [lead-in] a COUNT-NOUN COLLECTIVE [ACTIVITY] [SETTING]         ("a five-player basketball team")

    where a lead-in is "draw", "an image of", "there are", ... ; the setting starts at a preposition
    (in/at/on/inside/near/...); the activity starts at an -ing verb, "who are", or "with".
    Only the first entity group is planned ("three nurses and a doctor" plans the nurses, with a warning).
    """

    name = "rules"

    def parse(self, text: str, *, count: int | None = None) -> ParsedScene:
        """Parse ``text``. ``count``: the caller's own count (``plan_scene(count=...)``); a text that names
        a group without saying how many ("a team of basketball players", "nurses") is then read as if it
        said ``count``. A count in the text still wins here; the caller decides which one to use."""
        if not isinstance(text, str) or not text.strip():
            raise PlanError("scene text is empty; describe the entities, e.g. 'three nurses in a hospital'")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise PlanError(f"count must be a non-negative integer, not {count!r}")
        return _parse_cached(self, text, count)

    # Stateless: all rule parsers are interchangeable, which lets parses be cached across instances.
    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def _parse(self, text: str, count_hint: int | None = None) -> ParsedScene:
        norm = self._normalise(text)
        norm = self._strip_leadins(norm)
        tokens = norm.replace(",", " , ").split()
        setting_first: list[str] = []
        if tokens and tokens[0] in SETTING_PREPS:
            if "," in tokens:
                cut = tokens.index(",")
                setting_first, tokens = tokens[:cut], tokens[cut + 1 :]
            else:
                found = _find_count(tokens)
                if found is not None:
                    cut = self._setting_end(tokens[: found.start])
                    setting_first, tokens = tokens[:cut], tokens[cut:]
            tokens = self._strip_leadins(" ".join(tokens)).split()
        parsed = self._parse_tokens(tokens, original=text, count_hint=count_hint)
        if setting_first:
            setting = _join(setting_first + ([] if parsed.setting is None else parsed.setting.split()))
            parsed = ParsedScene(parsed.count, parsed.noun, parsed.scene, parsed.activity, setting)
        return parsed

    @staticmethod
    def _setting_end(pre: list[str]) -> int:
        """Where a leading setting without a comma ends, given the tokens before the count: before a lead-in
        ("in a kitchen | we see three cooks") or before a collective ("on a court | a team of five players")."""
        for j in range(2, len(pre)):
            rest = " ".join(pre[j:]) + " "
            if any(p.match(rest) for p in _LEADINS[:_CLAUSE_LEADINS]):
                return j
        for connector in _CONNECTORS:
            n = len(connector)
            if len(pre) > n and tuple(pre[-n:]) == connector:
                articles = [i for i, t in enumerate(pre[:-n]) if t in ("a", "an", "the") and i >= 2]
                return articles[-1] if articles else len(pre)
        return len(pre)

    @staticmethod
    def _normalise(text: str) -> str:
        text = text.lower()
        text = re.sub(r"[\u2010-\u2015\u2212]", "-", text)
        text = re.sub(r"[\u2018\u2019`]", "'", text)
        text = re.sub(r"[\"\u201c\u201d()\[\]{}]", " ", text)
        text = re.sub(r"[.!?]+(\s|$)", r" \1", text)
        text = re.sub(r"\s*[;:]+(\s|$)", r", \1", text)  # "at a concert: two boys; dancing" -- clause breaks
        return " ".join(text.split())

    @staticmethod
    def _strip_leadins(text: str) -> str:
        changed = True
        while changed:
            changed = False
            for pattern in _LEADINS:
                match = pattern.match(text)
                if match and _find_count(match.group(0).split()[:-1]) is None:
                    text = text[match.end() :]
                    changed = True
        return text

    def _parse_tokens(self, tokens: list[str], *, original: str, count_hint: int | None = None) -> ParsedScene:
        found = _find_count(tokens)
        if found is None and count_hint is not None:
            tokens = _with_count(tokens, count_hint)
            found = _find_count(tokens)
        if found is None:
            return self._parse_uncounted(tokens, original=original)
        scene = self._scene_before(tokens[: found.start])
        rest = tokens[found.end :]
        if found.compound_noun is not None:
            # "a five-player basketball team playing ...": the collective comes after the count.
            group, rest = self._noun_phrase(rest)
            if group:
                scene = " ".join(group)
            noun = found.compound_noun
        else:
            rest = _strip_prefix(rest, (("of", "the"), ("of", "these"), ("of",)))
            np, rest = self._noun_phrase(rest)
            if np:
                noun = self._singular_np(np) if found.value != 1 else " ".join(np)
            elif scene and scene.split()[-1] in MEMBER_OF:
                noun = MEMBER_OF[scene.split()[-1]]
            else:
                raise PlanError(
                    f"no entity noun after the count in {original!r}; say what to count, e.g. 'five players'"
                )
        activity, setting = self._activity_and_setting(rest)
        return ParsedScene(found.value, noun, scene, activity, setting)

    def _parse_uncounted(self, tokens: list[str], *, original: str) -> ParsedScene:
        """No count word: 'a nurse in a hospital' is one nurse; 'nurses' or 'a team of players' is an error."""
        if tokens and tokens[0] in ("a", "an", "one"):
            np, rest = self._noun_phrase(tokens[1:])
            if "of" in np[1:] and np[np.index("of", 1) - 1] in MEMBER_OF:
                np = np[: np.index("of", 1)]
                raise PlanError(
                    f"no count in {original!r}: how many in the {' '.join(np)}? e.g. 'a {' '.join(np)} of five ...'"
                )
            if np:
                activity, setting = self._activity_and_setting(rest)
                return ParsedScene(1, " ".join(np), None, activity, setting)
        raise PlanError(
            f"no countable entity in {original!r}; say how many of what, e.g. 'three nurses in a "
            f"hospital' or 'a team of five players'"
        )

    @staticmethod
    def _scene_before(pre: list[str]) -> str | None:
        """The collective in 'a female basketball team of' (the tokens before the count), or None."""
        while pre and pre[-1] in (",", "about", "around", "roughly", "exactly", "some", "just", "only", "the"):
            pre = pre[:-1]
        for connector in _CONNECTORS:
            if len(pre) > len(connector) and tuple(pre[-len(connector) :]) == connector:
                group = pre[: -len(connector)]
                break
        else:
            return None
        while group and group[0] in ("a", "an", "the", "one", "this", "that", "our", "my", "their", "some"):
            group = group[1:]
        if not group or group[-1] in _MEDIA or group[-1] in SETTING_PREPS:
            return None
        return " ".join(group)

    @staticmethod
    def _noun_phrase(tokens: list[str]) -> tuple[list[str], list[str]]:
        """Split ``tokens`` into the leading noun phrase and the rest (activity/setting)."""
        np: list[str] = []
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            after = tokens[i + 1] if i + 1 < len(tokens) else ""
            if tok in _NP_STOP or (np and _is_ing_verb(tok, after, np[-1])):
                break
            np.append(tok)
            i += 1
        if i < len(tokens) and tokens[i] == "and":
            # "three nurses and a doctor in a hospital": plan the nurses, keep the setting.
            j = i + 1
            while (
                j < len(tokens)
                and tokens[j] not in SETTING_PREPS
                and tokens[j] != ","
                and not (
                    j > i + 1 and _is_ing_verb(tokens[j], tokens[j + 1] if j + 1 < len(tokens) else "", tokens[j - 1])
                )
            ):
                j += 1
            log.warning("only the first group of entities is planned; ignoring %r", " ".join(tokens[i:j]))
            return np, tokens[j:]
        return np, tokens[i:]

    @staticmethod
    def _singular_np(np: list[str]) -> str:
        if "of" in np[1:]:  # "cups of coffee": the head is before "of"
            k = np.index("of", 1)
            return " ".join(np[: k - 1] + [singularize(np[k - 1])] + np[k:])
        return " ".join(np[:-1] + [singularize(np[-1])])

    @staticmethod
    def _activity_and_setting(rest: list[str]) -> tuple[str | None, str | None]:
        while rest and rest[0] == ",":
            rest = rest[1:]
        rest = _strip_prefix(rest, _RELATIVE)
        split = next((i for i, t in enumerate(rest) if t in SETTING_PREPS), None)
        if split is None:
            return _join(rest), None
        activity, setting = rest[:split], rest[split:]
        # "on a city street eating lunch": an activity after the setting, with no comma. Not "in a hospital
        # waiting room" (an -ing word that starts a compound noun) and not the setting's own first words.
        if not activity and "," not in setting:
            for i in range(3, len(setting)):
                after = setting[i + 1] if i + 1 < len(setting) else ""
                if after not in _COMPOUND_HEADS and _is_ing_verb(setting[i], after, setting[i - 1]):
                    activity, setting = setting[i:], setting[:i]
                    break
        # "in a hospital, smiling": an activity after the setting, set off by a comma
        if "," in setting:
            cut = setting.index(",")
            after = _strip_prefix(setting[cut + 1 :], _RELATIVE)
            if (
                after
                and (_is_ing_verb(after[0], after[1] if len(after) > 1 else "") or after[0] == "with")
                and not activity
            ):
                activity, setting = after, setting[:cut]
        return _join(_strip_prefix(activity, _RELATIVE)), _join(setting)


#: Vague quantifiers a caller's count replaces ("several nurses" with count=5 -> "5 nurses").
_VAGUE = ("several", "some", "many", "multiple", "various", "numerous", "few", "a few", "a number of", "lots of",
          "a lot of", "plenty of")


def _with_count(tokens: list[str], count: int) -> list[str]:
    """``tokens`` with ``count`` written in where a count belongs: after "COLLECTIVE of" ("a team of | players"),
    else before the noun phrase, replacing a vague quantifier ("several") if there is one."""
    for j, tok in enumerate(tokens):
        if tok == "of" and j >= 1 and tokens[j - 1] in MEMBER_OF:
            return tokens[: j + 1] + [str(count)] + tokens[j + 1 :]
    rest = list(tokens)
    for vague in sorted(_VAGUE, key=len, reverse=True):
        words = vague.split()
        if rest[: len(words)] == words:
            rest = rest[len(words) :]
            break
    return [str(count)] + rest


@functools.lru_cache(maxsize=1024)
def _parse_cached(parser: RuleParser, text: str, count_hint: int | None = None) -> ParsedScene:
    # The rule parser is a pure function of the text and ParsedScene is immutable, so repeated texts (many
    # seeds of one request) are parsed once.
    return parser._parse(text, count_hint)


#: Named parser factories. Another engineer's learned parser registers itself here (e.g. ``PARSERS["llm"] =
#: lambda: LoraParser(...)``), and ``deltaw plan`` uses it unless ``--no-llm`` is given.
PARSERS: dict[str, Callable[[], Parser]] = {"rules": RuleParser}


def get_parser(use_llm: bool = True) -> Parser:
    """The learned parser if one is registered and ``use_llm``; otherwise the rule parser."""
    if use_llm and "llm" in PARSERS:
        return PARSERS["llm"]()
    if use_llm:
        log.debug("no learned parser registered; using the rule parser")
    return RuleParser()
