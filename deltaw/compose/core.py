"""``compose``: combine resident adapters into a new one; ``compose_dirs``: the same from PEFT directories.

Both front ends gather, per module, the terms (A, B, wᵢ·sᵢ) in B·A matrix space (see ``methods``), run one
method, and store the result as an ordinary LoRA adapter whose scaling is exactly 1 (alpha = r per module;
``rank_pattern`` / ``alpha_pattern`` where module ranks differ). The user weights and every source's own scaling
(alpha/r, rsLoRA's alpha/√r, per-module patterns) are folded into B, so sources with different ranks, alphas or
scaling rules combine correctly, and a module an adapter does not touch simply contributes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .. import api
from ..config import LoraConfig
from ..errors import AdapterFormatError, AdapterNameError, BaseModelMismatchError
from ..io import fingerprints as fp
from ..io.peft import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterFile, read_adapter
from ..registry import check_name
from .methods import METHODS, ModuleResult, Term, compose_module, one_cpu_thread, work_dtype

log = logging.getLogger(__name__)

# Yadav et al. 2023 keep the top 20 % of each task vector (k = 20) in their main results.
DEFAULT_DENSITY = 0.2
# Yu et al. 2023 drop up to 90 % of 7B+ SFT deltas harmlessly; small models and LoRA deltas tolerate less, so the
# default is the conservative midpoint 0.5 (also PEFT's example value).
DEFAULT_DROP_RATE = 0.5


@dataclass
class ModuleReport:
    """Per module: stored rank, how many sources touch it, and the errors defined in ``methods.ModuleResult``."""

    rank: int
    sources: int
    rel_error: float
    energy_kept: float
    deviation: float


@dataclass
class ComposeReport:
    """What ``compose`` built: the new adapter's name, method, weights, config and per-module errors."""

    name: str
    method: str
    weights: dict[str, float]
    config: LoraConfig
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    settings: dict[str, float | int | None] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules.values()), default=0.0)

    @property
    def mean_rel_error(self) -> float:
        return _mean([m.rel_error for m in self.modules.values()])

    @property
    def mean_energy_kept(self) -> float:
        return _mean([m.energy_kept for m in self.modules.values()])

    @property
    def mean_deviation(self) -> float:
        return _mean([m.deviation for m in self.modules.values()])

    def to_dict(self) -> dict:
        return {
            "name": self.name, "method": self.method, "weights": self.weights, "settings": self.settings,
            "r": self.config.r, "rank_pattern": dict(self.config.rank_pattern),
            "out_dir": str(self.out_dir) if self.out_dir else None,
            "mean_rel_error": self.mean_rel_error, "max_rel_error": self.max_rel_error,
            "mean_energy_kept": self.mean_energy_kept, "mean_deviation": self.mean_deviation,
            "modules": {p: asdict(m) for p, m in self.modules.items()},
        }

    def summary(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        return (f"{self.name}: {self.method} of {self.weights} over {len(self.modules)} modules, rank "
                f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}; factorisation error mean "
                f"{self.mean_rel_error:.3g} / max {self.max_rel_error:.3g}, energy kept {self.mean_energy_kept:.4f}, "
                f"distance from the exact sum {self.mean_deviation:.3g}")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---- shared core ---------------------------------------------------------------------------------------
def _check_args(method: str, density: float, drop_rate: float, rank: int | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown compose method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")


def _combine(terms: dict[str, list[Term]], max_ranks: dict[str, int], method: str, *, rank: int | None,
             density: float, drop_rate: float, seed: int) -> dict[str, ModuleResult]:
    """Run the method on every module (sorted order, so a seeded run is reproducible)."""
    results: dict[str, ModuleResult] = {}
    on_cpu = all(t.a.device.type == "cpu" for ts in terms.values() for t in ts)
    with one_cpu_thread(on_cpu):
        for path in sorted(terms):
            results[path] = compose_module(terms[path], method, rank=rank, max_rank=max_ranks[path], module=path,
                                           density=density, drop_rate=drop_rate, seed=seed)
    return results


def _config_for(results: dict[str, ModuleResult], paths: Sequence[str]) -> LoraConfig:
    """Scaling 1 everywhere: alpha = r = the most common rank, patterns for the rest. Pattern keys match as
    ``(.*\\.)?(key)$`` (PEFT's rule, and ``LoraConfig.rank_for``'s), i.e. by dotted suffix: an escaped path
    "fc" would also set "sub.fc". Anchored with ``^``, a key matches its own path only, under both rules (as
    ``io.peft`` writes them)."""
    ranks = {p: results[p].rank for p in paths}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {"^" + re.escape(p): k for p, k in ranks.items() if k != r}
    return LoraConfig(r=r, alpha=float(r), target_modules=tuple(sorted(paths)), dropout=0.0, rank_pattern=pattern,
                      alpha_pattern={key: float(k) for key, k in pattern.items()}, use_rslora=False)


def _reports(results: dict[str, ModuleResult], terms: dict[str, list[Term]]) -> dict[str, ModuleReport]:
    return {p: ModuleReport(rank=res.rank, sources=len(terms[p]), rel_error=res.rel_error,
                            energy_kept=res.energy_kept, deviation=res.deviation) for p, res in results.items()}


def _weights(weights: Mapping[str, float]) -> dict[str, float]:
    out = {str(k): float(v) for k, v in weights.items()}
    if not out:
        raise ValueError("nothing to compose: give at least one adapter with a weight")
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"weights must be finite numbers; got {[(k, out[k]) for k in bad]}")
    return out


