"""``deltaw train``, ``deltaw eval``, ``deltaw generate`` and ``deltaw merge``.

Thin wrappers over :mod:`deltaw.train`: options map one-to-one onto ``TrainConfig`` fields, and every
expected failure (bad data, unknown targets, an existing output dir, an incompatible checkpoint, options that
do not go together) is reported as one ``error:`` line with exit code 2 instead of a traceback
(:func:`deltaw.cli.errors.cli_errors`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from .errors import cli_errors

log = logging.getLogger(__name__)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table (readable in a terminal, pasteable into an issue)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def eval_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    first = next(iter(results.values()))
    if first.task == "classification":
        headers = ["variant", "accuracy", "macro-F1", "loss", "examples"]
        rows = [[k, f"{r.accuracy:.4f}", f"{r.macro_f1:.4f}", f"{r.loss:.4f}", str(r.n_examples)] for k, r in results.items()]
    else:
        headers = ["variant", "perplexity", "loss", "tokens", "texts"]
        rows = [[k, f"{r.perplexity:.3f}", f"{r.loss:.4f}", str(r.n_targets), str(r.n_examples)] for k, r in results.items()]
    return headers, rows


def train_cmd(
    output: Path = typer.Option(..., "--output", "-o", help="Run directory: adapter, train_log.jsonl, loss_curve.png, checkpoints/."),
    data: str = typer.Option("bbc:tech", help="'bbc', 'bbc:<topic>[,<topic>]' (embedded BBC News) or a local .txt/.jsonl/folder."),
    model: str | None = typer.Option(None, help="Local transformers folder or .gguf; default: embedded SmolLM2 (causal-lm) / MiniLM (classification)."),
    task: str = typer.Option("causal-lm", help="causal-lm (next-token; prompt/response JSONL masks the prompt) or classification."),
    val_data: str | None = typer.Option(None, help="Validation data (default: BBC validation split / 10% of a local file)."),
    targets: str | None = typer.Option(None, help="Preset (all-linear, attention, qv, mlp), names 'q_proj,v_proj', or 're:<regex>' (default all-linear; top:4 with --objective balance)."),
    r: int = typer.Option(8, "--r", "-r", help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha (scaling = alpha / r)."),
    dropout: float = typer.Option(0.0, help="LoRA dropout on the adapter input."),
    lr: float | None = typer.Option(None, help="Peak learning rate (AdamW; default 1e-3, 2e-3 with --objective balance)."),
    schedule: str = typer.Option("cosine", help="cosine, linear or constant (after warmup)."),
    warmup_steps: int | None = typer.Option(None, help="Linear warmup steps (default 5% of the steps)."),
    steps: int | None = typer.Option(None, help="Optimizer steps (default: from --epochs)."),
    epochs: float | None = typer.Option(None, help="Epochs when --steps is not given (default 1)."),
    batch_size: int = typer.Option(4, help="Examples per micro-batch and process."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(256, help="Tokens per example; longer texts are truncated (and counted)."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations in backward to save memory."),
    seed: int = typer.Option(0, help="Seed for adapter init, data order and dropout."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    max_grad_norm: float | None = typer.Option(1.0, help="Gradient clipping norm (0 disables)."),
    eval_every: int = typer.Option(0, help="Validate every N steps (0: only at the end)."),
    eval_max_examples: int | None = typer.Option(64, help="Validation examples used (cap)."),
    early_stopping_patience: int = typer.Option(0, help="Stop after N validations without improvement (needs --eval-every)."),
    early_stopping_min_delta: float = typer.Option(0.0, help="Minimum validation-loss decrease that counts."),
    checkpoint_every: int = typer.Option(0, help="Write a resumable checkpoint every N steps."),
    keep_checkpoints: int = typer.Option(2, help="Checkpoints kept (older ones deleted)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --output."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast)."),
    adapter_name: str = typer.Option("default", help="Adapter name inside the model."),
    max_train_examples: int | None = typer.Option(None, help="Use only N training examples (a fixed random subset)."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    objective: str = typer.Option("lm", help="lm: the task's loss on --data; balance: pull a probe's attribute "
                                             "distribution toward --target, with KL to the base on neutral text."),
    probe: str | None = typer.Option(None, help="With --objective balance: probe name or JSON file (default "
                                                "gender_occupation)."),
    target: str | None = typer.Option(None, help="With --objective balance: 'uniform' (default) or JSON {value: prob}."),
) -> None:
    """Train a LoRA adapter (causal LM or classification). Works under torchrun for data parallelism.

    ``--objective balance`` trains a debiasing adapter instead (the same job as ``deltaw audit train-debias``):
    options that only make sense for text data (--data, --task, --batch-size, ...) are then refused."""
    from ..train import TrainConfig, train

    with cli_errors():
        if objective == "balance":
            from .audit import run_train_debias

            if resume or task != "causal-lm":
                raise ValueError("--objective balance trains a causal LM from the start (no --resume, no "
                                 "classification)")
            given = {"data": data, "val_data": val_data, "dropout": dropout, "schedule": schedule,
                     "warmup_steps": warmup_steps, "epochs": epochs, "batch_size": batch_size,
                     "grad_accum": grad_accum, "seq_len": seq_len, "gradient_checkpointing": gradient_checkpointing,
                     "weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "eval_every": eval_every,
                     "eval_max_examples": eval_max_examples, "early_stopping_patience": early_stopping_patience,
                     "early_stopping_min_delta": early_stopping_min_delta, "checkpoint_every": checkpoint_every,
                     "keep_checkpoints": keep_checkpoints, "device": device, "precision": precision,
                     "max_train_examples": max_train_examples}
            unused = unused_balance_options(given)
            if unused:
                raise ValueError(f"--objective balance does not use {', '.join(unused)}; drop them (it trains on "
                                 "the probe's prompts with its own batch, device and precision settings)")
            run_train_debias(output, model=model, probe=probe, target=target, steps=steps, lr=lr, r=r, alpha=alpha,
                             targets=targets, seed=seed, overwrite=overwrite,
                             name="debias" if adapter_name == "default" else adapter_name)
            return
        if objective != "lm":
            raise ValueError(f"unknown --objective {objective!r}; expected 'lm' or 'balance'")
        if probe is not None or target is not None:
            raise ValueError("--probe and --target belong to --objective balance")
        # Only what the user gave; the rest keeps TrainConfig's defaults.
        defaults_overridden = {k: v for k, v in (("targets", targets), ("lr", lr)) if v is not None}
        config = TrainConfig(
            output_dir=str(output), task=task, model=model, data=data, val_data=val_data, r=r, alpha=alpha,
            dropout=dropout, schedule=schedule, warmup_steps=warmup_steps, steps=steps, **defaults_overridden,
            epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len,
            gradient_checkpointing=gradient_checkpointing, seed=seed, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm or None, eval_every=eval_every, eval_max_examples=eval_max_examples,
            early_stopping_patience=early_stopping_patience, early_stopping_min_delta=early_stopping_min_delta,
            checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, resume=resume, overwrite=overwrite,
            device=device, precision=precision, adapter_name=adapter_name, max_train_examples=max_train_examples,
            progress=progress)
        result = train(config)
    # result.rank, not torch.distributed: train() destroys the process group it created before returning, so
    # asking dist afterwards would make every torchrun rank print the summary.
    if result.rank != 0:
        return
    typer.echo(f"adapter: {result.adapter_dir}")
    typer.echo(f"steps: {result.steps}/{result.total_steps}  final train loss: {result.final_train_loss:.4f}  "
               f"time: {result.train_seconds:.1f}s  trainable params: {result.trainable_params:,}")
    if result.validation is not None:
        typer.echo(f"validation: {result.validation.summary()}")
    if result.stopped_early:
        typer.echo(f"stopped early; kept the best adapter (step {result.best_step})")
    typer.echo(f"log: {result.log_path}" + (f"  plot: {result.plot_path}" if result.plot_path else ""))


def unused_balance_options(given: dict[str, object]) -> list[str]:
    """The ``--option`` names in ``given`` that differ from ``train``'s defaults: ``--objective balance`` refuses them.

    Why refuse instead of ignoring: a user who passes ``--device cuda`` or ``--data mine.jsonl`` expects it to
    matter, and a run that silently did something else is worse than an error.
    """
    import inspect

    defaults = {name: p.default.default for name, p in inspect.signature(train_cmd).parameters.items()}
    return [f"--{name.replace('_', '-')}" for name, value in given.items() if value != defaults[name]]


def eval_cmd(
    adapter: list[Path] = typer.Option([], "--adapter", "-a", help="Adapter directory (repeatable)."),
    model: str | None = typer.Option(None, help="Base model (default: the adapter's base, else embedded)."),
    task: str | None = typer.Option(None, help="causal-lm or classification (default: from the adapter)."),
    data: str | None = typer.Option(None, help="Evaluation data (default: the adapter's --val-data, else the part of "
                                               "its local training file held out from training, else BBC's test split)."),
    split: str = typer.Option("test", help="BBC split to evaluate on (local files are used whole)."),
    seq_len: int | None = typer.Option(None, help="Tokens per text (default: the adapter's training seq_len, else 256)."),
    batch_size: int = typer.Option(8, help="Evaluation batch size."),
    max_examples: int | None = typer.Option(None, help="Evaluate N examples only (a fixed random subset)."),
    base: bool = typer.Option(True, help="Include the base model."),
    merged: bool = typer.Option(True, help="Include the adapters merged into the weights (unmerged afterwards)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    seed: int = typer.Option(0, help="Seed for a classification base's fresh head."),
    allow_base_mismatch: bool = typer.Option(False, help="Load adapters trained on another base anyway."),
) -> None:
    """Held-out perplexity (causal LM) or accuracy / macro-F1 (classification): base, adapter(s), merged."""
    from .. import api
    from ..train.data import align_labels, limit, load_eval_dataset, pad_id_of
    from ..train.evaluate import evaluate
    from ..train.loop import _tokenize
    from ..train.session import adapter_defaults, open_session

    with cli_errors():
        defaults = adapter_defaults(adapter[0]) if adapter else None
        spec, held_out = eval_data_spec(data, defaults)
        ds = limit(load_eval_dataset(spec, split, held_out=held_out), max_examples)
        labels = (defaults.label_names if defaults else []) or list(getattr(ds, "label_names", []) or [])
        session = open_session(adapter, model=model, task=task, label_names=labels, seed=seed, device="cpu",
                               allow_base_mismatch=allow_base_mismatch)
        if session.task == "classification" and session.label_names:
            ds = align_labels(ds, session.label_names, f"evaluation data {spec!r}")
        length = seq_len or session.defaults.seq_len or 256
        examples = _tokenize(session.task, ds, session.tokenizer, length, f"evaluation data {spec!r}")
        kw = dict(pad_id=pad_id_of(session.tokenizer), batch_size=batch_size, label_names=list(ds.label_names or []))
        net, results = session.model, {}
        if base or not session.adapters:
            if session.adapters:
                with api.disabled(net):
                    results["base"] = evaluate(net, examples, session.task, **kw)
            else:
                results["base"] = evaluate(net, examples, session.task, **kw)
        for name in session.adapters:
            with api.using(net, name):
                results[name] = evaluate(net, examples, session.task, **kw)
        if len(session.adapters) > 1:
            with api.using(net, session.adapters):
                results["+".join(session.adapters)] = evaluate(net, examples, session.task, **kw)
        if merged and session.adapters:
            with api.using(net, session.adapters):
                api.merge(net, session.adapters)  # explicit, and undone below (bit-exact)
                try:
                    results["merged"] = evaluate(net, examples, session.task, **kw)
                finally:
                    api.unmerge(net)
    if as_json:
        typer.echo(json.dumps({k: v.to_dict() for k, v in results.items()}, indent=2))
        return
    from ..train.data import is_bbc_spec

    where = f"{spec} [{split}]" if is_bbc_spec(spec) else (f"{spec} [held-out part]" if held_out else spec)
    typer.echo(f"data: {where}, {len(examples)} examples, seq_len {length}")
    typer.echo(format_table(*eval_rows(results)))


def eval_data_spec(data: str | None, defaults) -> tuple[str, bool]:
    """(spec, held_out): what ``eval`` measures when ``--data`` is or is not given.

    Without ``--data`` it must not score the examples the adapter trained on: the run's ``--val-data`` if it had
    one, else the held-out part of its local training file (BBC specs have a test split of their own).
    """
    from ..train.data import is_bbc_spec

    if data:
        return data, False
    if defaults is None or not defaults.data:
        return "bbc:tech", False
    if defaults.val_data:
        return defaults.val_data, False
    return defaults.data, not is_bbc_spec(defaults.data)


def generate_cmd(
    prompt: str = typer.Argument(..., help="Text to continue."),
    adapter: list[Path] = typer.Option([], "--adapter", "-a", help="Adapter directory (repeatable; all are activated)."),
    model: str | None = typer.Option(None, help="Base model (default: the adapter's base, else embedded SmolLM2)."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, help="0: greedy; > 0: sampling."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (with --temperature > 0)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    compare_base: bool = typer.Option(False, help="Also print the base model's continuation."),
) -> None:
    """Generate text with a causal LM and adapter(s)."""
    import torch

    from .. import api
    from ..train.session import open_session

    with cli_errors():
        if max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")
        session = open_session(adapter, model=model, task="causal-lm", device="cpu")
        tok, net = session.tokenizer, session.model
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True) if chat else prompt
        inputs = tok(text, return_tensors="pt")
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=tok.pad_token_id)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p)

        def run() -> str:
            torch.manual_seed(seed)
            with torch.no_grad():
                out = net.generate(**inputs, **kwargs)
            return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

        if session.adapters:
            if compare_base:
                with api.disabled(net):
                    typer.echo(f"--- base\n{prompt}{run()}")
            api.activate(net, session.adapters)
            label = "+".join(session.adapters)
            typer.echo(f"--- {label}\n{prompt}{run()}" if compare_base else f"{prompt}{run()}")
        else:
            typer.echo(f"{prompt}{run()}")


def merge_cmd(
    adapter: list[Path] = typer.Option(..., "--adapter", "-a", help="Adapter directory (repeatable)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged model."),
    model: str | None = typer.Option(None, help="Base model (default: the adapter's base)."),
    weight: list[float] = typer.Option([], help="Merge weight per adapter (default 1.0 each)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
) -> None:
    """Fold adapters into the base weights and write a plain transformers model folder (safetensors)."""
    import torch

    from .. import api
    from ..train.export import save_plain_model
    from ..train.session import open_session

    with cli_errors():
        if weight and len(weight) != len(adapter):
            raise ValueError(f"{len(weight)} --weight values for {len(adapter)} adapters; give one per adapter or none")
        out = Path(output)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{str(out)!r} is a file; give a folder for the merged model")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{str(out)!r} exists and is not empty; pass --overwrite to replace it")
        session = open_session(adapter, model=model)
        net = session.model
        spec = dict(zip(session.adapters, weight or [1.0] * len(adapter)))
        probe = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]) % max(2, _vocab(net))}
        with torch.no_grad():
            api.activate(net, spec)
            before = _logits(net, probe)
            plain = api.merge_and_unload(net, spec)
            after = _logits(plain, probe)
        diff = float((before - after).abs().max())
        save_plain_model(plain, session.tokenizer, out, overwrite=overwrite)
    typer.echo(f"merged {', '.join(f'{k}x{v:g}' for k, v in spec.items())} into {out} "
               f"(max |logit difference| adapter vs merged on a probe: {diff:.2e})")


def _vocab(net) -> int:
    return int(getattr(getattr(net, "config", None), "vocab_size", 2) or 2)


def _logits(net, batch):
    out = net(**batch)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
    app.command("generate")(generate_cmd)
    app.command("merge")(merge_cmd)
