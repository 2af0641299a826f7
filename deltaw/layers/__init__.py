"""LoRA layers: one small wrapper per base layer type, all built on ``LoraLayer``.

``wrap(module, ...)`` dispatches on the base layer's type through ``LAYER_TYPES``; a new backend registers
itself there instead of growing an ``if`` chain.
"""

from __future__ import annotations

from torch import nn

from .base import LoraLayer, ModulesToSave
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraConv1D, LoraLinear, is_hf_conv1d

LAYER_TYPES: list[tuple[type[nn.Module], type[LoraLayer]]] = [
    (nn.Linear, LoraLinear),
    (nn.Embedding, LoraEmbedding),
    (nn.Conv1d, LoraConv),
    (nn.Conv2d, LoraConv),
    (nn.Conv3d, LoraConv),
]


def layer_class_for(module: nn.Module) -> type[LoraLayer] | None:
    if is_hf_conv1d(module):
        return LoraConv1D
    for base_type, layer_type in LAYER_TYPES:
        if type(module) is base_type or isinstance(module, base_type):
            return layer_type
    return None


__all__ = ["LAYER_TYPES", "LoraLayer", "ModulesToSave", "LoraLinear", "LoraConv1D", "LoraEmbedding", "LoraConv",
           "layer_class_for"]