# ---- in-model ------------------------------------------------------------------------------------------
def compose(model: nn.Module, weights: Mapping[str, float], method: str = "linear", name: str = "combo", *,
            rank: int | None = None, density: float = DEFAULT_DENSITY, drop_rate: float = DEFAULT_DROP_RATE,
            seed: int = 0, activate: bool = False) -> ComposeReport:
    """Add adapter ``name`` = the ``method`` combination of resident adapters ``weights`` ({adapter: weight}).

    ``linear`` equals live stacking ``deltaw.activate(model, weights)`` exactly; ``svd`` is its best rank-``rank``
    approximation (default: the largest source rank); ``ties`` / ``dare`` follow Yadav et al. 2023 / Yu et al.
    2023 (``density`` kept per task / ``drop_rate`` dropped, seeded by ``seed``) and are re-factored at ``rank``
    (default Σ rᵢ). Negative weights subtract (task negation, Ilharco et al. 2023). The model is changed only by
    the attach at the very end; the activation is unchanged unless ``activate``.
    """
    _check_args(method, density, drop_rate, rank)
    weights = _weights(weights)
    check_name(name)
    st = api.state(model)
    if name in st.adapters:
        raise AdapterNameError(f"an adapter named {name!r} already exists; delete it first or pick another name")
    infos = {n: st.require(n) for n in weights}
    for n, info in infos.items():
        if info.config.modules_to_save:
            log.warning("adapter %r has modules_to_save %s: they are not combined (only LoRA factors are)",
                        n, list(info.config.modules_to_save))
    terms: dict[str, list[Term]] = {}
    max_ranks: dict[str, int] = {}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    with torch.no_grad():
        for n, w in weights.items():
            if w == 0.0:
                log.info("adapter %r has weight 0: left out", n)
                continue
            for path in infos[n].modules:
                layer = st.layers[path]
                a, b = layer.adapter_parameters(n)
                dtype = work_dtype(a.device)
                coef = w * layer.scaling[n]
                terms.setdefault(path, []).append(
                    Term(a.detach().to(dtype).flatten(1), b.detach().to(dtype).flatten(1), coef, n))
                max_ranks[path] = layer.max_rank()
                shapes[path] = (tuple(a.shape[1:]), tuple(b.shape[2:]))
        if not terms:
            raise ValueError(f"nothing to compose: every weight in {weights} is 0")
        results = _combine(terms, max_ranks, method, rank=rank, density=density, drop_rate=drop_rate, seed=seed)
    config = _config_for(results, list(results))
    # Onto exactly these modules: the paths as target_modules would also pull in modules they are suffixes of.
    targets = [(path, st.layers[path].base_layer) for path in results]
    info = api._attach_to(model, config, name, targets, trainable=False, activate=False, factors=None)
    try:
        with torch.no_grad():
            for path, res in results.items():
                a, b = st.layers[path].adapter_parameters(name)
                a.copy_(res.a.reshape(a.shape))
                b.copy_(res.b.reshape(b.shape))
    except BaseException:
        api.delete(model, name)
        raise
    settings = _settings(method, rank, density, drop_rate, seed)
    info.metadata.update({"composed_from": weights, "compose_method": method, "compose_settings": settings})
    if activate:
        api.activate(model, name)
    report = ComposeReport(name, method, weights, config, _reports(results, terms), settings)
    log.info("%s", report.summary())
    return report


def _settings(method: str, rank: int | None, density: float, drop_rate: float, seed: int) -> dict:
    out: dict[str, float | int | None] = {"rank": rank}
    if method == "ties":
        out["density"] = density
    if method == "dare":
        out.update(drop_rate=drop_rate, seed=seed)
    return out


