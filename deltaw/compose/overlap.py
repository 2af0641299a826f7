"""How much two adapters' updates share directions, per module -- the mechanism behind stacking interference.

If ΔWᵢ and ΔWⱼ write into orthogonal output subspaces, adding them changes neither one's effect on the other's
directions; if the subspaces coincide, the sum distorts both. Two measures, both in [0, 1] and computed from the
factors (thin SVD via QR of the factors, never the full matrix):

* ``cos2``: the mean squared cosine of the principal angles between the column spaces (output directions) of ΔWᵢ
  and ΔWⱼ, ‖UᵢᵀUⱼ‖_F² / min(rankᵢ, rankⱼ) (Björck & Golub 1973). Two random subspaces of dimensions rᵢ, rⱼ in ℝᵈ
  score max(rᵢ, rⱼ)/d on average, reported as ``random_cos2`` for scale.
* ``gram``: ‖ΔWᵢᵀΔWⱼ‖_F / √(‖ΔWᵢΔWᵢᵀ‖_F‖ΔWⱼΔWⱼᵀ‖_F) = ‖SᵢUᵢᵀUⱼSⱼ‖_F / √(‖Sᵢ²‖‖Sⱼ²‖), the cosine between
  the output Gram matrices ΔWΔWᵀ (‖ΔWᵢᵀΔWⱼ‖_F² = ⟨ΔWᵢΔWᵢᵀ, ΔWⱼΔWⱼᵀ⟩_F, so Cauchy-Schwarz bounds it by 1, with 1
  on the diagonal): the same overlap weighted by how much energy each direction carries, so a shared but tiny
  direction counts little.
* ``cos2_rows``: ``cos2`` for the row spaces (the input directions each adapter reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import api
from .methods import factored_svd, one_cpu_thread, work_dtype

RANK_TOL = 1e-6  # singular values below RANK_TOL·σ_max are numerical zeros, not directions


@dataclass
class _Basis:
    u: torch.Tensor  # (out, k) orthonormal output directions
    s: torch.Tensor  # (k,)
    v: torch.Tensor  # (in', k) orthonormal input directions


@dataclass
class OverlapReport:
    """Symmetric N×N matrices (diagonal 1), averaged over the modules both adapters adapt; per module too."""

    names: list[str]
    cos2: list[list[float]]
    gram: list[list[float]]
    cos2_rows: list[list[float]]
    random_cos2: list[list[float]]
    per_module: dict[str, dict[str, list[list[float | None]]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"names": self.names, "cos2": self.cos2, "gram": self.gram, "cos2_rows": self.cos2_rows,
                "random_cos2": self.random_cos2, "per_module": self.per_module}

    def off_diagonal(self, which: str = "cos2") -> list[float]:
        m = getattr(self, which)
        return [m[i][j] for i in range(len(m)) for j in range(len(m)) if i < j]


def _basis(a: torch.Tensor, b: torch.Tensor) -> _Basis | None:
    u, s, vh = factored_svd(a, b)  # (out, m), (m,), (m, in')
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    k = int((s > s[0] * RANK_TOL).sum())
    return _Basis(u[:, :k], s[:k], vh[:k].T)


def _pair(x: _Basis, y: _Basis) -> tuple[float, float, float, float]:
    m = x.u.T @ y.u  # (kx, ky) cosines between output directions
    kmin = min(x.s.numel(), y.s.numel())
    cos2 = float((m ** 2).sum()) / kmin
    gram = float(torch.linalg.matrix_norm(x.s[:, None] * m * y.s[None, :])) / math.sqrt(
        float((x.s ** 2).norm() * (y.s ** 2).norm()))
    rows = float(((x.v.T @ y.v) ** 2).sum()) / kmin
    rand = max(x.s.numel(), y.s.numel()) / x.u.shape[0]
    return cos2, gram, rows, rand


def overlap_from_factors(factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> OverlapReport:
    """``factors``: {adapter: {module: (A (r, in'), B (out, r))}} in B·A matrix space (scaling is irrelevant)."""
    names = list(factors)
    n = len(names)
    bases: dict[str, dict[str, _Basis | None]] = {
        name: {p: _basis(a, b) for p, (a, b) in mods.items()} for name, mods in factors.items()}
    modules = sorted({p for mods in factors.values() for p in mods})
    keys = ("cos2", "gram", "cos2_rows", "random_cos2")
    sums = {k: [[0.0] * n for _ in range(n)] for k in keys}
    counts = [[0] * n for _ in range(n)]
    per_module: dict[str, dict[str, list[list[float | None]]]] = {}
    for p in modules:
        mats = {k: [[None] * n for _ in range(n)] for k in keys}
        for i in range(n):
            for j in range(i, n):
                x, y = bases[names[i]].get(p), bases[names[j]].get(p)
                if x is None or y is None:
                    continue
                values = _pair(x, y)
                for k, v in zip(keys, values):
                    mats[k][i][j] = mats[k][j][i] = v
                    sums[k][i][j] += v
                    if i != j:
                        sums[k][j][i] += v
                counts[i][j] += 1
                if i != j:
                    counts[j][i] += 1
        per_module[p] = mats
    means = {k: [[sums[k][i][j] / counts[i][j] if counts[i][j] else float("nan") for j in range(n)]
                 for i in range(n)] for k in keys}
    return OverlapReport(names, means["cos2"], means["gram"], means["cos2_rows"], means["random_cos2"], per_module)


def adapter_overlap(model: nn.Module, names: list[str]) -> OverlapReport:
    """Pairwise overlap of resident adapters (see the module docstring for the measures)."""
    st = api.state(model)
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    with torch.no_grad():
        for name in names:
            mods: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for path in st.require(name).modules:
                a, b = st.layers[path].adapter_parameters(name)
                dtype = work_dtype(a.device)
                mods[path] = (a.detach().to(dtype).flatten(1), b.detach().to(dtype).flatten(1))
            factors[name] = mods
    on_cpu = all(a.device.type == "cpu" for mods in factors.values() for a, _ in mods.values())
    with one_cpu_thread(on_cpu):
        return overlap_from_factors(factors)
