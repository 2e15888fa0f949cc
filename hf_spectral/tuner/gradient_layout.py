"""Index sets chosen by the gradient: the calibration step of ``layout="gradient"``.

A delta adapter's first optimiser step moves its coefficients along the loss gradient, which in the
layer's basis is ``DCT2(G)`` with G = dL/dW0 (out x in). Keeping the K coefficients where |DCT2(G)| is
largest puts the budget where training would move the weight the most at the start: the spectral
counterpart of LoRA-GA's initialisation (PEFT's ``preprocess_loraga``), and of LoCA's learned locations
without their iterative search.

The step follows PEFT's convention for data-driven initialisation (``initialize_lora_eva_weights``): it
runs on the PEFT model, after ``get_peft_model`` and before the optimiser is made::

    config = SpectralConfig(layout="gradient", n_coefficients=1000, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base_model, config)
    hf_spectral.init_gradient_layout(model, calibration_batches)   # dicts of model inputs with labels
    trainer = Trainer(model=model, ...)

Until then every use of the adapter's coefficients (forward, merge, save) raises, so a model cannot be
trained on the placeholder set by mistake. The chosen sets are saved with the adapter (a bitmap or int32
positions, ``index_codec``) and loaded like ``energy``'s: a reloaded adapter needs no calibration.

With ``global_budget=True`` the layers' total budget is shared in proportion to each layer's gradient
energy ``||G||_F^2`` (the energy of its DCT too, by Parseval); the per-layer counts are written into the
config's ``budget_pattern`` so that a reload builds layers of the same sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from peft.utils.other import transpose
from torch import nn

from .._peft_registry import PEFT_KEY_PREFIX
from ..transforms.coefficient_space import make_space
from ..transforms.layouts import CALIBRATED_LAYOUTS
from .model import spectral_layers

__all__ = ["init_gradient_layout", "share_budget"]


def init_gradient_layout(
    model: nn.Module,
    batches: Optional[Iterable],
    *,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    global_budget: bool = False,
    adapter_name: str = "default",
    max_batches: Optional[int] = None,
) -> dict[str, int]:
    """Choose every ``layout="gradient"`` layer's index set from the loss gradient on calibration batches.

    Args:
        model: the PEFT model (or a model with the adapter injected) holding adapter ``adapter_name``.
        batches: an iterable of batches (a list, a ``DataLoader``): each a dict of model inputs (``input_ids``,
            ``attention_mask``, ``labels``, ...) or a 2-D integer tensor of token ids (batch x sequence), which
            is used as its own labels (causal LM). Gradients of all batches are summed.
        loss_fn: ``loss_fn(outputs, batch) -> scalar tensor``; by default the model's own ``outputs.loss``
            (so the batches must hold labels).
        global_budget: False: every layer keeps its configured K. True: the sum of the layers' K is shared in
            proportion to each layer's gradient energy (at least one coefficient per layer, at most m * n).
        max_batches: read at most this many batches (None: all of them).

    The base model runs with the adapter disabled (the update starts at zero anyway), in eval mode so the
    choice is a function of the data alone (no dropout), with gradients on the targeted base weights only;
    every ``requires_grad`` flag, gradient and the train/eval mode are restored afterwards.

    Returns:
        ``{layer name: K}`` of the layers it chose sets for.
    """
    layers = _gradient_layers(model, adapter_name)
    peft_config = getattr(model, "peft_config", None)
    config = peft_config.get(adapter_name) if isinstance(peft_config, Mapping) else None
    if global_budget and config is None:
        raise ValueError(
            "global_budget=True writes the per-layer budgets into the adapter's config, and this model has no "
            "peft_config: pass the PeftModel that get_peft_model returned."
        )
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} must be a positive integer or None.")

    gradients = _base_gradients(model, [layer for _, layer in layers], batches, loss_fn, max_batches)

    budgets = [layer.spectral_coefficients[adapter_name].numel() for _, layer in layers]
    if global_budget:
        energies = [float(g.double().pow(2).sum()) for g in gradients]
        capacities = [layer.out_features * layer.in_features for _, layer in layers]
        budgets = share_budget(sum(budgets), energies, capacities)

    chosen = {}
    for (name, layer), gradient, k in zip(layers, gradients, budgets, strict=True):
        key = name.removeprefix(PEFT_KEY_PREFIX)
        settings = layer.spectral_settings[adapter_name]
        space = make_space(
            layer.out_features, layer.in_features, k, layout=settings.layout, basis=settings.basis,
            seed=settings.seed, gradient=gradient, name=key,
        )
        _install(layer, adapter_name, space.indices, k)
        chosen[key] = k
    if global_budget:
        # exact names first: PEFT's get_pattern_key takes the first pattern that matches
        exact = {re.escape(key): k for key, k in chosen.items()}
        config.budget_pattern = {**exact, **{p: b for p, b in config.budget_pattern.items() if p not in exact}}
    return chosen


def share_budget(total: int, energies: list[float], capacities: list[int]) -> list[int]:
    """Integers k_i summing to ``total``, proportional to ``energies``, with 1 <= k_i <= capacities[i].

    Layers whose share would fall outside [1, capacity] are pinned there and the rest is shared again among
    the others; the remainder of the rounding goes to the largest fractional parts. Zero total energy
    shares equally.
    """
    count = len(energies)
    if count != len(capacities) or count == 0:
        raise ValueError(f"share_budget needs one energy and one capacity per layer, got {count} and {len(capacities)}.")
    if any(not math.isfinite(e) or e < 0 for e in energies):
        raise ValueError(f"gradient energies must be finite and >= 0, got {energies}: the calibration loss is not finite.")
    if not count <= total <= sum(capacities):
        raise ValueError(
            f"a global budget of {total} cannot give {count} layers between 1 and their sizes (total {sum(capacities)})."
        )
    pinned: dict[int, int] = {}
    while True:
        free = [i for i in range(count) if i not in pinned]
        left = total - sum(pinned.values())
        weight = sum(energies[i] for i in free)
        ideal = {i: left * (energies[i] / weight if weight > 0 else 1.0 / len(free)) for i in free}
        over = [i for i in free if ideal[i] > capacities[i]]
        under = [i for i in free if ideal[i] < 1]
        if over:  # pinning at the top raises the others' shares, so handle those first
            pinned.update({i: capacities[i] for i in over})
        elif under:
            pinned.update({i: 1 for i in under})
        else:
            break
    shares = [pinned.get(i, 0) for i in range(count)]
    for i in free:
        shares[i] = int(math.floor(ideal[i]))
    remainder = total - sum(shares)
    by_fraction = sorted(free, key=lambda i: (-(ideal[i] - math.floor(ideal[i])), i))
    for i in by_fraction[:remainder]:
        shares[i] += 1
    return shares


# ------------------------------------------------------------------------------------------------------


def _gradient_layers(model: nn.Module, adapter_name: str) -> list:
    layers = [(name, layer) for name, layer in spectral_layers(model) if adapter_name in layer.spectral_coefficients]
    if not layers:
        raise ValueError(
            f"The model has no spectral adapter named {adapter_name!r}: create it with get_peft_model(model, "
            "SpectralConfig(layout='gradient', ...)) first, or pass its adapter_name."
        )
    for name, layer in layers:
        layout = layer.spectral_settings[adapter_name].layout
        if layout not in CALIBRATED_LAYOUTS:
            raise ValueError(
                f"Adapter {adapter_name!r} has layout={layout!r} (layer {name!r}); init_gradient_layout chooses the "
                f"index sets of layout {CALIBRATED_LAYOUTS[0]!r} only. Create the adapter with "
                "SpectralConfig(layout='gradient', ...)."
            )
        if layer.quantization_backend is not None:
            raise ValueError(
                f"Layer {name!r} has a quantized base ({layer.quantization_backend}); layout='gradient' needs the dense "
                "gradient of a float weight. Calibrate on the unquantized model, or use layout='energy'/'random'."
            )
        values = layer.spectral_coefficients[adapter_name]
        if adapter_name not in layer.uncalibrated_adapters and bool(values.detach().ne(0).any()):
            raise ValueError(
                f"Adapter {adapter_name!r} already has an index set and trained (non-zero) coefficients in layer "
                f"{name!r}; choosing a new set would scramble them. Create a fresh adapter to calibrate again."
            )
    return layers


def _as_batch(batch, position: int) -> dict:
    """A batch as keyword arguments of the model, with its token ids checked to be batch x sequence."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() != 2 or batch.dtype.is_floating_point or batch.dtype == torch.bool:
            raise ValueError(
                f"Calibration batch {position} is a {batch.dtype} tensor of shape {list(batch.shape)}; a tensor batch "
                "must be 2-D integer token ids (batch x sequence). Pass a dict of model inputs for other models."
            )
        return {"input_ids": batch, "labels": batch}
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"Calibration batch {position} is a {type(batch).__name__}; expected a dict of model inputs (with labels, "
            "or give loss_fn) or a 2-D tensor of token ids."
        )
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() != 2:
        raise ValueError(
            f"Calibration batch {position} has input_ids of shape {list(ids.shape)}; expected 2-D (batch x sequence). "
            "Batch single examples with a DataLoader or add a batch dimension (ids.unsqueeze(0))."
        )
    return dict(batch)


