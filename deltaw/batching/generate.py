"""``generate``: HF ``model.generate`` with one adapter spec per prompt, in a single batched call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .plan import RowSpec, per_row


def generate(model: nn.Module, tokenizer_or_inputs: Any, adapters: Sequence[RowSpec], *,
             prompts: Sequence[str] | None = None, strategy: str = "auto", **gen_kwargs: Any) -> Any:
    """Generate for every row with its own adapter (rows fixed for the whole call, KV cache included).

    ``tokenizer_or_inputs``: a tensor of input ids (B, T), a mapping of model inputs (``input_ids``,
    ``attention_mask`` ...) -- both return ``model.generate``'s output -- or a tokenizer, in which case
    ``prompts`` (one per adapter) are left-padded, generated, and the new text of each row is returned."""
    if isinstance(tokenizer_or_inputs, torch.Tensor):
        with per_row(model, adapters, strategy=strategy), torch.inference_mode():
            return model.generate(input_ids=tokenizer_or_inputs, **gen_kwargs)
    if isinstance(tokenizer_or_inputs, Mapping):
        with per_row(model, adapters, strategy=strategy), torch.inference_mode():
            return model.generate(**dict(tokenizer_or_inputs), **gen_kwargs)
    tokenizer = tokenizer_or_inputs
    if prompts is None or len(prompts) != len(adapters):
        raise ValueError("with a tokenizer, pass prompts=[...] with exactly one prompt per adapter spec")
    side = tokenizer.padding_side
    pad = tokenizer.pad_token
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position of every row
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = pad
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    gen_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id if pad is not None else tokenizer.eos_token_id)
    with per_row(model, adapters, strategy=strategy), torch.inference_mode():
        out = model.generate(**enc, **gen_kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
