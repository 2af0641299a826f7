"""Models deltaw can load offline: the embedded SmolLM2 and MiniLM wheels, GGUF files and local folders.

transformers is imported lazily inside the loaders, so importing this package stays cheap and a CLI that
never loads a model never pays for it. See :mod:`deltaw.models.embedded` for the SmolLM2 cache.
"""

from deltaw.models.embedded import (
    MissingDependencyError,
    ModelLoadError,
    default_cache_dir,
    load_gguf,
    load_minilm,
    load_minilm_classifier,
    load_smollm2,
    minilm_dir,
    smollm2_gguf_path,
)
from deltaw.models.local import CAUSAL_LM_NAMES, ENCODER_NAMES, load_causal_lm, load_encoder

__all__ = [
    "CAUSAL_LM_NAMES",
    "ENCODER_NAMES",
    "MissingDependencyError",
    "ModelLoadError",
    "default_cache_dir",
    "load_causal_lm",
    "load_encoder",
    "load_gguf",
    "load_minilm",
    "load_minilm_classifier",
    "load_smollm2",
    "minilm_dir",
    "smollm2_gguf_path",
]