def _loss_of(outputs, batch: dict, loss_fn, position: int) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
    else:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError(
                f"The model returned no loss for calibration batch {position}: give labels in the batches, or "
                "loss_fn=lambda outputs, batch: ... returning a scalar."
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"The calibration loss of batch {position} must be a scalar tensor, got {loss!r:.80}.")
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"The calibration loss of batch {position} is {float(loss)}; the gradient would be meaningless.")
    return loss.reshape(())


def _base_gradients(model, layers, batches, loss_fn, max_batches) -> list[torch.Tensor]:
    """dL/dW0 (out x in, float32) of every layer's base weight, summed over the batches."""
    if batches is None:
        raise ValueError(
            "init_gradient_layout needs calibration data: pass batches (a list or DataLoader of model inputs with "
            "labels, or of 2-D token-id tensors)."
        )
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]  # one batch given as it is
    weights = [layer.get_base_layer().weight for layer in layers]
    for layer, weight in zip(layers, weights, strict=True):
        if weight is None or weight.device.type == "meta" or not weight.is_floating_point():
            raise ValueError(f"A targeted layer ({type(layer.get_base_layer()).__name__}) has no float weight to take a gradient of.")
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [w.grad for w in weights]
    saved_disabled = [layer._disable_adapters for layer in layers]
    was_training = model.training
    seen = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.grad = None
            w.requires_grad_(True)
        for layer in layers:
            layer._disable_adapters = True  # the update is zero at the start: the gradient is the base model's
        model.eval()
        with torch.enable_grad():
            for position, batch in enumerate(batches):
                if max_batches is not None and position >= max_batches:
                    break
                inputs = _as_batch(batch, position)
                outputs = model(**inputs)
                _loss_of(outputs, inputs, loss_fn, position).backward()
                seen += 1
        if seen == 0:
            raise ValueError("init_gradient_layout got no calibration batches (an empty iterable); pass at least one.")
        gradients = []
        for layer, w in zip(layers, weights, strict=True):
            if w.grad is None:
                raise ValueError(
                    f"The calibration loss does not depend on a targeted layer ({type(layer.get_base_layer()).__name__} "
                    f"{tuple(w.shape)}): check target_modules and the loss."
                )
            # read as the layer reads its weight (_dense_weight): out x in, a table or a kernel flattened
            matrix = transpose(w.grad.detach().float(), layer.fan_in_fan_out)
            gradients.append(matrix.reshape(layer.out_features, layer.in_features))
        return gradients
    finally:
        for w, grad in zip(weights, saved_grads, strict=True):
            w.grad = grad
        for p, flag in zip(params, saved_flags, strict=True):
            p.requires_grad_(flag)
        for layer, disabled in zip(layers, saved_disabled, strict=True):
            layer._disable_adapters = disabled
        model.train(was_training)


def _install(layer, adapter_name: str, indices: torch.Tensor, k: int) -> None:
    """Give the layer its chosen index set (and, when the budget moved, coefficients of the new size)."""
    old = layer.spectral_coefficients[adapter_name]
    layer.spectral_indices[adapter_name] = indices.to(layer.spectral_indices[adapter_name].device)
    if old.numel() != k:
        with torch.no_grad():
            nonzero = bool(old.ne(0).any())  # init_weights=False: small random values of the same spread
            values = torch.randn(k, dtype=old.dtype, device=old.device) * old.std() if nonzero else old.new_zeros(k)
        layer.spectral_coefficients[adapter_name] = nn.Parameter(values, requires_grad=old.requires_grad)
    layer.uncalibrated_adapters.discard(adapter_name)
    layer._spaces.pop(adapter_name, None)
    layer._path_memo.clear()
    layer.drop_weight_cache()
