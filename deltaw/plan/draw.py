"""``layout.png``: the plan's boxes drawn and labelled, for a human to check before spending GPU time.

Why matplotlib's object API (``Figure`` + ``FigureCanvasAgg``) and not ``pyplot``: pyplot keeps global state
and may pick an interactive backend; drawing on an Agg canvas directly is headless and safe in threads.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from deltaw.plan.errors import PlanError

if TYPE_CHECKING:
    from deltaw.plan.planner import ScenePlan


def draw_layout(plan: ScenePlan, path: str | Path, *, size_px: int = 768) -> Path:
    """Draw ``plan``'s boxes on a square canvas (origin top-left, as the image model sees it) into ``path``.

    Boxes are coloured by the value of the first mix axis, and labelled with their number and attributes.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:  # pragma: no cover - matplotlib is in the plot/test extras
        raise PlanError("drawing layout.png needs matplotlib: pip install 'deltaw[plot]'") from None

    dpi = 100
    fig = Figure(figsize=(size_px / dpi, size_px / dpi + 0.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 * size_px / (size_px + 50)))
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)  # y grows downwards, like image rows
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.add_patch(Rectangle((0, 0), 1, 1, facecolor="#f4f4f4", edgecolor="#888888"))

    first_axis = next(iter(plan.mix), None)
    values = list(plan.mix[first_axis]) if first_axis else []
    palette = [
        "#4e79a7",
        "#f28e2b",
        "#e15759",
        "#76b7b2",
        "#59a14f",
        "#edc948",
        "#b07aa1",
        "#ff9da7",
        "#9c755f",
        "#bab0ac",
    ]
    for i, entity in enumerate(plan.entities):
        x0, y0, x1, y1 = entity.box
        value = entity.attributes.get(first_axis) if first_axis else None
        color = palette[values.index(value) % len(palette)] if value in values else "#4e79a7"
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=color, alpha=0.35, edgecolor=color, lw=1.5))
        lines = [f"{i + 1}"] + [str(v) for v in entity.attributes.values()]
        if not entity.attributes:
            lines += textwrap.wrap(entity.noun, 12)
        box_px_h = (y1 - y0) * size_px * 0.72  # points available vertically
        box_px_w = (x1 - x0) * size_px * 0.72
        longest = max(len(s) for s in lines)
        fontsize = max(3.0, min(11.0, box_px_h / (1.4 * len(lines)), box_px_w / (0.62 * longest)))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, "\n".join(lines), ha="center", va="center", fontsize=fontsize)

    counts = "; ".join(f"{axis}: " + ", ".join(f"{v}={c}" for v, c in q.items()) for axis, q in plan.quotas.items())
    title = textwrap.shorten(plan.caption, 90)
    fig.suptitle(f"{title}\n{textwrap.shorten(counts, 110)}" if counts else title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
