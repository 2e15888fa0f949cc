"""Spectral deltas on parameters targeted by name (``target_parameters``, PEFT's meaning): MoE experts.

In transformers 5 the experts of Mixtral, Qwen3-MoE and others are one 3-D ``nn.Parameter`` per projection,
(experts, out, in), read by the experts module's own forward, so no ``nn.Linear`` is there to wrap. Each expert
gets its own spectral delta of K coefficients (K from the budget, per expert, on its out x in matrix), all
experts on one index set: the (experts, K) coefficients are rebuilt in one batched transform, and each expert
is adapted independently, as a linear layer would be. (One delta over the whole (experts * out) x in stack
would let the DCT mix experts along its first axis, which have no order.) A 2-D parameter is one matrix.

The forward calls the wrapped module's own forward with its parameters replaced by ``W0 + scaling * dW``
(``torch.func.functional_call``). Several parameters of one module nest, as in PEFT (a wrapper around a
wrapper); the outermost collects every wrapper's weight and runs the module once.

Data-dependent layouts (``energy``, ``banded``), replace mode, ``spectral_dropout`` and mixed batches are
refused by name (LoRA's ``ParamWrapper`` refuses dropout and mixed batches too).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from .._peft_registry import BufferDict
from ..compute.functions import transform_dtype
from ..transforms.coefficient_space import CoefficientSpace, group_to_matrix, make_space
from ..transforms.layouts import SAVED_LAYOUTS
from .layer import AdapterSettings

__all__ = ["ParamWrapper"]


# The class name is PEFT's: its injection of target_parameters nests wrappers only around modules whose class is
# called "ParamWrapper" (peft/tuners/tuners_utils.py, _inject_parameters).
class ParamWrapper(nn.Module, BaseTunerLayer):
    """A spectral delta per expert on one parameter (E, out, in) of a module (or one (out, in) parameter)."""

    adapter_layer_names = ("spectral_expert_coefficients",)
    other_param_names = ("spectral_expert_indices", "spectral_expert_settings")

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, config, module_key: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.spectral_expert_coefficients = nn.ParameterDict({})
        self.spectral_expert_indices = BufferDict({}, persistent=False)  # recomputed from shape and seed
        self.spectral_expert_settings: dict[str, AdapterSettings] = {}
        self._spaces: dict[str, tuple] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.fan_in_fan_out = False
        shape = tuple(self.get_param().shape)
        if len(shape) not in (2, 3):
            raise ValueError(
                f"target_parameters: {module_key!r} has shape {list(shape)}; spectral deltas take a 2-D (out, in) or "
                "a 3-D (experts, out, in) parameter."
            )
        self.num_experts = shape[0] if len(shape) == 3 else 1
        # some MoE modules store (experts, in, out) and say so (PEFT reads the same attribute)
        self.is_transposed = len(shape) == 3 and bool(getattr(self.get_base_layer(), "is_transposed", False))
        rows, cols = shape[-2:]
        self.out_features, self.in_features = (cols, rows) if self.is_transposed else (rows, cols)
        self.update_layer(adapter_name, config, module_key)

    def get_param(self) -> nn.Parameter:
        return getattr(self.get_base_layer(), self.parameter_name)

    def update_layer(self, adapter_name: str, config, module_key: str) -> None:
        where = f"target_parameters: {module_key!r}"
        if config.mode != "delta":
            raise ValueError(f"{where} takes mode='delta' only, not {config.mode!r} (the experts keep their weights).")
        if config.layout in SAVED_LAYOUTS:  # energy, banded, gradient: one weight's (or gradient's) ranking
            raise ValueError(
                f"{where}: layout={config.layout!r} ranks one weight's coefficients, but all experts share one index "
                "set here; use layout='random', 'lowfreq' or 'triangle'."
            )
        if getattr(config, "spectral_dropout", 0.0):
            raise ValueError(
                f"{where}: spectral_dropout={config.spectral_dropout} cannot apply to a parameter (the module's input "
                "is not the update's own input); use spectral_dropout=0 (LoRA's ParamWrapper refuses it too)."
            )
        m, n = self.out_features, self.in_features
        k = config.budget_for(module_key, m, n)
        param = self.get_param()
        device = param.device if param.device.type != "meta" else torch.device("cpu")
        dtype = transform_dtype(param.dtype if param.dtype.is_floating_point else torch.float32)
        space = make_space(
            m, n, k, layout=config.layout, basis=config.basis, seed=config.seed, name=module_key, **config.layout_options()
        )
        if config.init_weights:
            values = torch.zeros(self.num_experts, space.k, dtype=dtype)
        else:  # small random coefficients, as SpectralLinear's init_weights=False
            std = 0.1 * math.sqrt(m / space.k) / (abs(config.scaling) or 1.0)
            values = torch.randn(self.num_experts, space.k, dtype=dtype) * std
        self.spectral_expert_coefficients[adapter_name] = nn.Parameter(values.to(device))
        if space.block is None:
            self.spectral_expert_indices[adapter_name] = space.indices.to(device)
        self.spectral_expert_settings[adapter_name] = AdapterSettings(
            mode="delta", layout=config.layout, basis=config.basis, seed=config.seed, scaling=float(config.scaling),
            block=space.block, grid=space.grid,
        )
        self._spaces.pop(adapter_name, None)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # -- the update ----------------------------------------------------------------------------------

    def coefficient_space(self, adapter: str) -> CoefficientSpace:
        """The one (out x in) space every expert of the adapter shares; rebuilt when its indices change."""
        settings = self.spectral_expert_settings[adapter]
        indices = None if settings.block is not None else self.spectral_expert_indices[adapter]
        key = None if indices is None else (id(indices), indices._version, indices.device)
        cached = self._spaces.get(adapter)
        if cached is None or cached[0] != key:
            space = CoefficientSpace(
                self.out_features, self.in_features, settings.basis, settings.seed, settings.block, indices, settings.grid
            )
            cached = self._spaces[adapter] = (key, space)
        return cached[1]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """What the adapter adds to the parameter, in its shape (float32; differentiable)."""
        values = self.spectral_expert_coefficients[adapter]
        values = values.to(transform_dtype(values.dtype))
        space = self.coefficient_space(adapter)
        with torch.autocast(device_type=values.device.type, enabled=False):
            delta = group_to_matrix([space] * self.num_experts, list(values.unbind(0)), space.weight_method(values.device))
        delta = delta * self.spectral_expert_settings[adapter].scaling
        if self.is_transposed:
            delta = delta.transpose(-1, -2)
        return delta.reshape(self.get_param().shape)

    def adapted_parameter(self) -> Optional[torch.Tensor]:
        """The parameter plus every active adapter's update, or None when the parameter is used as it is."""
        if self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.spectral_expert_coefficients]
        if not active:
            return None
        param = self.get_param()
        for adapter in active:
            param = param + self.get_delta_weight(adapter).to(param.dtype)
        return param

    # -- forward, merge, unload ----------------------------------------------------------------------

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("adapter_names (mixed batches) is not supported with target_parameters.")
        if self.disable_adapters and self.merged:
            self.unmerge()
        overrides = {}
        module = self
        while isinstance(module, ParamWrapper):  # nested wrappers: one per parameter of the same module
            if module.disable_adapters and module.merged:
                module.unmerge()
            weight = module.adapted_parameter()
            if weight is not None:
                overrides[module.parameter_name] = weight
            module = module.base_layer
        if not overrides:
            return module(x, *args, **kwargs)
        return functional_call(module, overrides, (x, *args), kwargs, strict=False)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        param = self.get_param()
        for adapter in adapter_names:
            if adapter not in self.spectral_expert_coefficients:
                continue
            with torch.no_grad():
                merged = param.data + self.get_delta_weight(adapter).to(param.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaN or inf found in the merged {self.parameter_name!r} of adapter {adapter!r}; it was left "
                    "unmerged. The adapter's coefficients are broken."
                )
            param.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        param = self.get_param()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.spectral_expert_coefficients:
                with torch.no_grad():
                    param.data -= self.get_delta_weight(adapter).to(param.dtype)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]):
        """The module under every nested wrapper, each wrapper's adapters merged into it first if ``merge``."""
        module = self
        while isinstance(module, ParamWrapper):
            if merge:
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            module = module.base_layer
        return module

    def __repr__(self) -> str:
        return f"spectral.ParamWrapper(parameter_name={self.parameter_name!r}, " + super().__repr__()[len("ParamWrapper("):]
