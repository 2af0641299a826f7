"""Attribute functions for the sampled-generation mode: continuation text -> attribute value (or None).

Why a second mode at all: next-token probabilities are exact but only see attributes that are one token
("he", "she"). Attributes spread over several tokens ("the man", "a woman", a name, a dialect) need a
continuation to be generated and judged. The judge is either

* a regex per value (``{"male": "\\bhe\\b", "female": "\\bshe\\b"}``, a JSON string or a .json file):
  the value whose pattern matches *earliest* in the continuation wins (so "he told her" is male: the first
  pronoun is what the sentence says about its subject); no match -> None (not counted), or
* any Python function ``f(text: str) -> str | None`` named ``package.module:function`` or
  ``path/to/file.py:function``; it must return one of the probe's value names or None.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .probe import ProbeError

AttributeFn = Callable[[str], "str | None"]


def regex_scorer(patterns: Mapping[str, str], *, ignore_case: bool = True) -> AttributeFn:
    """Earliest-match-wins scorer over one regex per value (case-insensitive by default)."""
    if not patterns:
        raise ProbeError("the regex attribute map is empty")
    flags = re.IGNORECASE if ignore_case else 0
    try:
        compiled = {value: re.compile(p, flags) for value, p in patterns.items()}
    except re.error as exc:
        raise ProbeError(f"invalid attribute regex: {exc}") from None

    def score(text: str) -> str | None:
        best: tuple[int, str] | None = None
        for value, rx in compiled.items():
            m = rx.search(text)
            if m is not None and (best is None or m.start() < best[0]):
                best = (m.start(), value)
        return best[1] if best else None

    score.__name__ = "regex_scorer"
    return score


def load_function(spec: str) -> AttributeFn:
    """``pkg.module:func`` or ``path/file.py:func`` -> the callable (the file is executed: only use your own)."""
    module_part, sep, func_name = spec.rpartition(":")
    if not sep or not module_part or not func_name:
        raise ProbeError(f"attribute function {spec!r} must look like 'package.module:function' or 'file.py:function'")
    if module_part.endswith(".py"):
        path = Path(module_part).expanduser()
        if not path.is_file():
            raise ProbeError(f"attribute function file {str(path)!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"deltaw_attr_{path.stem}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise ProbeError(f"cannot import {str(path)!r}")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise ProbeError(f"cannot import {module_part!r} for attribute function {spec!r}: {exc}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ProbeError(f"{module_part!r} has no function {func_name!r}")
    return fn


def resolve_scorer(spec: str | Mapping[str, str] | Callable | None, probe_regex: Mapping[str, str],
                   values: Sequence[str]) -> AttributeFn:
    """The attribute function for ``spec``: None -> the probe's own regex map; a mapping or JSON (string or
    .json file) -> regex map; ``module:function`` -> that function; a callable -> itself. The result is
    wrapped so that a value outside ``values`` raises instead of being silently dropped."""
    if spec is None:
        if not probe_regex:
            raise ProbeError("sampled mode needs an attribute function: the probe has no 'regex' map, so pass "
                             "--attribute-fn module:function or --attribute-regex '{\"value\": \"regex\", ...}'")
        fn = regex_scorer(probe_regex)
    elif callable(spec):
        fn = spec
    elif isinstance(spec, Mapping):
        fn = regex_scorer(spec)
    else:
        text = spec.strip()
        if text.startswith("{"):
            fn = regex_scorer(_json_map(text, "--attribute-regex"))
        elif text.endswith(".json") and Path(text).expanduser().is_file():
            fn = regex_scorer(_json_map(Path(text).expanduser().read_text(encoding="utf-8"), text))
        else:
            fn = load_function(text)
    allowed = set(values)

    def checked(text: str) -> str | None:
        value = fn(text)
        if value is not None and value not in allowed:
            raise ProbeError(f"attribute function returned {value!r}; it must return one of {sorted(allowed)} or None")
        return value

    return checked


def _json_map(text: str, where: str) -> dict[str, str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProbeError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ProbeError(f"{where}: expected a JSON object mapping each value to a regex")
    return data
