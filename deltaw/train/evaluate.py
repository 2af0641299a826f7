"""Held-out measurements: perplexity for causal LMs, accuracy and macro-F1 for classification.

``evaluate`` measures the model *as it is* (whatever adapters are live or merged); it never changes adapter
state. ``evaluate_variants`` compares base / adapter / merged and is the one place that merges -- only when
asked with ``merged=True``, and it unmerges (bit-exact) before returning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import api
from .data import Example, collate
from .distributed import DistContext, all_reduce_sum
from .objectives import loss_sum


@dataclass(frozen=True)
class EvalResult:
    """One measurement. ``loss`` is the mean token (causal) or example (classification) cross-entropy."""

    task: str
    n_examples: int
    n_targets: int
    loss: float
    perplexity: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    per_class_f1: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.task == "classification":
            return f"accuracy {self.accuracy:.4f}  macro-F1 {self.macro_f1:.4f}  loss {self.loss:.4f}"
        return f"perplexity {self.perplexity:.3f}  loss {self.loss:.4f}"


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str] = ()) -> tuple[float, dict[str, float]]:
    """Unweighted mean of per-class F1 over the classes present in truth or predictions (as scikit-learn)."""
    classes = sorted(set(y_true) | set(y_pred))
    per: dict[str, float] = {}
    for c in classes:
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        per[label_names[c] if c < len(label_names) else str(c)] = f1
    return (sum(per.values()) / len(per) if per else 0.0), per


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Example], task: str, *, pad_id: int, batch_size: int = 8,
             label_names: Sequence[str] = (), ctx: DistContext | None = None,
             device: torch.device | str | None = None) -> EvalResult:
    """Measure ``model`` on tokenized ``examples`` (eval mode inside, the previous mode restored after).

    Under DDP each rank takes every world_size-th example and the sums are all-reduced, so every rank
    returns the same numbers.
    """
    ctx = ctx or DistContext()
    if not examples:
        raise ValueError("nothing to evaluate: the evaluation set is empty")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    mine = list(examples)[ctx.rank::ctx.world_size]
    total = 0.0
    count = 0
    y_true: list[int] = []
    y_pred: list[int] = []
    try:
        for i in range(0, len(mine), batch_size):
            batch = collate(mine[i:i + batch_size], pad_id, device)
            s, n, logits = loss_sum(task, model, batch)
            total += float(s)
            count += n
            if task == "classification":
                y_true.extend(batch["labels"].tolist())
                y_pred.extend(logits.argmax(-1).tolist())
    finally:
        model.train(was_training)
    if ctx.enabled:
        total, count = all_reduce_sum([total, float(count)], ctx)
        count = int(count)
        if task == "classification":
            gathered_true: list[list[int]] = [[] for _ in range(ctx.world_size)]
            gathered_pred: list[list[int]] = [[] for _ in range(ctx.world_size)]
            torch.distributed.all_gather_object(gathered_true, y_true)
            torch.distributed.all_gather_object(gathered_pred, y_pred)
            y_true = [y for part in gathered_true for y in part]
            y_pred = [y for part in gathered_pred for y in part]
    loss = total / max(count, 1)
    if task == "classification":
        accuracy = sum(1 for t, p in zip(y_true, y_pred) if t == p) / max(len(y_true), 1)
        f1, per = macro_f1(y_true, y_pred, label_names)
        return EvalResult(task, len(examples), count, loss, accuracy=accuracy, macro_f1=f1, per_class_f1=per)
    return EvalResult(task, len(examples), count, loss, perplexity=math.exp(min(loss, 700.0)))


def evaluate_variants(model: nn.Module, examples: Sequence[Example], task: str, *, pad_id: int,
                      adapters: Sequence[str] | None = None, base: bool = True, merged: bool = True,
                      batch_size: int = 8, label_names: Sequence[str] = ()) -> dict[str, EvalResult]:
    """Evaluate ``base`` (adapters disabled), ``adapter`` (``adapters`` live) and, if ``merged``, the same
    adapters folded into the weights. The merge is undone before returning (unmerge restores W0 bit for bit)
    and the previous activation is restored, so the model leaves as it came."""
    names = list(adapters) if adapters is not None else [n for n, _ in api.active(model)]
    if not names:
        raise ValueError("no adapter to evaluate: load one or pass adapters=[...]")
    kw = dict(pad_id=pad_id, batch_size=batch_size, label_names=label_names)
    results: dict[str, EvalResult] = {}
    if base:
        with api.disabled(model):
            results["base"] = evaluate(model, examples, task, **kw)
    label = "adapter" if len(names) == 1 else "adapters(" + "+".join(names) + ")"
    with api.using(model, names):
        results[label] = evaluate(model, examples, task, **kw)
        if merged:
            already = api.merged(model)
            if already:
                raise ValueError(f"adapters {already} are already merged; unmerge them before comparing variants")
            api.merge(model, names)
            try:
                results["merged"] = evaluate(model, examples, task, **kw)
            finally:
                api.unmerge(model)
    return results
