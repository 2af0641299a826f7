"""``train(TrainConfig) -> TrainResult``: LoRA fine-tuning for causal LMs and sequence classifiers.

The loop is deliberately plain: AdamW over the adapter parameters only, an LR that is a pure function of the
step, the deterministic batch stream of ``data.BatchStream``, and losses normalised by the global batch's
target count (``objectives``). Those three choices are what make ``--resume`` bit-identical and N-process
training equal to 1-process training. The model comes back with the adapter attached and *unmerged*:
merging is the caller's decision (``deltaw.merge``), never a side effect of training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .. import api
from ..config import LoraConfig
from ..data import DatasetError
from ..errors import DeltawError, NonFiniteError
from ..io import peft as peft_io
from . import checkpoint as ckpt
from . import distributed as dist_util
from . import report
from .config import TrainConfig
from .data import (BatchStream, Example, align_labels, collate, data_identity, is_bbc_spec, limit, load_splits,
                   pad_id_of, shard, tokenize_causal, tokenize_classification)
from .evaluate import EvalResult, evaluate
from .loading import load_for_task
from .objectives import loss_sum
from .targets import classification_head, resolve_targets

log = logging.getLogger(__name__)

CONFIG_NAME = "train_config.json"
BEST_DIR = "best"
EMBEDDED_NAMES = {"causal-lm": "smollm2", "classification": "minilm"}
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS"}


class OutputExistsError(DeltawError, FileExistsError):
    """The output directory holds a previous run (or something else) and --overwrite/--resume was not given."""


@dataclass(frozen=True)
class StepInfo:
    """What callbacks see after each optimizer step."""

    step: int  # steps completed
    total_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    epoch: float


@dataclass
class TrainResult:
    """The trained model (adapter attached, active, unmerged) and where everything was written."""

    config: TrainConfig
    model: nn.Module
    tokenizer: Any
    adapter_dir: Path
    log_path: Path
    plot_path: Path | None
    steps: int
    total_steps: int
    final_train_loss: float | None
    validation: EvalResult | None
    best_val_loss: float | None
    best_step: int | None
    stopped_early: bool
    resumed_from: Path | None
    train_seconds: float
    tokens_seen: int
    trainable_params: int
    peak_memory_bytes: int
    label_names: list[str] = field(default_factory=list)
    # This process's torchrun rank (0 without torchrun). Recorded because train() destroys the process group it
    # created before returning, so afterwards torch.distributed can no longer say which rank should report.
    rank: int = 0


def lr_at(step: int, total: int, warmup: int, base: float, schedule: str) -> float:
    """The learning rate of (0-based) step ``step``: linear warmup, then cosine / linear decay or constant."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- output directory ----------------------------------------------------------------------------------
def plan_output_dir(config: TrainConfig) -> tuple[Path, Path | None]:
    """Decide what to do with ``output_dir`` (no side effects): (dir, checkpoint to resume from or None)."""
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out)!r} is a file; give a directory")
    if config.resume:
        found = ckpt.list_checkpoints(out)
        if not found:
            raise ckpt.CheckpointError(f"--resume: no checkpoint under {out / ckpt.CHECKPOINTS} (write some with "
                                       "--checkpoint-every N)")
        return out, found[-1]
    if out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            raise OutputExistsError(f"output directory {str(out)!r} already exists and is not empty; pass --overwrite "
                                    "to replace it, --resume to continue it, or choose another directory")
        if not (out / CONFIG_NAME).is_file():
            raise OutputExistsError(f"refusing to overwrite {str(out)!r}: it is not a deltaw run directory (no "
                                    f"{CONFIG_NAME}); remove it yourself if you mean it")
    return out, None


