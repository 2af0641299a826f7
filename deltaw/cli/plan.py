"""``deltaw plan``: text + attribute mix -> per-entity prompts and boxes for a layout-conditioned image model.

Why a command of its own: the plan (plan.json, gligen.json, lmd.json, layout.png) is useful without any GPU —
it can be checked by eye, edited, and rendered elsewhere; ``--render`` is the optional last step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from .errors import cli_errors

log = logging.getLogger(__name__)

_MIX_HELP = (
    "Attribute mix, AXIS=VALUE:WEIGHT,... e.g. skin_tone=light:1,medium:1,dark:1 (weight 0 excludes a value; "
    "a value without :W weighs 1). Repeat, or separate axes with ';', for several axes."
)


def register(app: typer.Typer) -> None:
    """Add the ``plan`` command to ``app``."""

    @app.command("plan")
    def plan_command(
        text: Annotated[str, typer.Argument(help="The scene, e.g. 'a female basketball team of five players'.")],
        mix: Annotated[list[str] | None, typer.Option("--mix", "-m", help=_MIX_HELP)] = None,
        seed: Annotated[int, typer.Option(help="Seed for remainder seats and shuffles; same seed, same plan.")] = 0,
        out: Annotated[
            Path,
            typer.Option("--out", "-o", help="Directory for plan.json, gligen.json, lmd.json, lmd.txt and layout.png."),
        ] = Path("runs/plan"),
        joint: Annotated[
            bool,
            typer.Option(
                "--joint",
                help="Quotas over combinations of the axes (product of the weights), not each axis on its own.",
            ),
        ] = False,
        joint_table: Annotated[
            Path | None,
            typer.Option(
                "--joint-table", help="CSV/JSON with a weight per combination (implies --joint; replaces --mix)."
            ),
        ] = None,
        axes: Annotated[
            list[Path] | None, typer.Option("--axes", help="Extra axes file(s) in the format of deltaw/plan/axes.json.")
        ] = None,
        no_llm: Annotated[
            bool, typer.Option("--no-llm", help="Use the rule parser even if a learned parser is registered.")
        ] = False,
        parser_adapter: Annotated[
            Path | None,
            typer.Option(
                "--parser-adapter",
                help="LoRA folder for the learned parser (default: $DELTAW_PLAN_PARSER_ADAPTER, else the cached "
                "adapter, trained on first use). Ignored with --no-llm.",
            ),
        ] = None,
        count: Annotated[int | None, typer.Option(help="Override the count read from the text.")] = None,
        negative: Annotated[str | None, typer.Option(help="Negative prompt (default: common crowd artefacts).")] = None,
        render: Annotated[
            bool, typer.Option("--render", help="Also render with a local diffusers GLIGEN pipeline into render.png.")
        ] = False,
        model: Annotated[
            str | None, typer.Option(help="GLIGEN pipeline directory or cached model id for --render.")
        ] = None,
        steps: Annotated[int, typer.Option(help="Denoising steps for --render.")] = 50,
        beta: Annotated[float, typer.Option(help="gligen_scheduled_sampling_beta for --render.")] = 0.3,
        layout_png: Annotated[bool, typer.Option("--png/--no-png", help="Draw layout.png.")] = True,
    ) -> None:
        """Plan a scene with attributes in exact proportions; one prompt and one box per entity."""
        from deltaw.plan import get_parser, load_axes, load_joint_table, plan_scene
        from deltaw.plan.planner import STALE_RENDER

        # PlanError is a ValueError; OSError covers an unwritable --out or a full disk: a message, not a traceback.
        with cli_errors():
            registry = load_axes(axes or None)
            table = load_joint_table(joint_table) if joint_table is not None else None
            plan = plan_scene(
                text,
                list(mix or []) or None,
                seed,
                joint=joint,
                joint_table=table,
                parser=_adapter_parser(parser_adapter) if parser_adapter and not no_llm else get_parser(not no_llm),
                axes=registry,
                count=count,
                negative=negative,
            )
            paths = plan.write(out, layout_png=layout_png)
            for i, entity in enumerate(plan.entities, start=1):
                box = ", ".join(f"{v:.3f}" for v in entity.box)
                typer.echo(f"{i:>2}  [{box}]  {entity.prompt}")
            for axis, counts in plan.quotas.items():
                typer.echo(f"{axis}: " + ", ".join(f"{v}={c}" for v, c in counts.items()))
            typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
            if render:
                from deltaw.plan.render import (
                    DEFAULT_GLIGEN_MODEL,
                    gligen_call_kwargs,
                    load_gligen_pipeline,
                    render_gligen,
                )

                gligen_call_kwargs(plan, beta=beta, steps=steps)  # refuse what GLIGEN can't take before loading
                pipe = load_gligen_pipeline(model or DEFAULT_GLIGEN_MODEL)
                image = render_gligen(plan, pipe, beta=beta, steps=steps)
                image.save(out / STALE_RENDER)
                typer.echo(f"wrote {out / STALE_RENDER}")


def _adapter_parser(path: Path):
    from deltaw.plan.llm_parser import LlmParser

    return LlmParser.from_adapter(path)
