"""Write a merged, adapter-free model as a plain transformers folder.

Why not ``save_pretrained``: models loaded from GGUF carry a quantization marker and transformers refuses to
save them, and the tied ``lm_head`` must be stored once (safetensors refuses shared tensors). So the folder is
written by hand: ``model.safetensors`` (each shared tensor once; ``from_pretrained`` re-ties from
``tie_word_embeddings``), ``config.json`` without the GGUF quantization marker, the generation config when the
model has one, and the tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .. import api

log = logging.getLogger(__name__)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every shared tensor kept under its first name, contiguous, on the CPU."""
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident in seen:
            continue
        seen.add(ident)
        kept[key] = tensor.detach().to("cpu").contiguous()
    return kept


def save_plain_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` (no adapter state may remain: call ``deltaw.merge_and_unload`` first) to ``out_dir``."""
    if api.adapters(model):
        raise ValueError("the model still carries adapters: call deltaw.merge_and_unload(model) first")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{str(out)!r} exists and is not empty; pass --overwrite to replace it")
        if out.is_dir() and not (out / "config.json").is_file():
            raise FileExistsError(f"refusing to overwrite {str(out)!r}: it does not look like a model folder")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(plain_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = getattr(model, "config", None)
        if config is not None:
            data = config.to_dict()
            data.pop("quantization_config", None)
            data["torch_dtype"] = data["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("merged model written to %s", out)
    return out
