"""The side-by-side audit: base, base + adapter, adapter removed, adapter merged and reloaded, adapters stacked.

Each row answers one claim of the forum thread behind the project:

* ``adapter``          -- what the LoRA shifts (TV to target), and at what cost (perplexity, neutral KL,
                          controllability).
* ``removed``          -- the fix disappears with the adapter: after ``deltaw.delete`` the model must be the
                          base *bit for bit*. Checked with ``torch.equal`` on the logits of every probe prompt,
                          the stated-value distributions and the neutral-text log-probabilities -- not assumed.
* ``merged_reloaded``  -- a "less biased W" keeps the fix: the adapter is merged, the model saved as a plain
                          transformers folder (``model.safetensors`` + ``config.json``; GGUF-loaded models refuse
                          ``save_pretrained``, hence ``deltaw.train.save_plain_model``), loaded into a *fresh*
                          model object, and measured; its logits are compared with the adapter row's.
* ``stacked``          -- fix upon fix: two or more adapters trained on disjoint filler sets, live together.
                          Each was trained alone against the base, so together they may overshoot; the row
                          shows the shift and the quality cost of the combination.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..io import peft as peft_io
from .cache import cached_debias_adapter
from .debias import DebiasConfig
from .measure import Measurement, attribute_tokens, bbc_perplexity_ids, check_sampling, measure, neutral_kl
from .probe import Probe, Prompt, load_probe
from .scorers import resolve_scorer

log = logging.getLogger(__name__)

ROW_ORDER = ("base", "adapter", "removed", "merged_reloaded", "stacked")
MERGED_ATOL = 1e-3  # max |Δlogit| tolerated between live adapter and merged+reloaded weights (fp32 rounding)
# fp16/bf16 models are checked on the weights instead (``_expected_weights``): rounding the merged weight to an
# 11/8-bit mantissa moves the logits by as much as a gentle adapter does (tiny Llama in bf16: 0.04), so no logit
# tolerance separates a right merge of a weak adapter from a merge that lost it.

Loader = Callable[[str | os.PathLike | None], tuple[nn.Module, Any]]


@dataclass
class AuditConfig:
    """What the audit measures and how much of it (``quick()`` is the CI size)."""

    probe: str | None = None  # shipped probe name or JSON path
    target: dict[str, float] | None = None  # overrides the probe's target
    mode: str = "exact"  # "exact" (next-token probabilities) or "sampled"
    attribute_fn: str | None = None  # sampled mode: module:function, regex JSON map, or None = probe's regex
    n_samples: int = 16
    max_new_tokens: int = 12
    sampled_scope: str = "heldout"  # sampled mode: "heldout" (held-out fillers x templates) or "all" prompts
    seed: int = 0
    control_templates: int = 1  # stated-value prompts use this many templates of each split (x all fillers)
    ppl_per_topic: int = 1  # BBC test articles per topic for held-out perplexity
    ppl_seq_len: int = 128
    n_fillers: int | None = None  # per split; None = all
    n_templates: int | None = None
    n_neutral: int | None = None
    stack: int = 2  # default stacked adapters (trained on disjoint train-filler sets)
    debias: DebiasConfig = field(default_factory=DebiasConfig)
    stack_debias: DebiasConfig | None = None  # for the stacked parts (default: ``debias``)
    keep_merged: bool = False  # keep the merged model folder in the output (hundreds of MB for SmolLM2)
    batch_size: int = 32

    @classmethod
    def quick(cls, **overrides: Any) -> AuditConfig:
        base = cls(n_fillers=6, n_templates=2, n_neutral=4, ppl_seq_len=64,
                   debias=DebiasConfig(steps=12, batch_size=8, control_batch=4, neutral_batch=2),
                   n_samples=4, max_new_tokens=6)
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["debias"] = self.debias.to_dict()
        out["stack_debias"] = self.stack_debias.to_dict() if self.stack_debias else None
        return out


# ---- orchestration ---------------------------------------------------------------------------------------
def _default_loader(path: str | os.PathLike | None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    from ..models import load_causal_lm
    return load_causal_lm(path, device=device, dtype=dtype)


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of the model's first parameter: where its forward runs and in what precision."""
    p = next(model.parameters())
    return p.device, p.dtype


