"""How a spectral layer reads, runs and merges a quantized base layer.

A quantized base (bitsandbytes ``Linear8bitLt`` / ``Linear4bit``, a torchao tensor-subclass weight, HQQ's
``HQQLinear``, and the forward-only layers PEFT knows: GPTQ, AWQ, AQLM, EETQ, INC, TransformerEngine) is
never read as a float weight. bitsandbytes' layers subclass ``nn.Linear``, so without this module their
int8 / packed 4-bit ``weight`` would be taken for W0. Everything here goes through PEFT's own backends
(``peft.utils.quantization_utils``), the ones VeRA, BOFT and MiSS use, so a backend PEFT adds is covered here
as soon as it is in ``resolve_quantization_backend``.

What a delta adapter on a quantized base does:

- **forward**: the quantized layer's own forward, ``base_layer(x)`` (its kernel, its scales, its compute
  dtype), plus the spectral update ``s * x dW^T`` computed from the coefficients alone by the cheapest exact
  path for the update (``compute/dispatch.run_path`` with no base weight: ``dense``, ``sampled``,
  ``factored`` or the activation-domain ``spectral`` path), transforms in float32;
- **index sets that rank W0** (``energy``, ``banded``) read the backend's dequantized weight, once, when the
  adapter is made; other layouts never dequantize;
- **evaluation** keeps no weight cache on a quantized base: a cached W0 + dW would be a dequantized float copy
  of every targeted weight, several times the quantized model's memory. The update is recomputed each call
  from the K coefficients; for a fast evaluation model, ``merge_and_unload()``;
- **merge / unmerge**: dequantize, add (or subtract) the delta in float32, requantize through the backend's
  ``set_base_weight``, where the backend ``supports_merge`` (bitsandbytes 8/4-bit, torchao, HQQ; the result
  carries the requantization's rounding, as LoRA's merge does); elsewhere a clear error.

Replace mode on a quantized base is refused: it stores the weight itself as coefficients and releases the
dense weight, so a quantized copy of that weight would save nothing and be rounded for no gain.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.import_utils import is_torchao_available
from peft.utils.quantization_utils import (
    QuantizationBackend,
    TorchaoBackend,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from torch import nn

from .compute import dispatch
from .compute.functions import transform_dtype
from .layouts import DATA_DEPENDENT_LAYOUTS

__all__ = ["resolve_backend", "is_quantized", "layer_kwargs", "features", "init_weight", "device_of", "forward", "merge", "unmerge"]


def _torchao_weight(base_layer: nn.Module) -> bool:
    if not is_torchao_available():
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(getattr(base_layer, "weight", None), TorchAOBaseTensor)


def resolve_backend(base_layer: nn.Module, **kwargs) -> Optional[QuantizationBackend]:
    """PEFT's backend for ``base_layer``, or None for a plain float layer.

    A torchao weight quantized outside transformers (``torchao.quantize_`` on the model) comes without the
    config that requantizes it: forward and training work, merging raises (as LoRA does).
    """
    get_apply_tensor_subclass = kwargs.get("get_apply_tensor_subclass")
    if get_apply_tensor_subclass is None and _torchao_weight(base_layer):
        backend = TorchaoBackend(None)
        backend.supports_merge = False
        backend.merge_hint = (
            "this torchao model was quantized without transformers' TorchAoConfig, so the config that requantizes a "
            "merged weight is unknown. Load it with AutoModelForCausalLM.from_pretrained(..., quantization_config="
            "TorchAoConfig(...)) to merge"
        )
        return backend
    return resolve_quantization_backend(base_layer, get_apply_tensor_subclass=get_apply_tensor_subclass)


def is_quantized(base_layer: nn.Module) -> bool:
    return _torchao_weight(base_layer) or resolve_backend(base_layer) is not None


def layer_kwargs(model: nn.Module) -> dict:
    """What the layers of ``model`` need to requantize after a merge (torchao's config), read from the model."""
    return get_quantization_kwargs(model)


def _name(layer) -> str:
    return layer.quantization_backend.backend_name or type(layer.get_base_layer()).__name__


def features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a quantized layer that is not an ``nn.Linear`` (HQQ, GPTQ, ...)."""
    for names in (("in_features", "out_features"), ("infeatures", "outfeatures")):
        if all(isinstance(getattr(base_layer, n, None), int) for n in names):
            return getattr(base_layer, names[0]), getattr(base_layer, names[1])
    raise TypeError(
        f"Cannot read the shape of the quantized layer {type(base_layer).__name__} (no in_features/out_features). "
        "Remove it from target_modules (or add it to exclude_modules)."
    )


def device_of(layer) -> torch.device:
    """The device a quantized base layer computes on (where the adapter's coefficients go)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    device = getattr(base, "device", None)  # HQQLinear
    if device is not None:
        return torch.device(device)
    for tensor in list(base.parameters()) + list(base.buffers()):
        return tensor.device
    return torch.device("cpu")


def init_weight(layer, config, module_key: str) -> Optional[torch.Tensor]:
    """What ``update_layer`` reads of a quantized base: checks the adapter, and returns the dequantized W0
    (out x in, float32) only for a layout that ranks W0's coefficients; None otherwise (nothing is dequantized)."""
    backend = layer.quantization_backend
    if config.mode == "replace":
        raise ValueError(
            f"Replace mode cannot wrap {module_key!r}: its base layer is quantized ({_name(layer)}). Replace mode stores "
            "the weight itself as K coefficients and releases the dense weight, so a quantized copy saves nothing. Load "
            "the model unquantized for replace mode, or use mode='delta' to fine-tune the quantized model."
        )
    if backend.layer_type != "linear":
        raise TypeError(
            f"{module_key!r} is a quantized {backend.layer_type} layer ({_name(layer)}); spectral layers wrap linear "
            "layers only. Remove it from target_modules (or add it to exclude_modules)."
        )
    if config.layout not in DATA_DEPENDENT_LAYOUTS:
        return None
    try:
        weight = backend.get_base_weight(layer.get_base_layer())
    except (TypeError, NotImplementedError) as exc:
        raise ValueError(
            f"layout={config.layout!r} ranks the coefficients of the existing weight, but the {_name(layer)} base layer "
            f"of {module_key!r} cannot be dequantized ({exc}). Use a layout that does not read the weight: 'random', "
            "'lowfreq' or 'triangle'."
        ) from exc
    return weight.detach().to(torch.float32)


# --------------------------------------------------------------------------------------------------
# forward


def forward(layer, x: torch.Tensor, active: list[str], *args, **kwargs) -> torch.Tensor:
    """``base_layer(x) + sum_a s_a * x dW_a^T`` for the active delta adapters of a layer on a quantized base."""
    result = layer.base_layer(x, *args, **kwargs)  # the quantized kernel, under the caller's autocast
    result = layer.quantization_backend.maybe_clone_base_result(result)
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    # as in SpectralLinear.forward: in training mode the path is chosen as if gradients were on (checkpointing)
    grad = torch.is_grad_enabled() or layer.training
    tokens = x.numel() // max(x.shape[-1], 1)
    path = None
    with torch.autocast(device_type=device_type, enabled=False):
        x = x.to(dtype)
        for adapter in active:
            values = layer.spectral_coefficients[adapter]
            coefficient_grad = grad and values.requires_grad
            values = values.to(transform_dtype(values.dtype))
            path = layer.choose_path(adapter, tokens, x, coefficient_grad, update_only=True)
            update = dispatch.run_path(
                path, x, values, layer.coefficient_space(adapter), base_weight=None, bias=None, scaling=layer.spectral_settings[adapter].scaling
            )
            result = result + update.to(result.dtype)
    object.__setattr__(layer, "last_compute_path", path)
    return result


# --------------------------------------------------------------------------------------------------
# merging


def _require_merge(layer, action: str) -> QuantizationBackend:
    backend = layer.quantization_backend
    if not backend.supports_merge:
        hint = getattr(backend, "merge_hint", None) or (
            f"{_name(layer)} layers cannot be dequantized and requantized here. Use the model unmerged (the forward "
            "works), or load the base unquantized, load the adapter into it and merge there"
        )
        raise TypeError(f"Cannot {action} a spectral adapter into a quantized {_name(layer)} base layer: {hint}.")
    return backend


def _write(layer, adapter: str, sign: float, safe_merge: bool) -> None:
    backend = layer.quantization_backend
    with torch.no_grad():
        weight = backend.get_base_weight(layer.get_base_layer())
        delta = layer.get_delta_weight(adapter).to(weight.device)
        merged = weight.to(torch.float32) + sign * delta.to(torch.float32)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(
                f"NaN or inf found in the merged weight of adapter {adapter!r} (shape {tuple(merged.shape)}); the layer "
                "was left unmerged. The adapter's coefficients are broken: check the learning rate, or load an earlier "
                "checkpoint."
            )
        backend.set_base_weight(layer, merged.to(weight.dtype))


def merge(layer, adapter: str, safe_merge: bool = False) -> None:
    """Merge one delta adapter into the quantized base: dequantize, add, requantize (``set_base_weight``)."""
    _require_merge(layer, "merge")
    warnings.warn(
        f"Merging into a {_name(layer)} base requantizes its weight: the merged layer differs from the unmerged one by "
        "the rounding of that requantization (as with LoRA).",
        stacklevel=3,
    )
    _write(layer, adapter, 1.0, safe_merge)


def unmerge(layer, adapter: str) -> None:
    """Subtract a merged delta again; the base keeps the rounding of two requantizations."""
    _require_merge(layer, "unmerge")
    _write(layer, adapter, -1.0, False)