def _prepare_output_dir(out: Path, config: TrainConfig, resuming: bool, ctx: dist_util.DistContext) -> None:
    dist_util.barrier(ctx)  # every rank has planned before rank 0 deletes anything
    if ctx.is_main:
        if not resuming and config.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:
            (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    dist_util.barrier(ctx)


# ---- pieces --------------------------------------------------------------------------------------------
def _tokenize(task: str, ds, tokenizer, seq_len: int, what: str) -> list[Example]:
    if task == "classification":
        return tokenize_classification(ds, tokenizer, seq_len, what)
    return tokenize_causal(ds, tokenizer, seq_len, what)


def _lora_config(config: TrainConfig, model: nn.Module) -> LoraConfig:
    saved = classification_head(model) if config.task == "classification" else ()
    return LoraConfig(r=config.r, alpha=config.alpha, target_modules=resolve_targets(config.targets, model),
                      dropout=config.dropout, modules_to_save=saved)


def resolved_spec(spec: str) -> str:
    """A data or model spec as it should be recorded: an existing local path made absolute, anything else as typed.

    Why: the adapter is read later from another directory (``deltaw eval -a RUN`` from anywhere), where a relative
    path would name another file or none; names such as 'bbc:tech' or 'smollm2' are not paths and stay.
    """
    if is_bbc_spec(spec):
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _base_model_name(config: TrainConfig) -> str:
    return resolved_spec(config.model) if config.model else EMBEDDED_NAMES[config.task]


def _adapter_metadata(config: TrainConfig, label_names: Sequence[str]) -> dict:
    meta = {"task_type": PEFT_TASK[config.task], "deltaw_task": config.task, "data": resolved_spec(config.data),
            "seq_len": config.seq_len, "base_model_name_or_path": _base_model_name(config)}
    if config.val_data:
        meta["val_data"] = resolved_spec(config.val_data)
    if label_names:
        meta["label_names"] = list(label_names)
    return meta


def _load_adapter_tensors(model: nn.Module, name: str, directory: Path) -> None:
    """Copy a saved adapter's tensors into the resident adapter ``name`` (same modules, same shapes)."""
    adapter = peft_io.read_adapter(directory)
    st = api.state(model)
    with torch.no_grad():
        for module, entry in adapter.factors.items():
            a, b = st.layers[module].adapter_parameters(name)
            a.copy_(entry["A"])
            b.copy_(entry["B"])
        for module, sd in adapter.saved.items():
            st.saved_modules[module].modules_to_save[name].load_state_dict(sd)


def _autocast(config: TrainConfig, device: torch.device):
    if config.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- the entry point -----------------------------------------------------------------------------------
def train(config: TrainConfig, *, model: nn.Module | None = None, tokenizer: Any = None,
          callbacks: Sequence[Callable[[StepInfo], None]] = ()) -> TrainResult:
    """Train one adapter as ``config`` says; see the module docstring.

    ``model``/``tokenizer`` may be passed in (e.g. a model built in memory); otherwise ``config.model`` is
    loaded. Under ``torchrun`` every process calls this; rank 0 writes the files. Errors about the inputs
    (empty data, unknown targets, a rank too large, an existing output dir, an incompatible checkpoint) are
    raised before anything on disk changes.
    """
    ctx = dist_util.setup(config.device)
    try:
        return _train(config, model, tokenizer, callbacks, ctx)
    finally:
        dist_util.teardown(ctx)


def _train(config: TrainConfig, model, tokenizer, callbacks, ctx: dist_util.DistContext) -> TrainResult:
    out, resume_from = plan_output_dir(config)
    saved_state: dict | None = None
    if resume_from is not None:
        saved_state = ckpt.read_state(resume_from)
        ckpt.check_compatible(saved_state, config.identity(), ctx.world_size, resume_from)
        log.info("resuming from %s (step %d)", resume_from, saved_state["state"]["step"])

    seed_everything(config.seed)
    splits = load_splits(config.data, config.val_data)
    # Hashed only when a checkpoint is read or written (a data file may be large); after load_splits, so a
    # missing file is reported by the loader.
    data_id = _data_identity(config) if config.checkpoint_every or resume_from is not None else {}
    if resume_from is not None and saved_state is not None:
        ckpt.check_data(saved_state, data_id, resume_from)
    train_ds = limit(splits.train, config.max_train_examples)
    label_names = list(getattr(train_ds, "label_names", []) or []) if config.task == "classification" else []
    if config.task == "classification" and len(label_names) < 2:
        raise DatasetError(f"classification needs labeled data with at least 2 labels; {config.data!r} has "
                           f"{len(label_names)} ({', '.join(label_names) or 'unlabeled'})")
    validation = splits.validation
    if config.task == "classification" and validation is not None:
        validation = align_labels(validation, label_names, f"validation data {config.val_data or config.data!r}")
    if model is None:
        model, tokenizer = load_for_task(config.task, config.model, num_labels=len(label_names),
                                         label_names=label_names, seed=config.seed, device=ctx.device)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    model.to(ctx.device)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and config.seq_len > context:
        raise ValueError(f"seq_len={config.seq_len} exceeds the model's context of {context} positions; "
                         f"use --seq-len {context} or less (longer texts are truncated to it)")
    pad_id = pad_id_of(tokenizer)
    examples = _tokenize(config.task, train_ds, tokenizer, config.seq_len, f"training data {config.data!r}")
    val_examples: list[Example] = []
    if validation is not None and len(validation):
        val_examples = _tokenize(config.task, limit(validation, config.eval_max_examples), tokenizer,
                                 config.seq_len, "validation data")
    elif config.eval_every or config.early_stopping_patience:
        log.warning("no validation data: periodic evaluation and early stopping are off")

    # The adapter: fresh (same init on every rank: same seed) or the checkpoint's (validated against this base).
    # Until training starts, an error takes it out again (attach itself is all-or-nothing): the caller's model
    # comes back as it was passed in, and a retry after fixing the cause does not meet a leftover adapter.
    name = config.adapter_name
    undo = api.undo_attach(model)
    torch.manual_seed(config.seed)
    if resume_from is not None:
        peft_io.load(model, resume_from, name, trainable=True, activate=True)
    else:
        info = api.attach(model, _lora_config(config, model), name)
        info.metadata.update(_adapter_metadata(config, label_names))
    try:
        api.state(model).adapters[name].metadata.update(_adapter_metadata(config, label_names))
        api.activate(model, name)

        params, names = ckpt.named_trainables(model)
        adapter_ids = {id(p) for p in api.adapter_parameters(model, name)}
        stray = [names[id(p)] for p in params if id(p) not in adapter_ids]
        if stray:
            raise ValueError(f"parameters outside the adapter require grad: {stray[:5]}; only adapters are trained")
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

        global_batch = config.batch_size * config.grad_accum * ctx.world_size
        stream = BatchStream(examples, global_batch, config.seed)
        total = config.steps or stream.steps_for_epochs(config.epochs or 1.0)
        warmup = config.warmup_steps if config.warmup_steps is not None else round(0.05 * total)
        warmup = min(warmup, total)

        _prepare_output_dir(out, config, resume_from is not None, ctx)
        log_path = out / report.LOG_NAME
        state = ckpt.TrainerState()
        if resume_from is not None and saved_state is not None:
            ckpt.load_optimizer(optimizer, names, ckpt.read_optimizer(resume_from),
                                _json_groups(saved_state["optimizer_param_groups"]))
            state = ckpt.TrainerState(**saved_state["state"])
            if ctx.is_main:
                report.truncate(log_path, state.step)
            dist_util.barrier(ctx)
            ckpt.restore_rng(*ckpt.read_rng(resume_from, ctx.rank))
        else:
            torch.manual_seed(config.seed + 7919 * ctx.rank)  # dropout stream: per rank, fixed by the seed
        if config.gradient_checkpointing:  # last: nothing after it can fail, so it never needs undoing
            # transformers 5 renamed the method; non-reentrant checkpointing works with a frozen embedding.
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
            if hasattr(model, "config"):
                model.config.use_cache = False
    except BaseException:
        undo(name)
        raise
    n_trainable = sum(p.numel() for p in params)
    if ctx.is_main:
        log.info("training %s adapter %r: %d trainable parameters, %d examples, %d steps x %d examples",
                 config.task, name, n_trainable, len(examples), total, global_batch)

    def save_adapter(directory: Path) -> None:
        peft_io.save(model, directory, name, base_model_name_or_path=_base_model_name(config))

    def run_eval() -> EvalResult:
        return evaluate(model, val_examples, config.task, pad_id=pad_id, batch_size=max(config.batch_size, 8),
                        label_names=label_names, ctx=ctx, device=ctx.device)

    model.train()
    bar = tqdm(total=total, initial=state.step, unit="step", dynamic_ncols=True, desc=f"train {name}",
               disable=not (config.progress and ctx.is_main))
    last_loss: float | None = None
    validation: EvalResult | None = None
    evaluated_at = -1
    stopped_early = False
    t_start = time.perf_counter()
    try:
        for step in range(state.step, total):
            t0 = time.perf_counter()
            lr = lr_at(step, total, warmup, config.lr, config.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = stream.indices(step)
            n_targets = sum(examples[i].n_targets() for i in indices)
            n_tokens = sum(len(examples[i].input_ids) for i in indices)
            local = 0.0
            for micro in shard(indices, config.batch_size, config.grad_accum, ctx.rank):
                batch = collate([examples[i] for i in micro], pad_id, ctx.device)
                with _autocast(config, ctx.device):
                    s, _, _ = loss_sum(config.task, model, batch)
                (s / n_targets).backward()
                local += float(s.detach())
            dist_util.all_reduce_grads(params, ctx)
            loss = dist_util.all_reduce_sum([local], ctx)[0] / n_targets
            if not math.isfinite(loss):
                raise NonFiniteError(f"loss became {loss} at step {step + 1}; lower --lr (now {config.lr}) or enable "
                                     "--max-grad-norm. Checkpoints written so far are kept")
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            dt = time.perf_counter() - t0
            state.step = step + 1
            state.tokens_seen += n_tokens
            state.elapsed_s += dt
            last_loss = loss
            tok_s = n_tokens / dt if dt > 0 else 0.0
            epoch = stream.epoch_at(state.step)
            if ctx.is_main and (state.step % config.log_every == 0 or state.step == total):
                report.append(log_path, {"event": "step", "step": state.step, "loss": loss, "lr": lr,
                                         "tokens": n_tokens, "tokens_per_s": tok_s, "epoch": epoch,
                                         "elapsed_s": state.elapsed_s})
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            info = StepInfo(state.step, total, loss, lr, tok_s, epoch)
            for callback in callbacks:
                callback(info)

            if val_examples and config.eval_every and state.step % config.eval_every == 0:
                validation = run_eval()
                evaluated_at = state.step
                stopped_early = _track_best(validation, state, config, ctx, out, save_adapter, log_path)
            if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < total \
                    and not stopped_early:
                _checkpoint(out, state, config, ctx, optimizer, names, save_adapter, data_id)
            if stopped_early:
                log.info("early stopping at step %d: no validation improvement in %d evaluations (best %.4f at "
                         "step %d)", state.step, config.early_stopping_patience, state.best_val_loss, state.best_step)
                break
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t_start

    if config.early_stopping_patience and state.best_step is not None and state.best_step != state.step:
        dist_util.barrier(ctx)  # rank 0 may have written best/ just now
        _load_adapter_tensors(model, name, out / BEST_DIR)  # the kept adapter is the best one
        log.info("restored the best adapter (step %d, validation loss %.4f)", state.best_step, state.best_val_loss)
        validation = None
    if val_examples and (validation is None or evaluated_at != state.step):
        validation = run_eval()
        if ctx.is_main:
            report.append(log_path, {"event": "eval", "step": state.step, "val_loss": validation.loss,
                                     **_metrics(validation)})
    model.eval()
    plot_path = None
    if ctx.is_main:
        save_adapter(out)
        plot_path = report.plot(log_path, out / report.PLOT_NAME, f"{config.task} LoRA r={config.r} on {config.data}")
        log.info("adapter written to %s", out)
    dist_util.barrier(ctx)
    return TrainResult(
        config=config, model=model, tokenizer=tokenizer, adapter_dir=out, log_path=log_path, plot_path=plot_path,
        steps=state.step, total_steps=total, final_train_loss=last_loss, validation=validation,
        best_val_loss=state.best_val_loss, best_step=state.best_step, stopped_early=stopped_early,
        resumed_from=resume_from, train_seconds=train_seconds, tokens_seen=state.tokens_seen,
        trainable_params=n_trainable, peak_memory_bytes=peak_memory_bytes(ctx.device), label_names=label_names,
        rank=ctx.rank)


def _metrics(result: EvalResult) -> dict:
    keys = ("perplexity",) if result.task != "classification" else ("accuracy", "macro_f1")
    return {k: getattr(result, k) for k in keys}


def _track_best(validation: EvalResult, state: ckpt.TrainerState, config: TrainConfig, ctx, out: Path,
                save_adapter, log_path: Path) -> bool:
    """Record an evaluation; returns whether early stopping triggers (the same decision on every rank)."""
    improved = state.best_val_loss is None or validation.loss < state.best_val_loss - config.early_stopping_min_delta
    if improved:
        state.best_val_loss, state.best_step, state.bad_evals = validation.loss, state.step, 0
        if config.early_stopping_patience and ctx.is_main:
            save_adapter(out / BEST_DIR)
    else:
        state.bad_evals += 1
    if ctx.is_main:
        report.append(log_path, {"event": "eval", "step": state.step, "val_loss": validation.loss,
                                 "best": improved, **_metrics(validation)})
    return bool(config.early_stopping_patience) and state.bad_evals >= config.early_stopping_patience


def _data_identity(config: TrainConfig) -> dict[str, dict]:
    """Fingerprints of the training and validation data (``data.data_identity``), for checkpoints and resume."""
    found = {"data": data_identity(config.data)}
    if config.val_data:
        found["val_data"] = data_identity(config.val_data)
    return found


def _checkpoint(out: Path, state: ckpt.TrainerState, config: TrainConfig, ctx, optimizer, names, save_adapter,
                data_id: dict[str, dict]) -> None:
    path = ckpt.checkpoint_dir(out, state.step)
    ckpt.write(path, rank=ctx.rank, is_main=ctx.is_main, save_adapter=save_adapter, optimizer=optimizer, names=names,
               state=state, identity=config.identity(), world_size=ctx.world_size, data=data_id)
    dist_util.barrier(ctx)
    ckpt.write_rng(path, ctx.rank)
    dist_util.barrier(ctx)
    if ctx.is_main:
        ckpt.commit(path)
        ckpt.prune(out, config.keep_checkpoints)
        log.debug("checkpoint %s", path)
    dist_util.barrier(ctx)


def _json_groups(groups: list[dict]) -> list[dict]:
    return [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]


def read_label_names(adapter_dir: Path) -> list[str]:
    """Label names stored with a classification adapter (empty if none)."""
    weights = Path(adapter_dir) / peft_io.WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("deltaw", "{}"))
    return list(meta.get("metadata", {}).get("label_names", []))
