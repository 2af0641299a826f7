"""Subspace overlap measures on constructed cases with known answers."""

from __future__ import annotations

import pytest
import torch

from deltaw.compose import overlap_from_factors


def _eye_cols(d: int, cols: list[int]) -> torch.Tensor:
    return torch.eye(d, dtype=torch.float64)[:, cols]  # (d, k)


def test_identical_orthogonal_and_partial():
    d = 8
    a = torch.randn(2, 5, dtype=torch.float64)  # (r, in)
    f = {
        "x": {"m": (a, _eye_cols(d, [0, 1]) * 3.0)},
        "y": {"m": (a * -2.0, _eye_cols(d, [0, 1]))},  # same column space, other scale and sign
        "z": {"m": (a, _eye_cols(d, [2, 3]))},  # orthogonal outputs
        "w": {"m": (a, _eye_cols(d, [1, 2]))},  # shares one of two directions
    }
    rep = overlap_from_factors(f)
    i = {n: k for k, n in enumerate(rep.names)}
    assert rep.cos2[i["x"]][i["y"]] == pytest.approx(1.0)
    assert rep.gram[i["x"]][i["y"]] == pytest.approx(1.0)
    assert rep.cos2[i["x"]][i["z"]] == pytest.approx(0.0, abs=1e-12)
    assert rep.gram[i["x"]][i["z"]] == pytest.approx(0.0, abs=1e-12)
    assert rep.cos2[i["x"]][i["w"]] == pytest.approx(0.5)
    assert rep.random_cos2[i["x"]][i["z"]] == pytest.approx(2 / d)
    for n in rep.names:
        assert rep.cos2[i[n]][i[n]] == pytest.approx(1.0) and rep.gram[i[n]][i[n]] == pytest.approx(1.0)


def test_gram_matches_definition_and_missing_modules():
    torch.manual_seed(0)
    f = {n: {"m": (torch.randn(3, 7, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64))} for n in "ab"}
    f["a"]["only_a"] = (torch.randn(2, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    rep = overlap_from_factors(f)
    wa, wb = (f[n]["m"][1] @ f[n]["m"][0] for n in "ab")
    want = (wa.T @ wb).norm() / ((wa @ wa.T).norm() * (wb @ wb.T).norm()).sqrt()
    assert rep.gram[0][1] == pytest.approx(float(want), rel=1e-9)
    assert rep.per_module["only_a"]["cos2"][0][1] is None  # not shared: left out of the mean
    assert rep.cos2[0][1] == rep.per_module["m"]["cos2"][0][1]
