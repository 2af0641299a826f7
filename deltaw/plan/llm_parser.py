"""The learned language stage: a LoRA on the embedded SmolLM2 that reads a scene request into a :class:`ParsedScene`.

How it works::

    prompt      "Parse: a jazz band of five at the airport\\nJSON:"
    completion  ' {"count":5,"noun":"musician","scene":"jazz band","setting":"at the airport"}' + eos

The request is normalised first (lower case, single spaces, no final ``.!?``) because the canonical parse is
lower case anyway, so casing carries no information. The completion is compact JSON with the fields in a fixed
order and the ``null`` ones left out (``ParsedScene.from_target`` reads absent fields as ``None``): about 20
tokens instead of 34 for ``to_target()``, so training and decoding cost ~40 % less. Prompt plus completion
stays under 64 tokens for every generated example.

Training (:func:`train_parser_adapter`) runs ``deltaw.train`` (prompt masked out of the loss) on
``ParserTrainSettings.pool`` examples of the grammar's *train* split; the held-out split's templates and
vocabulary are never seen. The adapter is cached (PEFT format) under
``<cache>/adapters/plan-parser-<key>/``, where ``<key>`` hashes the grammar (templates, vocabulary and a sample
of generated pairs), the prompt format and the training settings: a grammar change means a new adapter, never a
stale one. :class:`LlmParser` with no adapter given uses, in order: ``$DELTAW_PLAN_PARSER_ADAPTER``, the
cached adapter, or trains the cached adapter now (logged, once; ~15 min on 2 idle CPU cores, 5.2 s per step).

Snapping. Before any check, code -- not the model -- settles the form of the answer's spans against the
request's own words (:func:`canonical`): the noun's head goes to the singular of the word the text uses
("mechanics" -> "mechanic"); a noun that names a group ("jazz band") becomes the scene and the group's implied
member the noun; a noun absent from the text becomes the collective's member or the text's word it resembles
("grandfather" -> "grandparent"); fields are disjoint spans (no activity inside the scene; "waiting room" after
"in a hospital" belongs to the setting); and a setting the model cut short is widened to its preposition and the
end of its phrase ("waiting room" -> "in a hospital waiting room"). The model decides what the scene holds; the
code decides how it is spelled. ``canonical`` never changes a correct parse (tested on 30,000 grammar examples).

Invalid output. The model's answer is rejected when it holds no JSON object, fails :class:`ParsedScene`'s
validation, or is not *grounded* in the request: the count must be one the text can express (digits, number
words, dozen/pair/trio forms, an article for one), ``scene``, ``activity`` and ``setting`` must occur in the
text, and the noun must too (up to plural/singular), unless it is the implied member of the scene's collective
("a jazz band of five" -> "musician"). A rejected greedy answer is retried with beam search; if no beam is
grounded either, the first answer that is grounded once its unsupported optional fields (scene, activity,
setting) are dropped is taken ("a picture showing six hikers" -> a hallucinated "in a picture" goes). Only then
does the parser fall back to the rule parser with a logged warning
(``fallback=None`` raises :class:`PlanError` instead). Why fall back: the rule parser is exact on every form
the grammar produces, and a hallucinated count ("a beautiful sunset" -> 1 sunset) would silently plan the wrong
scene; with the fallback, text with nothing countable still gets the rule parser's clear error.
``benchmarks/plan_parser.py`` reports accuracy with the fallback disabled, so the number is the learned parser's
own (the model plus the snapping and grounding code; no rule parser), next to the model's unsnapped greedy answer.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from deltaw.plan.errors import PlanError
from deltaw.plan.parsing import (
    _FIELDS,
    MEMBER_OF,
    ParsedScene,
    Parser,
    SETTING_PREPS,
    RuleParser,
    _COMPOUND_HEADS,
    _find_count,
    _NP_STOP,
    pluralize,
    singularize,
)

log = logging.getLogger(__name__)

#: Bump when the prompt or completion format changes (it is part of the adapter cache key).
FORMAT_VERSION = 1
PROMPT_TEMPLATE = "Parse: {text}\nJSON:"
#: Environment variable naming a user adapter directory (PEFT format, trained on SmolLM2 with this format).
ADAPTER_ENV = "DELTAW_PLAN_PARSER_ADAPTER"
ADAPTER_NAME = "plan_parser"
MAX_NEW_TOKENS = 40  # the longest generated completion is 33 tokens with eos
_MEMO_LIMIT = 20_000

#: Sentinel: "use a RuleParser as the fallback" (``None`` means no fallback).
_RULES = object()


# --------------------------------------------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------------------------------------------


def normalize_request(text: str) -> str:
    """Lower case, unified dashes/quotes, single spaces, no final sentence punctuation."""
    text = text.lower()
    text = re.sub(r"[\u2010-\u2015\u2212]", "-", text)
    text = re.sub(r"[\u2018\u2019`]", "'", text)
    return " ".join(text.split()).rstrip(" .!?")


def format_prompt(text: str) -> str:
    """The prompt the parser model sees for a request."""
    return PROMPT_TEMPLATE.format(text=normalize_request(text))


def format_target(parse: ParsedScene) -> str:
    """The completion the parser model is trained to emit: leading space, compact JSON, null fields left out."""
    data = {k: getattr(parse, k) for k in _FIELDS if getattr(parse, k) is not None}
    return " " + json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def training_records(examples: Iterable[Any]) -> list[dict[str, str]]:
    """``{"prompt", "response"}`` records (``deltaw.train``'s prompt/response JSONL schema) for grammar examples."""
    return [{"prompt": format_prompt(e.text), "response": format_target(e.parse)} for e in examples]


# --------------------------------------------------------------------------------------------------------------
# Grounding: is a parse supported by the text it came from?
# --------------------------------------------------------------------------------------------------------------


_PHRASE_ENDS = (",", ";", ":")


def _clauses(text: str) -> list[str]:
    """The request's words, with commas, semicolons and colons kept as tokens (they end a phrase)."""
    return re.sub(r"[.!?\"()]", " ", re.sub(r"([,;:])", r" \1 ", normalize_request(text))).split()


def _words(text: str) -> list[str]:
    return [w for w in _clauses(text) if w not in _PHRASE_ENDS]


def _expressible_counts(words: list[str]) -> set[int]:
    counts = {c.value for i in range(len(words)) if (c := _find_count(words[i:])) is not None}
    if any(w in ("a", "an", "one", "single", "lone") for w in words):
        counts.add(1)
    return counts


def _noun_in_text(noun: str, words: list[str]) -> bool:
    """The noun phrase occurs contiguously (hyphens split), its last word singular or plural."""
    def split(ws: list[str]) -> list[str]:
        return [p for w in ws for p in w.split("-") if p]

    return _noun_head(" ".join(split(noun.split())), split(words)) is not None




def _span(phrase: str | None, words: list[str], avoid: tuple[tuple[int, int] | None, ...] = ()
          ) -> tuple[int, int] | None:
    """Where ``phrase`` occurs in ``words`` as a run of whole words, as [start, end): the first occurrence
    that overlaps none of the ``avoid`` spans, else the first one."""
    want = _words(phrase) if phrase else []
    found = [(i, i + len(want)) for i in range(len(words) - len(want) + 1 if want else 0)
             if words[i : i + len(want)] == want]
    free = [f for f in found if not any(a and f[0] < a[1] and a[0] < f[1] for a in avoid)]
    return (free or found or [None])[0]


def _activity_span(activity: str | None, words: list[str], avoid: tuple[tuple[int, int] | None, ...]
                   ) -> tuple[int, int] | None:
    """The activity's span, preferring an occurrence outside ``avoid`` and not the -ing word of a compound
    noun ("waiting" in "waiting room")."""
    compounds = tuple((i, i + 1) for i in range(len(words) - 1)
                      if words[i].endswith("ing") and words[i + 1] in _COMPOUND_HEADS)
    return _span(activity, words, avoid + compounds)


def _noun_head(noun: str, words: list[str]) -> int | None:
    """The index of the noun's head word in ``words`` (in either number), after its modifiers."""
    *mods, head = noun.split()
    for i in range(len(mods), len(words)):
        t = words[i]
        if words[i - len(mods) : i] == mods and (t in (head, pluralize(head)) or singularize(t) == head):
            return i
    return None


def _noun_span(noun: str, words: list[str]) -> tuple[int, int] | None:
    i = _noun_head(noun, words)
    return None if i is None else (i - len(noun.split()) + 1, i + 1)


def _snap_noun(noun: str, words: list[str]) -> str:
    """The noun with its head word in the singular of the form the text uses ("mechanics" -> "mechanic",
    "elve" -> "elf"): the model copies the text's word, the code decides its number."""
    i = _noun_head(noun, words)
    if i is None or "-" in noun.split()[-1]:
        return noun
    one = singularize(words[i])
    return " ".join([*noun.split()[:-1], one if pluralize(one) == words[i] else words[i]])


def _snap_setting(parse: ParsedScene, words: list[str]) -> str | None:
    """A setting cut short, widened to its whole phrase in the text: back to the preposition that opens it
    ("waiting room" -> "in a hospital waiting room") and on over trailing words no other field holds and no
    preposition or clause word starts ("in a hospital" -> "in a hospital waiting room")."""
    scene = _span(parse.scene, words)
    span, head = _span(parse.setting, words, (scene,)), _noun_head(parse.noun, words)
    if head is None and scene is not None:  # "a platoon of 47 under a bridge": the group stands for the noun
        head = scene[1] - 1
    if span is None or head is None or span[0] <= head:  # only a setting after the noun is widened
        return parse.setting
    activity = _activity_span(parse.activity, words, (scene, span, _noun_span(parse.noun, words)))
    taken = {i for sp in (activity, scene) if sp for i in range(*sp)}
    start, end = span
    if words[start] not in SETTING_PREPS:
        back = next((k for k in range(start - 1, max(start - 4, -1), -1) if words[k] in SETTING_PREPS), None)
        if back is not None and back > head and not taken & set(range(back, start)):
            start = back
    while end < len(words) and end not in taken and words[end] not in _NP_STOP:
        end += 1
    if end < len(words) and end not in taken and words[end] not in _PHRASE_ENDS:  # stopped at a preposition or a
        # clause word, not at a phrase end: keep the model's end
        end = span[1]
    return " ".join(words[start:end])


def _resembling_word(noun: str, words: list[str]) -> str | None:
    """The text's word sharing the longest start (>= 4 letters) with the noun's head, in the singular:
    "grandfather" for a text that says "grandparents" -> "grandparent"."""
    head = noun.split()[-1]

    best = max(words, key=lambda w: len(os.path.commonprefix([head, w])), default="")
    return singularize(best) if len(os.path.commonprefix([head, best])) >= 4 else None


def canonical(parse: ParsedScene, text: str) -> ParsedScene:
    """The model's parse with its spans snapped to the request's words -- form is decided by code, content by
    the model. Fields are disjoint spans of the text, and:

    * the noun's head is the singular of the word the text uses ("mechanics" -> "mechanic");
    * a noun that names a group ("jazz band") is the scene, and the noun is the group's implied member
      (``MEMBER_OF``); so is a noun absent from the text when the scene is a known collective;
    * another noun absent from the text is the text's word it resembles ("grandfather" -> "grandparent");
    * an activity inside the scene's span ("marching" in "marching band") is no activity;
    * an "activity" that is a compound noun continuing the setting ("in a hospital" + "waiting room") is
      part of the setting, and a setting cut short is widened to its whole phrase.
    """
    words = _clauses(text)
    noun, scene, activity, setting = _snap_noun(parse.noun, words), parse.scene, parse.activity, parse.setting
    if noun.split()[-1] in MEMBER_OF and (scene is None or scene == noun):
        scene, noun = noun, MEMBER_OF[noun.split()[-1]]
    group = scene.split()[-1] if scene else None
    if not _noun_in_text(noun, words):
        if group in MEMBER_OF:
            noun = MEMBER_OF[group]
        elif (near := _resembling_word(noun, words)) is not None:
            noun = near
    scn = _span(scene, words)
    sett = _span(setting, words, (scn,))
    act = _activity_span(activity, words, (scn, sett, _noun_span(noun, words)))
    if act and scn and scn[0] <= act[0] and act[1] <= scn[1]:
        activity = None
    elif act and sett and act[0] == sett[1] and words[act[1] - 1] in _COMPOUND_HEADS:
        setting, activity = f"{setting} {activity}", None
    parse = replace(parse, noun=noun, scene=scene, activity=activity, setting=setting)
    return replace(parse, setting=_snap_setting(parse, words)) if setting else parse


def without_unsupported(parse: ParsedScene, text: str) -> ParsedScene:
    """``parse`` less the optional fields (scene, activity, setting) the text does not contain."""
    words = _words(text)
    kept = {f: getattr(parse, f) if _span(getattr(parse, f), words) else None for f in ("scene", "activity", "setting")}
    return replace(parse, **kept)


def ungrounded(parse: ParsedScene, text: str) -> str | None:
    """Why ``parse`` is not supported by ``text``, or ``None`` if it is (see the module docstring)."""
    words = _words(text)
    joined = f" {' '.join(words)} "
    if parse.count not in _expressible_counts(words):
        return f"count {parse.count} is not written in the text"
    for name in ("scene", "activity", "setting"):
        value = getattr(parse, name)
        if value is not None and f" {' '.join(_words(value))} " not in joined:
            return f"{name} {value!r} is not in the text"
    if _noun_in_text(parse.noun, words):
        return None
    if parse.scene and MEMBER_OF.get(parse.scene.split()[-1]) == parse.noun:
        return None
    return f"noun {parse.noun!r} is not in the text"


# --------------------------------------------------------------------------------------------------------------
# Training and the adapter cache
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParserTrainSettings:
    """Everything that decides the parser adapter's weights (all of it goes into the cache key).

    The step budget was measured with ``benchmarks/plan_parser.py --sweep 200`` on the 20-template train split:
    development-set (held-out templates, seed 7, 150 examples) exact match 74.7 % at 60 steps, 84.0 % at 120,
    92.0 % at 160, 90.7 % at 200 while the training loss kept falling, so 160 is the default (~15 min on 2 CPU
    cores). A second sweep that also varied the train templates' lead-ins scored 86-89 % at 160-200 steps: within
    the noise of 150 examples, and not an improvement, so it was not kept. Held-out failures then were mostly new
    vocabulary ("hospital waiting room" read as an activity, "listening to music" cut short), so the train
    vocabulary gained -ing compound settings and activities with "to"/"for" (held-out words untouched): on the
    development set regenerated with it, 90.7 % at 160 steps against 83.3 % for the previous adapter.
    ``schedule="constant"`` with a fixed warm-up and a fixed example pool make a run of N steps identical to the
    first N steps of a longer run, which is how the budget was measured from one run's intermediate adapters.
    """

    steps: int = 160
    batch_size: int = 16
    r: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 10
    pool: int = 4000  # train-split examples generated (data_seed); steps * batch_size <= pool: no repeats
    data_seed: int = 0
    seed: int = 0
    seq_len: int = 64

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "r", "pool", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"ParserTrainSettings.{name} must be a positive integer, not {value!r}")

    def key(self) -> str:
        """12 hex digits over the grammar, the prompt/completion format and these settings."""
        blob = json.dumps(
            {"format": FORMAT_VERSION, "prompt": PROMPT_TEMPLATE, "grammar": grammar_digest(), **asdict(self)},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.cache
def grammar_digest() -> str:
    """A hash of what the grammar generates: its templates, its vocabulary tables and a sample of its pairs."""
    from deltaw.plan import grammar

    tables = {k: v for k, v in vars(grammar).items() if k.isupper() or (k.startswith("_") and isinstance(v, tuple))}
    sample = [e.to_record() for e in grammar.generate_examples(64, seed=0, split="train")]
    blob = repr(sorted((k, repr(v)) for k, v in tables.items())) + json.dumps(sample, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def adapter_cache_dir(
    settings: ParserTrainSettings | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """``<cache>/adapters/plan-parser-<key>``; ``<cache>`` is ``deltaw.models.default_cache_dir()`` by default."""
    from deltaw.models import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "adapters" / f"plan-parser-{(settings or ParserTrainSettings()).key()}"


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _remove_stale_runs(out: Path) -> None:
    """Delete temporary run folders for ``out`` left by processes that no longer exist (killed mid-training)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rpartition("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # exists, owned by someone else
            pass


def train_parser_adapter(
    out_dir: str | os.PathLike[str] | None = None,
    steps: int | None = None,
    *,
    settings: ParserTrainSettings | None = None,
    model: Any = None,
    tokenizer: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callable[[Any], None]] = (),
    progress: bool = False,
    num_threads: int | None = None,
) -> Path:
    """Train the parser LoRA with ``deltaw.train`` and write it (PEFT format) to ``out_dir``.

    ``out_dir`` defaults to :func:`adapter_cache_dir`; ``steps`` overrides ``settings.steps``. ``model`` /
    ``tokenizer`` default to the embedded SmolLM2; a model passed in comes back with the trained adapter attached
    and active (so the caller can wrap it in :class:`LlmParser` without reloading). The run is written to a
    temporary sibling folder and renamed into place, so an interrupted run never leaves a half-written adapter.
    Besides the adapter the folder holds ``train_log.jsonl``, ``train_config.json`` and ``parser.json``
    (settings, key, training time). ``num_threads`` sets torch's CPU threads for the run (on a loaded machine
    one thread is often much faster than two).
    """
    from deltaw.plan.grammar import generate_examples
    from deltaw.train import TrainConfig, train

    settings = settings or ParserTrainSettings()
    if steps is not None:
        settings = replace(settings, steps=steps)
    out = Path(out_dir) if out_dir is not None else adapter_cache_dir(settings, cache_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds files; remove it or choose another directory")
    if model is None:
        from deltaw.models import load_smollm2

        model, tokenizer = load_smollm2()
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_runs(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deltaw-plan-parser-") as data_dir:
        train_path, val_path = Path(data_dir) / "train.jsonl", Path(data_dir) / "val.jsonl"
        pool = generate_examples(settings.pool, seed=settings.data_seed, split="train")
        val = generate_examples(64, seed=settings.data_seed + 1_000_003, split="train")
        for path, examples in ((train_path, pool), (val_path, val)):
            path.write_text("".join(json.dumps(r) + "\n" for r in training_records(examples)), encoding="utf-8")
        config = TrainConfig(
            output_dir=str(tmp), task="causal-lm", data=str(train_path), val_data=str(val_path),
            targets=settings.targets, r=settings.r, alpha=settings.alpha, lr=settings.lr,
            schedule=settings.schedule, warmup_steps=settings.warmup_steps, steps=settings.steps,
            batch_size=settings.batch_size, seq_len=settings.seq_len, seed=settings.seed, progress=progress,
            eval_max_examples=64,
        )  # fmt: skip
        try:
            with _threads(num_threads):
                result = train(config, model=model, tokenizer=tokenizer, callbacks=callbacks)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    seconds = time.perf_counter() - start
    info = {
        "key": settings.key(), "format_version": FORMAT_VERSION, "prompt": PROMPT_TEMPLATE,
        "settings": asdict(settings), "train_seconds": round(seconds, 1),
        "final_train_loss": result.final_train_loss,
        "val_loss": None if result.validation is None else result.validation.loss,
    }  # fmt: skip
    (tmp / "parser.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    try:
        if out.exists():
            out.rmdir()  # empty (checked above); a non-empty one here means another process won the race
        os.replace(tmp, out)
    except OSError:
        if not _is_adapter_dir(out):
            raise
        log.info("another process cached %s first; keeping that one", out)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_parser_adapter(
    settings: ParserTrainSettings | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_missing: bool = True,
) -> Path:
    """The cached parser adapter for ``settings``, trained now if it is missing (and ``train_missing``)."""
    settings = settings or ParserTrainSettings()
    out = adapter_cache_dir(settings, cache_dir)
    if _is_adapter_dir(out):
        return out
    if not train_missing:
        raise PlanError(f"no cached parser adapter at {out}; train it with deltaw.plan.train_parser_adapter()")
    log.info(
        "training the scene-parser adapter on first use (%d steps x %d examples on the grammar's train split; "
        "about %d min on 2 idle CPU cores, more on a busy machine; once) -> %s",
        settings.steps, settings.batch_size, max(1, round(settings.steps * 5.5 / 60)), out,
    )  # fmt: skip
    start = time.perf_counter()

    def _progress(info: Any) -> None:
        if info.step % 20 == 0 or info.step == info.total_steps:
            log.info("parser adapter: step %d/%d, loss %.4f", info.step, info.total_steps, info.loss)

    path = train_parser_adapter(out, settings=settings, model=model, tokenizer=tokenizer, callbacks=[_progress])
    log.info("parser adapter trained in %.0f s and cached at %s", time.perf_counter() - start, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------------------


class LlmParser:
    """A causal LM with the parser adapter active: greedy-decodes the compact JSON parse of each request.

    ``parse(text)`` decodes one request; :meth:`prefetch` decodes many in length-sorted batches and memoises
    the answers, so ``evaluate_parser_report(parser, examples)`` after ``parser.prefetch(texts)`` costs one
    batched pass. Every answer's spans are snapped to the request's words first (``snap``: :func:`canonical`).
    An unusable greedy answer (no JSON, invalid, or not grounded in the request) is retried with beam search
    (``retry_beams``) and the first grounded beam is taken; if none is, the first of those answers that is
    grounded once its unsupported optional fields are dropped. ``fallback`` is the parser used when nothing is
    usable (default: the rule parser, with a warning); ``None`` raises :class:`PlanError` instead.
    """

    name = "llm"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        fallback: Parser | None | object = _RULES,
        max_new_tokens: int = MAX_NEW_TOKENS,
        batch_size: int = 32,
        retry_beams: int = 4,
        snap: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.fallback: Parser | None = RuleParser() if fallback is _RULES else fallback  # type: ignore[assignment]
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._memo: dict[str, str] = {}
        self.adapter_dir: Path | None = None
        self.fallbacks = 0  # how many parses the fallback answered
        # An unusable greedy answer is retried with beam search: the first grounded one of ``retry_beams``
        # beams wins (0: no retry). Still the model's own answer, checked only against the request's text.
        self.retry_beams = retry_beams
        self.retries = 0  # greedy answers that were unusable and retried
        self.rescued = 0  # ... of which a beam gave a usable parse
        # Spans snapped to the request's words (``canonical``), and as a last resort before the fallback the
        # first answer usable without its unsupported optional fields (``without_unsupported``).
        self.snap = snap
        self.relaxed = 0  # parses answered that way

    @classmethod
    def from_adapter(
        cls,
        adapter_dir: str | os.PathLike[str] | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        cache_dir: str | os.PathLike[str] | None = None,
        settings: ParserTrainSettings | None = None,
        train_missing: bool = True,
        merge: bool = True,
        **kwargs: Any,
    ) -> LlmParser:
        """Load the base model (default: embedded SmolLM2) with a parser adapter.

        The adapter is ``adapter_dir``, else ``$DELTAW_PLAN_PARSER_ADAPTER``, else the cached one (trained now
        if missing and ``train_missing``). ``merge`` folds it into the weights for faster decoding.
        """
        import deltaw

        if model is not None and tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        chosen = adapter_dir or os.environ.get(ADAPTER_ENV) or None
        if chosen is None:  # trains (on its own copy of the model) if missing
            chosen = ensure_parser_adapter(settings, cache_dir, train_missing=train_missing)
        elif not _is_adapter_dir(Path(chosen).expanduser()):
            raise PlanError(f"parser adapter {str(chosen)!r} is not a PEFT adapter folder (adapter_config.json + "
                            "adapter_model.safetensors)")
        if model is None:
            from deltaw.models import load_smollm2

            model, tokenizer = load_smollm2()
        deltaw.load(model, Path(chosen).expanduser(), ADAPTER_NAME, activate=True)
        if merge:
            deltaw.merge(model, ADAPTER_NAME)
        parser = cls(model, tokenizer, **kwargs)
        parser.adapter_dir = Path(chosen).expanduser()
        return parser

    # ---- decoding ---------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, texts: Sequence[str], beams: int = 1) -> list[str] | list[list[str]]:
        """The model's raw completions for ``texts`` (greedy, batched, up to ``max_new_tokens``); with
        ``beams`` > 1, the ``beams`` best beam-search completions of each text, best first."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=beams, num_return_sequences=beams,
            pad_token_id=pad, eos_token_id=tok.eos_token_id, bos_token_id=getattr(tok, "bos_token_id", None),
        )  # fmt: skip
        prompts = [tok(format_prompt(t))["input_ids"] for t in texts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        device = self._device()
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding: every row's next token sits at the end
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            generated = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen
            )
            for row, i in enumerate(chunk):
                answers = [tok.decode(generated[row * beams + k, width:], skip_special_tokens=True)
                           for k in range(beams)]  # generate returns each row's beams consecutively
                out[i] = answers[0] if beams == 1 else answers
        return out

    def prefetch(self, texts: Iterable[str]) -> None:
        """Decode ``texts`` in batches and remember the answers for :meth:`parse`."""
        todo = list(dict.fromkeys(t for t in texts if isinstance(t, str) and t.strip() and t not in self._memo))
        if len(self._memo) + len(todo) > _MEMO_LIMIT:
            self._memo.clear()
        for start in range(0, len(todo), 256):
            part = todo[start : start + 256]
            self._memo.update(zip(part, self.generate(part)))

    def completion(self, text: str) -> str:
        """The raw model answer for one request (memoised)."""
        if text not in self._memo:
            self.prefetch([text])
        return self._memo[text]

    # ---- the Parser protocol ----------------------------------------------------------------------------------
    def read(self, text: str, completion: str, relaxed: bool = False) -> ParsedScene:
        """Turn a completion into a grounded parse, or raise :class:`PlanError` saying what is wrong with it.

        With ``snap`` the spans are first snapped to the text (:func:`canonical`); ``relaxed`` also drops the
        optional fields the text does not contain (:func:`without_unsupported`) instead of rejecting the answer.
        """
        parsed = ParsedScene.from_target(completion)
        if self.snap:
            parsed = canonical(parsed, text)
        if relaxed:
            parsed = without_unsupported(parsed, text)
        why = ungrounded(parsed, text)
        if why is not None:
            raise PlanError(f"parser output is not supported by the text: {why}")
        return parsed

    def parse(self, text: str) -> ParsedScene:
        """Greedy answer; else the first usable beam (``retry_beams``); else, with ``snap``, the first answer of
        those that is usable once unsupported optional fields are dropped; else the fallback."""
        if not isinstance(text, str) or not text.strip():
            raise PlanError("scene text is empty; describe the entities, e.g. 'three nurses in a hospital'")
        completion = self.completion(text)
        try:
            return self.read(text, completion)
        except PlanError as exc:
            error = exc
        beams: list[str] = []
        if self.retry_beams >= 2:
            self.retries += 1
            beams = self.generate([text], beams=self.retry_beams)[0]  # type: ignore[assignment]
            if (parsed := self._first_usable(text, beams)) is not None:
                self.rescued += 1
                return parsed
        if self.snap and (parsed := self._first_usable(text, [completion, *beams], relaxed=True)) is not None:
            self.relaxed += 1
            return parsed
        if self.fallback is None:
            raise PlanError(f"learned parser failed on {text!r}: {error}") from None
        log.warning("learned parser gave an unusable answer for %r (%s; output %r); using the %s parser",
                    text, error, completion[:120], self.fallback.name)
        self.fallbacks += 1
        return self.fallback.parse(text)

    def _first_usable(self, text: str, completions: Sequence[str], relaxed: bool = False) -> ParsedScene | None:
        for completion in completions:
            try:
                return self.read(text, completion, relaxed)
            except PlanError:
                continue
        return None


def evaluate_llm_parser(parser: LlmParser, examples: Sequence[Any], **kwargs: Any):
    """:func:`~deltaw.plan.grammar.evaluate_parser_report` after one batched decoding pass over the examples."""
    from deltaw.plan.grammar import evaluate_parser_report

    parser.prefetch(e.text for e in examples)
    return evaluate_parser_report(parser, examples, **kwargs)


@functools.cache
def _default_parser(adapter_dir: str | None, cache_dir: str) -> Parser:
    try:
        return LlmParser.from_adapter(adapter_dir, cache_dir=cache_dir)
    except ModuleNotFoundError as exc:  # the embedded model's wheel (or transformers) is not installed
        log.warning("learned parser unavailable (%s); using the rule parser", exc)
        return RuleParser()


def default_llm_parser() -> Parser:
    """``PARSERS["llm"]``: the embedded SmolLM2 with the cached (or ``$DELTAW_PLAN_PARSER_ADAPTER``) adapter,
    loaded once per process. Falls back to the rule parser only when the embedded model is not installed."""
    from deltaw.models import default_cache_dir

    return _default_parser(os.environ.get(ADAPTER_ENV) or None, str(default_cache_dir()))
