"""The one way every ``deltaw`` command reports an expected failure: one ``error:`` line on stderr, exit code 2.

Why one mechanism: a user (or a script checking ``$?``) should not have to learn per command whether a bad path
gives a traceback, exit 1 or exit 2. Commands wrap their work in :func:`cli_errors`; what it catches is the
user's input or environment (a missing file, an unknown probe, an invalid combination of options, deltaw's own
:class:`~deltaw.errors.DeltawError`). Anything else is a bug and keeps its traceback, which is what a bug
report needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

# Exit code for expected failures: the same code click uses for usage errors (bad option values), so "the
# command was asked for something it cannot do" has one code whether click or deltaw noticed it.
EXIT_USAGE = 2

# OSError covers FileNotFoundError / FileExistsError / NotADirectoryError and what writing outputs can hit (no
# permission, a full disk): the user's environment, not a bug worth a traceback. ValueError covers invalid
# values and combinations of options (and the ValueError subclasses ProbeError, PlanError, DatasetError, ...);
# ModuleNotFoundError an optional dependency that is not installed.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ModuleNotFoundError)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn expected failures raised inside the block into ``error: ...`` on stderr and exit code 2.

    Commands report a refused option combination by raising ``ValueError`` with a message naming the options,
    so that it takes the same path as every other expected failure.
    """
    from ..errors import DeltawError

    try:
        yield
    except (DeltawError, *EXPECTED_ERRORS) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