# ---- file level ----------------------------------------------------------------------------------------
def _source_name(i: int, adapter: AdapterFile) -> str:
    return adapter.deltaw_meta.get("adapter_name") or f"{i}:{adapter.directory.name}"


def _merged_fingerprint(adapters: list[AdapterFile], allow_base_mismatch: bool) -> dict | None:
    """The union of the sources' base fingerprints, after checking they describe the same base model."""
    prints = [(a.directory, a.deltaw_meta.get("fingerprint")) for a in adapters]
    prints = [(d, p) for d, p in prints if p]
    if not prints:
        return None
    first_dir, first = prints[0]
    for d, p in prints[1:]:
        common = sorted(set(p.get("samples", {})) & set(first.get("samples", {})))
        why = fp.compare(_restrict(first, common), _restrict(p, common)) if common else None
        if why is not None:
            if not allow_base_mismatch:
                raise BaseModelMismatchError(f"{first_dir} and {d} were trained on different base models: {why}. "
                                             "Pass allow_base_mismatch=True (CLI: --allow-base-mismatch) to compose "
                                             "them anyway")
            log.warning("composing adapters from different base models: %s", why)
    shapes: dict = {}
    samples: dict = {}
    for _, p in prints:
        shapes.update(p.get("shapes", {}))
        samples.update(p.get("samples", {}))
    if not samples:
        return {"shapes": shapes, "sha256": None, "samples": {}}
    # fingerprint() of the stored samples re-derives the hash the union would have (same bytes, same order).
    merged = fp.fingerprint({k: torch.tensor(v, dtype=torch.float32) for k, v in samples.items()})
    merged["shapes"] = shapes
    return merged


def _restrict(print_: dict, modules: list[str]) -> dict:
    sub = fp.fingerprint({k: torch.tensor(print_["samples"][k], dtype=torch.float32) for k in modules})
    sub["shapes"] = {k: print_["shapes"][k] for k in modules if k in print_.get("shapes", {})}
    return sub


def compose_dirs(sources: Mapping[str | os.PathLike, float] | Sequence[tuple[str | os.PathLike, float]],
                 out_dir: str | os.PathLike, method: str = "linear", *, rank: int | None = None,
                 density: float = DEFAULT_DENSITY, drop_rate: float = DEFAULT_DROP_RATE, seed: int = 0,
                 name: str = "combo", allow_base_mismatch: bool = False) -> ComposeReport:
    """``compose`` without a model: read PEFT directories, write the combined adapter as a PEFT directory.

    Layer types come from the files: embedding factors are stored as ``lora_embedding_A/B`` (r, num) / (dim, r);
    conv factors carry the kernel in A; Conv1D ΔW's transposition is irrelevant in B·A space. The result is the
    same adapter ``compose`` would build on a model holding the sources (tested).
    """
    _check_args(method, density, drop_rate, rank)
    check_name(name)
    items = list(sources.items()) if isinstance(sources, Mapping) else [(s, w) for s, w in sources]
    if not items:
        raise ValueError("nothing to compose: give at least one adapter directory with a weight")
    adapters = [read_adapter(path) for path, _ in items]
    names = [_source_name(i, a) for i, a in enumerate(adapters)]
    if len(set(names)) != len(names):  # the same adapter twice (or two with one name): keep them apart
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    weights = _weights({n: w for n, (_, w) in zip(names, items)})
    fingerprint = _merged_fingerprint(adapters, allow_base_mismatch)

    terms: dict[str, list[Term]] = {}
    max_ranks: dict[str, int] = {}
    layout: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], torch.dtype]] = {}  # kind, A tail, B tail, dtype
    for n, adapter in zip(names, adapters):
        if adapter.saved:
            log.warning("%s has modules_to_save %s: they are not combined (only LoRA factors are)",
                        adapter.directory, sorted(adapter.saved))
        w = weights[n]
        for path, entry in sorted(adapter.factors.items()):
            a, b = entry["A"], entry["B"]
            this = (entry["kind"], tuple(a.shape[1:]), tuple(b.shape[2:]))
            seen = layout.get(path)
            if seen is not None and (seen[:3] != this or terms[path][0].b.shape[0] != b.shape[0]):
                raise AdapterFormatError(f"module {path!r}: {adapter.directory} stores {this[0]} factors A "
                                         f"{tuple(a.shape)} / B {tuple(b.shape)}, which do not fit the other sources "
                                         f"(A (r, *{seen[1]}), B ({terms[path][0].b.shape[0]}, r, *{seen[2]}))")
            if seen is None:
                layout[path] = (*this, a.dtype)
            if w == 0.0:
                continue
            coef = w * adapter.config.scaling_for(path)
            terms.setdefault(path, []).append(
                Term(a.to(torch.float64).flatten(1), b.to(torch.float64).flatten(1), coef, n))
            max_ranks[path] = min(b.shape[0], a[0].numel())
    if not terms:
        raise ValueError(f"nothing to compose: every weight in {weights} is 0")
    with torch.no_grad():
        results = _combine(terms, max_ranks, method, rank=rank, density=density, drop_rate=drop_rate, seed=seed)
    config = _config_for(results, list(results))

    tensors: dict[str, torch.Tensor] = {}
    for path, res in results.items():
        kind, a_tail, b_tail, dtype = layout[path]
        dtype = dtype if dtype.is_floating_point else torch.float32
        a = res.a.reshape(res.rank, *a_tail).to(dtype).contiguous()
        b = res.b.reshape(res.b.shape[0], res.rank, *b_tail).to(dtype).contiguous()
        if kind == "embedding":
            tensors[f"{PREFIX}{path}.lora_embedding_A"], tensors[f"{PREFIX}{path}.lora_embedding_B"] = a, b
        else:
            tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"] = a, b
    settings = _settings(method, rank, density, drop_rate, seed)
    peft = _peft_config(config, adapters)
    sources_meta = [{"dir": str(a.directory), "weight": float(w)} for a, (_, w) in zip(adapters, items)]
    meta = {"format": "pt", "deltaw": json.dumps({
        "version": _version(), "adapter_name": name, "fingerprint": fingerprint,
        "metadata": {"composed_from": sources_meta, "compose_method": method, "compose_settings": settings}})}
    out = _write(Path(out_dir), tensors, meta, peft)
    report = ComposeReport(name, method, weights, config, _reports(results, terms), settings, out)
    log.info("%s -> %s", report.summary(), out)
    return report


