"""SpectralModel: the PEFT tuner that swaps targeted layers for spectral layers.

Beyond PEFT's defaults it adds replace mode's rules: a replace-mode adapter owns the model (it
is the only adapter, it cannot be disabled, unloaded without merging or deleted, because the
dense weights are gone), and by default every non-spectral parameter trains and is saved with it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from peft.tuners.tuners_utils import AuxiliaryTrainingWrapper, BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._peft_registry import (
    PEFT_KEY_PREFIX,
    PREFIX,
    filter_state_dict_by_key_prefixes,
    is_key_under_prefixes,
    tuner_state_dict_key_prefixes,
)
from ..compute import autotune, rebuild_groups
from ..io.adapter_files import COEFFICIENTS_SUFFIX, INDICES_SUFFIX
from ..io.loading import (
    AdapterLoadError,
    check_before_injection,
    encode_index_sets,
    fingerprints,
    module_shape,
    partial_load_allowed,
)
from ..transforms.index_codec import decode as decode_indices
from ..transforms.layouts import validate_indices
from . import embedding_conv, quantized
from .config import SpectralConfig
from .expert_parameters import ParamWrapper
from .layer import COMPUTE_PATHS, SpectralLayer, SpectralLinear

__all__ = [
    "SpectralModel", "spectral_layers", "set_compute_path", "set_weight_cache", "tune_compute_paths", "describe_compute_paths",
    "set_path_tuning",
]


def spectral_layers(model: nn.Module):
    """(name, layer) of every spectral layer of ``model`` (a PeftModel or the model inside it), in model order."""
    for name, module in model.named_modules():
        if isinstance(module, SpectralLayer):
            yield name, module



def set_compute_path(model: nn.Module, path: str) -> int:
    """Force one compute path (or ``"auto"``) on every spectral layer of ``model``; returns how many.

    For tests and benchmarks: every path computes the same function, ``auto`` the cheapest one.
    """
    if path not in COMPUTE_PATHS:
        raise ValueError(f"compute path must be one of {COMPUTE_PATHS}, got {path!r}.")
    layers = [layer for _, layer in spectral_layers(model)]
    for layer in layers:
        layer.compute_path = path
    return len(layers)


def tune_compute_paths(model: nn.Module, tokens, *, dtype: torch.dtype | None = None, repeats: int = 3) -> dict:
    """Measure, on this machine, the fastest compute path of every spectral layer for a training step of
    ``tokens`` tokens per forward (an int, or several), and store it on the layers, where ``auto`` reads it
    from then on; returns {layer name: {tokens: path}}. Without this step ``auto`` takes the cost model's
    path. Same-shape layers share one measurement; ``dtype`` is the activations' dtype (default: the
    model's). Under ``torch.distributed`` rank 0 measures and every rank takes its paths, so all ranks compute
    the same numbers. Nothing is written to disk: run it again in each process that wants measured paths.
    """
    layers = list(spectral_layers(model))
    counts = sorted({autotune.token_bucket(t) for t in ([tokens] if isinstance(tokens, int) else tokens)})
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    measured: dict[tuple, str] = {}
    found: dict[str, dict[int, str]] = {}
    if not distributed or torch.distributed.get_rank() == 0:
        for name, layer in layers:
            for adapter in [a for a in layer.active_adapters if a in layer.spectral_coefficients]:
                settings = layer.spectral_settings[adapter]
                space = layer.coefficient_space(adapter)
                values = layer.spectral_coefficients[adapter]
                delta = settings.mode == "delta" and layer.quantization_backend is None
                base = layer.get_base_layer().weight if delta else None
                run_dtype = dtype or layer.model_dtype()
                for count in counts:
                    signature = (settings.mode if delta else "replace", space.m, space.n, space.block, space.grid, space.k,
                                 space.basis, run_dtype, values.requires_grad, count, layer.fan_in_fan_out and delta,
                                 values.device)
                    if signature not in measured:
                        measured[signature] = autotune.measure(
                            space, signature[0], count, values.device, run_dtype, coefficient_grad=values.requires_grad,
                            input_grad=True, base_weight=base, scaling=settings.scaling if delta else 1.0,
                            fan_in_fan_out=layer.fan_in_fan_out, repeats=repeats,
                        )
                    found.setdefault(name, {})[(adapter, count, run_dtype)] = measured[signature]
    if distributed:
        shared = [found]
        torch.distributed.broadcast_object_list(shared, src=0)
        found = shared[0]
    for name, layer in layers:
        layer.tuned_paths.update(found.get(name, {}))
        layer._path_memo.clear()
    return {name: {key[1]: path for key, path in paths.items()} for name, paths in found.items()}


def describe_compute_paths(model: nn.Module, tokens: int) -> dict[str, str]:
    """{layer name: "path (why)"}: the path each spectral layer's training forward takes at ``tokens`` tokens,
    and where it comes from (``forced``, ``tuned`` by :func:`tune_compute_paths`, or the ``cost model``)."""
    table = {}
    for name, layer in spectral_layers(model):
        active = [a for a in layer.active_adapters if a in layer.spectral_coefficients]
        if not active:
            continue
        adapter = active[0]
        dtype = layer.model_dtype()
        x = torch.empty(0, layer.in_features, dtype=dtype, device=layer.spectral_coefficients[adapter].device)
        forced = layer.compute_path != "auto"
        tuned = (adapter, autotune.token_bucket(tokens), dtype) in layer.tuned_paths
        training, layer.training = layer.training, True  # the training step's choice (the flag alone: no cache drop)
        try:
            path = layer.choose_path(adapter, tokens, x, layer.spectral_coefficients[adapter].requires_grad,
                                     update_only=layer.quantization_backend is not None)
        finally:
            layer.training = training
        table[name] = f"{path} ({'forced' if forced else 'tuned' if tuned else 'cost model'})"
    return table


def set_path_tuning(enabled) -> None:
    """Gone: ``auto`` no longer times paths inside a forward. ``False`` or ``None`` (the cost model) is what it
    does now; for measured paths call ``hf_spectral.tune_compute_paths(model, tokens)`` before training."""
    if enabled:
        raise ValueError(
            "set_path_tuning(True) is gone: compute paths are no longer timed inside a forward. Call "
            "hf_spectral.tune_compute_paths(model, tokens) once before training to measure and store them."
        )


def set_weight_cache(model: nn.Module, enabled: bool) -> int:
    """Turn the evaluation-time weight cache of every spectral layer on or off (dropping what it holds)."""
    layers = [layer for _, layer in spectral_layers(model)]
    for layer in layers:
        layer.cache_weights = bool(enabled)
        layer.drop_weight_cache()
    return len(layers)


class SpectralModel(BaseTuner):
    """Creates spectral (DCT-coefficient) layers in a model; use it through ``peft.get_peft_model``."""

    prefix: str = PREFIX
    tuner_layer_cls = SpectralLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether ``peft.convert_to_lora`` can convert this model: every spectral layer holds a delta adapter.

        A question, so it answers False for replace mode, where a layer asked directly (as the converter does)
        raises an error that says to merge instead."""
        def converts(layer) -> bool:  # asked only of delta layers, which answer rather than raise
            settings = layer.spectral_settings.get(adapter_name)
            return settings is not None and settings.mode == "delta" and layer.supports_lora_conversion(adapter_name)

        layers = [layer for _, layer in spectral_layers(self.model)]
        return bool(layers) and all(converts(layer) for layer in layers)

    # ----------------------------------------------------------------------------------------------
    # checks before anything is changed

    def _prepare_adapter_config(self, peft_config: SpectralConfig, model_config: dict) -> SpectralConfig:
        if peft_config.target_modules is None and peft_config.mode == "replace":
            # the paper's setting: every linear layer of the blocks (PEFT leaves the output head out)
            peft_config.target_modules = "all-linear"
        return super()._prepare_adapter_config(peft_config, model_config)

    def _check_new_adapter_config(self, config: SpectralConfig) -> None:
        super()._check_new_adapter_config(config)
        others = {name: c for name, c in self.peft_config.items() if c is not config}
        if others and (config.mode == "replace" or any(c.mode == "replace" for c in others.values())):
            raise ValueError(
                f"A replace-mode spectral adapter must be the only adapter of a model (found {sorted(others)} "
                "besides the new one): replace mode releases the dense weights the other adapters build on. "
                "Call merge_and_unload() first to get a dense model, then add adapters to that."
            )

    def _pre_injection_hook(self, model: nn.Module, config: SpectralConfig, adapter_name: str) -> None:
        # An adapter saved with its layer shapes is checked against the model before any layer is touched,
        # so a load into the wrong model fails and leaves the model as it was.
        mismatched = []
        modules = dict(model.named_modules())
        for key, saved in (config.layer_shapes or {}).items():
            module = modules.get(key)
            shape = module_shape(module) if module is not None else None
            if shape is not None and tuple(shape) != tuple(saved):
                mismatched.append(f"{key}: adapter {tuple(saved)} vs model {tuple(shape)}")
        if mismatched:
            raise ValueError(
                "This spectral adapter was made for layers of other shapes (out, in); the model was left "
                "unchanged. Load it into the model it was trained on.\n  " + "\n  ".join(mismatched)
            )

    # ----------------------------------------------------------------------------------------------
    # creating layers

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if kwargs.get("parameter_name") is not None:  # PEFT's target_parameters (expert_parameters.py)
            return self._create_and_replace_parameter(
                config, adapter_name, target, target_name, parent, current_key, parameter_name=kwargs["parameter_name"]
            )
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        # transformers tags every parameter it loads from a checkpoint; weights built by from_config are untagged
        from_pretrained = bool(getattr(getattr(base, "weight", None), "_is_hf_initialized", False))  # HQQ has no weight
        if isinstance(target, SpectralLayer):
            target.update_layer(adapter_name, config, current_key, from_pretrained)
            return
        if embedding_conv.handles(base):  # nn.Embedding and convolutions: a weight read as a matrix
            new_module = embedding_conv.create(target, adapter_name, config, current_key, from_pretrained, self.model)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
            return
        if not isinstance(base, (nn.Linear, Conv1D)) and not quantized.is_quantized(base):
            raise TypeError(
                f"Target module {current_key!r} is a {type(base).__name__}; spectral layers replace torch.nn.Linear "
                "(plain or quantized: bitsandbytes, torchao, HQQ, ...), transformers' Conv1D, nn.Embedding and "
                "nn.Conv1d/2d/3d (delta mode). Remove it from "
                "target_modules (or add it to exclude_modules)."
            )
        # Each layer reads its layout off its base (Conv1D stores (in, out)), whatever the config says, so a
        # mismatch is not the user's to fix: record what the layer is, as LoRA does, and say nothing.
        config.fan_in_fan_out = isinstance(base, Conv1D)
        new_module = SpectralLinear(
            target, adapter_name, config, current_key, from_pretrained, **quantized.layer_kwargs(self.model)
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _create_and_replace_parameter(
        self, config, adapter_name, target, target_name, parent, current_key, parameter_name=None
    ) -> None:
        if isinstance(target, ParamWrapper) and target.parameter_name == parameter_name:
            target.update_layer(adapter_name, config, current_key)  # another adapter on a wrapped parameter
            return
        new_module = ParamWrapper(target, adapter_name, parameter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Unloading puts the base layer back as it is. PEFT's version copies child.weight onto it, which a
        # quantized base without a `weight` (HQQLinear, swapped in by a merge) does not have.
        if isinstance(child, (SpectralLayer, ParamWrapper)) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        # All or nothing: if any layer fails (a budget too large, an unsupported module), the layers already
        # made are taken out again, and replace mode releases dense weights only once every layer is built.
        check_before_injection(model, self.peft_config[adapter_name], adapter_name)  # a load from the Hub: files first
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
            _check_layers_match_the_saved_ones(model, self.peft_config[adapter_name], adapter_name)
        except Exception:
            _remove_adapter_layers(model, adapter_name)
            raise
        if self.peft_config[adapter_name].mode == "replace":
            for _, layer in spectral_layers(model):
                if adapter_name in layer.spectral_settings and layer.get_base_layer().weight is not None:
                    layer.release_base_weight()
        if getattr(self, "_rebuild_hooks", None) is None:  # training forwards rebuild same-shape layers together
            self._rebuild_hooks = rebuild_groups.install(model)

    # ----------------------------------------------------------------------------------------------
    # what trains and what is saved

    def _replace_config(self) -> SpectralConfig | None:
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if config is not None and config.mode == "replace":
                return config
        return None

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        config = self._replace_config()
        if config is None or not config.train_non_spectral or config.inference_mode:
            return
        # Replace mode trains the whole model: embeddings, norms, biases and head stay trainable.
        for _, param in _non_spectral_parameters(model):
            param.requires_grad = True

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # Record every spectral layer's shape, so a load into a model of other shapes fails early.
        config.layer_shapes = {
            name.removeprefix(PEFT_KEY_PREFIX): [layer.out_features, layer.in_features]
            for name, layer in spectral_layers(model)
            if adapter_name in layer.spectral_coefficients
        }
        encode_index_sets(spectral_layers(model), adapter_name, to_return)  # a bitmap or int32 (index_codec)
        # ... and fingerprints of each layer's index set and saved tensors, so an edited config or a file from
        # another adapter is refused on load (hf_spectral/io/loading.py)
        config.fingerprints = fingerprints(spectral_layers(model), config, adapter_name, to_return)
        if config.mode == "replace" and config.train_non_spectral:
            # tied parameters are listed once (named_parameters skips the aliases), so a tied head is saved once
            for name, _ in _non_spectral_parameters(model):
                if name in state_dict:
                    to_return[name] = state_dict[name]
        return to_return

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT's contract: autocast_adapter_dtype=True keeps adapter weights in float32 (they are made in float32
        # here); False keeps them in the model's dtype. The layer transforms in float32 either way.
        if autocast_adapter_dtype:
            return super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        for _, layer in spectral_layers(self.model):
            values = layer.spectral_coefficients.get(adapter_name) if adapter_name in layer.spectral_coefficients else None
            dtype = layer.model_dtype()
            if values is not None and dtype.is_floating_point and values.dtype != dtype:
                layer.spectral_coefficients[adapter_name] = nn.Parameter(
                    values.detach().to(dtype), requires_grad=values.requires_grad
                )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # Check saved index sets before anything is loaded: a corrupt file must not half-load.
        layers = {name.removeprefix(PEFT_KEY_PREFIX): layer for name, layer in spectral_layers(model)}
        # keys carry PeftModel's prefix, or none when the adapter was injected into the model directly
        saved = {key.removeprefix(PEFT_KEY_PREFIX).removesuffix(COEFFICIENTS_SUFFIX) for key in state_dict
                 if key.endswith(COEFFICIENTS_SUFFIX)}
        absent = sorted(name for name, layer in layers.items() if adapter_name in layer.spectral_coefficients and name not in saved)
        if absent and not partial_load_allowed():
            if config.mode == "delta":
                _remove_adapter_layers(model, adapter_name)
            raise AdapterLoadError(
                f"The adapter's weights hold no coefficients for {len(absent)} of its layers ({absent[:8]}): the weights "
                "and the config do not belong together. Pass allow_partial_load=True to load only the others."
            )
        state_dict = dict(state_dict)  # saved index sets are decoded to positions below (index_codec)
        for key, value in state_dict.items():
            if key.endswith(INDICES_SUFFIX):
                layer_name = key.removesuffix(INDICES_SUFFIX).removeprefix(PEFT_KEY_PREFIX)
                layer = layers.get(layer_name)
                if layer is None:
                    continue
                try:
                    expected = layer.spectral_coefficients[adapter_name].numel()
                    value = state_dict[key] = decode_indices(
                        value, layer.out_features, layer.in_features, k=expected, name=layer_name
                    )
                    validate_indices(value, layer.out_features, layer.in_features, name=layer_name)
                    if value.numel() != expected:
                        raise ValueError(
                            f"The adapter file holds {value.numel()} indices for layer {layer_name!r}, whose "
                            f"configuration gives {expected} coefficients: the file and its adapter_config.json "
                            "do not belong together."
                        )
                except ValueError:
                    # a delta-mode load leaves the model as it was; replace mode already released its weights
                    if config.mode == "delta":
                        _remove_adapter_layers(model, adapter_name)
                    raise
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    # ----------------------------------------------------------------------------------------------
    # combining adapters

    def add_weighted_adapter(self, adapters, weights, adapter_name: str, combination_type: str = "linear") -> None:
        """A new delta adapter ``adapter_name`` whose update is ``sum_i weights[i] * update_i``.

        ``combination_type="linear"`` (the only one): the adapters must share their coefficient spaces (the same
        layout, basis, seed, budget and target modules, hence the same index set in every layer), and the new
        coefficients are the weighted sum of theirs, scalings included, so the result is exact. Adapters with
        other index sets raise: merge them one by one (``merge_and_unload``), or convert them with
        ``peft.convert_to_lora`` and combine the LoRA adapters.
        """
        import copy

        adapters, weights = list(adapters), [float(w) for w in weights]
        if combination_type != "linear":
            raise ValueError(
                f"combination_type={combination_type!r} is not supported for spectral adapters; use 'linear' (a "
                "weighted sum of coefficients over shared index sets)."
            )
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"Give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights.")
        missing = [name for name in adapters if name not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter(s) {missing} do not exist; this model has {sorted(self.peft_config)}.")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another name.")
        configs = [self.peft_config[name] for name in adapters]
        if any(config.target_parameters for config in configs):
            raise ValueError("add_weighted_adapter does not combine adapters with target_parameters; merge them one by one.")
        if any(config.mode != "delta" for config in configs):
            raise ValueError("Only delta-mode adapters can be combined: a replace-mode adapter is the weight itself.")
        fields = ("layout", "basis", "seed", "n_coefficients", "coefficient_fraction", "budget_pattern",
                  "banded_rings", "banded_energy_share", "grid_rank", "target_modules", "exclude_modules", "layers_to_transform")
        differ = [f for f in fields if any(getattr(c, f) != getattr(configs[0], f) for c in configs[1:])]
        if differ:
            raise ValueError(
                f"Adapters {adapters} differ in {differ}, so their index sets differ and a weighted sum of coefficients "
                "is not their weighted update. Merge them one by one with merge_and_unload(), or convert them with "
                "peft.convert_to_lora and combine the LoRA adapters."
            )
        config = copy.deepcopy(configs[0])
        config.init_weights = True
        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
            for name, layer in spectral_layers(self.model):
                if adapter_name not in layer.spectral_coefficients:
                    continue
                if not all(a in layer.spectral_coefficients for a in adapters):
                    raise ValueError(f"Layer {name!r} does not hold every adapter of {adapters}.")
                target = layer.coefficient_space(adapter_name)
                total = torch.zeros_like(layer.spectral_coefficients[adapter_name])
                for adapter, weight in zip(adapters, weights, strict=True):
                    space = layer.coefficient_space(adapter)
                    same = (space.block, space.grid) == (target.block, target.grid) and (
                        space.block is not None or torch.equal(space.indices.cpu(), target.indices.cpu())
                    )
                    if not same:
                        raise ValueError(
                            f"Layer {name!r}: adapter {adapter!r} has another index set than {adapters[0]!r} (a "
                            "data-dependent layout read another base weight); they cannot be summed coefficient by "
                            "coefficient."
                        )
                    scale = layer.spectral_settings[adapter].scaling / layer.spectral_settings[adapter_name].scaling
                    total += weight * scale * layer.spectral_coefficients[adapter].detach().to(total.dtype)
                with torch.no_grad():
                    layer.spectral_coefficients[adapter_name].copy_(total)
                layer.drop_weight_cache()
        except Exception:
            _remove_adapter_layers(self.model, adapter_name)
            self.peft_config.pop(adapter_name, None)
            raise
        self._mark_only_adapters_as_trainable(self.model)

    # ----------------------------------------------------------------------------------------------
    # mixed batches: each row through its own adapter (LoRA's ``adapter_names``)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}.")
        if self.training:
            raise ValueError("adapter_names is for inference: call model.eval() first (mixed batches do not train).")
        if any(isinstance(module, ParamWrapper) for module in self.model.modules()):
            raise ValueError("adapter_names (mixed batches) is not supported with target_parameters.")
        replace = self._replace_adapter_names()
        if replace:
            raise ValueError(
                f"adapter_names cannot be used with replace-mode adapter(s) {replace}: there is no base model to run "
                "the other rows with. Mixed batches need delta-mode adapters."
            )
        known = {name for _, layer in spectral_layers(self.model) for name in layer.spectral_coefficients}
        unknown = sorted({name for name in adapter_names if name != "__base__"} - known)
        if unknown:
            raise ValueError(f"adapter_names names adapter(s) {unknown} that this model does not have; it has "
                             f"{sorted(known)} (and '__base__' for the base model).")
        if any(layer.merged for _, layer in spectral_layers(self.model)):
            raise ValueError("adapter_names cannot be used while adapters are merged: call unmerge_adapter() first.")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats every row num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        for module in self.model.modules():
            if isinstance(module, (SpectralLayer, AuxiliaryTrainingWrapper)):
                hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ----------------------------------------------------------------------------------------------
    # replace mode has no dense weight to fall back on

    def _replace_adapter_names(self) -> list[str]:
        return [name for name, config in self.peft_config.items() if config.mode == "replace"]

    def disable_adapter_layers(self) -> None:
        if self._replace_adapter_names():
            raise ValueError(
                f"Cannot disable replace-mode spectral adapter(s) {self._replace_adapter_names()}: the model's dense "
                "weights were released, so there is no base model to fall back on. Use merge_and_unload() for a "
                "dense model."
            )
        super().disable_adapter_layers()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self._replace_adapter_names():
            raise ValueError(
                f"Cannot delete replace-mode spectral adapter {adapter_name!r}: it holds the model's weights. Use "
                "merge_and_unload() to write them back as dense weights."
            )
        super().delete_adapter(adapter_name)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        replace = self._replace_adapter_names()
        if replace and (not merge or (adapter_names is not None and not set(replace) <= set(adapter_names))):
            raise ValueError(
                f"Cannot unload replace-mode spectral adapter(s) {replace} without merging them: they hold the "
                "model's weights. Use merge_and_unload(), which writes the rebuilt dense weights back."
            )
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        for handle in getattr(self, "_rebuild_hooks", None) or ():  # a plain model again, without our hooks
            handle.remove()
        self._rebuild_hooks = None
        return model


def _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _check_layers_match_the_saved_ones(model: nn.Module, config: SpectralConfig, adapter_name: str) -> None:
    """A config saved with an adapter records its layers: the layers it targets here must be exactly those
    (a removed target_modules would otherwise fall back to defaults and drop layers without a word)."""
    if not config.layer_shapes or partial_load_allowed():
        return
    made = {name for name, layer in spectral_layers(model) if adapter_name in layer.spectral_settings}
    recorded = set(config.layer_shapes)
    if made != recorded:
        extra, missing = sorted(made - recorded), sorted(recorded - made)
        raise AdapterLoadError(
            f"This spectral adapter was saved with {len(recorded)} layers, but its config targets {len(made)} layers of "
            f"this model (not saved: {extra[:8]}; saved but not targeted: {missing[:8]}). Restore the saved "
            "target_modules, load it into the model it was saved from, or pass allow_partial_load=True. The model "
            "was left unchanged."
        )


def _remove_adapter_layers(model: nn.Module, adapter_name: str) -> None:
    """Take an adapter out again: layers that hold only it go back to their base layers."""
    for name, layer in list(spectral_layers(model)):
        if adapter_name not in layer.spectral_settings:
            continue
        if set(layer.spectral_settings) == {adapter_name}:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer.get_base_layer())
        else:
            layer.delete_adapter(adapter_name)


def _non_spectral_parameters(model: nn.Module):
    """(name, parameter) of every parameter outside the spectral layers' adapters and PEFT's wrappers."""
    adapter_prefixes = tuner_state_dict_key_prefixes(model)
    adapter_names = set(filter_state_dict_by_key_prefixes(dict(model.named_parameters()), adapter_prefixes))
    wrapper_names = {n for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)}
    for name, param in model.named_parameters():
        if name in adapter_names or is_key_under_prefixes(name, wrapper_names):
            continue
        yield name, param

