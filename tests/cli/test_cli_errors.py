"""Every command reports an expected failure the same way: one ``error:`` line on stderr and exit code 2.

Why a table over the whole ``deltaw`` app: the contract (docs/ARCHITECTURE.md, CLI) used to hold only for the
commands that happened to use ``cli_errors``; serve gave a traceback, audit / stack-report / train --objective
balance exited 1. Each row is a user mistake that fails before any model is loaded, so the table stays fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltaw.cli.errors import EXIT_USAGE, cli_errors
from deltaw.cli.main import app

MISSING = "MISSING"  # replaced by a path under tmp_path that does not exist

USER_ERRORS = {
    "serve_missing_base": (["serve", "--base", MISSING], "does not exist"),
    "audit_unknown_probe": (["audit", "--out", "OUT", "--probe", "nonexist", "--threads", "1"], "nonexist"),
    "audit_out_is_a_file": (["audit", "--out", "AFILE", "--threads", "1"], "not a directory"),
    "audit_probes_unknown": (["audit", "probes", "nonexist"], "nonexist"),
    "train_debias_unknown_probe": (["audit", "train-debias", "--out", "OUT", "--probe", "nonexist",
                                    "--threads", "1"], "nonexist"),
    "train_debias_out_is_a_file": (["audit", "train-debias", "--out", "AFILE", "--threads", "1"], "not a directory"),
    "train_debias_out_not_empty": (["audit", "train-debias", "--out", "FULL", "--threads", "1"], "--overwrite"),
    "stack_report_missing_model": (["stack-report", "--out", "OUT", "--model", MISSING], "does not exist"),
    "train_balance_unknown_probe": (["train", "--objective", "balance", "--output", "OUT", "--probe", "nonexist"],
                                    "nonexist"),
    "train_balance_with_resume": (["train", "--objective", "balance", "--output", "OUT", "--resume"], "--resume"),
    "train_balance_refused_option": (["train", "--objective", "balance", "--output", "OUT", "--batch-size", "8"],
                                     "--batch-size"),
    "train_unknown_objective": (["train", "--objective", "fairness", "--output", "OUT"], "fairness"),
    "train_missing_data": (["train", "--output", "OUT", "--data", MISSING, "--no-progress"], MISSING),
    "compose_missing_source": (["compose", MISSING, "-o", "OUT"], MISSING),
    "inspect_missing_adapter": (["inspect", MISSING], MISSING),
}


def _materialise(args: list[str], tmp_path: Path) -> list[str]:
    afile = tmp_path / "afile"
    afile.write_text("x")
    full = tmp_path / "full"
    full.mkdir(exist_ok=True)
    (full / "something").write_text("x")
    paths = {MISSING: tmp_path / "nonexistent", "OUT": tmp_path / "out", "AFILE": afile, "FULL": full}
    return [str(paths.get(a, a)) for a in args]


@pytest.mark.parametrize("args,fragment", USER_ERRORS.values(), ids=USER_ERRORS.keys())
def test_user_errors_are_one_error_line_and_exit_2(tmp_path, args, fragment):
    result = CliRunner().invoke(app, _materialise(args, tmp_path))
    assert result.exit_code == EXIT_USAGE == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught traceback
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert fragment.replace(MISSING, "nonexistent") in errors[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unexpected_errors_keep_their_traceback():
    """A bug (here a KeyError) must not be dressed up as a user error: it propagates with its traceback."""
    with pytest.raises(KeyError):
        with cli_errors():
            raise KeyError("bug")


def test_no_command_reports_errors_by_hand():
    """The single mechanism: no command module prints ``error:`` itself or exits 1 for an expected failure.

    Why a source check: a new ``except ...: typer.echo("error: ..."); raise typer.Exit(1)`` is exactly how the
    commands drifted apart; ``cli/errors.py`` is the one place that writes the line.
    """
    cli = Path(__file__).resolve().parents[2] / "deltaw" / "cli"
    offenders = [f"{p.name}:{n}" for p in sorted(cli.glob("*.py")) if p.name != "errors.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if 'echo(f"error:' in line
                 or "echo(\"error:" in line]
    assert not offenders, offenders
