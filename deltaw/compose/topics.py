"""The stacking report's default adapters: one SmolLM2 LoRA per BBC topic, trained once and cached.

Trained with ``deltaw.train`` (next-token loss on the topic's BBC *train* split; the report evaluates on the
*test* split) and cached under ``<cache>/stack-report/<topic>-<hash of the training settings>/``, where <cache> is
``$DELTAW_CACHE`` or ``~/.cache/deltaw``. A cache entry is used only if it holds a complete adapter; training writes
to a temporary folder and renames it into place, so an interrupted run never leaves a half-trained adapter behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..io.peft import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

# Bump when the training recipe changes meaning, so stale cached adapters are not reused.
_RECIPE = 1


@dataclass(frozen=True)
class TopicBudget:
    """Training settings per topic adapter.

    ``qv`` targets (LoRA paper §7.1: W_q, W_v are the best single pair) at r = 8 keep both training and the
    report's TIES/DARE compositions (which work on full ΔW matrices) within the CPU budget; 40 steps of 4 × 128
    tokens at lr 2e-3 move each topic's held-out perplexity visibly (a few minutes per topic on 2 cores).
    """

    steps: int = 40
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 2e-3
    r: int = 8
    alpha: float = 16.0
    targets: str = "qv"
    eval_max_examples: int = 8  # the trainer's own end-of-run validation; the report does its own evaluation

    @classmethod
    def quick(cls) -> TopicBudget:
        """CI: a handful of tiny steps (the adapters barely move; the point is that every stage runs)."""
        return cls(steps=4, batch_size=2, seq_len=64, lr=5e-3, r=4, alpha=8.0, eval_max_examples=2)

    def with_steps(self, steps: int) -> TopicBudget:
        return replace(self, steps=steps)

    def describe(self) -> str:
        return (f"{self.steps} steps x {self.batch_size} x {self.seq_len} tokens, lr {self.lr}, r={self.r}, "
                f"alpha={self.alpha}, targets={self.targets}")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from ..models import default_cache_dir

    return default_cache_dir() / "stack-report"


def _key(topic: str, budget: TopicBudget, model: str | None, seed: int) -> str:
    blob = json.dumps({"recipe": _RECIPE, "topic": topic, "budget": asdict(budget), "model": model or "smollm2",
                       "seed": seed}, sort_keys=True)
    return f"{topic}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _complete(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


def topic_adapters(model_path: str | None, topics: Sequence[str] | None, budget: TopicBudget, *, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None, quick: bool = False, model=None,
                   tokenizer=None) -> list[tuple[str, Path]]:
    """(topic, adapter dir) for each BBC topic (default: all five; ``quick``: the first three), training the ones
    not cached yet with ``deltaw.train``. ``model``/``tokenizer``: the already loaded ``model_path`` (each trained
    adapter is deleted from it again); otherwise it is loaded only if something must be trained."""
    from ..data import BBC_TOPICS

    chosen = list(topics) if topics else list(BBC_TOPICS[:3] if quick else BBC_TOPICS)
    unknown = [t for t in chosen if t not in BBC_TOPICS]
    if unknown:
        raise ValueError(f"unknown BBC topic(s) {unknown}; choose from {', '.join(BBC_TOPICS)}")
    root = cache_root(cache_dir)
    out: list[tuple[str, Path]] = []
    todo = [(t, root / _key(t, budget, model_path, seed)) for t in chosen]
    missing = [(t, d) for t, d in todo if not _complete(d)]
    if missing:
        _train_missing(model_path, missing, budget, seed, model, tokenizer)
    for t, d in todo:
        log.info("topic adapter %s: %s", t, d)
        out.append((t, d))
    return out


def _train_missing(model_path: str | None, missing: list[tuple[str, Path]], budget: TopicBudget, seed: int,
                   model=None, tokenizer=None) -> None:
    from .. import api
    from ..models import load_causal_lm
    from ..train import TrainConfig, train

    if model is None:
        model, tokenizer = load_causal_lm(model_path)
    for topic, final in missing:
        _remove_stale(final)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        log.info("training the %s adapter (%s) -> %s", topic, budget.describe(), final)
        config = TrainConfig(output_dir=str(tmp), data=f"bbc:{topic}", model=model_path, targets=budget.targets,
                             r=budget.r, alpha=budget.alpha, lr=budget.lr, steps=budget.steps,
                             batch_size=budget.batch_size, seq_len=budget.seq_len, seed=seed,
                             eval_max_examples=budget.eval_max_examples, adapter_name=topic, progress=False,
                             log_every=max(1, budget.steps // 10))
        try:
            result = train(config, model=model, tokenizer=tokenizer)
            if result.validation is not None:
                log.info("%s adapter: validation loss %.4f after %d steps (%.0f s)", topic, result.validation.loss,
                         result.steps, result.train_seconds)
        finally:
            if topic in api.adapters(model):
                api.delete(model, topic)  # the report loads every adapter from its directory, like any user would
            model.eval()
        if final.exists():  # another process finished the same adapter first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)


def _remove_stale(final: Path) -> None:
    """Delete temporary folders of this entry left by killed runs (their process no longer exists)."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # signal 0: only checks that the process exists
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue
