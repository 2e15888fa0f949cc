"""Spectral deltas on ``nn.Embedding`` and convolutions (``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``).

The weight is read as an m x n matrix and the update is K coefficients of its 2-D DCT, as for a linear layer:

- Embedding: the (num_embeddings x embedding_dim) table itself, m = num_embeddings, n = embedding_dim.
- Convolution: the kernel (out, in / groups, *kernel_size) reshaped to out x (in / groups * prod(kernel_size)),
  LoRA's view of a kernel. Every setting of the convolution (stride, padding and its mode, dilation, groups)
  applies to the update as it does to the kernel, because the layer always computes with the base module's own
  forward.

The forward runs the base module with its weight swapped for ``W0 + scaling * dW`` (``torch.func.functional_call``),
so a subclass's forward (a scaled word embedding) sees the adapted weight as it would a merged one. With
``spectral_dropout`` in training a convolution computes ``base(x) + conv(dropout(x), scaling * dW)`` instead; an
embedding takes no dropout (its input is token ids), as in LoRA. Replace mode is refused: these layers are small
next to the model's linear layers, and a replace-mode model keeps them dense and trains them as non-spectral
parameters.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .layer import SpectralLayer, SpectralLinear

__all__ = ["SpectralEmbedding", "SpectralConv", "handles", "create", "matrix_shape"]


def matrix_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """(m, n) of the matrix an Embedding's or a convolution's weight is read as, else None."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd):
        return module.out_channels, module.in_channels // module.groups * math.prod(module.kernel_size)
    return None


def handles(module: nn.Module) -> bool:
    """Is ``module`` one of the types this file makes spectral? A transposed convolution raises: its kernel is
    laid out (in, out / groups, ...), which this file does not read."""
    if isinstance(module, _ConvTransposeNd):
        raise TypeError(
            f"{type(module).__name__} is not supported by spectral layers (a transposed convolution's kernel is "
            "(in, out / groups, ...)); spectral deltas apply to nn.Linear, Conv1D, nn.Embedding and nn.Conv1d/2d/3d. "
            "Remove it from target_modules (or add it to exclude_modules)."
        )
    return matrix_shape(module) is not None


def create(target: nn.Module, adapter_name: str, config, module_key: str, from_pretrained: bool, model: nn.Module):
    if isinstance(target, BaseTunerLayer) and not isinstance(target, SpectralLayer):
        raise ValueError(
            f"{module_key!r} already holds a {type(target).__name__} adapter of another method; a spectral embedding or "
            "convolution goes under it, not over it: add the spectral adapter first (in a mixed model, as the first "
            "adapter), then the other method's."
        )
    base = target.get_base_layer() if isinstance(target, SpectralLayer) else target
    if isinstance(base, nn.Embedding):
        layer = SpectralEmbedding(target, adapter_name, config, module_key, from_pretrained)
        # a table tied to another module (a tied LM head) is read there too: merging would change it as well
        layer.tied_to = sorted(name for name, module in model.named_modules() if module is not base and any(
            p is base.weight for p in module.parameters(recurse=False)))
        return layer
    return SpectralConv(target, adapter_name, config, module_key, from_pretrained)


