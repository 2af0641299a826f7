"""Per-model adapter registry: the single source of truth for which adapters exist, which are active (with
weights), which are merged into the base weights, and whether adapters are disabled.

Every wrapped layer holds a reference to its model's ``AdapterState`` and reads it at forward time. That is why
switching adapters costs one attribute assignment instead of a walk over the module tree.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import LoraConfig
from .errors import AdapterNameError

if TYPE_CHECKING:
    from .layers.base import LoraLayer, ModulesToSave

# A plain identifier, optionally with dashes: safe as a dict key, a file name and a URL segment.
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")

Weighted = tuple[tuple[str, float], ...]


@functools.cache
def _reserved() -> frozenset[str]:
    """Attribute names of the dicts that hold an adapter's tensors (``lora_A`` is a ParameterDict, saved modules
    a ModuleDict): an adapter called ``keys``, ``training`` or ``__dict__`` would shadow one of them."""
    from torch import nn
    return frozenset(n for d in (nn.ParameterDict(), nn.ModuleDict()) for n in dir(d))


def check_name(name: object) -> str:
    """Reject names that could escape a directory, collide with module attributes or break PEFT keys."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise AdapterNameError(
            f"unsafe adapter name {name!r}: use 1-64 characters of letters, digits, '_' or '-', "
            "starting with a letter or '_' (no dots, slashes or spaces)"
        )
    if name in _reserved():
        raise AdapterNameError(f"unsafe adapter name {name!r}: it is an attribute of torch's ParameterDict/"
                               "ModuleDict that hold the adapter's tensors; pick another name")
    if name.startswith("__"):  # any dunder, not only those dir() lists today: Python gives them meaning
        raise AdapterNameError(f"unsafe adapter name {name!r}: names starting with '__' are reserved for Python "
                               "attributes; pick another name")
    return name


@dataclass(frozen=True)
class AdapterInfo:
    """What is known about one resident adapter. ``modules``: the wrapped module paths it adapts."""

    name: str
    config: LoraConfig
    modules: tuple[str, ...]
    metadata: dict[str, Any]


class AdapterState:
    """Shared, model-wide adapter state. Mutated only through the verbs in ``deltaw.api``."""

    def __init__(self) -> None:
        self.adapters: dict[str, AdapterInfo] = {}
        self.layers: dict[str, LoraLayer] = {}  # module path -> wrapped layer
        self.saved_modules: dict[str, ModulesToSave] = {}  # module path -> modules_to_save wrapper
        self._active: Weighted = ()
        self._merged: Weighted = ()
        self._disabled_depth = 0
        self.live: Weighted = ()  # derived: active adapters that are not merged (what forward() adds)
        self.rows: Any = None  # a deltaw.batching plan while a per-row batch is running, else None

    # ---- read-only views -------------------------------------------------------------------------------
    @property
    def active(self) -> Weighted:
        return self._active

    @property
    def merged(self) -> Weighted:
        return self._merged

    @property
    def disabled(self) -> bool:
        return self._disabled_depth > 0

    def require(self, name: str) -> AdapterInfo:
        info = self.adapters.get(name)
        if info is None:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise AdapterNameError(f"unknown adapter {name!r}; resident adapters: {known}")
        return info

    # ---- the only mutators -----------------------------------------------------------------------------
    def set_active(self, weighted: Weighted) -> None:
        for name, _ in weighted:
            self.require(name)
        self._active = weighted
        self._derive()

    def set_merged(self, weighted: Weighted) -> None:
        self._merged = weighted
        self._derive()

    def push_disabled(self, delta: int) -> None:
        self._disabled_depth += delta

    def _derive(self) -> None:
        merged = {name for name, _ in self._merged}
        self.live = tuple((n, w) for n, w in self._active if n not in merged)
