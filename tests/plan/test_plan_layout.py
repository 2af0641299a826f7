"""Boxes: inside [0, 1], strictly apart, one per entity, for every count 1..64 (also after pixel rounding)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaw.plan import LayoutSpec, PlanError, check_boxes, grid_layout, plan_scene
from deltaw.plan.layout import boxes_overlap


def _assert_layout_ok(boxes: list[tuple[float, float, float, float]], n: int, gap: float) -> None:
    assert len(boxes) == n
    for x0, y0, x1, y1 in boxes:
        assert 0.0 <= x0 < x1 <= 1.0
        assert 0.0 <= y0 < y1 <= 1.0
    for a, b in itertools.combinations(boxes, 2):
        # strictly apart: separated by at least the gap (minus rounding) along x or y
        sep_x = max(b[0] - a[2], a[0] - b[2])
        sep_y = max(b[1] - a[3], a[1] - b[3])
        assert max(sep_x, sep_y) >= gap - 2e-4, (a, b)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 64))
def test_default_layout_properties(n: int) -> None:
    spec = LayoutSpec()
    _assert_layout_ok(grid_layout(n), n, spec.gap)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 64),
    margin=st.floats(0.0, 0.2),
    gap=st.floats(0.002, 0.05),
    aspect=st.floats(0.2, 3.0),
)
def test_layout_properties_for_any_spec(n: int, margin: float, gap: float, aspect: float) -> None:
    spec = LayoutSpec(margin=margin, gap=gap, aspect=aspect)
    boxes = grid_layout(n, spec)
    _assert_layout_ok(boxes, n, gap)
    for x0, y0, x1, y1 in boxes:  # margins respected (up to rounding)
        assert min(x0, y0) >= margin - 1e-4 and max(x1, y1) <= 1 - margin + 1e-4


@settings(max_examples=64, deadline=None)
@given(n=st.integers(1, 64))
def test_lmd_pixel_boxes_stay_inside_and_apart(n: int) -> None:
    plan = plan_scene(f"{n} people", seed=n)
    objects = plan.to_lmd()["objects"]
    assert len(objects) == n
    rects = []
    for _, (x, y, w, h) in objects:
        assert all(isinstance(v, int) for v in (x, y, w, h))
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 512 and y + h <= 512
        rects.append((x, y, x + w, y + h))
    for a, b in itertools.combinations(rects, 2):
        assert not boxes_overlap(a, b), (a, b)


def test_people_are_portrait_and_rows_balanced() -> None:
    boxes = grid_layout(5)
    widths = {round(b[2] - b[0], 4) for b in boxes}
    heights = {round(b[3] - b[1], 4) for b in boxes}
    assert len(widths) == 1 and len(heights) == 1
    assert widths.pop() < heights.pop()
    rows = sorted({b[1] for b in boxes})
    assert len(rows) == 2  # 3 over 2, not a strip of five slivers


def test_check_boxes_rejects_overlap_touching_and_outside() -> None:
    with pytest.raises(PlanError, match="overlap"):
        check_boxes([(0.1, 0.1, 0.5, 0.5), (0.4, 0.4, 0.9, 0.9)])
    with pytest.raises(PlanError, match="overlap"):
        check_boxes([(0.1, 0.1, 0.5, 0.5), (0.5, 0.1, 0.9, 0.5)])  # touching is not apart
    with pytest.raises(PlanError, match="inside the canvas"):
        check_boxes([(0.1, 0.1, 1.2, 0.5)])
    check_boxes([(0.1, 0.1, 0.5, 0.5), (0.51, 0.1, 0.9, 0.5)])


@pytest.mark.parametrize("n", [0, 65])
def test_layout_count_range(n: int) -> None:
    with pytest.raises(PlanError, match="out of range"):
        grid_layout(n)


def test_bad_layout_spec() -> None:
    with pytest.raises(PlanError, match="margin"):
        LayoutSpec(margin=0.4)
    with pytest.raises(PlanError, match="gap"):
        LayoutSpec(gap=0.0)
