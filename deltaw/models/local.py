"""Resolve "which model?" for the CLI and the trainers: an embedded default, or a local transformers folder.

Why only local paths and no Hub ids: deltaw must run on machines without network access, and a silent
download of gigabytes is never what a ``--model`` flag should do. A Hub model is used by downloading it
once (``huggingface-cli download ... --local-dir DIR``) and passing ``DIR``. Every load passes
``local_files_only=True`` and never ``trust_remote_code``: a model folder cannot run code it ships.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deltaw.models.embedded import ModelLoadError, _dtype_kwargs, load_gguf, load_minilm, load_smollm2

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["CAUSAL_LM_NAMES", "ENCODER_NAMES", "load_causal_lm", "load_encoder"]

logger = logging.getLogger(__name__)

#: Names (case-insensitive) that select the embedded SmolLM2-135M-Instruct.
CAUSAL_LM_NAMES: tuple[str, ...] = ("smollm2", "smollm2-135m-instruct")
#: Names (case-insensitive) that select the embedded all-MiniLM-L6-v2.
ENCODER_NAMES: tuple[str, ...] = ("minilm", "all-minilm-l6-v2")


def load_causal_lm(
    path_or_name: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        path_or_name: ``None`` or one of :data:`CAUSAL_LM_NAMES` for the embedded SmolLM2; a ``.gguf``
            file (converted once and cached, like SmolLM2); or a local transformers folder (with
            ``config.json``), or a folder holding a single ``.gguf`` file.
        device, dtype: placement and parameter dtype.

    Returns:
        ``(model, tokenizer)``, the model in eval mode. If the tokenizer has no pad token, its eos token
        is used as pad (batched training needs one; this is the usual convention for decoder-only models).

    Raises:
        FileNotFoundError: the path does not exist (the message says how to get a model offline).
        ModelLoadError: the folder is not a transformers model.
    """
    if path_or_name is None or _is_name(path_or_name, CAUSAL_LM_NAMES):
        return load_smollm2(device, dtype)
    folder = _existing_path(path_or_name, "causal LM", CAUSAL_LM_NAMES)
    if folder.is_file():
        if folder.suffix.lower() == ".gguf":
            return load_gguf(folder, device, dtype)
        raise ModelLoadError(f"{str(folder)!r} is a file; pass a transformers model folder or a .gguf file.")
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], device, dtype)
        raise ModelLoadError(
            f"{str(folder)!r} has no config.json, so it is not a transformers model folder"
            + (f" (it holds {len(ggufs)} .gguf files; pass one of them)" if ggufs else "")
            + "; save one with model.save_pretrained(DIR) or download it with huggingface-cli download ... --local-dir DIR."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **_dtype_kwargs(dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot load a causal LM and tokenizer from {str(folder)!r}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("%s: tokenizer has no pad token; using eos %r as pad", folder, tokenizer.eos_token)
    return model.to(device).eval(), tokenizer


def load_encoder(
    path_or_name: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a text encoder (``AutoModel``, no task head) and its tokenizer.

    Args:
        path_or_name: ``None`` or one of :data:`ENCODER_NAMES` for the embedded all-MiniLM-L6-v2, or a
            local transformers folder (with ``config.json``).
        device: placement.

    Raises:
        FileNotFoundError: the path does not exist.
        ModelLoadError: the folder is not a transformers model.
    """
    if path_or_name is None or _is_name(path_or_name, ENCODER_NAMES):
        return load_minilm(device)
    folder = _existing_path(path_or_name, "encoder", ENCODER_NAMES)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{str(folder)!r} is not a transformers model folder (no config.json); save one with "
            "model.save_pretrained(DIR) or download it with huggingface-cli download ... --local-dir DIR."
        )
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot load an encoder and tokenizer from {str(folder)!r}: {exc}") from exc
    return model.to(device).eval(), tokenizer


def _is_name(value: str | os.PathLike[str], names: tuple[str, ...]) -> bool:
    return isinstance(value, str) and value.strip().lower() in names


def _existing_path(value: str | os.PathLike[str], kind: str, names: tuple[str, ...]) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{kind} path {str(path)!r} does not exist. Pass None or one of {list(names)} for the embedded model, "
            "or a local folder; Hub ids are not downloaded (use huggingface-cli download ... --local-dir DIR first)."
        )
    return path