def _reload(loader: Loader | None, path: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The merged folder as a fresh model on ``device`` -- the audited model's -- and, with the default loader,
    in its ``dtype``.

    Why: the merged row is compared with the live adapter row, which only means something for like with like
    (a CPU float32 copy against float16 CUDA rows measures the precision gap, not the merge), and logits on two
    devices cannot be subtracted at all. A caller's ``loader`` (path only) decides the precision itself (a
    mixed-precision or quantised model must not be cast whole); its model is only moved to the device."""
    fresh, _ = loader(path) if loader is not None else _default_loader(path, device, dtype)
    where = _placement(fresh)[0]
    if where != device:
        log.info("moving the reloaded merged model from %s to the audited model's %s", where, device)
        fresh = fresh.to(device)
    return fresh


def _match_buffer_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Cast ``model``'s floating buffers to the dtypes the audited model had under the same names.

    Why: buffers a checkpoint does not hold are recomputed at load time (Llama's rotary ``inv_freq``, in fp32),
    while a model cast with ``.to(torch.bfloat16)`` carries them rounded; the merged row would then measure
    that rounding (tiny Llama in bf16: 0.04 in the logits without any adapter), not the merge."""
    for name, buf in list(model.named_buffers()):
        want = dtypes.get(name)
        if want is not None and want != buf.dtype and buf.is_floating_point() and want.is_floating_point:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._buffers[leaf] = buf.to(want)


def _freeze(model: nn.Module) -> None:
    """Freeze every parameter before measuring, as ``deltaw.attach`` does anyway.

    Why it matters for a bit-exact comparison: with torch 2.13 on CPU, ``F.linear`` on a non-contiguous 3-D
    input (transformers' ``logits_to_keep`` slice) takes a different matmul path when the weight requires
    grad, even under ``no_grad`` -- 1-ulp differences. So base and "adapter removed" are measured with the
    same flags; the weights are what must be (and are) identical.
    """
    for p in model.parameters():
        p.requires_grad_(False)


def _control_prompts(probe: Probe, n_templates: int, fillers: Sequence[str] | None = None) -> list[Prompt]:
    templates = [t for s in ("train", "heldout") for t in probe.templates[s][:n_templates]]
    return probe.control_prompts(fillers, templates=templates)


def _equal_report(a: Measurement, b: Measurement) -> dict[str, Any]:
    """torch.equal on everything both measurements computed from the model's outputs."""
    checks: dict[str, bool] = {}
    if a.logits is not None and b.logits is not None:
        checks["probe_logits"] = _equal(a.logits, b.logits)
    checks["control_p_attr"] = _equal_nan(a.control_p, b.control_p)
    checks["p_attr"] = _equal_nan(a.p_attr, b.p_attr)
    if a.neutral_logprobs is not None and b.neutral_logprobs is not None:
        checks["neutral_logprobs"] = len(a.neutral_logprobs) == len(b.neutral_logprobs) and all(
            _equal(x, y) for x, y in zip(a.neutral_logprobs, b.neutral_logprobs))
    if a.heldout_ppl is not None or b.heldout_ppl is not None:
        checks["heldout_ppl"] = a.heldout_ppl == b.heldout_ppl
    return {"equal": all(checks.values()), "checks": checks}


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal with ``b`` brought to ``a``'s device (a no-op when they share one; torch.equal refuses two
    devices). Bits are compared: a dtype difference is a difference."""
    return a.dtype == b.dtype and torch.equal(a, b.to(a.device))


def _equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, with NaN (sampled mode: no scored sample) equal to NaN at the same place."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _close_report(a: Measurement, b: Measurement) -> dict[str, Any]:
    """Max |Δ| of p_attr (CPU float64 tables) and of the kept logits (``b``'s brought to ``a``'s device), and
    whether the logits agree to ``MERGED_ATOL``."""
    out: dict[str, Any] = {"max_abs_p_attr_diff": float((a.p_attr - b.p_attr).abs().nan_to_num(0.0).max())}
    if a.logits is not None and b.logits is not None:
        diff = float((a.logits - b.logits.to(a.logits.device)).abs().max())
        out |= {"max_abs_logit_diff": diff, "within_tolerance": diff <= MERGED_ATOL, "atol": MERGED_ATOL}
    return out


def _expected_weights(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Per layer carrying adapter ``name`` (unmerged): W0 + s·ΔW computed in float64 and rounded once to W0's
    dtype -- what a merge must produce, up to the last bit of that rounding (the merge sums in fp32)."""
    out = {}
    with torch.no_grad():
        for path, layer in api.state(model).layers.items():
            if name in layer.lora_A:
                w0 = layer.base_weight()
                delta = layer.delta_weight(layer.lora_A[name].double(), layer.lora_B[name].double())
                out[path] = (w0.double() + layer.scaling[name] * delta).to(w0.dtype)
    return out


