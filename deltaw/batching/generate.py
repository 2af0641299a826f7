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
    ``prompts`` (one per adapter) are left-padded, generated, and the new text of each row is returned.

    There must be exactly one adapter spec per input row (ValueError otherwise): ``model.generate``'s own
    expansion of a row (``num_beams``, ``num_return_sequences``) happens later and keeps each row's spec."""
    if isinstance(tokenizer_or_inputs, torch.Tensor):
        _check_rows(tokenizer_or_inputs.shape[0] if tokenizer_or_inputs.dim() > 1 else 1, adapters, "input row")
        with per_row(model, adapters, strategy=strategy), torch.inference_mode():
            return model.generate(input_ids=tokenizer_or_inputs, **gen_kwargs)
    if isinstance(tokenizer_or_inputs, Mapping):
        batch = next((tokenizer_or_inputs[k] for k in ("input_ids", "inputs_embeds", "attention_mask")
                      if isinstance(tokenizer_or_inputs.get(k), torch.Tensor)), None)
        if batch is not None:
            _check_rows(batch.shape[0] if batch.dim() > 1 else 1, adapters, "input row")
        with per_row(model, adapters, strategy=strategy), torch.inference_mode():
            return model.generate(**dict(tokenizer_or_inputs), **gen_kwargs)
    tokenizer = tokenizer_or_inputs
    if prompts is None:
        raise ValueError("with a tokenizer, pass prompts=[...] with exactly one prompt per adapter spec")
    _check_rows(len(prompts), adapters, "prompt")
    side = tokenizer.padding_side
    pad = tokenizer.pad_token
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position of every row
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        # (no token_type_ids: a tokenizer that makes them would have generate() refuse the decoder's kwargs)
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, return_token_type_ids=False)
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


def _check_rows(n: int, adapters: Sequence[RowSpec], what: str) -> None:
    """One adapter spec per input row: ``per_row`` alone would read 4 rows with 2 specs as 2 entries per spec
    (its beam-search layout) and silently give row 1 the first spec."""
    if isinstance(adapters, (str, Mapping)):
        raise ValueError(f"adapters must be a list with exactly one spec per {what}, not a single "
                         f"{type(adapters).__name__}: got {n} {what}s; pass [{adapters!r}] * {n} for the same "
                         "spec on every row")
    if len(adapters) != n:
        lead = "with a tokenizer, pass prompts=[...] with " if what == "prompt" else "pass "
        raise ValueError(f"{lead}exactly one {what} per adapter spec: got {n} {what}s for {len(adapters)} adapter "
                         "specs (num_beams / num_return_sequences expand each row later, keeping its spec)")
