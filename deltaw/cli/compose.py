"""``deltaw compose`` (combine adapter directories into one) and ``deltaw stack-report`` (measure stacking)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import typer

from .errors import cli_errors

log = logging.getLogger(__name__)


def parse_source(spec: str) -> tuple[Path, float]:
    """``DIR:WEIGHT`` -> (DIR, WEIGHT); a bare ``DIR`` (or one whose suffix after ':' is not a number) weighs 1."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def compose_cmd(
    sources: list[str] = typer.Argument(..., help="Adapter directories with weights: DIR:WEIGHT (DIR alone = 1.0); "
                                                  "negative weights subtract (task negation)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the composed adapter to (PEFT format)."),
    method: str = typer.Option("linear", help="linear (exact, rank Σr) | svd (exact sum truncated to --rank) | "
                                              "ties (Yadav et al. 2023) | dare (Yu et al. 2023)."),
    rank: int | None = typer.Option(None, help="Rank of the result (default: svd max r, ties/dare Σr; linear "
                                               "ignores it)."),
    density: float | None = typer.Option(None, help="ties: share of entries kept per task (default 0.2)."),
    drop_rate: float | None = typer.Option(None, help="dare: drop probability p (default 0.5)."),
    seed: int = typer.Option(0, help="dare: random seed."),
    name: str = typer.Option("combo", help="Adapter name recorded in the file's metadata."),
    allow_base_mismatch: bool = typer.Option(False, help="Compose adapters trained on different base models."),
    as_json: bool = typer.Option(False, "--json", help="Print the full per-module report as JSON."),
) -> None:
    """Combine PEFT adapter directories into one, without loading a model."""
    from deltaw.compose import DEFAULT_DENSITY, DEFAULT_DROP_RATE, compose_dirs

    parsed = [parse_source(s) for s in sources]
    with cli_errors():  # OSError included: e.g. --out names an existing file
        report = compose_dirs(parsed, out, method, rank=rank, name=name, seed=seed,
                              density=DEFAULT_DENSITY if density is None else density,
                              drop_rate=DEFAULT_DROP_RATE if drop_rate is None else drop_rate,
                              allow_base_mismatch=allow_base_mismatch)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    typer.echo(report.summary())
    worst = sorted(report.modules.items(), key=lambda kv: -kv[1].rel_error)[:5]
    if method != "linear" and worst:
        typer.echo("largest factorisation errors (module: rank, rel. error, energy kept, distance from exact sum):")
        for path, m in worst:
            typer.echo(f"  {path}: r={m.rank}  {m.rel_error:.4f}  {m.energy_kept:.4f}  {m.deviation:.4f}")
    typer.echo(f"wrote {out}")


