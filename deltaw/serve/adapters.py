"""Adapters on demand: locate them safely under one root, load them into the base model, keep the recently
used ones resident under a byte budget (LRU), pin some, and unload others only when no sequence uses them.

Safety: a request's ``model`` string becomes a directory name, so it is checked three ways before anything is
opened: ``deltaw.registry.check_name`` (no dots, slashes, spaces: no ``..`` and no absolute paths), then the
directory and each file it holds are resolved (symlinks followed) and must lie inside the resolved root.
Loading then goes through ``deltaw.load`` on the resolved directory, which validates everything (keys, shapes,
finiteness, base fingerprint) before it touches the model: a corrupt adapter fails only its own requests.

Threading: every method that mutates the model (``acquire``, ``release``, ``load``, ``unload``) must run on
the scheduler thread, which owns the model; ``snapshot`` and ``locate`` are safe from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

import deltaw
from deltaw.errors import AdapterNameError, DeltawError
from deltaw.io.peft import CONFIG_NAME, WEIGHTS_NAME
from deltaw.registry import check_name

from .errors import APIError, adapter_load_failed, model_not_found
from .metrics import Metrics

log = logging.getLogger(__name__)

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class Resident:
    """One adapter in the model. ``refs``: running sequences using it; ``draining``: unload once refs hit 0."""

    name: str
    nbytes: int
    directory: Path
    pinned: bool = False
    refs: int = 0
    draining: bool = False
    loaded_at: float = field(default_factory=time.time)


class Wait(Exception):
    """The adapter cannot be made resident right now (budget held by running sequences); retry after a step."""


class Draining(Wait):
    """The adapter is being unloaded once its running sequences finish: requests for it wait, others go on."""


class AdapterStore:
    """Resident adapters of one model, an LRU over them under ``budget`` bytes, and on-demand loading."""

    def __init__(self, model: nn.Module, root: Path | None, budget: int, metrics: Metrics,
                 reserved: tuple[str, ...] = ()) -> None:
        self.model = model
        self.root = root.resolve(strict=True) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise NotADirectoryError(f"adapters directory {self.root} is not a directory")
        self.budget = budget
        self.metrics = metrics
        self.reserved = set(reserved)  # names that mean something else (the base model)
        self._lru: OrderedDict[str, Resident] = OrderedDict()  # least recently used first
        self._failed: dict[str, tuple[tuple, APIError]] = {}
        self._sizes: dict[str, tuple[tuple, int]] = {}  # name -> (file signature, bytes once loaded)
        self._lock = threading.Lock()  # guards _lru for readers on other threads
        # Bytes per factor element once loaded: the model's dtype, fp32 under a half-precision base.
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        self._resident_item = max(dtype.itemsize if dtype is not None else 4, 4)
        metrics.adapter_budget.set(budget)

    # ---- lookup (any thread) ---------------------------------------------------------------------------
    def locate(self, name: str) -> Path:
        """The adapter directory for ``name``, or an APIError: invalid name, not found, or escaping the root."""
        try:
            check_name(name)
        except AdapterNameError as exc:
            raise APIError(400, f"invalid model name: {str(exc).removeprefix('unsafe adapter name ')}",
                           param="model", code="invalid_model_name") from None
        if self.root is None:
            raise model_not_found(name, "this server has no adapters directory")
        candidate = self.root / name
        if not candidate.exists() and not candidate.is_symlink():
            raise model_not_found(name)
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling link or a loop
            raise model_not_found(name, "broken link") from None
        self._contained(resolved, name)
        if not resolved.is_dir() or not (resolved / CONFIG_NAME).exists():
            raise model_not_found(name, f"no {CONFIG_NAME} in its directory")
        for fname in (CONFIG_NAME, WEIGHTS_NAME):
            f = resolved / fname
            if f.exists() or f.is_symlink():
                try:
                    self._contained(f.resolve(strict=True), name)
                except (OSError, RuntimeError):
                    raise adapter_load_failed(name, f"{fname} is a broken link") from None
        return resolved

    def _contained(self, path: Path, name: str) -> None:
        assert self.root is not None
        if path != self.root and self.root not in path.parents:
            log.warning("refused adapter %r: it resolves outside the adapters directory", name)
            raise APIError(403, f"adapter {name!r} resolves outside the adapters directory (symlink escape); "
                                "refusing to load it", type="permission_error", param="model",
                           code="adapter_outside_root")

    def available(self) -> list[str]:
        """Adapter names under the root that pass every check of ``locate`` (resident ones included)."""
        names = set(self.resident_names())
        if self.root is not None:
            for child in sorted(self.root.iterdir()):
                if child.name in self.reserved or child.name in names:
                    continue
                try:
                    self.locate(child.name)
                except APIError:
                    continue
                names.add(child.name)
        return sorted(names)

    def resident_names(self) -> list[str]:
        with self._lock:
            return list(self._lru)

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {n: {"bytes": r.nbytes, "pinned": r.pinned, "in_flight": r.refs, "draining": r.draining,
                        "loaded_at": int(r.loaded_at)} for n, r in self._lru.items()}

    def used_bytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._lru.values())

    def is_draining(self, name: str) -> bool:
        with self._lock:
            r = self._lru.get(name)
            return r is not None and r.draining

    # ---- scheduler thread --------------------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """Make ``name`` resident (loading and evicting as needed) and count one more sequence using it.

        Raises ``Wait`` while the budget is held by running sequences (or the adapter is draining), APIError when
        it can never be served (not found, corrupt, larger than the budget)."""
        r = self._lru.get(name)
        if r is not None:
            if r.draining:
                raise Draining(name)
            self.metrics.cache_hits.inc()
        else:
            try:
                r = self._load(name)
            except Wait:
                raise  # retried every step until the budget frees up: not a miss (yet)
            except BaseException:
                self.metrics.cache_misses.inc()
                raise
            self.metrics.cache_misses.inc()
        with self._lock:
            r.refs += 1
            self._lru.move_to_end(name)

    def release(self, name: str) -> None:
        r = self._lru.get(name)
        if r is None:
            return
        with self._lock:
            r.refs -= 1
        if r.refs <= 0 and r.draining:
            self._delete(name, reason="unloaded after its last request finished")
            self.metrics.adapter_unloads.inc()

    def load(self, name: str, pin: bool | None = None) -> Resident:
        """Admin load: make resident (no reference held); ``pin`` True/False pins or unpins it.

        Not a cache miss: the misses count admissions that found their adapter absent, and an operator's
        preload is the opposite. It is counted in ``adapter_loads`` like every load."""
        r = self._lru.get(name)
        if r is None:
            try:
                r = self._load(name, admin=True)
            except Wait:
                raise APIError(503, f"adapter {name!r} does not fit the adapter memory budget until running "
                                    "requests finish; retry shortly", type="server_error",
                               code="adapter_memory_exhausted") from None
        else:
            r.draining = False  # a load cancels a pending unload
        with self._lock:
            if pin is not None:
                r.pinned = pin
            self._lru.move_to_end(name)
        return r

    def unload(self, name: str) -> dict:
        """Unload now if nothing uses it, else after the last running sequence finishes (``draining``)."""
        r = self._lru.get(name)
        if r is None:
            raise model_not_found(name, "it is not loaded")
        with self._lock:
            r.pinned = False
        if r.refs > 0:  # counted in adapter_unloads when it is deleted (a load may still cancel it)
            r.draining = True
            log.info("adapter %r: unloading after %d in-flight sequence(s) finish", name, r.refs)
            return {"id": name, "status": "draining", "in_flight": r.refs}
        self._delete(name, reason="unloaded")
        self.metrics.adapter_unloads.inc()
        return {"id": name, "status": "unloaded", "in_flight": 0}

    # ---- internals ---------------------------------------------------------------------------------------
    def _signature(self, directory: Path) -> tuple:
        sig = []
        for fname in (CONFIG_NAME, WEIGHTS_NAME):
            try:
                st = (directory / fname).stat()
                sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                sig.append(None)
        return tuple(sig)

    def _estimate(self, directory: Path) -> int:
        """Bytes of tensors in the safetensors file, from its header alone (0 if unreadable: load will say why)."""
        import json
        import struct
        try:
            with open(directory / WEIGHTS_NAME, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    return 0
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error):
            return 0
        total = 0
        for key, entry in header.items():
            if key == "__metadata__" or not isinstance(entry, dict):
                continue
            numel = 1
            for d in entry.get("shape", []):
                numel *= int(d)
            # Factors are held in the model's dtype (fp32 under a half-precision base), whatever the file stores.
            total += numel * max(_DTYPE_BYTES.get(entry.get("dtype", "F32"), 4), self._resident_item)
        return total

    def _load(self, name: str, admin: bool = False) -> Resident:
        directory = self.locate(name)
        sig = self._signature(directory)
        failed = self._failed.get(name)
        if failed is not None and failed[0] == sig:
            raise failed[1]  # same files as the failed attempt: fail fast, no re-read
        known = self._sizes.get(name)
        # Once loaded, its real size: a low estimate is not loaded (and unloaded) again on every retry.
        estimate = known[1] if known is not None and known[0] == sig else self._estimate(directory)
        if estimate > self.budget:
            raise APIError(422, f"adapter {name!r} holds {estimate} bytes of tensors, more than the whole adapter "
                                f"memory budget ({self.budget} bytes; --max-adapter-memory)", param="model",
                           code="adapter_too_large")
        self._make_room(estimate, name)
        t0 = time.perf_counter()
        try:
            deltaw.load(self.model, directory, name, activate=False)
        except (DeltawError, OSError, ValueError, KeyError, RuntimeError) as exc:
            error = adapter_load_failed(name, str(exc))
            self._failed[name] = (sig, error)
            self.metrics.adapter_loads.inc(result="error")
            log.warning("adapter %r failed to load: %s", name, exc)
            raise error from None
        self._failed.pop(name, None)
        nbytes = sum(p.numel() * p.element_size() for p in deltaw.adapter_parameters(self.model, name))
        self._sizes[name] = (sig, nbytes)
        r = Resident(name=name, nbytes=nbytes, directory=directory)
        with self._lock:
            self._lru[name] = r
        self.metrics.adapter_loads.inc(result="ok")
        self._update_gauges()
        log.info("adapter %r loaded (%d bytes, %.1f ms)%s", name, nbytes, (time.perf_counter() - t0) * 1e3,
                 " by admin request" if admin else "")
        if self.used_bytes() > self.budget:  # the estimate was low (e.g. unreadable header): settle now
            try:
                self._make_room(0, name)
            except (Wait, APIError):  # no room after all: nothing may stay resident outside the budget
                self._delete(name, reason="over the memory budget once loaded")
                raise
        return r

    def _make_room(self, need: int, loading: str) -> None:
        """Evict least recently used, unpinned, idle adapters until ``need`` more bytes fit the budget.

        The victims are chosen before any is evicted: if evicting every idle adapter would still leave no room
        (running sequences hold the rest), nothing is evicted and the caller waits. Evicting first and finding
        out afterwards threw adapters away for nothing, again on every retry, as running ones became idle."""
        used = self.used_bytes()
        if used + need <= self.budget:
            return
        pinned = sum(r.nbytes for r in self._lru.values() if r.pinned)
        if pinned + need > self.budget:
            raise APIError(503, f"adapter {loading!r} ({need} bytes) does not fit: pinned adapters hold {pinned} of "
                                f"the {self.budget}-byte budget; unpin or unload some", type="server_error",
                           param="model", code="adapter_memory_exhausted")
        victims: list[str] = []
        for name, r in self._lru.items():  # least recently used first
            if used + need <= self.budget:
                break
            if r.pinned or r.refs > 0 or name == loading:
                continue
            victims.append(name)
            used -= r.nbytes
        if used + need > self.budget:
            raise Wait(loading)
        for name in victims:
            self._delete(name, reason="evicted (LRU, memory budget)")
            self.metrics.cache_evictions.inc()

    def _delete(self, name: str, reason: str) -> None:
        deltaw.delete(self.model, name)
        with self._lock:
            self._lru.pop(name, None)
        self._update_gauges()
        log.info("adapter %r %s", name, reason)

    def _update_gauges(self) -> None:
        self.metrics.adapter_memory.set(self.used_bytes())
        self.metrics.adapters_resident.set(len(self._lru))
