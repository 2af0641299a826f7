"""The balance objective: train a LoRA that pulls an attribute distribution toward a target, and nothing else.

    loss = mean_prompts KL(target ‖ p_attr)                          (balance, train fillers x train templates)
         + neutral_weight · mean_positions KL(base ‖ model)          (stay the base model on neutral text)
         + control_weight · mean_controls KL(p_attr_base ‖ p_attr)   (keep explicitly stated values intact)

``p_attr`` is the renormalised next-token mass over each value's token ids (``measure`` module doc), so the
first term only moves the *ratio* between values, not how likely a pronoun is. The base distributions are
computed once, before training, with ``deltaw.disabled(model)`` -- exactly the base, whatever else the model
carries. The third term is the thread's acceptance criterion made into a constraint: a fix must not take
away the variants a user asks for explicitly ("The female carpenter said that" must still continue with
"she"). The base terms are KL(base ‖ model) -- mode-covering -- so the adapter is penalised for dropping
anything the base considered likely.

Why a loop here and not ``deltaw.train.train``: that loop is built around token cross-entropy over a text
data set; this objective needs several prompt sets, a frozen reference and a loss on renormalised masses.
It reuses the train module's LR schedule (``lr_at``) so the two loops behave alike.

Why the adapter sits in the last few blocks by default (``targets="top:4"``): the pronoun decision is made
late, and everything below the adapter is then a fixed function of the fixed prompts -- ``FrozenPrefix``
computes it once per prompt, so a step costs the top blocks only (on SmolLM2, 4 of 30). On SmolLM2 with
60 steps this moves held-out TV to target from 0.18 to 0.07 at +0.4 % held-out perplexity.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import api
from ..config import ALL_LINEAR, LoraConfig
from ..train.loop import lr_at
from .measure import (
    AttributeTokens,
    _module_modes,
    _restore_modes,
    _table,
    attribute_distribution,
    attribute_tokens,
    encode_prompts,
    last_token_logits,
    total_variation,
    value_log_masses,
)
from .probe import Probe

log = logging.getLogger(__name__)

OBJECTIVE = "balance"
_LAYER_RE = re.compile(r"(?:^|.*\.)(?:layers|h|layer|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class DebiasConfig:
    """Hyper-parameters of :func:`train_debias`; every field is part of the adapter cache key."""

    r: int = 8
    alpha: float = 16.0
    # "top:K" = every Linear of the last K transformer blocks (fast: the backward pass stops there, and the
    # pronoun decision is made late); otherwise anything deltaw.train.resolve_targets accepts
    # ("all-linear", "attention", "q_proj,v_proj", "re:<regex>").
    targets: str = "top:4"
    steps: int = 60
    lr: float = 2e-3
    warmup: int = 5
    schedule: str = "cosine"
    weight_decay: float = 0.0
    batch_size: int = 16  # probe prompts per step
    neutral_batch: int = 4  # neutral texts per step
    control_batch: int = 8  # stated-value prompts per step
    neutral_weight: float = 1.0
    control_weight: float = 1.0
    seed: int = 0
    max_seconds: float | None = None  # stop early (and say so) past this wall-clock budget
    frozen_prefix: bool = True  # run only the adapted top blocks per step (see FrozenPrefix); same result

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DebiasResult:
    """What training did: the adapter (attached, active, unmerged) and the numbers to judge it by."""

    name: str
    config: DebiasConfig
    lora: LoraConfig
    steps: int
    seconds: float
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)  # TV to target per cell, base
    after: dict[str, float] = field(default_factory=dict)  # TV to target per cell, with the adapter
    trainable_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "objective": OBJECTIVE, "config": self.config.to_dict(),
                "lora": {"r": self.lora.r, "alpha": self.lora.alpha, "target_modules": self.lora.target_modules
                         if isinstance(self.lora.target_modules, str) else list(self.lora.target_modules)},
                "steps": self.steps, "seconds": round(self.seconds, 2), "stopped_early": self.stopped_early,
                "trainable_params": self.trainable_params, "before": self.before, "after": self.after,
                "history": self.history}


def top_layers_regex(model: nn.Module, k: int) -> str:
    """A target regex for every adaptable module inside the last ``k`` numbered blocks (``layers.N.``)."""
    indices = sorted({int(m.group(1)) for name, _ in model.named_modules() if (m := _LAYER_RE.match(name + "."))})
    if not indices:
        raise ValueError("the model has no numbered blocks (layers.N / h.N / blocks.N); use targets='all-linear'")
    chosen = indices[-k:]
    return r"(?:.*\.)?(?:layers|h|layer|blocks)\.(?:" + "|".join(map(str, chosen)) + r")\..+"


def lora_config_for(model: nn.Module, config: DebiasConfig) -> LoraConfig:
    spec = config.targets.strip()
    if spec.startswith("top:"):
        targets: tuple[str, ...] | str = top_layers_regex(model, int(spec[4:]))
    elif spec == ALL_LINEAR:
        targets = ALL_LINEAR
    else:
        from ..train.targets import resolve_targets
        targets = resolve_targets(spec, model)
    return LoraConfig(r=config.r, alpha=config.alpha, target_modules=targets)


class _StopForward(Exception):
    """Raised by a pre-hook to end a forward pass once the wanted hidden state is captured."""


class FrozenPrefix:
    """Run the frozen lower blocks once per training sequence; each step runs only the adapted top blocks.

    Why: with the adapter in the last K of N blocks, everything below block N-K is a fixed function of the
    (fixed) prompts, yet a plain loop recomputes it every step -- most of the step's cost. The input of block
    N-K is captured once per sequence (a pre-hook stops the pass there) and fed back as ``inputs_embeds`` to
    the model with its block list cut to the top blocks. Works for the ``model.model.layers`` layout
    (Llama, Mistral, Qwen, SmolLM, ...); :meth:`build` checks the shortcut against the full model and
    returns None -- plain full passes -- for any model where the two disagree.
    """

    def __init__(self, model: nn.Module, owner: nn.Module, start: int) -> None:
        self.model, self.owner, self.start = model, owner, start
        self.blocks: nn.ModuleList = owner.layers
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def build(cls, model: nn.Module, adapted: Sequence[str], probe_ids: Sequence[list[int]]) -> FrozenPrefix | None:
        owner = getattr(model, "model", None)
        blocks = getattr(owner, "layers", None)
        if not isinstance(blocks, nn.ModuleList) or not adapted or not probe_ids:
            return None
        indices = []
        for path in adapted:
            m = _LAYER_RE.match(path + ".")
            if m is None:
                return None  # an adapted module outside the blocks (embeddings, head): nothing is frozen
            indices.append(int(m.group(1)))
        start = min(indices)
        if start == 0:
            return None
        prefix = cls(model, owner, start)
        try:
            with torch.no_grad():
                sample = list(probe_ids[:4])
                fast = prefix.last_logits(sample)
                full = last_token_logits(model, sample)
            ok = torch.allclose(fast, full, atol=1e-4, rtol=1e-4)
        except Exception as exc:  # any architecture surprise: fall back to full passes
            log.info("frozen-prefix shortcut unavailable (%s: %s); training with full passes", type(exc).__name__, exc)
            return None
        if not ok:
            log.info("frozen-prefix shortcut disagrees with the full model (max |diff| %.2e); full passes",
                     float((fast - full).abs().max()))
            return None
        log.info("training runs blocks %d..%d only (blocks below are frozen and computed once)", start, len(blocks) - 1)
        return prefix

    @torch.no_grad()
    def _capture(self, ids: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        handle = self.blocks[self.start].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with api.disabled(self.model):  # the lower blocks are the base model's, whatever is resident
                self.model(input_ids=ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0].detach()

    def hidden(self, batch: Sequence[list[int]]) -> torch.Tensor:
        missing = [ids for ids in batch if tuple(ids) not in self.cache]
        if missing:
            device = next(self.model.parameters()).device
            for ids, h in zip(missing, self._capture(torch.tensor(missing, device=device))):
                self.cache[tuple(ids)] = h
        return torch.stack([self.cache[tuple(ids)] for ids in batch])

    def forward(self, batch: Sequence[list[int]], last_only: bool) -> torch.Tensor:
        """Logits for equal-length sequences, running only the top blocks."""
        hidden = self.hidden(batch)
        self.owner.layers = nn.ModuleList(list(self.blocks)[self.start:])
        try:
            kwargs: dict[str, Any] = {"inputs_embeds": hidden, "use_cache": False}
            if last_only:
                kwargs["logits_to_keep"] = 1
            out = self.model(**kwargs)
        finally:
            self.owner.layers = self.blocks
        logits = out.logits if hasattr(out, "logits") else out[0]
        return (logits[:, -1] if last_only else logits).float()

    def last_logits(self, token_ids: Sequence[list[int]]) -> torch.Tensor:
        return _by_length(token_ids, lambda batch: self.forward(batch, last_only=True))


def _by_length(token_ids: Sequence[list[int]], run: Callable[[list[list[int]]], torch.Tensor]) -> torch.Tensor:
    """Apply ``run`` to equal-length groups and put the rows back in input order."""
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(token_ids):
        groups.setdefault(len(ids), []).append(i)
    rows: list[torch.Tensor | None] = [None] * len(token_ids)
    for idx in groups.values():
        out = run([list(token_ids[i]) for i in idx])
        for j, i in enumerate(idx):
            rows[i] = out[j]
    return torch.stack(rows)  # type: ignore[arg-type]


class _Runner:
    """Forward passes for the training step: through the frozen-prefix shortcut when there is one."""

    def __init__(self, model: nn.Module, prefix: FrozenPrefix | None) -> None:
        self.model, self.prefix = model, prefix

    def last_logits(self, token_ids: Sequence[list[int]]) -> torch.Tensor:
        if self.prefix is not None:
            return self.prefix.last_logits(token_ids)
        return last_token_logits(self.model, token_ids)

    def _logits_all(self, seqs: list[list[int]]) -> torch.Tensor:
        if self.prefix is not None:
            return self.prefix.forward(seqs, last_only=False)
        out = self.model(input_ids=torch.tensor(seqs, device=next(self.model.parameters()).device), use_cache=False)
        return (out.logits if hasattr(out, "logits") else out[0]).float()

    def all_logprobs(self, token_ids: Sequence[list[int]]) -> list[torch.Tensor]:
        """Per sequence, log-softmax (L, V) at every position."""
        out: list[torch.Tensor | None] = [None] * len(token_ids)
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(token_ids):
            groups.setdefault(len(ids), []).append(i)
        for idx in groups.values():
            logp = F.log_softmax(self._logits_all([list(token_ids[i]) for i in idx]), dim=-1)
            for j, i in enumerate(idx):
                out[i] = logp[j]
        return out  # type: ignore[return-value]

    def neutral_loss(self, batch: Sequence[list[int]], base: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over positions of KL(base ‖ model); texts of equal length are batched (no padding)."""
        total: torch.Tensor | float = 0.0
        count = 0
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(batch):
            groups.setdefault(len(ids), []).append(i)
        for idx in groups.values():
            logp = F.log_softmax(self._logits_all([list(batch[i]) for i in idx]), dim=-1)
            ref = torch.stack([base[i] for i in idx])
            total = total + (ref.exp() * (ref - logp)).sum()
            count += ref.shape[0] * ref.shape[1]
        return total / max(count, 1)  # type: ignore[return-value]


