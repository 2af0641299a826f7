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
    modules_to_save: tuple[str, ...] = ()  # extra modules trained in full and saved with the adapter (a new head).

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        _check_rank("r", self.r)
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoraConfig.alpha must be a finite positive number, got {self.alpha!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty: name the modules to adapt, or use 'all-linear'")
        for key, value in self.rank_pattern.items():
            _check_regex("rank_pattern", key)
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_regex("alpha_pattern", key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"alpha_pattern[{key!r}] must be a finite positive number, got {value!r}")
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


def _check_rank(what: str, r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoraConfig.{what} must be a positive integer, got {r!r}")


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"LoraConfig.{what}: {pattern!r} is not a valid regex ({exc})") from None
