"""A fingerprint of the base model an adapter was trained on, so loading onto another base fails loudly.

Shapes catch most mistakes; a base with the same architecture but other weights (another checkpoint, another
random init) is caught by a sample of each targeted weight: an exact hash (same weights, same precision) and the
sampled values themselves, compared by cosine similarity so that the same base in another precision passes.
"""

from __future__ import annotations

import functools
import hashlib
import math
from itertools import chain

import torch

SAMPLES_PER_MODULE = 16
SAME_BASE_COSINE = 0.999  # fp32 vs bf16 copies of one model score > 0.9999; unrelated weights score ~0.


@functools.lru_cache(maxsize=256)
def _indices(n: int, device: torch.device) -> torch.Tensor:
    """Evenly spaced flat positions, computed once per weight size (loading checks ~200 weights of ~7 sizes)."""
    # float64: in float32 the last position of a weight over 2**24 elements rounds past its end.
    return torch.linspace(0, n - 1, steps=min(SAMPLES_PER_MODULE, n), dtype=torch.float64,
                          device=device).round().long()


def _sampled(weights: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor, list[int]]:
    """(paths in order, every path's samples concatenated as fp32 on the CPU, samples per path).

    ``torch.take`` reads the samples without flattening a non-contiguous weight, and one ``cat`` plus one copy
    to the CPU serve all weights: ~1 ms for the 210 weights of a 135M model, so nothing needs caching."""
    paths = sorted(weights)
    taken = [torch.take(weights[p].detach(), _indices(weights[p].numel(), weights[p].device)) for p in paths]
    counts = [t.numel() for t in taken]
    if len({t.device for t in taken}) > 1:  # a model split across devices: gather on the CPU first
        taken = [t.cpu() for t in taken]
    flat = torch.cat(taken).float().cpu() if taken else torch.empty(0)  # (Σ k,)
    return paths, flat, counts


def _digest(paths: list[str], flat: torch.Tensor, counts: list[int]) -> str:
    """sha256 over (path, bf16 bytes of its samples) in path order; one dtype conversion for all modules."""
    raw = flat.to(torch.bfloat16).view(torch.int16).numpy().tobytes()  # precision-stable bytes
    h = hashlib.sha256()
    pos = 0
    for path, n in zip(paths, counts):
        h.update(path.encode())
        h.update(raw[pos:pos + 2 * n])
        pos += 2 * n
    return h.hexdigest()


def fingerprint(weights: dict[str, torch.Tensor]) -> dict:
    """{"shapes": {path: shape}, "sha256": hex | None, "samples": {path: [floats]}} over pristine base weights."""
    shapes = {path: list(w.shape) for path, w in sorted(weights.items())}
    if any(w.device.type == "meta" for w in weights.values()):
        return {"shapes": shapes, "sha256": None, "samples": {}}
    paths, flat, counts = _sampled(weights)
    values = flat.tolist()
    out: dict[str, list[float]] = {}
    pos = 0
    for path, n in zip(paths, counts):
        out[path] = [float(f"{v:.6g}") for v in values[pos:pos + n]]
        pos += n
    return {"shapes": shapes, "sha256": _digest(paths, flat, counts), "samples": out}


def same_base_quick(saved: dict, weights: dict[str, torch.Tensor]) -> bool:
    """True when the shapes agree and the exact hash matches -- the usual case when loading, decided without
    building the sample lists. False means "not proven": run ``compare`` on a full ``fingerprint``."""
    if not saved.get("sha256") or any(w.device.type == "meta" for w in weights.values()):
        return False
    for path, shape in saved.get("shapes", {}).items():
        w = weights.get(path)
        if w is not None and list(w.shape) != list(shape):
            return False
    return _digest(*_sampled(weights)) == saved["sha256"]


def compare(saved: dict, current: dict) -> str | None:
    """None when ``current`` is the same base as ``saved``; else a sentence saying what differs."""
    for path, shape in saved.get("shapes", {}).items():
        now = current["shapes"].get(path)
        if now is not None and list(now) != list(shape):
            return f"module {path!r} has weight shape {tuple(now)}, the adapter's base had {tuple(shape)}"
    if not saved.get("sha256") or not current.get("sha256") or saved["sha256"] == current["sha256"]:
        return None
    a, b = [], []
    for path, values in saved.get("samples", {}).items():
        if path in current["samples"]:
            a.extend(values)
            b.extend(current["samples"][path])
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)) or 1.0
    cosine = dot / norm
    if cosine >= SAME_BASE_COSINE:
        return None
    return f"sampled base weights differ (cosine similarity {cosine:.4f} < {SAME_BASE_COSINE})"


def malformed(saved: object) -> str | None:
    """None when ``saved`` has the structure ``fingerprint`` writes; else what is wrong with it. A fingerprint
    is read from a file header anyone can write, and ``compare`` / ``same_base_quick`` index into it. Checked a
    type set at a time (~0.2 ms for the 3,400 samples of a 135M model), not value by value."""
    if not isinstance(saved, dict):
        return f"the fingerprint is a {type(saved).__name__}, not an object"
    shapes, samples = saved.get("shapes", {}), saved.get("samples", {})
    if not (isinstance(shapes, dict) and set(map(type, shapes.values())) <= {list}
            and set(map(type, chain.from_iterable(shapes.values()))) <= {int}
            and min(chain.from_iterable(shapes.values()), default=0) >= 0):
        return "fingerprint 'shapes' must map module paths to lists of non-negative integers"
    if not isinstance(saved.get("sha256"), (str, type(None))):
        return "fingerprint 'sha256' must be a hex string or null"
    if not (isinstance(samples, dict) and set(map(type, samples.values())) <= {list}
            and set(map(type, chain.from_iterable(samples.values()))) <= {int, float}):
        return "fingerprint 'samples' must map module paths to lists of numbers"
    return None
