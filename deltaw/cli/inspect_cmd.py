"""``deltaw inspect ADAPTER [--base MODEL]``: what an adapter directory holds, and whether it fits a base.

Why a separate command: before loading (or shipping) an adapter people ask the same questions -- which modules,
which ranks, how big, trained on which base -- and all of it is in the PEFT config and the safetensors header,
readable without a model. ``--base`` then answers "will it load onto this model?" by actually loading it the
way ``deltaw.load`` does (every check: modules, shapes, fingerprint), onto a throwaway copy.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer

from .errors import cli_errors


def summarize(directory: Path) -> dict:
    """Everything ``inspect`` prints, as a dict (no model needed)."""
    from ..io.peft import WEIGHTS_NAME, read_adapter

    adapter = read_adapter(directory)
    cfg = adapter.config
    meta = adapter.deltaw_meta.get("metadata", {}) or {}
    ranks = Counter(int(f["A"].shape[0]) for f in adapter.factors.values())
    kinds = Counter(m.rsplit(".", 1)[-1] for m in adapter.factors)
    lora_params = sum(f["A"].numel() + f["B"].numel() for f in adapter.factors.values())
    saved_params = sum(t.numel() for sd in adapter.saved.values() for t in sd.values())
    fingerprint = adapter.deltaw_meta.get("fingerprint") or {}
    weights = adapter.directory / WEIGHTS_NAME
    return {
        "path": str(adapter.directory),
        "peft_type": adapter.peft.get("peft_type", "LORA"),
        "task_type": adapter.peft.get("task_type"),
        "base_model": adapter.peft.get("base_model_name_or_path"),
        "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "targets": sorted(adapter.factors),
        "target_kinds": dict(sorted(kinds.items())),
        "modules_to_save": sorted(adapter.saved),
        "lora_params": lora_params, "saved_params": saved_params, "params": lora_params + saved_params,
        "tensor_bytes": adapter.nbytes,
        "file_bytes": weights.stat().st_size + (adapter.directory / "adapter_config.json").stat().st_size,
        "fingerprint": fingerprint.get("sha256"),
        "deltaw_version": adapter.deltaw_meta.get("version"),
        "trained_on": meta.get("data"), "seq_len": meta.get("seq_len"), "label_names": meta.get("label_names"),
    }


def check_fits(directory: Path, base: str) -> tuple[bool, str]:
    """Load the adapter onto ``base`` (a fresh copy) with every check; (fits, reason)."""
    from ..errors import DeltawError
    from ..io.peft import load
    from ..train.session import adapter_defaults, model_argument
    from ..train.loading import load_for_task

    defaults = adapter_defaults(directory)
    task = defaults.task or "causal-lm"
    model, _ = load_for_task(task, model_argument(base), num_labels=len(defaults.label_names),
                             label_names=defaults.label_names)
    try:
        load(model, directory, "probe", activate=False)
    except DeltawError as exc:
        return False, str(exc)
    return True, "every module, shape and the base-weight fingerprint match"


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def inspect_cmd(
    adapter: Path = typer.Argument(..., help="Adapter directory (PEFT format)."),
    base: str | None = typer.Option(None, help="Check whether it fits this base: a local folder, or 'embedded'."),
    targets: bool = typer.Option(False, "--targets", help="List every adapted module."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print an adapter's config, targets, ranks, parameter count, size and base fingerprint."""
    with cli_errors():
        info = summarize(adapter)
        if base is not None:
            info["fits_base"], info["fits_reason"] = check_fits(adapter, base)
            info["checked_base"] = base
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        if base is not None and not info["fits_base"]:
            raise typer.Exit(1)
        return
    kinds = ", ".join(f"{k} x{v}" for k, v in info["target_kinds"].items())
    ranks = ", ".join(f"r={k} x{v}" for k, v in info["ranks"].items())
    lines = [
        f"adapter:         {info['path']}",
        f"type:            {info['peft_type']} ({info['task_type'] or 'task unknown'})",
        f"base model:      {info['base_model'] or 'unknown'}",
        f"config:          r={info['r']} alpha={info['alpha']:g} dropout={info['dropout']:g} rslora={info['use_rslora']}",
        f"targets:         {len(info['targets'])} modules ({kinds})",
        f"ranks:           {ranks}",
        f"modules_to_save: {', '.join(info['modules_to_save']) or 'none'}",
        f"parameters:      {info['params']:,} (LoRA {info['lora_params']:,}, saved modules {info['saved_params']:,})",
        f"size:            {_human(info['file_bytes'])} on disk ({_human(info['tensor_bytes'])} of tensors)",
        f"fingerprint:     {info['fingerprint'] or 'none (not written by deltaw)'}",
    ]
    if info.get("trained_on"):
        lines.append(f"trained on:      {info['trained_on']} (seq_len {info['seq_len']})")
    if info.get("label_names"):
        lines.append(f"labels:          {', '.join(info['label_names'])}")
    if base is not None:
        verdict = "yes" if info["fits_base"] else "NO"
        lines.append(f"fits {base}: {verdict} - {info['fits_reason']}")
    if targets:
        lines.append("modules:")
        lines.extend(f"  {m}" for m in info["targets"])
    typer.echo("\n".join(lines))
    if base is not None and not info["fits_base"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
