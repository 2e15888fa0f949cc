"""Dropout on the input of a delta update (``spectral_dropout``), with LoRA's meaning.

While training, ``y = base(x) + sum_a scaling_a * dropout_a(x) dW_a^T``: the update cannot be folded into one
matmul with W0 (the two terms see different inputs), so it runs as a second one on the dropped input. In
evaluation, and for merged layers, dropout is the identity and the layer's usual paths run.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def applies(layer, active: Optional[list[str]] = None) -> bool:
    """Does the next forward of ``layer`` drop the input of one of its active adapters?"""
    if not layer.training:
        return False
    if active is None:
        active = [a for a in layer.active_adapters if a in layer.spectral_settings]
    return any(layer.spectral_settings[a].dropout > 0 for a in active if a in layer.spectral_settings)


def forward(layer, x: torch.Tensor, active: list[str], *args, **kwargs) -> torch.Tensor:
    """``base_layer(x) + sum_a scaling_a * F.linear(dropout_a(x), dW_a)`` over the active delta adapters."""
    layer.rebuild_group = layer._prebuilt = None  # no batched rebuild is used by this path
    result = layer.base_layer(x, *args, **kwargs)
    for adapter in active:
        settings = layer.spectral_settings[adapter]
        if settings.mode != "delta":
            raise ValueError(f"spectral_dropout applies to delta-mode adapters; {adapter!r} is {settings.mode!r}.")
        dropped = F.dropout(x, settings.dropout, training=True) if settings.dropout > 0 else x
        update = layer.rebuild(adapter) * settings.scaling  # out x in, float32, differentiable
        result = result + F.linear(dropped, update.to(dropped.dtype)).to(result.dtype)
    object.__setattr__(layer, "last_compute_path", "dropout")
    return result
