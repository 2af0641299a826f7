"""Target presets per architecture, and the head a classification adapter trains in full.

Why presets: "which modules?" is the first question of every LoRA run and the answer depends only on the
architecture's module names. ``all-linear`` works everywhere (the core resolves it); the named presets
(``attention``, ``qv``, ``mlp``) map to each family's names. Anything else is an explicit comma-separated list
of module-name suffixes, or ``re:<regex>`` matched against full module paths.
"""

from __future__ import annotations

from torch import nn

from ..config import ALL_LINEAR
from ..errors import TargetError

_LLAMA = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
_BERT = {
    "attention": ("query", "key", "value", "attention.output.dense"),
    "qv": ("query", "value"),
    "mlp": r".*\.layer\.\d+\.(intermediate|output)\.dense",
}
_GPT2 = {
    "attention": ("c_attn", "attn.c_proj"),
    "qv": ("c_attn",),  # fused q,k,v: the closest GPT-2 has
    "mlp": ("c_fc", "mlp.c_proj"),
}
PRESETS: dict[str, dict[str, tuple[str, ...] | str]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "smollm3")},
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra")},
    "gpt2": _GPT2,
}
PRESET_NAMES = ("all-linear", "attention", "qv", "mlp")
# Classification heads that are new per task (trained in full, saved with the adapter via modules_to_save).
HEAD_NAMES = ("classifier", "score")


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def resolve_targets(spec: str, model: nn.Module) -> tuple[str, ...] | str:
    """A preset name, ``re:<regex>`` or ``a,b,c`` -> what LoraConfig.target_modules takes."""
    spec = spec.strip()
    if spec == ALL_LINEAR:
        return ALL_LINEAR
    if spec.startswith("re:"):
        return spec[3:]
    if spec in PRESET_NAMES:
        kind = model_type(model)
        table = PRESETS.get(kind or "")
        if table is None:
            raise TargetError(f"no '{spec}' preset for model type {kind!r} (presets exist for "
                              f"{', '.join(sorted(PRESETS))}); use 'all-linear' or name the modules, e.g. q_proj,v_proj")
        return table[spec]
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if not names:
        raise TargetError(f"empty target list {spec!r}")
    return names


def classification_head(model: nn.Module) -> tuple[str, ...]:
    """The name of the model's fresh classification head, for ``modules_to_save``."""
    found = tuple(n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module))
    if not found:
        raise TargetError(f"{type(model).__name__} has no classification head named one of {HEAD_NAMES}; load the "
                          "model with AutoModelForSequenceClassification")
    return found[:1]
