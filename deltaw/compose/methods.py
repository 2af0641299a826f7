"""The arithmetic of combining LoRA updates, one module at a time, in the matrix view ΔW = B·A.

Every layer type is handled in one space: A flattened to (r, in') and B to (out, r), so ΔW = B·A is (out, in').
Linear: in' = in. transformers Conv1D: PEFT stores A (r, in) / B (out, r) too; its weight layout is the transpose,
which never matters here because nothing leaves B·A space. Embedding: A (r, num) / B (dim, r), ΔW (dim, num).
Conv: A (r, in, *k) -> (r, in·∏k), B (out, r, 1...) -> (out, r). A module's result is reshaped back by the caller.

A *term* is one adapter's contribution at one module: (A, B, c) with c = wᵢ·sᵢ (user weight times the
adapter's own scaling alpha/r or alpha/√r), i.e. the term's update is c·B·A.

Methods (all return factors whose product is the stored update at scaling 1):

* ``linear``: exact. A's stacked, B's concatenated with cᵢ folded in: rank Σ rᵢ, no cross terms. (PEFT's
  ``add_weighted_adapter(combination_type="linear")`` sums √wᵢ-weighted A's and B's separately and so stores
  (Σ√wᵢBᵢ)(Σ√wᵢAᵢ) -- cross terms Bᵢ·Aⱼ that no adapter trained; its ``cat`` is the exact construction used here.)
* ``svd``: the exact sum truncated to rank k by Eckart-Young, computed from the factors: QR of the stacked B's and
  A's, SVD of the small (Σr × Σr) core. Exact (no approximation besides the truncation itself), and never forms
  the (out, in') matrix.
* ``ties``: TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models"): trim each task update
  to its top-``density`` entries by magnitude, elect a sign per entry as the sign of the summed trimmed updates,
  average the entries that agree with it (disjoint mean).
* ``dare``: DARE (Yu et al. 2023, "Language Models are Super Mario"): drop each entry of each task update with
  probability p and rescale the survivors by 1/(1-p) (unbiased), then sum.

TIES and DARE act entry-wise on the full ΔW, so their result is generally full rank; it is re-factored into A, B by
a truncated SVD and the re-factoring error is reported.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

METHODS: tuple[str, ...] = ("linear", "svd", "ties", "dare")


@dataclass(frozen=True)
class Term:
    """One adapter at one module: its update is ``coef · B @ A``. A: (r, in'), B: (out, r)."""

    a: torch.Tensor
    b: torch.Tensor
    coef: float
    source: str = ""  # adapter name, for seeding and messages

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class ModuleResult:
    """The combined update of one module as factors (scaling 1) plus what it cost.

    ``rel_error``: ‖target − B·A‖_F / ‖target‖_F, where target is what the method defines (the exact weighted sum
    for linear/svd; the trimmed/dropped merge for ties/dare). ``energy_kept``: Σ kept σ² / Σ σ² of the target.
    ``deviation``: ‖B·A − Σ cᵢ ΔWᵢ‖_F / ‖Σ cᵢ ΔWᵢ‖_F, how far the stored update is from the exact linear
    combination (0 for linear, = rel_error for svd, the price of trimming/dropping for ties/dare).
    """

    a: torch.Tensor  # (k, in')
    b: torch.Tensor  # (out, k)
    rel_error: float
    energy_kept: float
    deviation: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@contextmanager
def one_cpu_thread(tensors_on_cpu: bool) -> Iterator[None]:
    """Per-module work is a few hundred thousand entries: too small to amortise intra-op parallelism. On a shared
    2-core machine, 2 threads measured 10-40x *slower* than 1 for TIES/DARE (OpenMP threads spin-waiting for a
    busy core), and ~1x on an idle one, so the CPU path runs single-threaded and restores the setting after."""
    before = torch.get_num_threads()
    if not tensors_on_cpu or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def work_dtype(device: torch.device) -> torch.dtype:
    """float64 for the factorisations: the QR/SVD route must reproduce the exact sum to ~1e-12, not ~1e-6."""
    return torch.float32 if device.type == "mps" else torch.float64


def _ratio(num_sq: float, den_sq: float) -> float:
    if den_sq <= 0.0:
        return 0.0 if num_sq <= 0.0 else math.inf
    return math.sqrt(max(num_sq, 0.0) / den_sq)


def stacked(terms: list[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact sum as one pair: A = [A₁; A₂; ...] (Σr, in'), B = [c₁B₁, c₂B₂, ...] (out, Σr)."""
    a = torch.cat([t.a for t in terms], dim=0)
    b = torch.cat([t.b * t.coef for t in terms], dim=1)
    return a, b


def split_singular(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (√S·Vᴴ, U·√S): the balanced split, so neither factor carries all the scale (better conditioned if
    the composed adapter is trained further)."""
    root = s.clamp_min(0).sqrt()
    return root[:, None] * vh, u * root[None, :]


def factored_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B·A from the factors: B·A = (Q_B R_B)(Q_A R_A)ᵀ = Q_B (R_B R_Aᵀ) Q_Aᵀ, SVD of the core.

    a: (R, in'), b: (out, R). Returns U (out, m), S (m,), Vᴴ (m, in') with m = min(out, in', R). Costs
    O((out + in')·R²) instead of O(out·in'·min(out, in')) for the full matrix.
    """
    q_b, r_b = torch.linalg.qr(b)  # (out, p), (p, R)   p = min(out, R)
    q_a, r_a = torch.linalg.qr(a.T)  # (in', q), (q, R)  q = min(in', R)
    core = r_b @ r_a.T  # (p, q)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)  # (p, m), (m,), (m, q)
    return q_b @ u_c, s, vh_c @ q_a.T  # (out, m), (m,), (m, in')


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, target_sq: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-k factors of U·diag(S)·Vᴴ, zero-padded when k > len(S); (A, B, rel_error, energy_kept).

    The error of the best rank-k approximation is √(Σ_{i>k} σᵢ²) (Eckart-Young). ``target_sq`` is ‖target‖²
    when U S Vᴴ is itself only an approximation of the target (never here: the SVDs are of the target)."""
    total = float((s.double() ** 2).sum()) if target_sq is None else target_sq
    kept = float((s[:k].double() ** 2).sum())
    a, b = split_singular(u[:, :k], s[:k], vh[:k])
    if a.shape[0] < k:  # the target has lower rank than asked: pad with zero directions
        a = torch.cat([a, a.new_zeros(k - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], k - b.shape[1])], dim=1)
    energy = kept / total if total > 0 else 1.0
    return a, b, _ratio(total - kept, total), min(energy, 1.0)


# ---- the four methods ------------------------------------------------------------------------------------
def compose_linear(terms: list[Term], max_rank: int) -> ModuleResult:
    """Exact: the stacked factors (rank Σ rᵢ). If Σ rᵢ exceeds min(out, in') the layer cannot hold that rank, so the
    sum is re-factored by the factored SVD at rank min(out, in') -- still exact, ΔW has no higher rank."""
    a, b = stacked(terms)
    if a.shape[0] <= max_rank:
        return ModuleResult(a, b, 0.0, 1.0, 0.0)
    u, s, vh = factored_svd(a, b)
    a2, b2, err, kept = truncate(u, s, vh, max_rank)
    return ModuleResult(a2, b2, err, kept, err)


def compose_svd(terms: list[Term], rank: int) -> ModuleResult:
    """The exact sum, truncated to ``rank`` (Eckart-Young optimal in Frobenius norm)."""
    a, b = stacked(terms)
    u, s, vh = factored_svd(a, b)
    a2, b2, err, kept = truncate(u, s, vh, rank)
    return ModuleResult(a2, b2, err, kept, err)


def task_deltas(terms: list[Term]) -> torch.Tensor:
    """(T, out, in'): each term's full update cᵢ·Bᵢ·Aᵢ (the "task vectors" restricted to this module)."""
    return torch.stack([t.coef * (t.b @ t.a) for t in terms])


def ties_merge(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023, Alg. 1) on task updates (T, ...) that already carry their weights.

    1. Trim: per task keep the round(density·n) entries of largest |x| (entries tied at the threshold all stay).
    2. Elect: γ = sign(Σ_t trimmed_t) per entry ("the sign with the larger total mass").
    3. Disjoint mean: average, per entry, the trimmed values whose sign equals γ; 0 where none agree.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties density must be in (0, 1], got {density!r}")
    t = deltas.shape[0]
    flat = deltas.reshape(t, -1)  # (T, n)
    n = flat.shape[1]
    keep = max(1, int(round(density * n)))
    if keep < n:
        # The keep-th largest |x| per task (unsorted topk: ~3x faster than kthvalue on CPU); entries tied with the
        # threshold all stay.
        magnitude = flat.abs()
        threshold = magnitude.topk(keep, dim=1, sorted=False).values.amin(dim=1, keepdim=True)  # (T, 1)
        flat = torch.where(magnitude >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(flat.sum(dim=0))  # (n,)
    agree = (torch.sign(flat) == sign[None, :]) & (flat != 0)  # (T, n)
    total = (flat * agree).sum(dim=0)
    count = agree.sum(dim=0)
    merged = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return merged.reshape(deltas.shape[1:])


def dare_seed(seed: int, module: str, source: str) -> int:
    """A seed per (run seed, module, adapter) that does not depend on iteration order or Python's hash salt."""
    return (seed * 1_000_003 + zlib.crc32(f"{module}\0{source}".encode())) % (2**63 - 1)


def dare_merge(deltas: torch.Tensor, drop_rate: float, seeds: list[int]) -> torch.Tensor:
    """DARE (Yu et al. 2023, Eq. 1) on task updates (T, ...): drop with probability p, rescale by 1/(1-p), sum.

    The rescale keeps each entry's expectation, so p = 0 is exactly the linear sum."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"dare drop_rate must be in [0, 1), got {drop_rate!r}")
    if drop_rate == 0.0:
        return deltas.sum(dim=0)
    out = torch.zeros(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
    for delta, seed in zip(deltas, seeds):
        gen = torch.Generator().manual_seed(seed)
        keep = (torch.rand(delta.shape, generator=gen) >= drop_rate).to(delta.device)  # CPU RNG: same on any device
        out += torch.where(keep, delta / (1.0 - drop_rate), torch.zeros_like(delta))
    return out


# Randomised SVD settings (Halko, Martinsson & Tropp 2011, Alg. 4.4): a sketch of 2k + OVERSAMPLE columns and
# POWER_ITERS power iterations. On LoRA-like targets (low rank plus a flat tail, what trimming/dropping leaves) the
# truncation error lands within ~1e-4 (relative) of the Eckart-Young optimum; the errors reported are measured on
# the matrices, so they never rely on that.
OVERSAMPLE = 10
POWER_ITERS = 6


# ties/dare work entry-wise on full matrices; above this many entries per task they run in float32.
FLOAT32_ENTRYWISE_ABOVE = 1 << 16


def _sq(x: torch.Tensor) -> float:
    return float((x.double() ** 2).sum())


def top_svd(m: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of m (out, in'): exact LAPACK SVD when k is a sizeable share of min(out, in'),
    else a seeded randomised SVD (a full 576×576 SVD costs ~0.1-1 s on a busy CPU core; this is a few matmuls)."""
    n = min(m.shape)
    q = 2 * k + OVERSAMPLE
    if 2 * q >= n:
        return torch.linalg.svd(m, full_matrices=False)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(m.shape[1], q, generator=gen, dtype=m.dtype).to(m.device)  # (in', q)
    basis = torch.linalg.qr(m @ omega).Q  # (out, q)
    for _ in range(POWER_ITERS):  # re-orthonormalise each half-step: keeps small singular directions in float64
        basis = torch.linalg.qr(m @ torch.linalg.qr(m.T @ basis).Q).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)  # (q, q), (q,), (q, in')
    return basis @ u_small, s, vh


def refactor(target: torch.Tensor, exact_sum: torch.Tensor, rank: int, seed: int = 0) -> ModuleResult:
    """Rank-``rank`` factors of a full (out, in') update by truncated SVD (Eckart-Young optimal), with the
    re-factoring error, the energy kept and the distance from the exact sum all measured on the matrices."""
    u, s, vh = top_svd(target, rank, seed)
    a, b, _, _ = truncate(u, s, vh, rank)
    approx = b @ a
    total = _sq(target)
    err = _ratio(_sq(target - approx), total)
    kept = min(_sq(approx) / total, 1.0) if total > 0 else 1.0  # = Σ kept σ² / ‖target‖²
    dev = _ratio(_sq(approx - exact_sum), _sq(exact_sum))
    return ModuleResult(a, b, err, kept, dev)


def compose_module(terms: list[Term], method: str, *, rank: int | None, max_rank: int, module: str = "",
                   density: float = 0.2, drop_rate: float = 0.5, seed: int = 0) -> ModuleResult:
    """Combine one module's terms with ``method``. Factors must already be in a float work dtype.

    Default ranks: ``svd`` max rᵢ (the issue's choice: the composed adapter is no bigger than its largest input);
    ``ties``/``dare`` Σ rᵢ (their result is full rank; Σ rᵢ spends exactly linear's parameter budget). Always
    capped at min(out, in'), the largest rank the layer can hold; ``svd`` also at Σ rᵢ (the sum has no more).
    """
    if method not in METHODS:
        raise ValueError(f"unknown compose method {method!r}; choose one of {', '.join(METHODS)}")
    total_rank = sum(t.rank for t in terms)
    if method == "linear":
        return compose_linear(terms, max_rank)
    if method == "svd":
        k = rank if rank is not None else max(t.rank for t in terms)
        return compose_svd(terms, max(1, min(k, max_rank, total_rank)))
    k = min(rank if rank is not None else total_rank, max_rank)
    deltas = task_deltas(terms)  # (T, out, in')
    if deltas[0].numel() > FLOAT32_ENTRYWISE_ABOVE:
        deltas = deltas.float()  # entry-wise work is memory-bound: float32 halves it; norms below stay float64
    exact = deltas.sum(dim=0)
    if method == "ties":
        target = ties_merge(deltas, density)
    else:
        target = dare_merge(deltas, drop_rate, [dare_seed(seed, module, t.source) for t in terms])
    return refactor(target, exact, max(1, k), dare_seed(seed, module, "svd"))
