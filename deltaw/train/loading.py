"""Load the model a task needs: a causal LM (embedded SmolLM2 or a local folder) or an encoder with a new head.

Why here and not in ``deltaw.models``: classification needs a head sized to the data's labels, initialised
reproducibly (the seed is set first), and with a pad token the architecture can find; those are training
decisions. Loading the weights themselves is delegated to ``deltaw.models``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ..models import ENCODER_NAMES, ModelLoadError, load_causal_lm, load_minilm_classifier

log = logging.getLogger(__name__)


def load_for_task(task: str, model: str | None, *, num_labels: int = 0, label_names: Sequence[str] = (),
                  seed: int = 0, device: str | torch.device = "cpu"):
    """(model, tokenizer) for ``task``; the model is returned in eval mode on ``device``."""
    if task == "classification":
        return load_classifier(model, num_labels, label_names, seed=seed, device=device)
    return load_causal_lm(model, device=device)


def load_classifier(model: str | None, num_labels: int, label_names: Sequence[str] = (), *, seed: int = 0,
                    device: str | torch.device = "cpu"):
    """An encoder with a fresh ``num_labels``-way head; the head's init is fixed by ``seed``."""
    if num_labels < 2:
        raise ModelLoadError(f"classification needs at least 2 labels, the data has {num_labels}")
    names = list(label_names) or [str(i) for i in range(num_labels)]
    torch.manual_seed(seed)  # the head is drawn from the global RNG: make it a function of the seed
    if model is None or model.strip().lower() in ENCODER_NAMES:
        return load_minilm_classifier(num_labels, device=device, label_names=names)
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"classifier model {str(folder)!r} is not a transformers folder (no config.json)")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        net = AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=num_labels, id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, local_files_only=True, ignore_mismatched_sizes=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load a sequence classifier and tokenizer from {str(folder)!r}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(net.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        net.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers locate the last token with it
    return net.to(device).eval(), tokenizer