def _weights_report(model: nn.Module, expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Whether ``model``'s weights at the paths of ``expected`` are those values, to one unit in the last place
    of their dtype (the merge's fp32 sum and the float64 reference may round to neighbours)."""
    worst = 0.0
    for path, want in expected.items():
        got = model.get_submodule(path).weight.detach().to(want.device).double()
        ulp = torch.finfo(want.dtype).eps * want.double().abs() + torch.finfo(want.dtype).tiny
        worst = max(worst, float(((got - want.double()).abs() / ulp).max()))
    return {"weights_within_one_ulp": worst <= 1.0, "max_weight_error_ulps": worst, "layers": len(expected)}


def run_audit(out_dir: str | os.PathLike, *, config: AuditConfig | None = None,
              model: nn.Module | None = None, tokenizer: Any = None, model_path: str | None = None,
              adapter: str | os.PathLike | None = None, stack: Sequence[str | os.PathLike] = (),
              train_stack: bool | None = None, cache_root: str | os.PathLike | None = None,
              loader: Loader | None = None, plot: bool = True) -> dict[str, Any]:
    """Run the whole audit and write ``report.json``, ``report.md`` and ``skew.png`` into ``out_dir``.

    Args:
        model / tokenizer: the base model to audit (default: ``loader(model_path)``, i.e. the embedded
            SmolLM2). It must carry no adapters; it is modified (adapters attached, finally merged and
            unloaded), so pass a model you do not need afterwards.
        adapter: a PEFT adapter directory; without one the default debiasing adapter is trained (or
            reused from the cache under ``cache_root``).
        stack: adapter directories to stack for the ``stacked`` row. Without them, and when no ``adapter``
            was given (or ``train_stack``), ``config.stack`` default adapters on disjoint train fillers.
        loader: ``path -> (model, tokenizer)``, used to load ``model_path`` and to reload the merged model
            (default ``deltaw.models.load_causal_lm``, onto the audited model's device and dtype). A model it
            returns on another device is moved to the audited model's; its dtype is the loader's choice.
    """
    config = config or AuditConfig()
    if config.mode == "sampled":
        check_sampling(config.n_samples, config.max_new_tokens)  # before minutes of adapter training
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"audit output {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    load_before = _loadavg()
    timings: dict[str, float] = {}

    probe = load_probe(config.probe)
    if config.target is not None:
        probe = probe.with_target(config.target)
    if any(n is not None for n in (config.n_fillers, config.n_templates, config.n_neutral)):
        probe = probe.subset(config.n_fillers, config.n_templates, config.n_neutral)
    if model is None:
        model, tokenizer = (loader or _default_loader)(model_path)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    if api.adapters(model):
        raise ValueError(f"the model already carries adapters {api.adapters(model)}; audit a plain base model")
    _freeze(model)
    device, dtype = _placement(model)  # where the merged model is reloaded (see _reload)
    timings["load"] = time.perf_counter() - t0

    score = resolve_scorer(config.attribute_fn, probe.regex, probe.value_names) if config.mode == "sampled" else None
    tokens = attribute_tokens(tokenizer, probe) if config.mode == "exact" else None
    ppl_ids = bbc_perplexity_ids(tokenizer, per_topic=config.ppl_per_topic, seq_len=config.ppl_seq_len)
    if config.mode == "sampled" and config.sampled_scope == "heldout":
        # Generation costs n_samples x max_new_tokens passes per prompt: by default only the headline cell.
        held = list(probe.fillers["heldout"]) or list(probe.fillers["train"])
        prompts = probe.prompts(held, list(probe.templates["heldout"]) or list(probe.templates["train"]))
        controls = _control_prompts(probe, config.control_templates, fillers=held)
    else:
        prompts = probe.prompts()
        controls = _control_prompts(probe, config.control_templates)

    def run(label: str, m: nn.Module, reference: Measurement | None, keep: bool = True) -> Measurement:
        return measure(m, tokenizer, probe, label=label, mode=config.mode, reference=reference, ppl_ids=ppl_ids,
                       prompts=prompts, controls=controls, score=score, n_samples=config.n_samples,
                       max_new_tokens=config.max_new_tokens, seed=config.seed, batch_size=config.batch_size,
                       keep_logits=keep, tokens=tokens)

    rows: dict[str, Measurement | None] = {}
    notes: list[str] = []
    base = run("base", model, None)
    if base.neutral_logprobs and base.extra.get("neutral_split") == "heldout":
        base.neutral_kl = neutral_kl(base.neutral_logprobs, base.neutral_logprobs)  # 0 by definition
    elif "neutral_kl_note" in base.extra.get("row", {}):
        notes.append(base.extra["row"]["neutral_kl_note"])
    rows["base"] = base

    # The adapters: the user's, or the default ones (trained on this model, or reused from the cache).
    training: dict[str, Any] = {}
    t = time.perf_counter()
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
        adapter_source = str(adapter_dir)
    else:
        adapter_dir, summary, cached = cached_debias_adapter(model, tokenizer, probe, config.debias, name="debias",
                                                             cache_root=cache_root)
        training["debias"] = summary | {"cached": cached}
        adapter_source = f"default debiasing adapter ({'cache' if cached else 'trained now'}): {adapter_dir}"
    stack_dirs = [Path(p).expanduser() for p in stack]
    want_default_stack = not stack_dirs and (adapter is None if train_stack is None else train_stack)
    if want_default_stack and config.stack >= 2:
        part_cfg = config.stack_debias or config.debias
        for i, fillers in enumerate(probe.disjoint_train_sets(config.stack)):
            d, summary, cached = cached_debias_adapter(model, tokenizer, probe, part_cfg, name=f"debias_part{i}",
                                                       fillers=fillers, cache_root=cache_root)
            training[f"debias_part{i}"] = summary | {"cached": cached}
            stack_dirs.append(d)
    timings["adapters"] = time.perf_counter() - t

    # base + adapter
    peft_io.load(model, adapter_dir, "adapter")
    api.activate(model, "adapter")
    rows["adapter"] = run("adapter", model, base)

    # stacked
    if len(stack_dirs) >= 2:
        names = [f"stack{i}" for i in range(len(stack_dirs))]
        for n, d in zip(names, stack_dirs):
            peft_io.load(model, d, n, activate=False)
        api.activate(model, {n: 1.0 for n in names})
        rows["stacked"] = run("stacked", model, base, keep=False)
        rows["stacked"].extra.setdefault("row", {})["adapters"] = [str(d) for d in stack_dirs]
    else:
        rows["stacked"] = None
        notes.append("stacked: skipped (give two or more --stack adapters, or --train-stack for the default ones)")

    # removed: every adapter deleted; must be the base bit for bit
    for n in api.adapters(model):
        api.delete(model, n)
    rows["removed"] = run("removed", model, base)
    removed_check = _equal_report(rows["removed"], base)

    # merged, saved as a plain model, reloaded into a fresh model object
    t = time.perf_counter()
    peft_io.load(model, adapter_dir, "adapter")
    half = dtype in (torch.float16, torch.bfloat16)
    expected = _expected_weights(model, "adapter") if half else None
    from ..train.export import save_plain_model
    plain = api.merge_and_unload(model, "adapter")
    merged_dir = out / "merged_model" if config.keep_merged else Path(tempfile.mkdtemp(prefix="deltaw-audit-merged-"))
    buffer_dtypes = {n: b.dtype for n, b in plain.named_buffers()}
    try:
        save_plain_model(plain, tokenizer, merged_dir, overwrite=True)
        del plain, model
        fresh = _reload(loader, str(merged_dir), device, dtype)
        _match_buffer_dtypes(fresh, buffer_dtypes)
        _freeze(fresh)
        reloaded_device, reloaded_dtype = _placement(fresh)
        timings["merge_save_reload"] = time.perf_counter() - t
        rows["merged_reloaded"] = run("merged_reloaded", fresh, base)
        weights_check = _weights_report(fresh, expected) if expected is not None else None
        rows["merged_reloaded"].extra.setdefault("row", {})["model_dir"] = str(merged_dir) if config.keep_merged else None
        del fresh
    finally:
        if not config.keep_merged:
            shutil.rmtree(merged_dir, ignore_errors=True)
    merged_check = _close_report(rows["merged_reloaded"], rows["adapter"]) | {
        "reloaded": {"device": str(reloaded_device), "dtype": str(reloaded_dtype).removeprefix("torch.")}}
    if weights_check is not None:  # half precision: the weights decide, the logit distance is information
        merged_check |= weights_check | {"within_tolerance": weights_check["weights_within_one_ulp"],
                                         "decided_by": "weights"}
    else:
        merged_check["decided_by"] = "logits"

    for label, m in rows.items():
        if m is not None:
            timings[label] = m.seconds
    timings["total"] = time.perf_counter() - t0
    timings["total_cpu"] = time.process_time() - cpu0
    report = build_report(probe, config, rows, removed_check, merged_check, adapter_source=adapter_source,
                          training=training, timings=timings, notes=notes, tokens=tokens, load_before=load_before)
    if plot:
        png = plot_skew(report, out / "skew.png")
        report["plot"] = png.name if png is not None else None
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    log.info("audit written to %s (%.0fs)", out, timings["total"])
    return report


def _loadavg() -> float | None:
    """The 1-minute load average (recorded so that wall-clock timings on a shared machine can be read)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


FLIP_MIN_BASE = 0.05  # a filler the base leans on by at least this much ...
FLIP_MIN_AFTER = 0.02  # ... and that now leans the other way by at least this much, was overshot


def flipped_fillers(base: dict[str, Any] | None, row: dict[str, Any]) -> list[str]:
    """Fillers whose skew changed sign against the base (|base| >= 0.05, |now| >= 0.02): a fix that overshoots.
    Mean TV hides this -- a nurse pushed from "she" to "he" counts as much as one left at "she"."""
    if base is None:
        return []
    out = []
    for filler, b in base["per_filler"].items():
        now = row["per_filler"].get(filler, {}).get("skew")
        was = b.get("skew")
        if now is None or was is None:
            continue
        if abs(was) >= FLIP_MIN_BASE and abs(now) >= FLIP_MIN_AFTER and (was > 0) != (now > 0):
            out.append(filler)
    return out


def build_report(probe: Probe, config: AuditConfig, rows: dict[str, Measurement | None],
                 removed_check: dict[str, Any], merged_check: dict[str, Any], *, adapter_source: str,
                 training: dict[str, Any], timings: dict[str, float], notes: list[str], tokens=None,
                 load_before: float | None = None) -> dict[str, Any]:
    out_rows = {label: (rows[label].row() if rows.get(label) is not None else None) for label in ROW_ORDER}
    for r in out_rows.values():
        if r is not None:
            r.pop("attribute_tokens", None)
            r["flipped_fillers"] = flipped_fillers(out_rows["base"], r)
    report: dict[str, Any] = {
        "rows": out_rows,
        "removed_equals_base": removed_check["equal"],
        "removed_check": removed_check,
        "merged_matches_adapter": merged_check.get("within_tolerance"),
        "merged_check": merged_check,
        "probe": probe.to_dict(),
        "attribute_tokens": tokens.to_dict() if tokens is not None else None,
        "headline_cell": "heldout (held-out fillers x held-out templates)",
        "adapter": adapter_source,
        "training": training,
        "config": config.to_dict(),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "notes": notes,
        "torch_threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "loadavg_1min_at_start_end": [load_before, _loadavg()]},
    }
    return report


# ---- rendering -------------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def render_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    probe = report["probe"]
    lines = [f"# Bias audit: {probe['name']} ({probe['attribute']})", "",
             f"Adapter: {report['adapter']}", "",
             f"Target: {probe['target']}. Headline numbers are on the {report['headline_cell']} cell; "
             "`skew` > 0 leans towards "
             f"'{next(iter(probe['values']))}'. Quality: held-out BBC perplexity and mean KL(base ‖ model) on "
             "neutral texts. Controllability: share of prompts that state a value (\"The female carpenter ...\") "
             "where that value stays the most likely.", "",
             "| row | TV to target | KL(target‖p) | skew | attr. mass | held-out ppl | neutral KL | controllability | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label in ROW_ORDER:
        r = rows.get(label)
        if r is None:
            lines.append(f"| {label} | – | – | – | – | – | – | – | – |")
            continue
        lines.append(f"| {label} | {_fmt(r['tv_to_target'])} | {_fmt(r['kl_to_target'])} | {_fmt(r['skew'])} | "
                     f"{_fmt(r['attribute_mass'], 3)} | {_fmt(r['heldout_ppl'], 3)} | {_fmt(r['neutral_kl'], 5)} | "
                     f"{_fmt(r['controllability'], 3)} | {_fmt(r['seconds'], 1)} |")
    lines += ["", "## TV to target per cell", "",
              "| row | train | held-out fillers | held-out templates | held-out | all |", "|---|---|---|---|---|---|"]
    for label in ROW_ORDER:
        r = rows.get(label)
        if r is None:
            continue
        c = r["cells"]
        lines.append(f"| {label} | " + " | ".join(_fmt(c.get(k, {}).get("tv_to_target"))
                                                   for k in ("train", "heldout_fillers", "heldout_templates",
                                                             "heldout", "all")) + " |")
    rc, mc = report["removed_check"], report["merged_check"]
    lines += ["", "## Checks", "",
              f"- **Adapter removed = base, bit for bit: {_fmt(report['removed_equals_base'])}** "
              f"(torch.equal on: {', '.join(f'{k} {_fmt(v)}' for k, v in rc['checks'].items())}).",
              f"- Merged, saved as a plain model and reloaded = live adapter: {_fmt(report['merged_matches_adapter'])} "
              f"(max |Δlogit| {_fmt(mc.get('max_abs_logit_diff'), 6)}, max |Δp_attr| {_fmt(mc['max_abs_p_attr_diff'], 6)}"
              + (f"; in half precision decided on the weights: {mc['layers']} layers within "
                 f"{_fmt(mc['max_weight_error_ulps'], 2)} ulp of W0 + ΔW" if mc.get("decided_by") == "weights" else "")
              + ").",
              ""]
    lines += ["## What the rows say", ""] + [f"- {s}" for s in conclusions(report)] + [""]
    if report.get("training"):
        lines += ["## Training", ""]
        for name, t in report["training"].items():
            tv = ""
            if t.get("before") and t.get("after"):
                tv = (f"; TV train {_fmt(t['before'].get('train'))} → {_fmt(t['after'].get('train'))}, held-out "
                      f"{_fmt(t['before'].get('heldout'))} → {_fmt(t['after'].get('heldout'))}")
            hist = t.get("history") or []
            loss = f"; loss {hist[0]['loss']:.4f} → {hist[-1]['loss']:.4f}" if hist else ""
            lines.append(f"- {name}: {t.get('steps')} steps, {_fmt(t.get('seconds'), 0)} s"
                         f"{' (reused from the cache)' if t.get('cached') else ''}, {len(t.get('fillers', []))} "
                         f"fillers{loss}{tv}; {t.get('lora', {}).get('r')}-rank LoRA, {t.get('trainable_params')} "
                         "parameters")
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    machine = report.get("machine", {})
    lines += ["## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()),
              "", f"{machine.get('cpus')} CPUs, {report.get('torch_threads')} torch thread(s), 1-min load average at "
              f"start/end {machine.get('loadavg_1min_at_start_end')} (wall-clock times scale with it; total_cpu does "
              "not).", ""]
    src = probe.get("source")
    if src:
        lines += ["## Probe source", ""]
        lines += [f"- {k}: {v}" for k, v in src.items()] if isinstance(src, dict) else [str(src)]
        lines.append("")
    if report.get("plot"):
        lines += [f"![per-filler skew]({report['plot']})", ""]
    return "\n".join(lines)


def conclusions(report: dict[str, Any]) -> list[str]:
    """Plain sentences comparing the rows (what the thread argued, as measured here)."""
    rows = report["rows"]
    base, ad, mr, st = rows.get("base"), rows.get("adapter"), rows.get("merged_reloaded"), rows.get("stacked")
    out: list[str] = []
    if base and ad and base["tv_to_target"] is not None and ad["tv_to_target"] is not None:
        out.append(f"The adapter moves held-out TV to target from {base['tv_to_target']:.4f} to {ad['tv_to_target']:.4f} "
                   f"({ad['tv_to_target'] - base['tv_to_target']:+.4f}); perplexity {_fmt(base['heldout_ppl'], 3)} → "
                   f"{_fmt(ad['heldout_ppl'], 3)}, controllability {_fmt(base['controllability'], 3)} → "
                   f"{_fmt(ad['controllability'], 3)}.")
    out.append("Removing the adapter restores the base exactly." if report["removed_equals_base"] else
               "Removing the adapter did NOT restore the base bit for bit -- see removed_check.")
    if mr and ad:
        out.append(f"Merged into W and reloaded, the shift stays: TV {_fmt(mr['tv_to_target'])} vs "
                   f"{_fmt(ad['tv_to_target'])} live (max |Δlogit| "
                   f"{_fmt(report['merged_check'].get('max_abs_logit_diff'), 6)}).")
    if st and ad and base:
        out.append(f"Stacked adapters: TV {_fmt(st['tv_to_target'])} (single {_fmt(ad['tv_to_target'])}), skew "
                   f"{_fmt(st['skew'])}, perplexity {_fmt(st['heldout_ppl'], 3)} (single {_fmt(ad['heldout_ppl'], 3)}, "
                   f"base {_fmt(base['heldout_ppl'], 3)}), neutral KL {_fmt(st['neutral_kl'], 5)} (single "
                   f"{_fmt(ad['neutral_kl'], 5)}), attribute mass {_fmt(st['attribute_mass'], 3)} (base "
                   f"{_fmt(base['attribute_mass'], 3)}), controllability {_fmt(st['controllability'], 3)}.")
    for label, r in (("adapter", ad), ("stacked", st)):
        if r and r.get("flipped_fillers"):
            n = len(r["per_filler"])
            out.append(f"{label}: the skew changed sign (overshoot) for {len(r['flipped_fillers'])} of {n} fillers: "
                       f"{', '.join(r['flipped_fillers'])}.")
    return out


def plot_skew(report: dict[str, Any], path: Path) -> Path | None:
    """Per-filler skew (mean over templates), base vs adapter (and stacked), fillers sorted by the probe's
    ``bls_female_pct`` when present; held-out fillers marked with *."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    rows = report["rows"]
    base = rows["base"]["per_filler"]
    fillers = list(base)
    pct = (report["probe"].get("filler_info") or {}).get("bls_female_pct") or {}
    if pct:
        fillers.sort(key=lambda f: pct.get(f, 50))
    values = list(report["probe"]["values"])
    metric = "skew" if len(values) == 2 else "tv_to_target"
    series = [(label, rows[label]) for label in ("base", "adapter", "stacked") if rows.get(label)]
    n = len(series)
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(8, max(4.0, 0.28 * len(fillers) + 1.5)))
    for k, (label, r) in enumerate(series):
        ys = [i + (k - (n - 1) / 2) * height for i in range(len(fillers))]
        xs = [(r["per_filler"].get(f, {}).get(metric) or 0.0) for f in fillers]
        ax.barh(ys, xs, height=height, label=label)
    ax.set_yticks(range(len(fillers)))
    ax.set_yticklabels([f + (" *" if base[f].get("split") == "heldout" else "") for f in fillers], fontsize=7)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"skew = p_attr({values[0]}) − target  (← {values[1]}   {values[0]} →)" if metric == "skew"
                  else "TV to target")
    ax.set_title(f"{report['probe']['name']}: per-{report['probe'].get('slot', 'filler')} skew (* held out)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
