"""The one adapter configuration, validated on construction.

Every default carries the reason it was chosen. Field names follow the LoRA paper (Hu et al. 2021) and map
one-to-one onto PEFT's ``adapter_config.json`` (see ``deltaw.io.peft``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

INITS = ("kaiming", "gaussian")
# Presets resolved against the model's modules at attach time.
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    ``target_modules``: a list of names or dotted suffixes (a module matches when its full name equals an entry
    or ends with ``"." + entry``), a regex string matched with ``re.fullmatch`` against the full name, or
    ``"all-linear"`` (every Linear / Conv1D except the output head) -- the same rules PEFT applies.
    """

    r: int = 8  # §7.2: r = 4-8 already matches full fine-tuning on GPT-3; 8 is the ecosystem default.
    alpha: float = 16.0  # scaling = alpha / r = 2 keeps updates comparable when r changes (§4.1).
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")  # §7.1: W_q and W_v are the best pair.
    exclude_modules: tuple[str, ...] | str = ()  # nothing excluded unless asked.
    dropout: float = 0.0  # off: at small r dropout mostly slows convergence; set 0.05-0.1 for tiny data.
    rank_pattern: Mapping[str, int] = field(default_factory=dict)  # per-module rank overrides (regex keys).
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)  # per-module alpha overrides.
    use_rslora: bool = False  # alpha / sqrt(r) (Kalajdzievski 2023) only when asked: PEFT's default is alpha / r.
    init: Literal["kaiming", "gaussian"] = "kaiming"  # §4.1: A random, B zero, so ΔW = 0 at the start.
    # Extra modules trained in full and saved with the adapter (a new head); names or dotted suffixes, as above.
    # One string is one name (not a regex: PEFT matches modules_to_save by name only).
    modules_to_save: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                value = tuple(sorted(value, key=str)) if isinstance(value, (set, frozenset)) else tuple(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, (str, tuple)) or isinstance(value, tuple) and not all(
                    isinstance(v, str) for v in value):
                raise ValueError(f"LoraConfig.{name} must be a list of module names or a string, got {value!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ValueError(f"LoraConfig.{name} must be a mapping of module-name regexes, got {value!r}")
            object.__setattr__(self, name, dict(value))
        _check_rank("r", self.r)
        if not (_is_number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoraConfig.alpha must be a finite positive number, got {self.alpha!r}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty: name the modules to adapt, or use 'all-linear'")
        for key, value in self.rank_pattern.items():
            _check_regex("rank_pattern", key)
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_regex("alpha_pattern", key)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"LoraConfig.alpha_pattern[{key!r}] must be a finite positive number, got {value!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != ALL_LINEAR:
                _check_regex(name, value)

    def rank_for(self, module_name: str) -> int:
        """Rank of one module after ``rank_pattern`` (first matching key in dict order wins, as in PEFT)."""
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(pattern: Mapping, module_name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _is_number(value: object) -> bool:
    """int or float but not bool: ``alpha=True`` is a mistake, not 1.0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rank(what: str, r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoraConfig.{what} must be a positive integer, got {r!r}")


def _check_regex(what: str, pattern: str) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"LoraConfig.{what}: keys must be regex strings, got {pattern!r}")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"LoraConfig.{what}: {pattern!r} is not a valid regex ({exc})") from None
