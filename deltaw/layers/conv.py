"""LoRA for ``nn.Conv1d/2d/3d`` (groups = 1).

A is a convolution with the base kernel, stride, padding and dilation and r output channels; B is a 1×1
convolution (out, r, 1, ...). ΔW[o, i, k...] = Σ_r B[o, r] A[r, i, k...], so merged and live outputs agree.
"""

from __future__ import annotations

import torch

from ..errors import TargetError
from .base import LoraLayer


class LoraConv(LoraLayer):
    rank_dim = 1  # channels-first: h is (N, r, *spatial)

    def __init__(self, base_layer, state, tied_with=()) -> None:
        if base_layer.groups != 1:
            raise TargetError(
                f"{type(base_layer).__name__} with groups={base_layer.groups} is not supported: LoRA on grouped "
                "convolutions cannot be merged exactly; exclude this module"
            )
        super().__init__(base_layer, state, tied_with)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_c, in_c, *kernel = self.base_weight().shape
        return (r, in_c, *kernel), (out_c, r, *([1] * len(kernel)))

    def max_rank(self) -> int:
        out_c, in_c, *kernel = self.base_weight().shape
        return min(out_c, in_c * int(torch.Size(kernel).numel()))

    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, a, None)  # (N, in, *S) -> (N, r, *S')

    def project_out(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # A 1×1 convolution is a matmul over the channel axis.
        return torch.einsum("nr...,or->no...", h, b.flatten(1))  # (N, r, *S') -> (N, out, *S')

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b.flatten(1) @ a.flatten(1)).view(self.base_layer.weight.shape)  # (out, in, *k)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)
