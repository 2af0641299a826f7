"""``deltaw audit``: measure what an adapter shifts, what removing it restores, what merging keeps.

    deltaw audit --out DIR                          # default debiasing adapter on the embedded SmolLM2
    deltaw audit --out DIR --adapter runs/fix       # your adapter
    deltaw audit train-debias --out runs/fix        # train a debiasing adapter (balance objective)
    deltaw audit probes [NAME]                      # list the shipped probes / print one
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer

from .errors import cli_errors

log = logging.getLogger(__name__)

audit_app = typer.Typer(
    invoke_without_command=True, add_completion=False,
    help="Bias audit: attribute distributions over templated prompts, base vs adapter vs removed vs merged vs "
         "stacked, with the quality cost; and a debiasing training objective.")


def configure_threads(threads: int) -> int:
    """Set torch's CPU threads. 0 = auto: 1 thread when the machine is already busy (load average >= cores).

    Why: on a small shared machine, OpenMP workers of several processes spin-wait on each other; we measured
    a SmolLM2 forward 5-10x *slower* with 2 threads than with 1 on a loaded 2-core box.
    """
    import torch

    if threads <= 0:
        try:
            busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
        except OSError:
            busy = False
        threads = 1 if busy else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def _debias_config(quick: bool, **overrides):
    from dataclasses import replace

    from deltaw.audit import AuditConfig, DebiasConfig

    base = AuditConfig.quick().debias if quick else DebiasConfig()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _resolved_target(probe, target: str | None) -> dict[str, float] | None:
    """``--target`` checked against the probe's values: 'uniform' or a JSON object naming every value with a
    finite probability >= 0 (normalised). Raises :class:`ProbeError` naming what is wrong."""
    from deltaw.audit.probe import parse_target

    if target is None:
        return None
    return parse_target(target, probe.value_names, "--target")


def _chosen_fillers(probe, fillers: str | None) -> list[str] | None:
    """``--fillers`` as a list of the probe's *train* fillers (None: all of them).

    Why refuse held-out ones: training on them would leak the held-out cell the report's headline number is
    measured on; and a typo would otherwise only show up as a prompt about a "carpentr".
    """
    from deltaw.audit.probe import ProbeError

    if fillers is None:
        return None
    chosen = list(dict.fromkeys(f.strip() for f in fillers.split(",") if f.strip()))
    if not chosen:
        raise ProbeError("--fillers lists no filler; give comma-separated train fillers of the probe")
    train = set(probe.fillers["train"])
    heldout = [f for f in chosen if f in probe.fillers["heldout"]]
    unknown = [f for f in chosen if f not in train and f not in heldout]
    problems = []
    if heldout:
        problems.append(f"{heldout} are held-out fillers (training on them would leak the held-out evaluation)")
    if unknown:
        problems.append(f"{unknown} are not fillers of probe {probe.name!r}")
    if problems:
        raise ProbeError("--fillers: " + "; ".join(problems) + f". Train fillers: {', '.join(probe.fillers['train'])}")
    return chosen


def _check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that exists but is not a directory (before any minutes of work are spent)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} exists and is not a directory; choose a directory path")


@audit_app.callback()
def audit_cmd(
    ctx: typer.Context,
    out: Path | None = typer.Option(None, "--out", "-o", help="Directory for report.json, report.md and skew.png."),
    adapter: Path | None = typer.Option(None, help="PEFT adapter directory to audit. Default: the default debiasing "
                                                   "adapter, trained once and cached under $DELTAW_CACHE/audit."),
    stack: list[Path] = typer.Option([], help="Adapter directories to stack for the 'stacked' row (repeat; >= 2)."),
    train_stack: bool | None = typer.Option(None, "--train-stack/--no-train-stack",
                                            help="Train (or reuse) the default stacked adapters even with --adapter."),
    model: str | None = typer.Option(None, help="Causal LM: a local folder or .gguf (default: embedded SmolLM2)."),
    probe: str | None = typer.Option(None, help="Probe: a shipped name (see 'deltaw audit probes') or a JSON file."),
    target: str | None = typer.Option(None, help="Target distribution: 'uniform' or JSON {value: prob}."),
    mode: str = typer.Option("exact", help="exact: next-token probabilities (no sampling) | sampled: generate and "
                                           "score with an attribute function."),
    attribute_fn: str | None = typer.Option(None, help="Sampled mode: 'package.module:function' or 'file.py:function' "
                                                       "returning a value name or None (default: the probe's regex)."),
    attribute_regex: str | None = typer.Option(None, help="Sampled mode: JSON {value: regex} (or a .json file); the "
                                                          "earliest match wins."),
    samples: int | None = typer.Option(None, min=1, help="Sampled mode: continuations per prompt (default 16)."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Sampled mode: tokens per continuation (default 12)."),
    sampled_scope: str = typer.Option("heldout", help="Sampled mode: 'heldout' (held-out fillers x templates, "
                                                      "the headline cell) or 'all' prompts (slow)."),
    steps: int | None = typer.Option(None, min=0, help="Training steps of the default adapters (default 60)."),
    quick: bool = typer.Option(False, help="CI size: a few fillers/templates, short training, short perplexity."),
    keep_merged: bool = typer.Option(False, help="Keep the merged plain model in OUT/merged_model."),
    cache_dir: Path | None = typer.Option(None, help="Cache root for default adapters (default $DELTAW_CACHE/audit)."),
    seed: int = typer.Option(0, help="Seed (training and sampling)."),
    threads: int = typer.Option(0, help="torch CPU threads (0 = auto: 1 when the machine is busy)."),
) -> None:
    """Run the side-by-side audit (base, base + adapter, removed, merged+reloaded, stacked)."""
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        typer.echo(ctx.get_help())
        typer.echo("\nerror: --out DIR is required", err=True)
        raise typer.Exit(2)
    from dataclasses import replace

    from deltaw.audit import AuditConfig, run_audit
    from deltaw.audit.probe import load_probe

    if mode not in ("exact", "sampled"):
        raise typer.BadParameter("--mode must be 'exact' or 'sampled'")
    if sampled_scope not in ("heldout", "all"):
        raise typer.BadParameter("--sampled-scope must be 'heldout' or 'all'")
    if attribute_fn and attribute_regex:
        raise typer.BadParameter("give --attribute-fn or --attribute-regex, not both")
    n = configure_threads(threads)
    with cli_errors():
        _check_out_dir(out)
        probe_obj = load_probe(probe)
        config = AuditConfig.quick() if quick else AuditConfig()
        overrides = {"probe": probe, "target": _resolved_target(probe_obj, target), "mode": mode,
                     "attribute_fn": attribute_fn or attribute_regex, "seed": seed, "keep_merged": keep_merged,
                     "n_samples": samples, "max_new_tokens": max_new_tokens, "sampled_scope": sampled_scope}
        config = replace(config, **{k: v for k, v in overrides.items() if v is not None or k in ("probe", "target")})
        # ``is not None``: --steps 0 (no training, the adapter stays at its zero-B init) is a valid request.
        config = replace(config, debias=replace(config.debias, seed=seed,
                                                **({"steps": steps} if steps is not None else {})))
        report = run_audit(out, config=config, model_path=model, adapter=adapter, stack=stack,
                           train_stack=train_stack, cache_root=cache_dir)
    from deltaw.audit.report import conclusions

    typer.echo(f"{'row':16s} {'TV':>8s} {'skew':>8s} {'ppl':>9s} {'neutralKL':>10s} {'control':>8s}")
    for label, r in report["rows"].items():
        if r is None:
            typer.echo(f"{label:16s} (skipped)")
            continue
        fmt = lambda x, d=4: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
        typer.echo(f"{label:16s} {fmt(r['tv_to_target']):>8s} {fmt(r['skew']):>8s} {fmt(r['heldout_ppl'], 3):>9s} "
                   f"{fmt(r['neutral_kl'], 5):>10s} {fmt(r['controllability'], 3):>8s}")
    for line in conclusions(report):
        typer.echo(line)
    typer.echo(f"removed_equals_base: {str(report['removed_equals_base']).lower()}  "
               f"({report['timings_s']['total']:.0f}s, {n} thread(s))")
    typer.echo(f"wrote {Path(out) / 'report.json'}, report.md{', skew.png' if report.get('plot') else ''}")


@audit_app.command("train-debias")
def train_debias_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the adapter (PEFT format) and debias.json."),
    model: str | None = typer.Option(None, help="Causal LM: a local folder or .gguf (default: embedded SmolLM2)."),
    probe: str | None = typer.Option(None, help="Probe name or JSON file (default gender_occupation)."),
    target: str | None = typer.Option(None, help="Target distribution: 'uniform' or JSON {value: prob}."),
    fillers: str | None = typer.Option(None, help="Comma-separated train fillers to use (default: all train fillers)."),
    steps: int | None = typer.Option(None, min=0, help="Optimizer steps (default 60)."),
    lr: float | None = typer.Option(None, help="Learning rate (default 2e-3)."),
    r: int | None = typer.Option(None, help="LoRA rank (default 8)."),
    alpha: float | None = typer.Option(None, help="LoRA alpha (default 16)."),
    targets: str | None = typer.Option(None, help="'top:K' (last K blocks, default top:4), 'all-linear', a preset "
                                                  "or module names."),
    neutral_weight: float | None = typer.Option(None, help="Weight of KL(base ‖ model) on neutral text (default 1)."),
    control_weight: float | None = typer.Option(None, help="Weight of keeping stated values (default 1)."),
    max_seconds: float | None = typer.Option(None, help="Stop training after this many seconds."),
    name: str = typer.Option("debias", help="Adapter name."),
    quick: bool = typer.Option(False, help="A few steps on small batches (CI)."),
    overwrite: bool = typer.Option(False, help="Replace an existing adapter in --out."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch CPU threads (0 = auto)."),
) -> None:
    """Train a debiasing adapter: KL(target ‖ p_attr) on train fillers x train templates + KL to base."""
    run_train_debias(out, model=model, probe=probe, target=target, fillers=fillers, steps=steps, lr=lr, r=r,
                     alpha=alpha, targets=targets, neutral_weight=neutral_weight, control_weight=control_weight,
                     max_seconds=max_seconds, name=name, quick=quick, overwrite=overwrite, seed=seed, threads=threads)


def run_train_debias(out: Path, *, model: str | None = None, probe: str | None = None, target: str | None = None,
                     fillers: str | None = None, steps: int | None = None, lr: float | None = None,
                     r: int | None = None, alpha: float | None = None, targets: str | None = None,
                     neutral_weight: float | None = None, control_weight: float | None = None,
                     max_seconds: float | None = None, name: str = "debias", quick: bool = False,
                     overwrite: bool = False, seed: int = 0, threads: int = 0) -> None:
    """The debias training job behind ``deltaw audit train-debias`` and ``deltaw train --objective balance``."""
    from deltaw.audit import train_debias
    from deltaw.audit.probe import load_probe
    from deltaw.io import save

    with cli_errors():
        # Checked before any work: a wrong --out should not cost a model load and minutes of training.
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {str(out)!r} exists and is not a directory; choose a directory path")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace it")
        configure_threads(threads)
        probe_obj = load_probe(probe)
        # Checked before the model loads: a bad --target or --fillers should not cost a model load.
        goal = _resolved_target(probe_obj, target)
        chosen = _chosen_fillers(probe_obj, fillers)
        config = _debias_config(quick, steps=steps, lr=lr, r=r, alpha=alpha, targets=targets, seed=seed,
                                neutral_weight=neutral_weight, control_weight=control_weight, max_seconds=max_seconds)
        from deltaw.models import load_causal_lm

        lm, tok = load_causal_lm(model)
        result = train_debias(lm, tok, probe_obj, config, name=name, fillers=chosen, target=goal)
        save(lm, out, name, base_model_name_or_path=model or "smollm2")
        (out / "debias.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    b, a = result.before, result.after
    typer.echo(f"trained {name!r}: {result.steps} steps in {result.seconds:.0f}s; TV to target train "
               f"{b.get('train', float('nan')):.4f} -> {a.get('train', float('nan')):.4f}, held-out "
               f"{b.get('heldout', float('nan')):.4f} -> {a.get('heldout', float('nan')):.4f}")
    typer.echo(f"wrote {out}")


@audit_app.command("probes")
def probes_cmd(name: str | None = typer.Argument(None, help="Print this probe (name or JSON path).")) -> None:
    """List the shipped probes, or print one (fillers, templates, attribute words, source)."""
    from deltaw.audit.probe import load_probe, shipped_probes

    if name is None:
        for p in shipped_probes():
            typer.echo(p)
        return
    with cli_errors():
        probe = load_probe(name)
    typer.echo(json.dumps(probe.to_dict(), indent=1))


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
