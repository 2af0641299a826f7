"""LoRA for ``nn.Embedding``. A: (r, num_embeddings), B: (dim, r), as PEFT's ``lora_embedding_A/B``.

The lookup replaces the matmul with A: h = A[:, ids]ᵀ (a gather), then y += s · h Bᵀ. ΔW = (B A)ᵀ (num, dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LoraLayer


class LoraEmbedding(LoraLayer):
    zero_init_a = True

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num, dim = self.base_weight().shape
        return (r, num), (dim, r)

    def max_rank(self) -> int:
        return min(self.base_weight().shape)

    def merge_refusal(self) -> str | None:
        if self.base_layer.max_norm is None:
            return None
        # F.embedding renormalises each looked-up row of the table it is given: of W0 and of Aᵀ apart while
        # unmerged, of W0 + ΔW once merged -- different functions, so a merge could not keep the outputs.
        return (f"cannot merge into an nn.Embedding with max_norm={self.base_layer.max_norm}: it renormalises "
                "the rows it looks up, so the merged table would give different outputs than base + adapter")

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Rows ``table[ids]`` of an adapter factor table (Aᵀ, (num, r)) under the base layer's padding_idx,
        scale_grad_by_freq and max_norm, with two differences from ``F.embedding`` on that table:

        * dense, whatever the base's ``sparse``: the table is a transposed view of A, and a sparse gradient
          cannot be routed back through a transpose (backward fails); A has only r rows, so a dense gradient
          costs little.
        * max_norm renormalises the looked-up rows out of place: ``F.embedding`` rewrites the rows of the table
          it is given in place, i.e. A on every forward, no_grad and eval included. Here torch's own formula
          (``embedding_renorm_``: rows whose norm_type-norm exceeds max_norm are scaled by
          max_norm / (norm + 1e-7), in double) applies to the looked-up rows only: the output PEFT's layer
          gives on the same factors, A unchanged."""
        e = self.base_layer
        h = F.embedding(ids, table, e.padding_idx, None, e.norm_type, e.scale_grad_by_freq, False)  # (..., r)
        if e.max_norm is None:
            return h
        norm = torch.linalg.vector_norm(h, e.norm_type, dim=-1, keepdim=True).double()  # (..., 1)
        scale = torch.where(norm > e.max_norm, e.max_norm / (norm + 1e-7), 1.0)
        return h * scale.to(h.dtype)

    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self._lookup(x, a.T)  # (...,) ids -> (..., r)

    def project_out(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, b)  # (..., r) -> (..., dim)

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b @ a).T  # (num, dim)

    def add_delta(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, inplace: bool,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        # ΔW = Aᵀ·Bᵀ (num, dim) in one addmm
        return w.addmm_(a.T, b.T, alpha=alpha) if inplace else torch.addmm(w, a.T, b.T, alpha=alpha, out=out)

    def add_lora_(self, y: torch.Tensor, x: torch.Tensor, name: str, scale: float) -> torch.Tensor:
        a, b = self._a_params[name], self._b_params[name]
        if y.dtype != b.dtype or not y.is_contiguous():
            return super().add_lora_(y, x, name, scale)
        h = self._lookup(x, a.T)  # (..., r)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=scale)  # (N, dim) += s·h·Bᵀ
        return y

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        e = self.base_layer
        return F.embedding(x, weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
