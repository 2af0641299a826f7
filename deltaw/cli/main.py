"""The ``deltaw`` command. Each concern registers its own commands from ``deltaw/cli/<concern>.py``.

Why a registry of modules rather than one file: commands live next to the concern they drive, and a
command whose optional dependency is missing fails only when it is called, not when ``deltaw --help`` runs.
"""

from __future__ import annotations

import importlib
import logging

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="deltaw: low-rank adapters for PyTorch models.")

# Modules under deltaw.cli that define ``register(app: typer.Typer) -> None``.
COMMAND_MODULES: tuple[str, ...] = ("train", "inspect_cmd", "batching", "serve", "compose", "audit", "plan", "demo")

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"deltaw.cli.{_name}")
    except ModuleNotFoundError as exc:  # the module itself is not written yet, or an optional dep is absent
        if exc.name in (f"deltaw.cli.{_name}",):
            continue
        raise
    _module.register(app)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
