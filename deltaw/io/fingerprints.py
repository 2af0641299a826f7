"""A fingerprint of the base model an adapter was trained on, so loading onto another base fails loudly.

Shapes catch most mistakes; a base with the same architecture but other weights (another checkpoint, another
random init) is caught by a sample of each targeted weight: an exact hash (same weights, same precision) and the
sampled values themselves, compared by cosine similarity so that the same base in another precision passes.
"""

from __future__ import annotations

import functools
import hashlib
import math
import weakref

import torch

SAMPLES_PER_MODULE = 16
SAME_BASE_COSINE = 0.999  # fp32 vs bf16 copies of one model score > 0.9999; unrelated weights score ~0.


@functools.lru_cache(maxsize=256)
def _indices(n: int, device: torch.device) -> torch.Tensor:
    """Evenly spaced flat positions, computed once per weight size (loading checks ~200 weights of ~7 sizes)."""
    # float64: in float32 the last position of a weight over 2**24 elements rounds past its end.
    return torch.linspace(0, n - 1, steps=min(SAMPLES_PER_MODULE, n), dtype=torch.float64,
                          device=device).round().long()


def _sample(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    return flat[_indices(flat.numel(), flat.device)].float().cpu()  # (k,)


def _sampled(weights: dict[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    paths = sorted(weights)
    return paths, [_sample(weights[p]) for p in paths]


def _digest(paths: list[str], samples: list[torch.Tensor]) -> str:
    """sha256 over (path, bf16 bytes of its samples) in path order; one dtype conversion for all modules."""
    raw = torch.cat(samples).to(torch.bfloat16).view(torch.int16).numpy().tobytes()  # precision-stable bytes
    h = hashlib.sha256()
    pos = 0
    for path, s in zip(paths, samples):
        h.update(path.encode())
        h.update(raw[pos:pos + 2 * s.numel()])
        pos += 2 * s.numel()
    return h.hexdigest()


def fingerprint(weights: dict[str, torch.Tensor]) -> dict:
    """{"shapes": {path: shape}, "sha256": hex | None, "samples": {path: [floats]}} over pristine base weights."""
    shapes = {path: list(w.shape) for path, w in sorted(weights.items())}
    if any(w.device.type == "meta" for w in weights.values()):
        return {"shapes": shapes, "sha256": None, "samples": {}}
    paths, samples = _sampled(weights)
    values = torch.cat(samples).tolist()
    out: dict[str, list[float]] = {}
    pos = 0
    for path, s in zip(paths, samples):
        out[path] = [float(f"{v:.6g}") for v in values[pos:pos + s.numel()]]
        pos += s.numel()
    return {"shapes": shapes, "sha256": _digest(paths, samples), "samples": out}


def same_base_quick(saved: dict, weights: dict[str, torch.Tensor]) -> bool:
    """True when the shapes agree and the exact hash matches -- the usual case when loading, decided without
    building the sample lists. False means "not proven": run ``compare`` on a full ``fingerprint``."""
    if not saved.get("sha256") or any(w.device.type == "meta" for w in weights.values()):
        return False
    for path, shape in saved.get("shapes", {}).items():
        w = weights.get(path)
        if w is not None and list(w.shape) != list(shape):
            return False
    return _cached_digest(weights) == saved["sha256"]


#: paths -> (per weight: a weak reference, its version counter and data pointer; the digest they gave).
_DIGESTS: dict[tuple[str, ...], tuple[list[tuple[weakref.ref, int, int]], str]] = {}


def _cached_digest(weights: dict[str, torch.Tensor]) -> str:
    """``_digest`` of ``weights``, remembered while the very same tensors stay unmodified (same objects, same
    version counters, same data): loading many adapters onto one base hashes its samples once."""
    paths = tuple(sorted(weights))
    try:
        stamp = [(weights[p], weights[p]._version, weights[p].data_ptr()) for p in paths]
    except RuntimeError:  # inference-mode tensors keep no version counter
        return _digest(*_sampled(weights))
    hit = _DIGESTS.get(paths)
    if hit is not None and all(ref() is w and v == ver and ptr == p
                               for (ref, v, ptr), (w, ver, p) in zip(hit[0], stamp)):
        return hit[1]
    digest = _digest(*_sampled(weights))
    if len(_DIGESTS) >= 16:
        _DIGESTS.pop(next(iter(_DIGESTS)))
    _DIGESTS[paths] = ([(weakref.ref(w), v, p) for w, v, p in stamp], digest)
    return digest


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
