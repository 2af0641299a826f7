"""The default debiasing adapters, trained once per (model, probe, settings) and reused from the cache.

Why a cache: ``deltaw audit --out DIR`` with no adapter must have something to audit, and training takes
minutes on a CPU; the second audit should take only the measuring time. Each adapter is cached on its own
under ``<cache>/audit/<probe>-<name>-<key>/`` (PEFT format plus ``debias.json``), where ``key`` hashes
everything that decides the result: a fingerprint of every byte of the base model's weights and of
the tokenizer, the probe fields training
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

CACHE_FORMAT = 2  # 2: full-weight fingerprint and the tokenizer in the key
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


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every base weight's name, shape, dtype and *all* its bytes (pristine W0 when adapters are
    merged; wrappers and adapter factors are ignored, so attaching changes nothing).

    Why every byte: an edited or sparsely fine-tuned checkpoint may differ from its parent in only a few
    values, and a sampled hash would then hand it the parent's stale adapter. Hashing is a few seconds even
    for SmolLM2, nothing next to training.
    """
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
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        if w.device.type == "meta":
            continue
        h.update(tensor_bytes(w))
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (any dtype: bf16 and float8 have no numpy type, so every tensor is viewed as
    uint8), on the CPU, without a copy when it already is contiguous there."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of what decides the token ids training reads: the full serialised fast tokenizer (vocabulary,
    merges, normaliser, special-token post-processing) when there is one, else class, vocabulary, length
    and special tokens. None for no tokenizer.

    Why: the same weights with another tokenizer see other ids for the same prompts, so a cached adapter
    trained through one tokenizer is wrong for the other.
    """
    if tokenizer is None:
        return None
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    try:
        length = len(tokenizer)
    except TypeError:
        length = None
    special = getattr(tokenizer, "special_tokens_map", None)
    h.update(json.dumps({"len": length, "special": special,
                         "bos": getattr(tokenizer, "add_bos_token", None)}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(model: nn.Module, probe: Probe, config: DebiasConfig, fillers: Sequence[str],
              templates: Sequence[str], target: dict[str, float], *, tokenizer: Any = None) -> str:
    # Only what training reads (documentation fields such as "source" may change freely). Not the device: an
    # adapter trained on a GPU serves a CPU audit of the same base (their numbers differ by float rounding).
    used = {"slot": probe.slot, "values": probe.values, "modifiers": probe.modifiers, "neutral": probe.neutral}
    blob = json.dumps({"format": CACHE_FORMAT, "model": model_fingerprint(model),
                       "tokenizer": tokenizer_fingerprint(tokenizer), "probe": used,
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
    key = cache_key(model, probe, config, fillers, templates, dict(probe.target), tokenizer=tokenizer)
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