def _balance_loss(logits: torch.Tensor, tokens: AttributeTokens, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean KL(target ‖ p_attr), p_attr detached)."""
    log_p = F.log_softmax(value_log_masses(logits, tokens), dim=-1)
    t = target.to(log_p.dtype)
    kl = (t * (torch.where(t > 0, t.clamp_min(1e-30).log(), torch.zeros_like(t)) - log_p)).sum(-1)
    return kl.mean(), log_p.exp().detach()


def _control_loss(logits: torch.Tensor, tokens: AttributeTokens, base_p: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_attr_base ‖ p_attr) on stated-value prompts."""
    log_p = F.log_softmax(value_log_masses(logits, tokens), dim=-1)
    return (base_p * (base_p.clamp_min(1e-30).log() - log_p)).sum(-1).mean()


@torch.no_grad()
def _tv_by_cell(model: nn.Module, tokenizer, probe: Probe, tokens: AttributeTokens,
                fillers: Sequence[str], templates: Sequence[str], base: bool = False) -> dict[str, float]:
    """Mean TV to target on the train cell and the held-out cell (full forward passes; ``base``: disabled)."""
    if base:
        with api.disabled(model):
            return _tv_by_cell(model, tokenizer, probe, tokens, fillers, templates)
    target = torch.tensor([probe.target[v] for v in probe.value_names], dtype=torch.float64)  # (K,)
    out: dict[str, float] = {}
    cells = {"train": (fillers, templates), "heldout": (probe.fillers["heldout"], probe.templates["heldout"])}
    for cell, (fs, ts) in cells.items():
        if not fs or not ts:
            continue
        prompts = probe.prompts(fs, ts)
        logits = last_token_logits(model, encode_prompts(tokenizer, [p.text for p in prompts]))  # (N, V)
        # On the CPU in float64, as ``measure`` keeps its tables: the same TV for the same model on any device.
        p_attr = _table(attribute_distribution(logits, tokens)[0])  # (N, K)
        out[cell] = float(total_variation(p_attr, target).mean())
    return out