def _version() -> str:
    from .. import __version__
    return __version__


def _suffix_closed(peft: dict) -> bool:
    """Whether a source file's targeting takes every module whose path ends with "." + a targeted path (PEFT's
    rule for a plain list, with nothing excluded): then a module the union of the sources leaves out ends with
    none of the union's paths, and the union as a plain list selects exactly those paths."""
    return (isinstance(peft.get("target_modules"), list) and not peft.get("exclude_modules")
            and not peft.get("layers_to_transform") and not peft.get("modules_to_save"))


def _peft_config(config: LoraConfig, adapters: list[AdapterFile]) -> dict:
    """Every module listed explicitly (as ``deltaw.save`` does) so any PEFT version resolves the same set.

    A listed name also selects modules whose path ends with "." + it, and with no model here to check, the list
    is kept only when every source's targeting was closed under that rule (``_suffix_closed``); otherwise the
    paths become an exact regex (``re.fullmatch`` under both PEFT's rule and deltaw's), as ``deltaw.save``
    writes when its model has such a module: sources covering "fc" but not "sub.fc" gave a list ["fc"] that
    targeted "sub.fc" too (deltaw's load refused the file, PEFT adapted sub.fc from its init)."""
    paths = list(config.target_modules)
    exact = all(_suffix_closed(a.peft) for a in adapters)
    targets: list[str] | str = paths if exact else "(?:" + "|".join(re.escape(p) for p in paths) + ")"
    firsts = [a.peft for a in adapters]
    bases = {p.get("base_model_name_or_path") for p in firsts} - {None}
    tasks = {p.get("task_type") for p in firsts} - {None}
    return {
        "peft_type": "LORA",
        "task_type": tasks.pop() if len(tasks) == 1 else None,
        "base_model_name_or_path": bases.pop() if len(bases) == 1 else None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "target_modules": targets,
        "exclude_modules": None,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": any(bool(p.get("fan_in_fan_out")) for p in firsts),
        "modules_to_save": None,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def _write(out: Path, tensors: dict[str, torch.Tensor], meta: dict, config: dict) -> Path:
    """Atomic per file, like ``deltaw.save``: a crash never leaves a half-written file under the final name."""
    out.mkdir(parents=True, exist_ok=True)
    for fname, writer in ((WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata=meta)),
                          (CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{fname}.")
        os.close(fd)
        try:
            writer(tmp)
            os.replace(tmp, out / fname)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


__all__ = ["ComposeReport", "ModuleReport", "compose", "compose_dirs", "DEFAULT_DENSITY", "DEFAULT_DROP_RATE"]
