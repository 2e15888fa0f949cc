"""Hotswapping: replace a loaded spectral delta adapter's weights with another adapter's, in place.

``hotswap_adapter(model, path, adapter_name)`` has PEFT's signature; ``peft.utils.hotswap.hotswap_adapter`` itself
swaps LoRA only (its state-dict code is LoRA's), so ``import hf_spectral`` routes spectral adapters given to it here
(``_peft_registry.install_hotswap_route``). Nothing is created: the coefficients
and index sets are copied into the tensors the model holds (``copy_``), so a ``torch.compile``d model runs on
without recompiling. What makes that possible, and what is refused by name:

- the same layers, the same mode (delta) and basis (and seed of a random basis); no ``target_parameters``,
  ``modules_to_save`` or other non-spectral tensors;
- another ``scaling`` is folded into the coefficients (``values * new / old``), so the layer keeps its own;
- another index set of the same kind is copied in: scattered positions into the index buffer, a smaller
  low-frequency block into the top-left of the held one (zeros around it);
- fewer coefficients than the held adapter are padded with zeros at unused positions; more need room made
  first, before compiling: ``prepare_model_for_compiled_hotswap(model, target_n_coefficients=K)`` pads every
  scattered adapter to K (as PEFT's function of that name pads LoRA ranks).

The model's config for the adapter becomes the swapped-in one (with the held scaling); a hotswapped model is for
serving: save an adapter from its own folder, not from a model it was swapped into.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from peft.utils.save_and_load import load_peft_weights
from torch import nn

from .._peft_registry import PEFT_KEY_PREFIX
from ..io.adapter_files import COEFFICIENTS_SUFFIX, INDICES_SUFFIX
from ..io.loading import AdapterLoadError, check_adapter, download_adapter, hub_options, local_folder, read_config
from ..transforms.coefficient_space import CoefficientSpace, make_space
from ..transforms.index_codec import decode as decode_indices
from .model import spectral_layers

__all__ = ["hotswap_adapter", "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap"]


def is_spectral_adapter(model_name_or_path, **kwargs) -> bool:
    """Does ``model_name_or_path`` hold a spectral adapter? PEFT's ``hotswap_adapter`` asks before it reads the
    adapter: a local folder is read; for a Hub id its config is fetched, as PEFT's function fetches it next."""
    folder = local_folder(model_name_or_path, kwargs.get("subfolder"))
    if folder is None:
        from huggingface_hub import hf_hub_download
        from peft.utils import CONFIG_NAME

        try:
            folder = os.path.dirname(hf_hub_download(str(model_name_or_path), CONFIG_NAME,
                                                     subfolder=kwargs.get("subfolder"), **hub_options(kwargs)))
        except Exception:
            return False  # PEFT's function reports it
    try:
        return read_config(folder) is not None
    except AdapterLoadError:
        return False  # an unreadable config: PEFT's function reports it


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str, torch_device: Optional[str] = None,
                    **kwargs) -> None:
    """Swap the weights of the spectral adapter saved at ``model_name_or_path`` (a folder or a Hub id) into the
    model's adapter ``adapter_name``, in place; the name stays. ``kwargs``: ``subfolder``, ``revision``,
    ``token``, ``cache_dir``, ``local_files_only``, as PEFT takes them."""
    folder = local_folder(model_name_or_path, kwargs.get("subfolder")) or _fetch(model_name_or_path, kwargs.get("subfolder"), kwargs)
    config = read_config(folder)
    if config is None:
        raise ValueError(
            f"{model_name_or_path!r} is not a spectral adapter; peft.utils.hotswap.hotswap_adapter swaps LoRA adapters."
        )
    check_adapter(folder, config, model, adapter_name)  # complete, intact, and made for these layers
    state_dict = load_peft_weights(folder, device=torch_device or "cpu")
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config)


def _fetch(model_id: str, subfolder: Optional[str], kwargs: dict) -> str:
    """The folder of a Hub adapter's config and weights, downloaded (or found in the cache)."""
    try:
        return download_adapter(str(model_id), subfolder, hub_options(kwargs))
    except Exception as error:
        raise ValueError(
            f"No adapter found at {model_id!r} ({error}): give a folder written by save_pretrained or a Hub id."
        ) from error


