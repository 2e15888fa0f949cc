"""How one layer changes: a Linear or Conv1D whose weight (or weight update) is K DCT coefficients.

``rebuild`` is the single source of truth: forward, merge and unmerge all go through it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._peft_registry import BufferDict
from ..compute import cost_model, dispatch, rebuild_groups
from ..compute.autotune import token_bucket
from ..compute.functions import matrix, transform_dtype
from ..compute.weight_cache import WeightCache
from ..transforms.coefficient_space import TRANSFORMS, CoefficientSpace, make_space
from ..transforms.layouts import CALIBRATED_LAYOUTS, SAVED_LAYOUTS
from . import dropout, quantized

COMPUTE_PATHS = dispatch.PATHS

@dataclass(frozen=True)
class AdapterSettings:
    """What a layer needs to know about one of its adapters besides the coefficients."""

    mode: str
    layout: str
    basis: str
    seed: int
    scaling: float
    block: Optional[tuple[int, int]]  # (p, q) for the lowfreq and grid layouts, else None
    dropout: float = 0.0  # delta mode: dropout on the update's input while training (dropout.py)
    grid: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None  # the grid layout's frequencies


class SpectralLayer(BaseTunerLayer):
    adapter_layer_names = ("spectral_coefficients",)
    other_param_names = ("spectral_indices", "spectral_fixed_indices", "spectral_settings")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.spectral_coefficients = nn.ParameterDict({})
        # index sets that depend on data (energy, banded) are saved with the adapter ...
        self.spectral_indices = BufferDict({}, persistent=True)
        # ... the others (random, triangle) are recomputed from shape and seed
        self.spectral_fixed_indices = BufferDict({}, persistent=False)
        self.spectral_settings: dict[str, AdapterSettings] = {}
        # adapters of a calibrated layout (gradient) whose index set is not chosen yet: they refuse to run
        self.uncalibrated_adapters: set[str] = set()
        self._disable_adapters = False
        self.merged_adapters = []
        # how forward computes: "auto" (a path measured by tune_compute_paths, else the cost model's) or a forced path
        self.compute_path = "auto"
        # (adapter, token bucket, dtype) -> the path hf_spectral.tune_compute_paths measured for a training step
        self.tuned_paths: dict[tuple, str] = {}
        self.last_compute_path: Optional[str] = None  # what the last forward did (for tests and benchmarks)
        # Evaluation reuses the rebuilt weight while the coefficients, the base weight and the active
        # adapters are unchanged: one extra dense weight per layer, dropped when training resumes.
        self.cache_weights = True
        # how the DCT transforms run: "auto" (the cheaper by the cost model), "fft" or "matmul" (for tests)
        self.transform = "auto"
        self._weight_cache: Optional[WeightCache] = None
        self._mixed_weights: dict[str, WeightCache] = {}  # one merged weight per adapter, for mixed batches
        self._spaces: dict[str, CoefficientSpace] = {}
        self._path_memo: dict[tuple, str] = {}
        self.kwargs = kwargs

        base_layer = self.get_base_layer()
        # a quantized base (bitsandbytes, torchao, HQQ, ...) is never read as a float weight: quantized.py
        self.quantization_backend = quantized.resolve_backend(base_layer, **kwargs)
        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):
            self.in_features, self.out_features = base_layer.nx, base_layer.nf
        elif self.quantization_backend is not None:
            self.in_features, self.out_features = quantized.features(base_layer)
        elif self._matrix_shape(base_layer) is not None:  # a weight read as a matrix (embedding_conv.py)
            self.out_features, self.in_features = self._matrix_shape(base_layer)
        else:
            raise TypeError(
                f"Spectral layers wrap torch.nn.Linear and transformers' Conv1D, not {type(base_layer).__name__}."
            )

    def _matrix_shape(self, base_layer: nn.Module) -> Optional[tuple[int, int]]:
        """(out, in) of a base layer whose weight is read as a matrix; None here (subclasses for other modules)."""
        return None

    # ----------------------------------------------------------------------------------------------
    # creating an adapter

    def _dense_weight(self) -> Optional[torch.Tensor]:
        """The base weight as out x in, or None if there is none (released, or on the meta device)."""
        weight = self.get_base_layer().weight
        if weight is None or weight.device.type == "meta":
            return None
        return transpose(weight, self.fan_in_fan_out)

    def update_layer(self, adapter_name: str, config, module_key: str, from_pretrained: bool) -> None:
        m, n = self.out_features, self.in_features
        k = config.budget_for(module_key, m, n)
        mode, layout, basis, seed = config.mode, config.layout, config.basis, config.seed
        init = config.init_weights
        if mode == "replace" and init is True:
            init = "project" if from_pretrained else "random"

        if self.quantization_backend is None:
            weight = self._dense_weight()
        else:  # checks the adapter; the dequantized W0 only for a layout that ranks it
            weight = quantized.init_weight(self, config, module_key)
        if weight is None and init == "project":
            raise ValueError(
                f"init_weights='project' reads the existing weight of {module_key!r}, but that layer has none (it is "
                "on the meta device, or a replace-mode adapter released it). Load the model with its weights, or use "
                "init_weights='random'."
            )
        device = weight.device if weight is not None else torch.device("cpu")
        if self.quantization_backend is not None:
            device = quantized.device_of(self)
        dtype = transform_dtype(weight.dtype if weight is not None else torch.float32)
        weight = None if weight is None else weight.detach().to(dtype)
        # a calibrated layout holds a seeded placeholder of the right size until init_gradient_layout chooses
        calibrated = layout in CALIBRATED_LAYOUTS
        space = make_space(
            m, n, k, layout="random" if calibrated else layout, basis=basis, seed=seed, weight=weight,
            name=module_key, **config.layout_options(),
        )
        count = space.k

        if mode == "delta":
            if init:
                values = torch.zeros(count, dtype=dtype)
            else:
                # small enough not to blow up the output: per-entry std ~0.1/sqrt(n), a sixth of nn.Linear's init
                std = 0.1 * math.sqrt(m / count) / (abs(config.scaling) or 1.0)
                values = torch.randn(count, dtype=dtype) * std
        elif init == "project":
            values = space.from_matrix(weight)
        else:  # "random" or False: the rebuilt weight gets the variance of the existing weight
            std = float(weight.std()) if weight is not None and weight.numel() > 1 else 1 / math.sqrt(3 * n)
            values = torch.randn(count, dtype=dtype) * std * math.sqrt(m * n / count)

        self.spectral_coefficients[adapter_name] = nn.Parameter(values.to(device=device, dtype=dtype))
        if layout in SAVED_LAYOUTS:
            self.spectral_indices[adapter_name] = space.indices.to(device)
        elif space.block is None:
            self.spectral_fixed_indices[adapter_name] = space.indices.to(device)
        self.spectral_settings[adapter_name] = AdapterSettings(
            mode=mode, layout=layout, basis=basis, seed=seed, scaling=float(config.scaling), block=space.block,
            dropout=float(getattr(config, "spectral_dropout", 0.0)), grid=space.grid,
        )
        if calibrated:
            self.uncalibrated_adapters.add(adapter_name)
        else:
            self.uncalibrated_adapters.discard(adapter_name)
        self._spaces.pop(adapter_name, None)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def model_dtype(self) -> torch.dtype:
        """The dtype of the model around the layer: its base weight's, the released one's (replace mode), or a
        quantized base's compute dtype."""
        base = self.get_base_layer()
        if self.quantization_backend is not None:
            dtype = getattr(base, "compute_dtype", None)
            if isinstance(dtype, torch.dtype):
                return dtype
            floats = [t.dtype for t in base.parameters() if t.is_floating_point()]
            return floats[0] if floats else torch.float32
        weight = base.weight
        return weight.dtype if weight is not None else getattr(self, "_released_weight_dtype", torch.float32)

    def release_base_weight(self) -> None:
        """Replace mode: drop the dense weight; the layer now lives in coefficient space."""
        base = self.get_base_layer()
        self._released_weight_dtype = base.weight.dtype if base.weight is not None else torch.float32
        base.weight = None

    # ----------------------------------------------------------------------------------------------
    # the reconstruction: the single source of truth

    def _indices(self, adapter: str) -> torch.Tensor:
        if adapter in self.spectral_indices:
            return self.spectral_indices[adapter]
        return self.spectral_fixed_indices[adapter]

    def coefficient_space(self, adapter: str) -> CoefficientSpace:
        """The adapter's basis, index set and transforms; rebuilt when its index set moved or was reloaded."""
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}.")
        if adapter in self.uncalibrated_adapters:
            raise RuntimeError(
                f"Adapter {adapter!r} has layout={self.spectral_settings[adapter].layout!r}, whose index set is chosen "
                "from calibration data, and it has not been chosen yet: call hf_spectral.init_gradient_layout(model, "
                "batches) after get_peft_model and before training, or load a saved adapter."
            )
        settings = self.spectral_settings[adapter]
        indices = None if settings.block is not None else self._indices(adapter)
        cached = self._spaces.get(adapter)
        if torch.compiler.is_compiling() and cached is not None and (indices is None or cached[0][1] == id(indices)):
            # a traced tensor's version is a symbolic value: comparing two of them is a graph break
            return cached[1]
        key = (self.transform,) if indices is None else (self.transform, id(indices), indices._version, indices.device)
        if cached is None or cached[0] != key:
            space = CoefficientSpace(
                self.out_features, self.in_features, settings.basis, settings.seed, settings.block, indices, settings.grid
            )
            space.transform = self.transform
            cached = self._spaces[adapter] = (key, space)
            self._path_memo.clear()
        return cached[1]

    def rebuild(self, adapter: str) -> torch.Tensor:
        """The out x in matrix ``B_m^T S B_n`` of an adapter's coefficients (unscaled), in float32.

        Differentiable; its backward is the adjoint transform. Matmuls or FFTs, whichever is cheaper.
        """
        coefficients = self.spectral_coefficients[adapter]
        dtype = transform_dtype(coefficients.dtype)
        with torch.autocast(device_type=coefficients.device.type, enabled=False):
            return matrix(self.coefficient_space(adapter), coefficients.to(dtype))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """What the adapter adds to the base weight, in the base weight's layout (in x out for Conv1D)."""
        settings = self.spectral_settings[adapter]
        scale = settings.scaling if settings.mode == "delta" else 1.0
        return transpose(self.rebuild(adapter) * scale, self.fan_in_fan_out)

    # ----------------------------------------------------------------------------------------------
    # replace-mode rules

    def _require_base_weight(self, action: str) -> None:
        if self.quantization_backend is None and self.get_base_layer().weight is None:
            raise ValueError(
                f"Cannot {action}: this layer is a replace-mode spectral layer, so it has no dense base weight "
                "to fall back on. Use merge_and_unload() to get a dense model."
            )

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True for a delta adapter. ``peft.convert_to_lora`` asks each layer this before converting; a replace-mode
        layer raises instead of answering False, so the user reads what to do rather than PEFT's generic "do not
        support LoRA conversion". The model-wide question (``SpectralModel.supports_lora_conversion``) answers."""
        settings = self.spectral_settings.get(adapter_name)
        if settings is not None and settings.mode == "replace":
            raise TypeError(
                f"Adapter {adapter_name!r} is a replace-mode spectral adapter: its layers hold the weight itself, not "
                "an update of a base weight, so no LoRA adapter can express it (peft.convert_to_lora and save_as_lora "
                "convert delta adapters only). To serve it, merge it first: model.merge_and_unload() returns a plain "
                "transformers model with the rebuilt dense weights, which any server loads."
            )
        return settings is not None

    # ----------------------------------------------------------------------------------------------
    # the evaluation-time weight cache

    def drop_weight_cache(self) -> None:
        """Forget the cached rebuilt weight (it is rebuilt on the next forward that can use it)."""
        self._weight_cache = None
        self._mixed_weights.clear()

    def _cached_weight(self, active: list[str], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        cache = self._weight_cache
        if cache is None or not cache.valid(self, dtype, device):
            self._weight_cache = None  # free the old one before building the new one
            with torch.no_grad():
                weight = self._merged_weight(active).to(dtype).contiguous()
            watched = [self.spectral_coefficients[a] for a in active]
            watched += [self._indices(a) for a in active if self.spectral_settings[a].block is None]
            if self.get_base_layer().weight is not None:
                watched.append(self.get_base_layer().weight)
            self._weight_cache = WeightCache(self, dtype, device, watched, weight)
        return self._weight_cache.weight

    def _forward_cached(self, x: torch.Tensor, cache: WeightCache) -> Optional[torch.Tensor]:
        """The lean path of evaluation: one F.linear with the cached weight, or None if the cache is stale."""
        if not self.cache_weights:
            return None
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        if not cache.valid(self, dtype, x.device) or (torch.is_grad_enabled() and cache.needs_grad()):
            return None
        bias = cache.base.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        object.__setattr__(self, "last_compute_path", "cached")  # plain attribute, skip nn.Module's bookkeeping
        if autocast:
            with torch.autocast(device_type=device_type, enabled=False):
                return F.linear(x.to(dtype), cache.weight, bias)
        return F.linear(x, cache.weight, bias)

    def _merged_weight(self, active: list[str]) -> torch.Tensor:
        """out x in: the replace-mode weight or the base weight, plus every active delta (scaled)."""
        replace = [a for a in active if self.spectral_settings[a].mode == "replace"]
        if replace:
            weight = self.rebuild(replace[0])
        else:
            weight = transpose(self.get_base_layer().weight, self.fan_in_fan_out)
        for adapter in active:
            settings = self.spectral_settings[adapter]
            if settings.mode == "delta":
                weight = weight + self.rebuild(adapter) * settings.scaling
        return weight

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        self.drop_weight_cache()
        super().set_adapter(adapter_names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.drop_weight_cache()
        self.uncalibrated_adapters.discard(adapter_name)
        self._spaces.pop(adapter_name, None)
        self._path_memo.clear()
        super().delete_adapter(adapter_name)

    def __repr__(self) -> str:
        return "spectral." + super().__repr__()


class SpectralLinear(nn.Module, SpectralLayer):
    """A spectral adapter around an ``nn.Linear`` or a transformers ``Conv1D``."""

    batched_rebuilds = True  # same-shape layers' merged weights may be built together (rebuild_groups.py)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config,
        module_key: str,
        from_pretrained: bool,
        **kwargs,
    ) -> None:
        super().__init__()
        SpectralLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_key, from_pretrained)

    # ----------------------------------------------------------------------------------------------
    # loading (here, not in SpectralLayer: nn.Module comes first in this class's MRO)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Every state-dict load reaches each module through here (load_state_dict, PEFT's
        # set_peft_model_state_dict, torch.distributed.checkpoint's set_model_state_dict). Under FSDP2 a
        # load writes the shards and the next forward gathers them into the same memory without a version
        # bump, which the cache cannot see; so a load always drops it.
        self.drop_weight_cache()
        for adapter in list(self.uncalibrated_adapters):  # a saved calibrated index set is loaded: it is chosen
            if f"{prefix}spectral_indices.{adapter}" in state_dict:
                self.uncalibrated_adapters.discard(adapter)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # merging

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        self.drop_weight_cache()
        for adapter in adapter_names:
            if adapter not in self.spectral_coefficients:
                continue
            if self.quantization_backend is not None:  # dequantize, add, requantize (quantized.py)
                quantized.merge(self, adapter, safe_merge)
                self.merged_adapters.append(adapter)
                continue
            base = self.get_base_layer()
            settings = self.spectral_settings[adapter]
            with torch.no_grad():
                if settings.mode == "replace":
                    merged = self.get_delta_weight(adapter).to(getattr(self, "_released_weight_dtype", torch.float32))
                else:
                    merged = base.weight.data + self.get_delta_weight(adapter).to(base.weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaN or inf found in the merged weight of adapter {adapter!r} (shape "
                        f"{tuple(merged.shape)}); the layer was left unmerged. The adapter's coefficients are broken: "
                        "check the learning rate, or load an earlier checkpoint."
                    )
            if settings.mode == "replace":
                base.weight = nn.Parameter(merged, requires_grad=False)
            else:
                base.weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.drop_weight_cache()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.spectral_coefficients:
                continue
            if self.quantization_backend is not None:
                quantized.unmerge(self, adapter)
            elif self.spectral_settings[adapter].mode == "replace":
                self.release_base_weight()
            else:
                base = self.get_base_layer()
                base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)

    # ----------------------------------------------------------------------------------------------
    # forward

    def train(self, mode: bool = True):
        if mode:
            self.drop_weight_cache()  # training rebuilds every step; the cache would only hold memory
        return super().train(mode)

    def choose_path(self, adapter: str, tokens: int, x: torch.Tensor, coefficient_grad: bool, update_only: bool = False) -> str:
        """The path of one forward: the forced ``compute_path``, else the one ``tune_compute_paths`` measured for a
        training step like this one, else the cost model's. Decided from the layer's settings and the input's
        shape alone, so every rank and every run takes the same path. ``update_only``: the path for the update
        ``s * x dW^T`` without W0 (a quantized base runs W0 x in its own kernel)."""
        if self.compute_path != "auto":
            if self.compute_path not in COMPUTE_PATHS:
                raise ValueError(f"compute_path must be one of {COMPUTE_PATHS}, got {self.compute_path!r}.")
            # 'separate' is what a quantized base does anyway (base forward, then the update by one matmul)
            return "dense" if update_only and self.compute_path == "separate" else self.compute_path
        # In training mode the choice is the same whatever this pass needs: a checkpointed block runs once without
        # gradients and again with them, and a frozen embedding's output needs no input gradient where the same
        # layer elsewhere does; both passes, and all same-shape layers, must take one path and compute the same bits.
        input_grad = self.training or (torch.is_grad_enabled() and x.requires_grad)
        compiling = torch.compiler.is_compiling()
        key = (adapter, update_only, tokens, x.device.type, x.dtype, coefficient_grad, input_grad, compiling)
        path = self._path_memo.get(key)
        if path is None:
            path = None if compiling or not self.training else self.tuned_paths.get((adapter, token_bucket(tokens), x.dtype))
            if path is None:
                mode = "replace" if update_only else self.spectral_settings[adapter].mode
                path = cost_model.choose_path(
                    self.coefficient_space(adapter), mode, tokens, x.device.type, coefficient_grad=coefficient_grad,
                    input_grad=input_grad, half=x.dtype in (torch.bfloat16, torch.float16), sparse=not compiling,
                )
            if len(self._path_memo) > 64:
                self._path_memo.clear()
            self._path_memo[key] = path
        return path

    def _adapter_weight(self, adapter: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The merged weight of one delta adapter, cached per adapter while nothing it is built from changes."""
        caches = self._mixed_weights
        cache = caches.get(adapter)
        if cache is None or not cache.valid(self, dtype, device, active=adapter):
            with torch.no_grad():
                weight = self._merged_weight([adapter]).to(dtype).contiguous()
            watched = [self.spectral_coefficients[adapter], self.get_base_layer().weight]
            if self.spectral_settings[adapter].block is None:
                watched.append(self._indices(adapter))
            cache = caches[adapter] = WeightCache(self, dtype, device, watched, weight, active=adapter)
        return cache.weight

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row of the batch through its own adapter (``"__base__"``: none), as if run alone with it."""
        if x.shape[0] != len(adapter_names):
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows: give one adapter "
                "name (or '__base__') per row."
            )
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged: call unmerge_adapter() first.")
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(row)
        out = None
        for name, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            part = x.index_select(0, index)
            if name == "__base__" or name not in self.spectral_coefficients:
                y = self.base_layer(part, *args, **kwargs)
            else:
                y = self._forward_with_adapter(part, name, *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, index, y)
        object.__setattr__(self, "last_compute_path", "mixed")
        return out

    def _forward_with_adapter(self, x: torch.Tensor, adapter: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The rows of a mixed batch that take ``adapter``: through its merged weight (kept while unchanged)."""
        if self.quantization_backend is not None:
            return quantized.forward(self, x, [adapter], *args, **kwargs)
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        bias = self.get_base_layer().bias
        with torch.autocast(device_type=device_type, enabled=False) if autocast else contextlib.nullcontext():
            return F.linear(x.to(dtype), self._adapter_weight(adapter, dtype, x.device),
                            None if bias is None else bias.to(dtype))

    def _forward_matches_cache(self, active: list[str], tokens: int, x: torch.Tensor) -> bool:
        """In training mode without gradients: does the path a gradient pass takes compute its output with the
        merged weight, as the cache does (dense, sampled, several adapters), so that both give the same numbers?"""
        if len(active) > 1:
            return True
        return self.choose_path(active[0], tokens, x, True) in ("dense", "sampled")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # each row through its own adapter
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        active = self._adapters_to_run()
        if not active:  # disabled, merged, or no adapter of this layer active
            return self._base_forward(x, *args, **kwargs)
        return self._spectral_forward(x, active, *args, **kwargs)

    def _adapters_to_run(self) -> list[str]:
        """The active adapters this forward applies unmerged: none while disabled or merged."""
        if self.disable_adapters or self.merged:
            return []
        return [a for a in self.active_adapters if a in self.spectral_coefficients]

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped layer alone (with merged adapters, if any, unless the adapters are disabled)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            self._require_base_weight("run with the adapters disabled")
        elif not self.merged:
            self._require_base_weight("run without an active adapter")
        return self.base_layer(x, *args, **kwargs)

    def _spectral_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x W^T + b`` with ``W`` from the coefficients, by the path chosen before any compute starts."""
        if dropout.applies(self, active):  # base(x) + update(dropout(x)), as LoRA computes it
            return dropout.forward(self, x, active, *args, **kwargs)
        if self.quantization_backend is not None:  # the quantized kernel plus the update; no weight cache
            return quantized.forward(self, x, active, *args, **kwargs)
        cache = self._weight_cache
        if cache is not None:  # evaluation's lean path: one F.linear with the kept weight
            out = self._forward_cached(x, cache)
            if out is not None:
                return out
        base = self.get_base_layer()
        device_type = x.device.type
        # Under autocast the layer computes in the autocast dtype, as the nn.Linear it wraps would; the
        # paths themselves run with autocast off so their float32 transforms stay float32.
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        grad = torch.is_grad_enabled()
        trains = any(self.spectral_coefficients[a].requires_grad for a in active)
        base_grad = grad and base.weight is not None and base.weight.requires_grad
        # In training mode the path is chosen as if gradients were on even where they are off: gradient
        # checkpointing (use_reentrant=True) runs the forward without them and recomputes it with them, and the
        # two passes must compute the same numbers.
        choose_grad = trains and (grad or self.training)
        tokens = x.numel() // max(x.shape[-1], 1)
        with torch.autocast(device_type=device_type, enabled=False) if autocast else contextlib.nullcontext():
            x = x.to(dtype)
            bias = None if base.bias is None else base.bias.to(dtype)
            if self.cache_weights and not ((grad and trains) or base_grad) and (
                not choose_grad or self._forward_matches_cache(active, tokens, x)
            ):
                object.__setattr__(self, "last_compute_path", "cached")
                return F.linear(x, self._cached_weight(active, dtype, x.device), bias)
            self.drop_weight_cache()
            if len(active) > 1:
                # several adapters at once: one merged weight, gradients through the differentiable rebuild
                object.__setattr__(self, "last_compute_path", "dense")
                return F.linear(x, self._merged_weight(active).to(dtype), bias)
            adapter = active[0]
            settings = self.spectral_settings[adapter]
            values = self.spectral_coefficients[adapter]
            path = self.choose_path(adapter, tokens, x, choose_grad)
            object.__setattr__(self, "last_compute_path", path)
            # the weight its group of same-shape layers built ahead in this training forward (rebuild_groups.py)
            prebuilt = rebuild_groups.take(self, adapter, dtype, x.device, needs_weight=path in ("dense", "sampled"))
            return dispatch.run_path(
                path,
                x,
                values.to(transform_dtype(values.dtype)),
                self.coefficient_space(adapter),
                base_weight=None if settings.mode == "replace" else base.weight,
                bias=bias,
                scaling=settings.scaling if settings.mode == "delta" else 1.0,
                fan_in_fan_out=self.fan_in_fan_out,
                merged_weight=prebuilt,
            )
