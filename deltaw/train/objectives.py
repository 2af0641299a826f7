"""Loss sums for the two tasks.

Why sums and not means: a step's loss is Σ(token or example losses over the *global* batch) / (their count),
and a micro-batch contributes its sum divided by that global count. Gradients then add up to exactly the
gradient of the global mean however the batch is split into micro-batches and DDP ranks -- which is what
makes 2-process training equal to 1-process training on the same global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a collated batch (labels are kept out of the model: we compute the loss)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits if hasattr(out, "logits") else out[0]


def causal_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ next-token cross-entropy over positions whose label counts, and how many there are."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((shift_labels != IGNORE_INDEX).sum())


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ cross-entropy over the rows, and the row count."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())


def loss_sum(task: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(loss sum, count, logits) for one micro-batch."""
    logits = forward_logits(model, batch)
    if task == "classification":
        total, count = classification_loss_sum(logits, batch["labels"])
    else:
        total, count = causal_loss_sum(logits, batch["labels"])
    return total, count, logits
