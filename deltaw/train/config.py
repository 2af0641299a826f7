"""``TrainConfig``: every knob of a training run in one validated, frozen dataclass.

Why one dataclass: the CLI, the Python API, checkpoints and ``--resume`` all speak it. A checkpoint stores the
fields that decide the numbers (``IDENTITY_FIELDS``); resuming with any of them changed is refused, because the
continuation would silently be another run. Fields that only decide *when* something is written or shown
(eval/checkpoint cadence, progress bar) may change between the interrupted and the resumed process.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

TASKS = ("causal-lm", "classification")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")

# Fields that change the trained weights. Everything else is bookkeeping.
IDENTITY_FIELDS = (
    "task", "model", "data", "val_data", "targets", "r", "alpha", "dropout", "lr", "schedule", "warmup_steps",
    "steps", "epochs", "batch_size", "grad_accum", "seq_len", "seed", "weight_decay", "max_grad_norm",
    "precision", "adapter_name", "max_train_examples", "early_stopping_patience", "early_stopping_min_delta",
)
# With early stopping these decide which evaluations happen, on which examples, and so when training stops and
# which adapter is kept: they change the result, so a resume must agree on them too.
EARLY_STOPPING_IDENTITY_FIELDS = ("eval_every", "eval_max_examples")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``output_dir`` receives the adapter (PEFT format), ``train_log.jsonl``,
    ``loss_curve.png``, ``train_config.json`` and ``checkpoints/``."""

    output_dir: str
    task: Literal["causal-lm", "classification"] = "causal-lm"  # next-token LoRA is the toolkit's main use.
    model: str | None = None  # None: the embedded model for the task (SmolLM2 / MiniLM); else a local folder.
    data: str = "bbc:tech"  # the embedded corpus, so a bare `deltaw train` works offline.
    val_data: str | None = None  # None: BBC's validation split, or 10 % held out of a local file.
    targets: str = "all-linear"  # LoRA paper §7.1 + QLoRA: adapting every linear layer beats q,v at equal params.
    r: int = 8  # §7.2: r = 4-8 already matches full fine-tuning; the ecosystem default.
    alpha: float = 16.0  # alpha / r = 2, PEFT's and most recipes' scaling.
    dropout: float = 0.0  # off: with a few hundred steps dropout only slows convergence.
    lr: float = 1e-3  # LoRA tolerates ~10x full-FT rates; 1e-3 beat 2e-4 on BBC/SmolLM2 within a 40-step budget.
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decays to 0: the common robust choice.
    warmup_steps: int | None = None  # None: 5 % of the steps, which keeps Adam's first updates from overshooting.
    steps: int | None = None  # optimizer steps; None: derived from ``epochs``.
    epochs: float | None = None  # used when ``steps`` is None; both None means one epoch.
    batch_size: int = 4  # per process and micro-step; fits a 135M model at 256 tokens in < 3 GB on a CPU.
    grad_accum: int = 1  # micro-steps per optimizer step; global batch = batch_size * grad_accum * world size.
    seq_len: int = 256  # BBC articles average ~500 tokens; 256 keeps a step at a few seconds on 2 cores.
    gradient_checkpointing: bool = False  # off: trades ~30 % more compute for memory, rarely needed for LoRA.
    seed: int = 0  # fixes adapter init, data order and dropout: same seed, same run.
    weight_decay: float = 0.0  # LoRA factors are few and start at zero; decay mostly pulls B back to 0.
    max_grad_norm: float | None = 1.0  # clip: guards the first steps against loss spikes.
    eval_every: int = 0  # 0: validate only at the end; N: every N steps (needed for early stopping).
    eval_max_examples: int | None = 64  # cap validation cost; held-out test evaluation is `deltaw eval`'s job.
    early_stopping_patience: int = 0  # 0: off; N: stop after N evaluations without improvement, keep the best.
    early_stopping_min_delta: float = 0.0  # any decrease of validation loss counts as an improvement.
    checkpoint_every: int = 0  # 0: no checkpoints; N: a resumable checkpoint every N steps.
    keep_checkpoints: int = 2  # older checkpoints are deleted; 2 survives a crash during a checkpoint write.
    resume: bool = False  # continue from the newest checkpoint in output_dir.
    overwrite: bool = False  # never delete a previous run unless asked.
    device: str = "auto"  # cuda (this process's local rank) when available, else cpu.
    precision: Literal["fp32", "bf16"] = "fp32"  # fp32: exact and fast enough on CPU; bf16 autocast on GPUs.
    adapter_name: str = "default"  # PEFT's default name, so PEFT loads the output without arguments.
    max_train_examples: int | None = None  # None: all; a cap for quick experiments.
    progress: bool = True  # tqdm bar on rank 0 (loss, tokens/s, ETA).
    log_every: int = 1  # JSONL line every N steps.

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError("TrainConfig.output_dir must be a non-empty path")
        if self.task not in TASKS:
            raise ValueError(f"TrainConfig.task must be one of {TASKS}, got {self.task!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.data:
            raise ValueError("TrainConfig.data is empty: give 'bbc:<topic>' or a local path")
        if not self.targets:
            raise ValueError("TrainConfig.targets is empty: give a preset (attention, qv, mlp, all-linear) or names")
        for name in ("r", "batch_size", "grad_accum", "seq_len", "log_every", "keep_checkpoints"):
            _positive_int(name, getattr(self, name))
        for name in ("eval_every", "checkpoint_every", "early_stopping_patience", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        for name in ("steps", "max_train_examples", "eval_max_examples"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ValueError(f"TrainConfig.warmup_steps must be None or an integer >= 0, got {self.warmup_steps!r}")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs)
                                            and self.epochs > 0):
            raise ValueError(f"TrainConfig.epochs must be a positive number, got {self.epochs!r}")
        for name in ("lr", "alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"TrainConfig.{name} must be a finite positive number, got {value!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("weight_decay", "early_stopping_min_delta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"TrainConfig.max_grad_norm must be None or > 0, got {self.max_grad_norm!r}")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early stopping needs periodic validation: set eval_every (e.g. 10) as well")
        _check_device(self.device)
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: pick one")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields a checkpoint must agree with to be resumed (the evaluation cadence too, with early stopping)."""
        names = IDENTITY_FIELDS + (EARLY_STOPPING_IDENTITY_FIELDS if self.early_stopping_patience else ())
        return {name: getattr(self, name) for name in names}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")


def _check_device(pref: object) -> None:
    """Refuse a device string torch cannot parse now, rather than with a RuntimeError once training starts."""
    import torch

    if pref == "auto":
        return
    try:
        torch.device(pref)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise ValueError(f"TrainConfig.device: unknown device {pref!r}; expected auto, cpu, cuda or cuda:N") from None
