"""Box layout: one box per entity on a square canvas, in rows, inside margins, never overlapping.

Why a fixed grid and not a learned layout: the boxes only have to give each person a separate region of
sensible shape; where exactly they go is composition, which the image model handles within each box. A
deterministic grid is also easy to check: every box lies in [0, 1], and boxes are separated by at least
``gap`` in x or y (so they stay apart after rounding to pixels, too).

Coordinates are normalised ``(x0, y0, x1, y1)`` with the origin at the top-left, y pointing down — the
convention of GLIGEN (diffusers' ``gligen_boxes``) and of image pixels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from deltaw.plan.errors import PlanError
from deltaw.plan.quotas import check_count

Box = tuple[float, float, float, float]

#: Decimal places boxes are rounded to; far below ``gap``, so rounding cannot make boxes touch.
BOX_DECIMALS = 4


@dataclass(frozen=True)
class LayoutSpec:
    """Grid parameters. ``aspect`` is the target box width/height: people are taller than wide, so 0.6."""

    margin: float = 0.04
    gap: float = 0.02
    aspect: float = 0.6

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 0.25:
            raise PlanError(f"layout margin must be in [0, 0.25), not {self.margin}")
        if not 0.001 <= self.gap < 0.1:
            raise PlanError(f"layout gap must be in [0.001, 0.1), not {self.gap}")
        if not 0.1 <= self.aspect <= 10:
            raise PlanError(f"layout aspect must be in [0.1, 10], not {self.aspect}")


def _row_sizes(n: int, rows: int) -> list[int]:
    """``n`` split over ``rows`` as evenly as possible, larger rows first (5 over 2 -> [3, 2])."""
    base, extra = divmod(n, rows)
    return [base + (1 if r < extra else 0) for r in range(rows)]


def grid_layout(n: int, spec: LayoutSpec | None = None) -> list[Box]:
    """``n`` boxes (1..64), row by row from the top, each row centred, the grid centred on the canvas.

    The number of rows is chosen to maximise the area of boxes of the target aspect that fit the cells, so
    five people become a row of three over a row of two rather than five thin slivers.
    """
    check_count(n)
    return list(_grid_layout(n, spec or LayoutSpec()))


@functools.lru_cache(maxsize=256)
def _grid_layout(n: int, spec: LayoutSpec) -> tuple[Box, ...]:
    # Cached: a layout depends only on (n, spec), and planning many scenes re-uses a handful of them.
    inner = 1.0 - 2 * spec.margin
    best: tuple[float, int, float, float, float, float] | None = None
    for rows in range(1, n + 1):
        cols = math.ceil(n / rows)
        if rows > 1 and (rows - 1) * cols >= n:
            continue  # that many rows would leave one empty
        cell_w = (inner - (cols - 1) * spec.gap) / cols
        cell_h = (inner - (rows - 1) * spec.gap) / rows
        if cell_w <= 0 or cell_h <= 0:
            continue
        w = min(cell_w, cell_h * spec.aspect)
        h = w / spec.aspect
        area = n * w * h
        if best is None or area > best[0] + 1e-12:
            best = (area, rows, cell_w, cell_h, w, h)
    if best is None:
        raise PlanError(f"cannot fit {n} boxes with margin {spec.margin} and gap {spec.gap}")
    _, rows, cell_w, cell_h, w, h = best
    sizes = _row_sizes(n, rows)
    grid_h = rows * cell_h + (rows - 1) * spec.gap
    top = (1.0 - grid_h) / 2
    boxes: list[Box] = []
    for r, k in enumerate(sizes):
        row_w = k * cell_w + (k - 1) * spec.gap
        left = (1.0 - row_w) / 2
        y0 = top + r * (cell_h + spec.gap) + (cell_h - h) / 2
        for c in range(k):
            x0 = left + c * (cell_w + spec.gap) + (cell_w - w) / 2
            boxes.append(_rounded((x0, y0, x0 + w, y0 + h)))
    check_boxes(boxes, min_gap=spec.gap / 2)
    return tuple(boxes)


def _rounded(box: Box) -> Box:
    x0, y0, x1, y1 = (round(v, BOX_DECIMALS) for v in box)
    return (x0, y0, x1, y1)


def boxes_overlap(a: Box, b: Box, *, min_gap: float = 0.0) -> bool:
    """Whether two boxes overlap, or come closer than ``min_gap`` in both x and y (touching counts as overlap
    when ``min_gap`` is 0: the separation must be strictly positive)."""
    apart_x = a[2] + min_gap < b[0] or b[2] + min_gap < a[0]
    apart_y = a[3] + min_gap < b[1] or b[3] + min_gap < a[1]
    return not (apart_x or apart_y)


def check_boxes(boxes: list[Box] | tuple[Box, ...], *, min_gap: float = 0.0) -> None:
    """Raise :class:`PlanError` unless every box is proper, inside [0, 1], and apart from every other box."""
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise PlanError(f"box {i} {boxes[i]} is not a proper box inside the canvas [0, 1]")
    # Rows are few and short; a sweep over x keeps this near-linear for the 64-box case anyway.
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][0])
    for pos, i in enumerate(order):
        for j in order[pos + 1 :]:
            if boxes[j][0] > boxes[i][2] + min_gap:
                break
            if boxes_overlap(boxes[i], boxes[j], min_gap=min_gap):
                raise PlanError(f"boxes {i} {boxes[i]} and {j} {boxes[j]} overlap")
