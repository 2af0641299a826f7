"""Training and evaluating adapters: ``train(TrainConfig(...))``, ``evaluate``, ``evaluate_variants``.

    from deltaw.train import TrainConfig, train
    result = train(TrainConfig(output_dir="runs/tech", data="bbc:tech", steps=60))
    result.model   # adapter attached and active, not merged

The CLI (``deltaw train / eval / generate / merge``) is a thin layer over these functions.
"""

from .checkpoint import CheckpointError
from .config import TrainConfig
from .data import BatchStream, Example, load_eval_dataset, load_splits, tokenize_causal, tokenize_classification
from .evaluate import EvalResult, evaluate, evaluate_variants, macro_f1
from .export import save_plain_model
from .loop import OutputExistsError, StepInfo, TrainResult, lr_at, train
from .targets import PRESET_NAMES, resolve_targets

__all__ = [
    "BatchStream", "CheckpointError", "EvalResult", "Example", "OutputExistsError", "PRESET_NAMES", "StepInfo",
    "TrainConfig", "TrainResult", "evaluate", "evaluate_variants", "load_eval_dataset", "load_splits", "lr_at",
    "macro_f1", "resolve_targets", "save_plain_model", "tokenize_causal", "tokenize_classification", "train",
]
