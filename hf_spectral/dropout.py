"""The update computed on its own, ``base_layer(x) + sum_a scaling_a * dropout_a(x) dW_a^T``, where it cannot be
folded into one matmul with W0:

- dropout on the input of a delta update (``spectral_dropout``), with LoRA's meaning: while training the two terms
  see different inputs. In evaluation, and for merged layers, dropout is the identity and the usual paths run.
- a spectral layer around another method's layer (LoRA, LoHa, ... in a ``PeftMixedModel``): the base layer's output
  is not ``W0 x``, so it is called as it is and the update added.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer


def applies(layer, active: Optional[list[str]] = None) -> bool:
    """Does the next forward of ``layer`` compute its update on its own (see the module doc)?"""
    if isinstance(layer.base_layer, BaseTunerLayer):
        return True
    if not layer.training:
        return False
    if active is None:
        active = [a for a in layer.active_adapters if a in layer.spectral_settings]
    return any(layer.spectral_settings[a].dropout > 0 for a in active if a in layer.spectral_settings)


def forward(layer, x: torch.Tensor, active: list[str], *args, **kwargs) -> torch.Tensor:
    """``base_layer(x) + sum_a scaling_a * F.linear(dropout_a(x), dW_a)`` over the active delta adapters."""
    result = layer.base_layer(x, *args, **kwargs)
    for adapter in active:
        settings = layer.spectral_settings[adapter]
        if settings.mode != "delta":
            raise ValueError(f"spectral_dropout applies to delta-mode adapters; {adapter!r} is {settings.mode!r}.")
        dropped = F.dropout(x, settings.dropout, training=True) if settings.dropout > 0 and layer.training else x
        update = layer.rebuild(adapter) * settings.scaling  # out x in, float32, differentiable
        result = result + F.linear(dropped, update.to(dropped.dtype)).to(result.dtype)
    object.__setattr__(layer, "last_compute_path", "separate update")
    return result
