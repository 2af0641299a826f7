"""The stacking report: what happens to each task's quality when its adapter is stacked with others.

The claim under test (from the issue thread): stacking LoRAs degrades output quality "irrecoverably". The report
does not assume an answer. Given N adapters, adapter t trained on task t, and held-out text per task, it measures
task t's perplexity for

* ``base``: no adapter;
* ``own``: adapter t alone (k = 0);
* ``live_sum``: t stacked live with k others, every weight 1 (what naive stacking does);
* ``live_mean``: the same set live at weight 1/(k+1) (the uniform average, "model soup" style; Wortsman 2022);
* ``linear`` / ``svd`` / ``ties`` / ``dare``: the same set merged into one adapter by ``deltaw.compose`` with
  weight 1 each (task arithmetic, Ilharco et al. 2023; TIES's disjoint mean averages by itself);

for k = 0 … N-1 (every set of k others, or a seeded sample of ``samples`` sets, averaged), plus the pairwise
subspace overlap of the adapters (``overlap``). ``finding`` turns the numbers into a few sentences, with the
criterion it uses stated in the text.

The machinery takes a model with the adapters resident (``names``) and per-task token blocks, so it runs the same
on SmolLM2 with BBC-topic adapters (``deltaw stack-report``) and on a tiny random model in a test.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import api
from .core import DEFAULT_DENSITY, DEFAULT_DROP_RATE, compose
from .methods import METHODS
from .overlap import adapter_overlap

log = logging.getLogger(__name__)

LIVE = ("live_sum", "live_mean")
ALL_CURVES: tuple[str, ...] = LIVE + METHODS
_TMP = "_stack_report_tmp"
# A composed adapter whose distance from the exact sum is below this is the same function as the live stack
# (float32 round-off is ~1e-7), so at k = 0 it reuses the own adapter's perplexity instead of re-evaluating.
_IDENTICAL = 1e-5
# "Recovered" in the finding: a configuration keeps at least this share of the own adapter's gain over the base.
RECOVERED_SHARE = 0.5


@dataclass
class StackSettings:
    """What to measure. Defaults fit the 10-minute budget of the default SmolLM2 report on 2 CPU cores."""

    methods: tuple[str, ...] = ALL_CURVES
    samples: int = 1  # sets of k others per (task, k); every combination when there are no more than this
    max_k: int | None = None  # default N-1
    rank: int | None = None  # compose rank (None: svd max rᵢ, ties/dare Σ rᵢ)
    density: float = DEFAULT_DENSITY
    drop_rate: float = DEFAULT_DROP_RATE
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_CURVES]
        if unknown:
            raise ValueError(f"unknown stack-report method(s) {unknown}; choose from {', '.join(ALL_CURVES)}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@dataclass
class Measurement:
    topic: str
    k: int
    others: list[str]
    method: str
    ppl: float
    rel_error: float | None = None  # compose methods: mean factorisation error over modules
    deviation: float | None = None  # compose methods: mean distance from the exact sum


@dataclass
class StackReport:
    topics: list[str]
    base: dict[str, float]
    own: dict[str, float]
    curves: dict[str, dict[str, list[float]]]
    overlap: dict
    measurements: list[Measurement] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    finding: str = ""

    def to_dict(self) -> dict:
        return {"topics": self.topics, "base": self.base, "own": self.own, "curves": self.curves,
                "overlap": self.overlap,
                "retained": retained_curves(self), "summary": summary(self), "finding": self.finding,
                "settings": self.settings, "seconds": round(self.seconds, 1),
                "measurements": [asdict(m) for m in self.measurements]}


# ---- token blocks and perplexity -----------------------------------------------------------------------
def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (HF tokenizers), or ``tokenizer.encode(text)``."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def token_blocks(tokenizer, texts: Sequence[str], block_tokens: int, blocks: int) -> torch.Tensor:
    """The texts as one stream (documents separated by EOS when the tokenizer has one) cut into ``blocks``
    blocks of ``block_tokens`` tokens: (n, block_tokens) int64. Fixed-length blocks batch without padding and
    give every configuration exactly the same tokens to predict."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        stream.extend(encode(tokenizer, text))
        if eos is not None:
            stream.append(int(eos))
        if len(stream) >= block_tokens * blocks:
            break
    n = min(blocks, len(stream) // block_tokens)
    if n == 0:
        raise ValueError(f"the evaluation texts hold {len(stream)} tokens, fewer than one block of {block_tokens}")
    return torch.tensor(stream[: n * block_tokens], dtype=torch.long).view(n, block_tokens)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every predicted token of ``blocks`` (n, L): the first token of each block is
    context only."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start: start + batch_size].to(device)  # (b, L)
            logits = _logits(model, ids)[:, :-1].float()  # (b, L-1, V)
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


# ---- the measurement -----------------------------------------------------------------------------------
def stack_sets(names: Sequence[str], topic: str, k: int, samples: int, seed: int) -> list[tuple[str, ...]]:
    """The sets of k other adapters stacked with ``topic``'s own: all of them, or ``samples`` drawn with a seed
    that depends only on (seed, topic, k), so adding a method or a topic does not change the others' draws."""
    others = [n for n in names if n != topic]
    combos = list(itertools.combinations(others, k))
    if len(combos) <= samples:
        return combos
    return sorted(random.Random(f"{seed}:{topic}:{k}").sample(combos, samples))


def run_stack_report(model: nn.Module, names: Sequence[str], eval_blocks: Mapping[str, torch.Tensor],
                     settings: StackSettings | None = None,
                     progress: Callable[[str], None] | None = None) -> StackReport:
    """Measure everything the module docstring lists. ``names``: resident adapters, adapter t trained on task t;
    ``eval_blocks[t]``: task t's held-out token blocks (n, L). The model's activation is restored afterwards."""
    settings = settings or StackSettings()
    names = list(names)
    st = api.state(model)
    for n in names:
        st.require(n)
    missing = [n for n in names if n not in eval_blocks]
    if missing:
        raise ValueError(f"no evaluation texts for adapter(s) {missing}; give held-out texts per adapter name")
    if _TMP in st.adapters:
        api.delete(model, _TMP)
    max_k = len(names) - 1 if settings.max_k is None else min(settings.max_k, len(names) - 1)
    before = st.active
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    say = progress or (lambda msg: log.info("%s", msg))
    plan = {t: {k: stack_sets(names, t, k, settings.samples, settings.seed) for k in range(1, max_k + 1)}
            for t in names}

    def evaluate(topic: str, spec) -> float:
        nonlocal done
        with api.using(model, spec):
            ppl = perplexity(model, eval_blocks[topic], settings.batch_size)
        done += 1
        elapsed = time.perf_counter() - t0
        say(f"[{done}/~{n_evals}] {topic} {spec}: ppl {ppl:.3f} ({elapsed:.0f}s, ~"
            f"{elapsed / done * max(n_evals - done, 0):.0f}s left)")
        return ppl

    measurements: list[Measurement] = []
    base: dict[str, float] = {}
    owns: dict[str, float] = {}
    # The same set of adapters, merged with weight 1 each, is the same adapter whichever member's task is being
    # measured: compose each distinct set once (at k = N-1 every task shares the one full set).
    uses: dict[frozenset[str], list[tuple[str, tuple[str, ...]]]] = {}
    for topic in names:
        for sets in plan[topic].values():
            for others in sets:
                uses.setdefault(frozenset((topic, *others)), []).append((topic, others))
    inexact = sum(m in ("ties", "dare") for m in settings.methods)  # k = 0 compositions that change the adapter
    n_evals = len(names) * (2 + inexact) + sum(len(u) for u in uses.values()) * len(settings.methods)
    done = 0
    try:
        for topic in names:
            with api.disabled(model):
                base[topic] = perplexity(model, eval_blocks[topic], settings.batch_size)
            done += 1
            own = owns[topic] = evaluate(topic, {topic: 1.0})
            for method in settings.methods:
                if method in LIVE:
                    measurements.append(Measurement(topic, 0, [], method, own))
                else:
                    measurements += _composed(model, [(topic, ())], method, settings, evaluate, own)
        for members, users in uses.items():
            k = len(members) - 1
            for method in settings.methods:
                if method in LIVE:
                    w = 1.0 if method == "live_sum" else 1.0 / (k + 1)
                    for topic, others in users:
                        ppl = evaluate(topic, {m: w for m in (topic, *others)})
                        measurements.append(Measurement(topic, k, list(others), method, ppl))
                else:
                    measurements += _composed(model, users, method, settings, evaluate, None)
        say("subspace overlap")
        overlap = adapter_overlap(model, names)
    finally:
        if _TMP in st.adapters:
            api.delete(model, _TMP)
        st.set_active(before)
        model.train(was_training)
    curves = {m: {t: [_mean([x.ppl for x in measurements if x.method == m and x.topic == t and x.k == k])
                      for k in range(max_k + 1)] for t in names} for m in settings.methods}
    s = asdict(settings)
    s["methods"] = list(settings.methods)
    s.update(n_adapters=len(names), max_k=max_k,
             eval_tokens={t: int(b.numel()) for t, b in eval_blocks.items() if t in names})
    report = StackReport(names, base, owns, curves, _overlap_dict(overlap), measurements, s,
                         time.perf_counter() - t0)
    report.finding = finding(report)
    return report


def _composed(model, users: list[tuple[str, tuple[str, ...]]], method: str, settings: StackSettings,
              evaluate, own: float | None) -> list[Measurement]:
    """Compose the set once (weight 1 each) and measure it on each task in ``users`` [(task, its others)]."""
    topic, others = users[0]
    rep = compose(model, {m: 1.0 for m in (topic, *others)}, method, name=_TMP, rank=settings.rank,
                  density=settings.density, drop_rate=settings.drop_rate, seed=settings.seed)
    out = []
    try:
        for topic, others in users:
            if own is not None and rep.mean_deviation < _IDENTICAL and rep.max_rel_error < _IDENTICAL:
                ppl = own  # the composed adapter is the own adapter (k = 0, exact method): same function
            else:
                ppl = evaluate(topic, {_TMP: 1.0})
            out.append(Measurement(topic, len(others), list(others), method, ppl, rep.mean_rel_error,
                                   rep.mean_deviation))
    finally:
        api.delete(model, _TMP)
    return out


def _overlap_dict(overlap) -> dict:
    d = overlap.to_dict()
    off = overlap.off_diagonal("cos2")
    rand = overlap.off_diagonal("random_cos2")
    d["mean_cos2"] = _mean(off)
    d["mean_random_cos2"] = _mean(rand)
    d["mean_gram"] = _mean(overlap.off_diagonal("gram"))
    return d


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


# ---- derived numbers and the finding -------------------------------------------------------------------
def retained_curves(report: StackReport) -> dict[str, dict[str, list[float | None]]]:
    """Share of the own adapter's perplexity gain over the base kept: (base − ppl) / (base − own). 1 = all of it,
    0 = back to the base, < 0 = worse than the base. None where the own adapter did not beat the base."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for method, per_topic in report.curves.items():
        out[method] = {}
        for t, ppls in per_topic.items():
            own = report.own[t]
            gain = report.base[t] - own
            out[method][t] = [None if gain <= 0 or p is None else (report.base[t] - p) / gain for p in ppls]
    return out


def summary(report: StackReport) -> dict:
    """Averaged over tasks, per k: {"per_method": {method: {"ppl_ratio_to_own": [...], "gain_retained": [...]}},
    "distance_from_exact_sum": {compose method: [mean ‖ΔW − ΣΔWᵢ‖/‖ΣΔWᵢ‖ over modules and sets]}}."""
    retained = retained_curves(report)
    per_method: dict[str, dict[str, list[float]]] = {}
    for method, per_topic in report.curves.items():
        ks = range(len(next(iter(per_topic.values()))))
        ratio = [_mean([per_topic[t][k] / report.own[t] for t in report.topics]) for k in ks]
        kept = [_mean([retained[method][t][k] for t in report.topics]) for k in ks]
        per_method[method] = {"ppl_ratio_to_own": ratio, "gain_retained": kept}
    errs: dict[str, list[float]] = {}
    for method in METHODS:
        rows = [m for m in report.measurements if m.method == method and m.deviation is not None]
        if rows:
            errs[method] = [_mean([m.deviation for m in rows if m.k == k])
                            for k in range(report.settings.get("max_k", 0) + 1)]
    return {"per_method": per_method, "distance_from_exact_sum": errs}


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def finding(report: StackReport) -> str:
    """A few sentences computed from the numbers. The criterion for "recovered" is stated in the text."""
    topics = report.topics
    sm = summary(report)["per_method"]
    max_k = report.settings.get("max_k", len(topics) - 1)
    own_gain = _mean([1 - report.own[t] / report.base[t] for t in topics])
    lines = [f"Each adapter alone changes its own task's held-out perplexity by {_pct(-own_gain)} relative to the "
             f"base model (mean over {len(topics)} tasks)."]
    if max_k == 0:
        return " ".join(lines)
    improving = [t for t in topics if report.own[t] < report.base[t]]
    if len(improving) < len(topics):
        lines.append(f"Only {len(improving)} of {len(topics)} adapters beat the base on their own task, so the "
                     "share-of-gain numbers below cover only those.")
    ranked = []
    for method, s in sm.items():
        ratio, kept = s["ppl_ratio_to_own"][max_k], s["gain_retained"][max_k]
        ranked.append((ratio, method, kept))
        lines.append(f"With {max_k} other adapter(s) stacked, {method} changes perplexity by {_pct(ratio - 1)} vs the "
                     f"own adapter" + ("" if math.isnan(kept) else f" and keeps {100 * kept:.0f}% of its gain") + ".")
    ranked.sort()
    best_ratio, best, best_kept = ranked[0]
    if "live_sum" in sm:
        naive = sm["live_sum"]["gain_retained"][max_k]
        lines.append(f"The best configuration at k={max_k} is {best} ({_pct(best_ratio - 1)}); naive live stacking "
                     f"(live_sum) is {_pct(sm['live_sum']['ppl_ratio_to_own'][max_k] - 1)}.")
    else:
        naive = float("nan")
    if best_ratio < 1.0:
        lines.append(f"Stacking lowered perplexity below the own adapter's ({best} at k={max_k}: "
                     f"{_pct(best_ratio - 1)}): the other tasks' adapters help this task, consistent with the adapters sharing a common "
                     "component (e.g. the corpus's style) more than carrying conflicting task-specific ones.")
    if not math.isnan(best_kept):
        verdict = "recovered" if best_kept >= RECOVERED_SHARE else "not recovered"
        lines.append(f"Criterion: a configuration 'recovers' if it keeps at least {100 * RECOVERED_SHARE:.0f}% of the "
                     f"own adapter's gain over the base at k={max_k}. By that criterion quality is {verdict} "
                     f"here ({best}: {100 * best_kept:.0f}%" +
                     ("" if math.isnan(naive) else f"; live_sum: {100 * naive:.0f}%") + "), so this run "
                     + ("is evidence against" if best_kept >= RECOVERED_SHARE else "is consistent with")
                     + " the claim that stacking degrades quality irrecoverably.")
    ov = report.overlap
    if ov and not math.isnan(ov.get("mean_cos2", float("nan"))):
        lines.append(f"Mean pairwise output-subspace overlap (cos² of principal angles) is {ov['mean_cos2']:.3f} "
                     f"against {ov['mean_random_cos2']:.3f} for random subspaces of the same ranks; energy-weighted "
                     f"overlap {ov['mean_gram']:.3f}.")
    if "live_sum" in report.curves and "linear" in report.curves:
        gap = max(abs(a - b) / b for t in topics
                  for a, b in zip(report.curves["linear"][t], report.curves["live_sum"][t]))
        lines.append(f"Sanity check: merged linear equals live_sum to a relative perplexity difference of {gap:.1e}.")
    return " ".join(lines)


# ---- output files --------------------------------------------------------------------------------------
def write_report(report: StackReport, out_dir: str | Path) -> list[Path]:
    """report.json, report.md, stacking.png (quality vs number stacked), overlap.png (heatmaps)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    paths[1].write_text(_markdown(report, data))
    try:
        paths += _plots(report, data, out)
    except ImportError:  # matplotlib is the optional [plot] extra
        log.warning("matplotlib is not installed: no PNG plots (pip install 'deltaw[plot]')")
    return paths


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _markdown(report: StackReport, data: dict) -> str:
    topics, sm = report.topics, data["summary"]["per_method"]
    max_k = report.settings["max_k"]
    ks = list(range(max_k + 1))
    lines = ["# Stacking report", "", "## Finding", "", report.finding, "",
             "## Setup", "",
             f"- adapters / tasks: {', '.join(topics)}",
             f"- sets per (task, k): {report.settings['samples']} (all combinations when fewer), seed "
             f"{report.settings['seed']}",
             f"- compose: rank {report.settings['rank'] or 'default (svd: max r, ties/dare: sum r)'}, ties density "
             f"{report.settings['density']}, dare drop rate {report.settings['drop_rate']}; merged sets use weight 1 "
             "each, live_mean uses 1/(k+1)",
             f"- evaluation tokens per task: {sorted(set(report.settings['eval_tokens'].values()))}",
             f"- runtime: {report.seconds:.0f} s", ""]
    for key, extra in report.settings.get("extra", {}).items():
        lines.insert(-1, f"- {key}: {extra}")
    lines += ["## Mean over tasks: perplexity / own adapter's perplexity", "",
              "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for m in report.curves:
        lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in sm[m]["ppl_ratio_to_own"]) + " |")
    lines += ["", "## Mean over tasks: share of the own adapter's gain over the base kept", "",
              "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for m in report.curves:
        lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in sm[m]["gain_retained"]) + " |")
    lines += ["", "## Perplexity per task (base, then each method at k = 0 … N-1)", "",
              "| task | base | method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 3) + "|"]
    for t in topics:
        for i, m in enumerate(report.curves):
            lines.append(f"| {t if i == 0 else ''} | {_fmt(report.base[t]) if i == 0 else ''} | {m} | "
                         + " | ".join(_fmt(v) for v in report.curves[m][t]) + " |")
    devs = data["summary"]["distance_from_exact_sum"]
    if devs:
        lines += ["", "## Compose: mean distance of the merged ΔW from the exact sum ‖ΔW − ΣΔWᵢ‖/‖ΣΔWᵢ‖", "",
                  "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for m, v in devs.items():
            lines.append(f"| {m} | " + " | ".join(_fmt(x) for x in v) + " |")
    ov = report.overlap
    lines += ["", "## Pairwise subspace overlap (mean over shared modules)", "",
              f"cos² of principal angles between output subspaces (random baseline ≈ {_fmt(ov['mean_random_cos2'])}):",
              "", "| | " + " | ".join(topics) + " |", "|---" * (len(topics) + 1) + "|"]
    for i, t in enumerate(topics):
        lines.append(f"| {t} | " + " | ".join(_fmt(v) for v in ov["cos2"][i]) + " |")
    lines += ["", "energy-weighted ‖ΔWᵢᵀΔWⱼ‖_F / √(‖ΔWᵢΔWᵢᵀ‖_F‖ΔWⱼΔWⱼᵀ‖_F):", "",
              "| | " + " | ".join(topics) + " |", "|---" * (len(topics) + 1) + "|"]
    for i, t in enumerate(topics):
        lines.append(f"| {t} | " + " | ".join(_fmt(v) for v in ov["gram"][i]) + " |")
    lines += ["", "Plots: `stacking.png`, `overlap.png`. Raw numbers: `report.json`.", ""]
    return "\n".join(lines)


def _plots(report: StackReport, data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sm = data["summary"]["per_method"]
    max_k = report.settings["max_k"]
    x = [k + 1 for k in range(max_k + 1)]  # adapters in the stack
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"live_sum": ("o", "-"), "live_mean": ("s", "-"), "linear": ("x", "--"), "svd": ("^", "-"),
             "ties": ("D", "-"), "dare": ("v", "-")}  # linear is drawn dashed: it coincides with live_sum
    for m in report.curves:
        marker, ls = style.get(m, ("o", "-"))
        axes[0].plot(x, sm[m]["ppl_ratio_to_own"], marker=marker, ls=ls, label=m)
        axes[1].plot(x, sm[m]["gain_retained"], marker=marker, ls=ls, label=m)
    base_ratio = _mean([report.base[t] / report.own[t] for t in report.topics])
    axes[0].axhline(base_ratio, color="grey", ls="--", label="base")
    axes[1].axhline(0.0, color="grey", ls="--", label="base")
    axes[1].axhline(1.0, color="grey", ls=":", label="own adapter")
    axes[0].set(xlabel="adapters stacked (own + k others)", ylabel="perplexity / own adapter's",
                title="Held-out perplexity vs stack size (mean over tasks)")
    axes[1].set(xlabel="adapters stacked (own + k others)", ylabel="share of own gain over base kept",
                title="Gain retained (1 = own adapter, 0 = base)")
    for ax in axes:
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    curves_png = out / "stacking.png"
    fig.savefig(curves_png, dpi=110)
    plt.close(fig)

    ov = report.overlap
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
    for ax, key, title in ((axes[0], "cos2", "cos² principal angles (output subspaces)"),
                           (axes[1], "gram", "energy-weighted ‖ΔWᵢᵀΔWⱼ‖ (normalised)")):
        mat = torch.tensor([[float("nan") if v is None else v for v in row] for row in ov[key]])
        im = ax.imshow(mat.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(report.topics)), report.topics, rotation=45, ha="right")
        ax.set_yticks(range(len(report.topics)), report.topics)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if mat[i, j] < 0.5 else "black")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"Pairwise adapter overlap (random baseline cos² ≈ {ov['mean_random_cos2']:.3f})", fontsize=10)
    fig.tight_layout()
    overlap_png = out / "overlap.png"
    fig.savefig(overlap_png, dpi=110)
    plt.close(fig)
    return [curves_png, overlap_png]
