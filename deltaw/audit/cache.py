"""The default debiasing adapters, trained once per (model, probe, settings) and reused from the cache.

Why a cache: ``deltaw audit --out DIR`` with no adapter must have something to audit, and training takes
minutes on a CPU; the second audit should take only the measuring time. Each adapter is cached on its own
under ``<cache>/audit/<probe>-<name>-<key>/`` (PEFT format plus ``debias.json``), where ``key`` hashes
everything that decides the result: a fingerprint of the base model's weights, the probe fields training
reads (attribute words, modifiers, neutral texts, slot), the target, the train fillers/templates and every :class:`DebiasConfig` field. Change any of them and a
new adapter is trained; nothing stale is ever reused. Entries are written to a temporary folder and
renamed into place, so an interrupted training leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..io import peft as peft_io
from .debias import DebiasConfig, DebiasResult, train_debias
from .probe import Probe

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
RESULT_NAME = "debias.json"


def default_cache_root() -> Path:
    """``$DELTAW_CACHE`` / ``$XDG_CACHE_HOME/deltaw`` / ``~/.cache/deltaw``, plus ``audit``."""
    try:
        from ..models import default_cache_dir
        return default_cache_dir() / "audit"
    except ImportError:  # the models package is optional for the audit itself
        if os.environ.get("DELTAW_CACHE"):
            return Path(os.environ["DELTAW_CACHE"]).expanduser() / "audit"
        return Path.home() / ".cache" / "deltaw" / "audit"


def model_fingerprint(model: nn.Module, samples: int = 32) -> str:
    """A hash of every base weight's name, shape and ``samples`` evenly spaced values (pristine W0 when
    adapters are merged; wrappers and adapter factors are ignored, so attaching changes nothing)."""
    weights: dict[str, torch.Tensor] = {}
    st = model.__dict__.get("_deltaw_state")
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            weights[name.replace(".base_layer.", ".")] = p
    if st is not None:
        for path, layer in st.layers.items():
            if layer._pristine is not None:
                weights[f"{path}.weight"] = layer._pristine
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name]
        h.update(f"{name}:{tuple(w.shape)}".encode())
        if w.device.type == "meta":
            continue
        flat = w.detach().reshape(-1)
        n = flat.numel()
        k = min(samples, n)
        idx = torch.tensor([round(i * (n - 1) / max(k - 1, 1)) for i in range(k)], dtype=torch.long, device=flat.device)
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(model: nn.Module, probe: Probe, config: DebiasConfig, fillers: Sequence[str],
              templates: Sequence[str], target: dict[str, float]) -> str:
    # Only what training reads (documentation fields such as "source" may change freely).
    used = {"slot": probe.slot, "values": probe.values, "modifiers": probe.modifiers, "neutral": probe.neutral}
    blob = json.dumps({"format": CACHE_FORMAT, "model": model_fingerprint(model), "probe": used,
                       "target": target, "fillers": list(fillers), "templates": list(templates),
                       "config": config.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_debias_adapter(model: nn.Module, tokenizer, probe: Probe, config: DebiasConfig, *, name: str,
                          fillers: Sequence[str] | None = None, cache_root: str | os.PathLike | None = None,
                          retrain: bool = False, evaluate: bool = False) -> tuple[Path, dict[str, Any], bool]:
    """The directory of a debiasing adapter for this model/probe/config, training it if not cached.

    Returns ``(adapter_dir, training summary, was_cached)``. The model comes back without the adapter
    (it is trained on ``model``, saved, and deleted again): load it from the returned directory.
    """
    fillers = list(fillers) if fillers is not None else list(probe.fillers["train"])
    templates = list(probe.templates["train"])
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    key = cache_key(model, probe, config, fillers, templates, dict(probe.target))
    final = root / f"{probe.name}-{name}-{key}"
    if final.is_dir() and not retrain:
        try:
            summary = json.loads((final / RESULT_NAME).read_text())
            peft_io.read_adapter(final)  # validates the files
            log.info("reusing cached debiasing adapter %s", final)
            return final, summary, True
        except Exception as exc:  # a damaged entry is rebuilt, never trusted
            log.warning("cached adapter %s is unreadable (%s); retraining", final, exc)
            shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    log.info("training debiasing adapter %r on %d fillers (cached at %s afterwards)", name, len(fillers), final)
    result: DebiasResult = train_debias(model, tokenizer, probe, config, name=name, fillers=fillers,
                                        templates=templates, evaluate=evaluate)
    summary = result.to_dict() | {"cache_key": key, "fillers": fillers, "templates": templates}
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
    try:
        peft_io.save(model, tmp, name)
        (tmp / RESULT_NAME).write_text(json.dumps(summary, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        api.delete(model, name)
    return final, summary, False