class _SpectralReshaped(SpectralLinear):
    """A spectral delta on a module whose weight is read as an m x n matrix (see the module doc). Merging,
    unmerging, the weight caches and loading are SpectralLinear's, on the weight in its own shape."""

    def _matrix_shape(self, base_layer: nn.Module) -> Optional[tuple[int, int]]:
        return matrix_shape(base_layer)

    def update_layer(self, adapter_name: str, config, module_key: str, from_pretrained: bool) -> None:
        if config.mode != "delta":
            raise ValueError(
                f"{module_key!r} is a {type(self.get_base_layer()).__name__}: spectral layers on embeddings and "
                f"convolutions take mode='delta' only, not {config.mode!r}. Leave it out of target_modules (replace "
                "mode trains it as a non-spectral parameter)."
            )
        super().update_layer(adapter_name, config, module_key, from_pretrained)

    # -- the weight as a matrix, and back ----------------------------------------------------------------

    def _dense_weight(self) -> Optional[torch.Tensor]:
        weight = super()._dense_weight()
        return None if weight is None else weight.reshape(self.out_features, self.in_features)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """What the adapter adds to the base weight, in the base weight's shape."""
        return super().get_delta_weight(adapter).reshape(self.get_base_layer().weight.shape)

    def _merged_weight(self, active: list[str]) -> torch.Tensor:
        """The base weight (its shape and dtype) plus every active adapter's scaled update; differentiable."""
        weight = self.get_base_layer().weight
        for adapter in active:
            weight = weight + self.get_delta_weight(adapter).to(weight.dtype)
        return weight

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False  # peft.convert_to_lora reads a linear layer's (out, in) update

    batched_rebuilds = False  # batched rebuilds (rebuild_groups.py) serve linear layers

    # -- forward -------------------------------------------------------------------------------------

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base module's own forward with ``weight`` in place of its weight."""
        return functional_call(self.get_base_layer(), {"weight": weight}, (x, *args), kwargs)

    def _dropped_update(self, x: torch.Tensor, adapter: str) -> Optional[torch.Tensor]:
        """The update's output on the dropped input, or None where dropout does not apply."""
        return None

    def _spectral_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base module's forward with ``W0 + sum_a scaling_a dW_a`` in place of its weight."""
        if self.training and any(self.spectral_settings[a].dropout > 0 for a in active):
            updates = [self._dropped_update(x, a) for a in active]
            if all(u is not None for u in updates):
                object.__setattr__(self, "last_compute_path", "dropout")
                result = self.base_layer(x, *args, **kwargs)
                for update in updates:
                    result = result + update.to(result.dtype)
                return result
        weight = self.get_base_layer().weight
        needs_grad = torch.is_grad_enabled() and (
            weight.requires_grad or any(self.spectral_coefficients[a].requires_grad for a in active)
        )
        if self.cache_weights and not needs_grad:  # evaluation: the merged weight, kept while nothing changes
            object.__setattr__(self, "last_compute_path", "cached")
            return self._with_weight(x, self._cached_weight(active, weight.dtype, weight.device), *args, **kwargs)
        self.drop_weight_cache()
        object.__setattr__(self, "last_compute_path", "dense")
        return self._with_weight(x, self._merged_weight(active), *args, **kwargs)

    def _forward_with_adapter(self, x: torch.Tensor, adapter: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The rows of a mixed batch that take ``adapter``: the base module's forward with its merged weight."""
        weight = self.get_base_layer().weight
        return self._with_weight(x, self._adapter_weight(adapter, weight.dtype, weight.device), *args, **kwargs)


class SpectralEmbedding(_SpectralReshaped):
    """A spectral delta around an ``nn.Embedding``: the update is K DCT coefficients of the vocab x dim table."""

    def update_layer(self, adapter_name: str, config, module_key: str, from_pretrained: bool) -> None:
        base = self.get_base_layer()
        if base.max_norm is not None:
            raise ValueError(
                f"{module_key!r} is an nn.Embedding with max_norm={base.max_norm}, which renormalises the table in "
                "place on every lookup; a spectral update cannot follow that. Leave it out of target_modules."
            )
        if getattr(config, "spectral_dropout", 0.0):
            warnings.warn(
                f"spectral_dropout={config.spectral_dropout} does not apply to the embedding {module_key!r} (its input "
                "is token ids), as in LoRA; its update runs without dropout.",
                stacklevel=2,
            )
        super().update_layer(adapter_name, config, module_key, from_pretrained)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if getattr(self, "tied_to", None):
            raise ValueError(
                f"This embedding's table is tied to {self.tied_to} (a tied output head): merging would change that "
                "module too, while the unmerged adapter changes only the lookup. Keep the adapter unmerged, or untie "
                "the weights (tie_word_embeddings=False and a copy of the table in the head) before adding it."
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


class SpectralConv(_SpectralReshaped):
    """A spectral delta around an ``nn.Conv1d/2d/3d``: the update is K DCT coefficients of the kernel read as
    out x (in / groups * prod(kernel_size))."""

    def _dropped_update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        base = self.get_base_layer()
        p = self.spectral_settings[adapter].dropout
        dropped = F.dropout(x, p, training=True) if p > 0 else x
        update = self.get_delta_weight(adapter).to(dropped.dtype)
        return base._conv_forward(dropped, update, None)