def train_debias(model: nn.Module, tokenizer, probe: Probe, config: DebiasConfig | None = None, *,
                 name: str = "debias", fillers: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                 target: dict[str, float] | None = None, evaluate: bool = True,
                 callback: Callable[[dict[str, float]], None] | None = None) -> DebiasResult:
    """Attach a fresh adapter ``name`` to ``model`` and train it with the balance objective.

    Args:
        probe: prompts, attribute tokens, target and neutral texts (see ``probe``).
        fillers / templates: what to train on (default: the probe's train fillers and train templates);
            the held-out ones are never seen, so evaluation on them measures generalisation.
        target: overrides the probe's target distribution (validated like a probe's ``target``); the
            before/after TV is measured against it.
        evaluate: measure TV to target on the train and held-out cells before and after (a few seconds).

    Returns the result; the adapter stays attached and active (not merged), like ``deltaw.train.train``.
    Other resident adapters are deactivated during training and stay so (activate what you need after).
    The global torch RNG is left as it was (the seed is applied inside ``torch.random.fork_rng``).

    All-or-nothing: if training raises (e.g. ``FloatingPointError`` from a too-high learning rate), the
    adapter is deleted again and the previous activation, ``requires_grad`` flags and train/eval mode are
    restored, so a retry with the same ``name`` works.
    """
    config = config or DebiasConfig()
    fillers = list(fillers) if fillers is not None else list(probe.fillers["train"])
    templates = list(templates) if templates is not None else list(probe.templates["train"])
    if not fillers or not templates:
        raise ValueError("train_debias needs at least one filler and one template")
    # The reported before/after TV must be measured against the distribution actually trained towards, so
    # an overriding target replaces the probe's (validated and normalised like a probe file's target).
    goal_probe = probe.with_target(target) if target is not None else probe
    goal = dict(goal_probe.target)
    target_t = torch.tensor([goal[v] for v in probe.value_names], dtype=torch.float32)
    tokens = attribute_tokens(tokenizer, probe)
    device = next(model.parameters()).device
    start = time.perf_counter()

    prompts = probe.prompts(fillers, templates)
    prompt_ids = encode_prompts(tokenizer, [p.text for p in prompts])
    controls = probe.control_prompts(fillers, templates) if config.control_weight > 0 else []
    control_ids = encode_prompts(tokenizer, [p.text for p in controls])
    neutral_ids = encode_prompts(tokenizer, list(probe.neutral["train"])) if config.neutral_weight > 0 else []

    lora = lora_config_for(model, config)
    # All-or-nothing: a failed run (a too-high learning rate, an interrupt) must leave the model as it was --
    # no half-trained adapter squatting on ``name`` (a retry would hit AdapterNameError), the caller's
    # activation, trainable flags and train/eval mode back. Snapshot them before ``attach`` touches anything.
    # ``undo`` takes the adapter back out: the previous activation, or -- on a model with no deltaw adapters
    # before -- the plain modules (attach wrapped them; state_dict keys would read ...base_layer.weight).
    undo = api.undo_attach(model)
    previous_grad = [(p, p.requires_grad) for p in model.parameters()]
    previous_modes = _module_modes(model)  # every module's own flag, not just model.training
    # The seed fixes the adapter's init and batch order without reseeding the caller's global RNG.
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        info = api.attach(model, lora, name)
        try:
            before, after, history, stopped_early, params = _train_attached(
                model, tokenizer, probe, goal_probe, config, name, info, tokens, target_t, prompt_ids, control_ids,
                neutral_ids, fillers, templates, start, evaluate, callback)
        except BaseException:
            try:
                undo(name)
            finally:
                for p, flag in previous_grad:
                    p.requires_grad_(flag)
            raise
        finally:
            _restore_modes(model, previous_modes)
    api.set_trainable(model, None)
    steps_done = len(history)
    info.metadata.update({"objective": OBJECTIVE, "probe": probe.name, "target": goal, "train_fillers": fillers,
                          "train_templates": templates, "debias_config": config.to_dict(), "steps": steps_done})
    seconds = time.perf_counter() - start
    if evaluate:
        log.info("debias %s: TV to target train %.4f -> %.4f, held-out %s -> %s (%.0fs)", name,
                 before.get("train", math.nan), after.get("train", math.nan), before.get("heldout"),
                 after.get("heldout"), seconds)
    return DebiasResult(name=name, config=config, lora=lora, steps=steps_done, seconds=seconds,
                        stopped_early=stopped_early, history=history, before=before, after=after,
                        trainable_params=sum(p.numel() for p in params))


