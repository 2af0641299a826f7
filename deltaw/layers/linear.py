"""LoRA for ``nn.Linear`` and transformers' GPT-2 style ``Conv1D`` (weight stored (in, out): fan-in/fan-out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D, checked without importing transformers (a 1.5 s import that
    plain-PyTorch users should not pay)."""
    return any(t.__name__ == "Conv1D" and t.__module__.startswith("transformers.") for t in type(module).__mro__)


class LoraLinear(LoraLayer):
    """y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ.   A: (r, in), B: (out, r)."""

    def _features(self) -> tuple[int, int]:
        out_f, in_f = self.base_layer.weight.shape
        return in_f, out_f

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_f, out_f = self._features()
        return (r, in_f), (out_f, r)

    def max_rank(self) -> int:
        return min(self._features())

    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)  # (..., in) -> (..., r)

    def project_out(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, b)  # (..., r) -> (..., out)

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b @ a  # (out, in)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base_layer.bias)


class LoraConv1D(LoraLinear):
    """transformers ``Conv1D``: y = x W0 + b with W0 (in, out), so ΔW is stored transposed (Aᵀ Bᵀ)."""

    def _features(self) -> tuple[int, int]:
        in_f, out_f = self.base_layer.weight.shape
        return in_f, out_f

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b @ a).T  # (in, out)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out_shape = x.shape[:-1] + (weight.shape[1],)
        y = torch.addmm(self.base_layer.bias, x.reshape(-1, x.shape[-1]), weight)  # (N, out)
        return y.view(out_shape)
