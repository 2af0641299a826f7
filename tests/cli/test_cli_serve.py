"""``deltaw serve`` option parsing: bad settings are refused before any model is loaded, as one ``error:`` line
and exit code 2 (deltaw.cli.errors). The server itself is tested in tests/serve."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from deltaw.cli.errors import EXIT_USAGE
from deltaw.cli.main import app
from deltaw.cli.serve import _parse_bytes


@pytest.mark.parametrize("text", ["inf", "nan", "1e400", "-inf", "infGiB", "1e300T", "NaNMiB", "lots", ""])
def test_parse_bytes_requires_a_finite_number(text):
    """inf / nan / 1e400 crashed with a raw OverflowError / ValueError from int(float(...)) (NaN also passed the
    `value < 0` check)."""
    with pytest.raises(typer.BadParameter, match="not a byte size"):
        _parse_bytes(text)


def test_parse_bytes_accepts_sizes():
    assert _parse_bytes("1048576") == 1 << 20
    assert _parse_bytes("512MiB") == _parse_bytes("512M") == _parse_bytes("512mb") == 512 << 20
    assert _parse_bytes("1.5G") == 3 << 29
    assert _parse_bytes("0") == 0
    with pytest.raises(typer.BadParameter, match="negative"):
        _parse_bytes("-1K")


@pytest.fixture
def no_model(monkeypatch):
    """Loading or serving a model here means a bad setting was not refused: fail loudly instead of serving."""
    import deltaw.serve

    def refuse(*_a, **_k):
        raise AssertionError("a bad setting must be refused before the model is loaded")

    monkeypatch.setattr(deltaw.serve, "load_base", refuse)
    monkeypatch.setattr(deltaw.serve, "run_server", refuse)


@pytest.mark.parametrize("args,fragments", [
    (["--row-strategy", "grouped "], ["row_strategy", "'grouped '", "rowwise"]),
    (["--row-strategy", "fastest"], ["row_strategy", "auto"]),
    (["--max-adapter-memory", "inf"], ["--max-adapter-memory", "not a byte size"]),
    (["--max-body-bytes", "1e400"], ["--max-body-bytes", "not a byte size"]),
    (["--max-body-bytes", "nan"], ["--max-body-bytes"]),
    (["--batch-policy", "round-robin"], ["batch_policy"]),
    (["--max-batch-size", "0"], ["max_batch_size"]),
])
def test_bad_serve_settings_are_one_error_line_and_exit_2(no_model, args, fragments):
    """An unknown --row-strategy started a server that failed every adapter request with a 500; a byte size of
    inf / nan / 1e400 gave a traceback."""
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == EXIT_USAGE, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], result.output
    assert "Traceback" not in result.output