def _train_attached(model: nn.Module, tokenizer, probe: Probe, goal_probe: Probe, config: DebiasConfig, name: str,
                    info, tokens: AttributeTokens, target_t: torch.Tensor, prompt_ids: list[list[int]],
                    control_ids: list[list[int]], neutral_ids: list[list[int]], fillers: list[str],
                    templates: list[str], start: float, evaluate: bool,
                    callback: Callable[[dict[str, float]], None] | None
                    ) -> tuple[dict[str, float], dict[str, float], list[dict[str, float]], bool, list[nn.Parameter]]:
    """The training loop of :func:`train_debias` on the freshly attached adapter ``name``.

    Returns (before, after, history, stopped_early, params); the caller owns clean-up on failure.
    """
    device = next(model.parameters()).device
    model.eval()  # no dropout anywhere: the objective compares against deterministic base outputs
    api.activate(model, name)
    api.set_trainable(model, name)
    with torch.no_grad():
        before = _tv_by_cell(model, tokenizer, goal_probe, tokens, fillers, templates, base=True) if evaluate else {}
    prefix = FrozenPrefix.build(model, info.modules, prompt_ids) if config.frozen_prefix else None
    run = _Runner(model, prefix)
    # Base references, computed once: exactly the base model (every adapter off, merged ones included).
    with torch.no_grad(), api.disabled(model):
        base_neutral = run.all_logprobs(neutral_ids) if neutral_ids else []
        base_control = (attribute_distribution(run.last_logits(control_ids), tokens)[0]
                        if control_ids else torch.zeros(0, len(tokens.values)))
    params = [p for p in api.adapter_parameters(model, name) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    stopped_early = False
    step = 0
    for step in range(config.steps):
        if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
            stopped_early = True
            log.warning("debias training stopped at step %d/%d: --max-seconds %.0f reached", step,
                        config.steps, config.max_seconds)
            break
        lr = lr_at(step, config.steps, config.warmup, config.lr, config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pick = torch.randperm(len(prompt_ids), generator=gen)[:config.batch_size].tolist()
        logits = run.last_logits([prompt_ids[i] for i in pick])
        balance, p_attr = _balance_loss(logits, tokens, target_t.to(device))
        loss = balance
        entry = {"step": step + 1, "lr": lr, "balance": float(balance.detach()),
                 "batch_tv": float(total_variation(p_attr.double().cpu(), target_t.double()).mean())}
        if control_ids:
            cpick = torch.randperm(len(control_ids), generator=gen)[:config.control_batch].tolist()
            c_loss = _control_loss(run.last_logits([control_ids[i] for i in cpick]), tokens,
                                   base_control[cpick].to(device))
            loss = loss + config.control_weight * c_loss
            entry["control"] = float(c_loss.detach())
        if neutral_ids:
            npick = torch.randperm(len(neutral_ids), generator=gen)[:config.neutral_batch].tolist()
            n_loss = run.neutral_loss([neutral_ids[i] for i in npick], [base_neutral[i] for i in npick])
            loss = loss + config.neutral_weight * n_loss
            entry["neutral"] = float(n_loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
            raise FloatingPointError(f"non-finite gradient at step {step + 1}; lower the learning rate")
        optimizer.step()
        entry["loss"] = float(loss.detach())
        entry["seconds"] = round(time.perf_counter() - start, 2)
        history.append(entry)
        if callback is not None:
            callback(entry)
        if (step + 1) % 10 == 0 or step == 0:
            log.info("debias %s step %d/%d loss %.4f (balance %.4f, batch TV %.3f)", name, step + 1,
                     config.steps, entry["loss"], entry["balance"], entry["batch_tv"])
    with torch.no_grad():
        after = _tv_by_cell(model, tokenizer, goal_probe, tokens, fillers, templates) if evaluate else {}
    return before, after, history, stopped_early, params