def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict, adapter_name: str, config) -> None:
    """Swap an adapter state dict as ``save_pretrained`` writes it (keys without the adapter name) into
    ``adapter_name``. Everything is checked before anything is copied."""
    held_config = _held_config(model, adapter_name)
    problems = [f"{field}: held {getattr(held_config, field)!r}, new {getattr(config, field)!r}"
                for field in ("mode", "basis") if getattr(held_config, field) != getattr(config, field)]
    if config.basis != "dct" and held_config.seed != config.seed:
        problems.append(f"seed of the random basis: held {held_config.seed}, new {config.seed}")
    if problems:
        raise ValueError(f"Adapter {adapter_name!r} cannot be hotswapped: {'; '.join(problems)}. Load the new adapter "
                         "with load_adapter() instead.")
    if config.mode != "delta":
        raise ValueError("Hotswapping takes delta-mode adapters; a replace-mode adapter is the model's weights: load it "
                         "with PeftModel.from_pretrained.")
    if held_config.target_parameters or config.target_parameters:
        raise ValueError("Hotswapping does not take adapters with target_parameters; load the new one with load_adapter().")

    layers = {name.removeprefix(PEFT_KEY_PREFIX): layer for name, layer in spectral_layers(model)
              if adapter_name in layer.spectral_coefficients}
    coefficients, indices, other = {}, {}, []
    for key, value in state_dict.items():
        name = key.removeprefix(PEFT_KEY_PREFIX)
        if name.endswith(COEFFICIENTS_SUFFIX):
            coefficients[name.removesuffix(COEFFICIENTS_SUFFIX)] = value
        elif name.endswith(INDICES_SUFFIX):
            indices[name.removesuffix(INDICES_SUFFIX)] = value
        else:
            other.append(key)
    if other:
        raise ValueError(f"The new adapter holds tensors other than spectral coefficients ({other[:4]}: modules_to_save "
                         "or trainable tokens), which hotswapping does not swap. Load it with load_adapter().")
    if set(coefficients) != set(layers):
        raise ValueError(
            f"Adapter {adapter_name!r} cannot be hotswapped: the two adapters target other layers (only in the held "
            f"one: {sorted(set(layers) - set(coefficients))[:6]}; only in the new one: "
            f"{sorted(set(coefficients) - set(layers))[:6]}). Load the new adapter with load_adapter() instead."
        )

    plans = []
    for name, layer in layers.items():
        m, n = layer.out_features, layer.in_features
        values = coefficients[name]
        positions = None if name not in indices else decode_indices(indices[name], m, n, k=values.numel(), name=name)
        space = make_space(m, n, config.budget_for(name, m, n), layout=config.layout, basis=config.basis,
                           seed=config.seed, indices=positions, name=name, **config.layout_options())
        if space.k != values.numel():
            raise ValueError(f"The new adapter holds {values.numel()} coefficients for {name!r}, its config gives {space.k}.")
        held_scaling = layer.spectral_settings[adapter_name].scaling
        if held_scaling == 0:
            raise ValueError(f"Layer {name!r} holds scaling 0, which cannot take another adapter's update.")
        values = values.to(torch.float64) * (config.scaling / held_scaling)
        plans.append((layer, *_fit(space, values, layer.coefficient_space(adapter_name), name)))

    for layer, values, positions in plans:
        with torch.no_grad():
            held = layer.spectral_coefficients[adapter_name]
            held.copy_(values.to(held.dtype))
            if positions is not None:
                # through .data: the buffer's version stays, so the layer's cached coefficient space (keyed on it,
                # and reading this buffer itself) stays the object a compiled graph was traced with
                index = layer._indices(adapter_name)
                index.data.copy_(positions.to(index.dtype))
        _refresh_in_place(layer, adapter_name)
    swapped = copy.deepcopy(config)
    swapped.scaling = held_config.scaling  # the coefficients were scaled to the held layers' scaling
    model.peft_config[adapter_name] = swapped


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_n_coefficients: int, check_compiled: str = "error") -> None:
    """Pad every scattered spectral adapter of ``model`` to ``target_n_coefficients`` coefficients (zeros at unused
    positions; the outputs do not change), so that adapters with up to that many coefficients per layer can be
    hotswapped in later. Call it before ``torch.compile``; ``check_compiled``: ``"error"``, ``"warn"`` or ``"ignore"``
    for a model that is compiled already."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled={check_compiled!r} is not one of 'error', 'warn', 'ignore'.")
    if hasattr(model, "_orig_mod") and check_compiled != "ignore":
        message = "prepare_model_for_compiled_hotswap must run before torch.compile (the padded tensors are new ones)."
        if check_compiled == "error":
            raise ValueError(message)
        import warnings

        warnings.warn(message, stacklevel=2)
    if isinstance(target_n_coefficients, bool) or not isinstance(target_n_coefficients, int) or target_n_coefficients < 1:
        raise ValueError(f"target_n_coefficients={target_n_coefficients!r} must be a positive integer.")
    # every layer is checked before any is padded, so a refusal leaves the model as it was
    to_pad = []
    for name, layer in spectral_layers(model):
        for adapter in list(layer.spectral_coefficients):
            space = layer.coefficient_space(adapter)
            if space.block is not None:
                raise ValueError(
                    f"Layer {name!r}, adapter {adapter!r} has a block of coefficients (lowfreq or grid); blocks are not "
                    "padded (a smaller lowfreq block is swapped into the held one as it is)."
                )
            target = min(target_n_coefficients, space.m * space.n)
            if target <= space.k:
                continue
            if space.grid is not None:
                raise ValueError(
                    f"Layer {name!r}, adapter {adapter!r} is a sparse grid ({space.k} coefficients); its positions sit on "
                    f"rows and columns drawn for that budget, so it is not padded to {target}: hotswap sparse-grid "
                    "adapters of the same seed, grid_rank and budget (leave target_n_coefficients at the held budget), "
                    "or train the adapters with layout='random' to swap other budgets."
                )
            to_pad.append((layer, adapter, space, target))
    for layer, adapter, space, target in to_pad:
        held = layer.spectral_coefficients[adapter]
        values = torch.cat([held.detach(), held.new_zeros(target - space.k)])
        positions = space.indices.to(torch.int64)
        padded = _pad(positions, target, space.m * space.n)
        order = torch.argsort(padded)
        layer.spectral_coefficients[adapter] = nn.Parameter(values[order], requires_grad=held.requires_grad)
        buffers = layer.spectral_indices if adapter in layer.spectral_indices else layer.spectral_fixed_indices
        buffers[adapter] = padded[order].to(space.indices.dtype)
        layer._spaces.pop(adapter, None)
        layer._path_memo.clear()
        layer.drop_weight_cache()


def _refresh_in_place(layer, adapter: str) -> None:
    """Bring what a layer derived from its coefficients and index set up to date without new Python objects, so a
    compiled model's guards still hold: the coefficient space (which reads the index buffer itself) gets its sparse
    patterns copied into the held tensors, the evaluation weight caches their new weights."""
    cached = layer._spaces.get(adapter)
    if cached is not None and cached[1].block is None:
        space = cached[1]
        fresh = CoefficientSpace(space.m, space.n, space.basis, space.seed, indices=space.indices)
        for key, pattern in list(space._sparse.items()):
            new = fresh.sparse_pattern(pattern[0].device, transposed=key[2])
            if (pattern[2] is None) != (new[2] is None):
                del space._sparse[key]  # another structure: built again on the next use
                continue
            for held, value in zip(pattern, new, strict=True):
                if held is not None:
                    held.copy_(value)
    caches = [layer._weight_cache] + list(layer._mixed_weights.values())
    for cache in caches:
        if cache is None:
            continue
        with torch.no_grad():
            active = [a for a in (cache.active if isinstance(cache.active, list) else [cache.active])
                      if a in layer.spectral_settings]
            cache.weight.copy_(layer._merged_weight(active).to(cache.weight.dtype))
        cache.states = [(t, t._version, t.data_ptr()) for t, _, _ in cache.states]


def _held_config(model: nn.Module, adapter_name: str):
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"The model has no adapter {adapter_name!r} to hotswap into; it has {sorted(configs)}.")
    config = configs[adapter_name]
    if str(getattr(config.peft_type, "value", config.peft_type)).upper() != "SPECTRAL":
        raise ValueError(f"Adapter {adapter_name!r} is not a spectral adapter; peft.utils.hotswap swaps LoRA adapters.")
    return config


def _pad(positions: torch.Tensor, k: int, size: int) -> torch.Tensor:
    """``positions`` followed by the first ``k - len(positions)`` flat positions not among them."""
    free = torch.ones(size, dtype=torch.bool, device=positions.device)
    free[positions] = False
    return torch.cat([positions, free.nonzero().flatten()[: k - positions.numel()]])


def _fit(space: CoefficientSpace, values: torch.Tensor, held: CoefficientSpace, name: str):
    """(values, positions or None) of the new adapter in the held layer's shape: same K, same kind of index set."""
    if (space.block is None) != (held.block is None):
        kinds = ("a block (lowfreq or grid)", "scattered positions")
        raise ValueError(
            f"Layer {name!r}: the held adapter has {kinds[held.block is None]}, the new one {kinds[space.block is None]}; "
            "hotswapping keeps the kind of index set. Load the new adapter with load_adapter() instead."
        )
    if space.grid != held.grid:
        raise ValueError(
            f"Layer {name!r}: the new adapter keeps another grid of frequencies than the held one (another seed or "
            "budget); hotswapping keeps the index set. Load the new adapter with load_adapter() instead."
        )
    if space.block is not None:
        (p, q), (hp, hq) = space.block, held.block
        if p > hp or q > hq:
            raise ValueError(f"Layer {name!r}: the new block {p}x{q} does not fit in the held {hp}x{hq}.")
        block = values.new_zeros(hp, hq)
        block[:p, :q] = values.view(p, q)
        return block.reshape(-1), None
    if space.k > held.k:
        raise ValueError(
            f"Layer {name!r}: the new adapter has {space.k} coefficients, the held one {held.k}. Make room before "
            f"compiling: hf_spectral.prepare_model_for_compiled_hotswap(model, target_n_coefficients={space.k})."
        )
    positions = _pad(space.indices.to(torch.int64), held.k, space.m * space.n)
    values = torch.cat([values, values.new_zeros(held.k - space.k)])
    order = torch.argsort(positions)
    return values[order], positions[order]