def _named_dirs(specs: list[str]) -> list[tuple[str, Path]]:
    """``NAME=DIR`` or ``DIR`` (name = the directory's name)."""
    from deltaw.registry import check_name

    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        out.append((check_name(name), Path(path)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise typer.BadParameter(f"adapter names repeat: {names}; use NAME=DIR to name them")
    return out


def stack_report_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Directory for report.json, report.md and the plots."),
    quick: bool = typer.Option(False, help="CI budget: tiny training, 3 topics, 1 evaluation block of 64 tokens."),
    adapters: list[str] | None = typer.Option(None, "--adapters", help="Use these adapter dirs (NAME=DIR or DIR) "
                                              "instead of training one per BBC topic; more dirs may follow."),
    more_adapters: list[str] | None = typer.Argument(None, help="More adapter dirs after --adapters.",
                                                     show_default=False),
    model_path: str | None = typer.Option(None, "--model", help="Base model (transformers folder or .gguf); "
                                                                "default: the embedded SmolLM2-135M."),
    eval_texts: Path | None = typer.Option(None, help="JSON object mapping each adapter name to a list of held-out "
                                                      "texts (default: the BBC test split of the topic each adapter "
                                                      "is named after)."),
    topics: str | None = typer.Option(None, help="Comma-separated BBC topics for the default path (default all 5)."),
    methods: str | None = typer.Option(None, help="Comma-separated curves (default: live_sum,live_mean,linear,"
                                                  "svd,ties,dare)."),
    samples: int = typer.Option(1, help="Sets of k other adapters per (task, k), averaged (all when fewer exist)."),
    rank: int | None = typer.Option(None, help="Compose rank (default: svd max r, ties/dare Σr)."),
    density: float | None = typer.Option(None, help="ties density (default 0.2)."),
    drop_rate: float | None = typer.Option(None, help="dare drop rate (default 0.5)."),
    seed: int = typer.Option(0, help="Seed for set sampling, dare masks and training."),
    blocks: int | None = typer.Option(None, help="Evaluation blocks per task (default 4; --quick 1)."),
    block_tokens: int | None = typer.Option(None, help="Tokens per evaluation block (default 128; --quick 64)."),
    train_steps: int | None = typer.Option(None, help="Default path: optimiser steps per topic adapter."),
    cache_dir: Path | None = typer.Option(None, help="Where trained topic adapters are cached (default "
                                                     "$DELTAW_CACHE or ~/.cache/deltaw, under stack-report/)."),
) -> None:
    """Measure what stacking adapters does to held-out perplexity, live and merged, and the adapters' overlap.

    Per task: base, own adapter, own + k others live at weight 1 and 1/(k+1), and the same sets merged by
    linear / svd / ties / dare; writes report.json, report.md, stacking.png, overlap.png and a finding."""
    import torch

    import deltaw
    from deltaw.compose.stack_report import ALL_CURVES, StackSettings, run_stack_report, token_blocks, write_report

    t0 = time.perf_counter()
    blocks = blocks if blocks is not None else (1 if quick else 4)
    block_tokens = block_tokens if block_tokens is not None else (64 if quick else 128)
    try:
        settings = StackSettings(
            methods=tuple(m.strip() for m in methods.split(",")) if methods else ALL_CURVES, samples=samples,
            rank=rank, seed=seed,
            **({} if density is None else {"density": density}),
            **({} if drop_rate is None else {"drop_rate": drop_rate}))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    extra: dict[str, object] = {}
    with cli_errors():
        from deltaw.models import load_causal_lm

        torch.manual_seed(seed)
        model, tokenizer = load_causal_lm(model_path)
        specs = list(adapters or []) + list(more_adapters or [])
        if more_adapters and not adapters:
            raise typer.BadParameter("adapter directories given without --adapters")
        if specs:
            named = _named_dirs(specs)
        else:
            from deltaw.compose.topics import TopicBudget, topic_adapters

            chosen = [t.strip() for t in topics.split(",")] if topics else None
            budget = TopicBudget.quick() if quick else TopicBudget()
            if train_steps is not None:
                budget = budget.with_steps(train_steps)
            named = topic_adapters(model_path, chosen, budget, seed=seed, cache_dir=cache_dir, quick=quick,
                                   model=model, tokenizer=tokenizer)
            extra["training"] = budget.describe()
        names = [n for n, _ in named]
        for name, path in named:
            deltaw.load(model, path, name, activate=False)
        extra["adapters"] = {n: str(p) for n, p in named}
        extra["model"] = model_path or "SmolLM2-135M-Instruct (embedded)"
        texts = _eval_texts(eval_texts, names)
        eval_blocks = {n: token_blocks(tokenizer, texts[n], block_tokens, blocks) for n in names}
        report = run_stack_report(model, names, eval_blocks, settings)
        report.settings["extra"] = extra
        report.seconds = time.perf_counter() - t0
        paths = write_report(report, out)  # OSError here is the user's --out (a file, no permission)
    typer.echo(report.finding)
    typer.echo(f"wrote {', '.join(str(p) for p in paths)} ({report.seconds:.0f} s)")


def _eval_texts(path: Path | None, names: list[str]) -> dict[str, list[str]]:
    if path is not None:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object {{adapter name: [texts]}}")
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{path} has no texts for adapter(s) {missing}")
        return {n: [str(t) for t in data[n]] for n in names}
    from deltaw.data import load_bbc

    return {n: load_bbc("test", [n]).texts for n in names}


def register(app: typer.Typer) -> None:
    app.command("compose")(compose_cmd)
    app.command("stack-report")(stack_report_cmd)
