"""LoRA for ``nn.Linear`` and transformers' GPT-2 style ``Conv1D`` (weight stored (in, out): fan-in/fan-out)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .base import LoraLayer


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D, checked without importing transformers (a 1.5 s import that
    plain-PyTorch users should not pay)."""
    return any(t.__name__ == "Conv1D" and t.__module__.startswith("transformers.") for t in type(module).__mro__)


class LoraLinear(LoraLayer):
    """y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ.   A: (r, in), B: (out, r)."""

    @classmethod
    def is_plain_base(cls, base_layer: nn.Module) -> bool:
        return type(base_layer) is nn.Linear

    def _features(self) -> tuple[int, int]:
        out_f, in_f = self.base_weight().shape
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

    def add_delta(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, inplace: bool,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        m1, m2 = self._delta_factors(a, b)
        return w.addmm_(m1, m2, alpha=alpha) if inplace else torch.addmm(w, m1, m2, alpha=alpha, out=out)

    def fused_delta(self, w0: torch.Tensor, terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, bool] | None:
        # fp32 CPU only, up to the total rank where one fused pass still beats torch's GEMM pass per adapter.
        if w0.device.type != "cpu" or w0.dtype != torch.float32 or not w0.is_contiguous() or \
                sum(a.shape[0] for a, _, _ in terms) > native.FUSED_MAX_RANK or native.kernel() is None:
            return None
        parts = []
        for a, b, alpha in terms:
            m1, m2 = self._delta_factors(a, b)  # ΔW = m1·m2
            parts.append((m1, m2 if m2.is_contiguous() else m2.contiguous(), alpha))
        dest = out if out is not None else torch.empty(w0.shape, dtype=w0.dtype)
        finite = native.merge_terms_into(dest, w0, parts)
        return None if finite is None else (dest, finite)

    def _delta_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return b, a  # ΔW = B·A (out, in)

    def add_lora_(self, y: torch.Tensor, x: torch.Tensor, name: str, scale: float) -> torch.Tensor:
        a, b = self._a_params[name], self._b_params[name]
        # A few tokens (decode), fp32 CPU: one pass over A and B for all of them (it declines anything else, and
        # its checks are the only ones a decode step pays for).
        if native.lora_gemv_(y, x, a, b, scale):
            return y
        if x.dtype != a.dtype or y.dtype != b.dtype or not y.is_contiguous():
            return super().add_lora_(y, x, name, scale)
        if x.is_contiguous() and y.numel() <= native.MAX_TOKENS * b.shape[0]:
            if y.numel() == b.shape[0]:  # one token
                y.view(-1).addmv_(b, torch.mv(a, x.view(-1)), alpha=scale)  # (out,) += s·B·(A·x); (r,) between
                return y  # (addmm_ with Bᵀ, a transposed view, costs ~4 µs more per module at this size)
        h = F.linear(x, a)  # (..., r)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=scale)  # (N, out) += s·h·Bᵀ
        return y

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self._modules["base_layer"]._parameters["bias"])

    def base_into(self, d: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        d.view(-1, d.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())  # (N, out) += x·W0ᵀ (the GEMM's C)
        return d

    def deltas_with_bias(self, x: torch.Tensor, bias: torch.Tensor | None,
                         terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        d = None
        for a, b, scale in terms:
            h = F.linear(x2, a)  # (N, r)
            if d is None:  # the first term writes d (beta = 0: a missing bias is never read)
                d = torch.addmm(bias if bias is not None else h.new_zeros(()), h, b.t(), beta=1.0 if bias is not None
                                else 0.0, alpha=scale)  # (N, out)
            else:
                d.addmm_(h, b.t(), alpha=scale)
        return d.view(*x.shape[:-1], d.shape[-1])


class LoraConv1D(LoraLinear):
    """transformers ``Conv1D``: y = x W0 + b with W0 (in, out), so ΔW is stored transposed (Aᵀ Bᵀ)."""

    @classmethod
    def is_plain_base(cls, base_layer: nn.Module) -> bool:
        t = type(base_layer)
        return t.__name__ == "Conv1D" and t.__module__ == "transformers.pytorch_utils"

    def _features(self) -> tuple[int, int]:
        in_f, out_f = self.base_weight().shape
        return in_f, out_f

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b @ a).T  # (in, out)

    def _delta_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a.T, b.T  # ΔW = Aᵀ·Bᵀ (in, out)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out_shape = x.shape[:-1] + (weight.shape[1],)
        y = torch.addmm(self.base_layer.bias, x.reshape(-1, x.shape[-1]), weight)  # (N, out)
        return y.view(out_shape)

    def base_into(self, d: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        d.view(-1, d.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight)  # (N, out) += x·W0, W0 (in, out)
        return d
