"""hf_spectral: DCT-coefficient ("spectral") layers for Hugging Face models, as a PEFT method.

``import hf_spectral`` registers the method with PEFT, as PEFT's own tuners are registered: eagerly, here.
Then ``get_peft_model(model, SpectralConfig(...))``, ``PeftModel.from_pretrained`` and the rest of PEFT's API
work as for LoRA. Programs that load a spectral adapter without importing the package are served by
``hf_spectral_autoload`` (installed with a ``.pth`` file: it imports this package right after ``import peft``).
Every change this makes to PEFT's and transformers' classes is listed in ``_peft_registry.py``.
"""

from __future__ import annotations

import importlib
import sys

from ._peft_registry import (
    SPECTRAL_PEFT_TYPE,
    install_hotswap_route,
    install_mixed_model_support,
    install_patches,
    register,
)
from ._version import __version__
from .io.hub import is_spectral_model, push_to_hub
from .io.loading import guard_peft_from_pretrained, guard_peft_load_adapter, guard_transformers_load_adapter
from .transforms.coefficient_space import CoefficientSpace
from .tuner.config import SpectralConfig
from .tuner.gradient_layout import init_gradient_layout
from .tuner.hotswap import hotswap_adapter, is_spectral_adapter, prepare_model_for_compiled_hotswap
from .tuner.layer import SpectralLayer, SpectralLinear
from .tuner.model import (
    SpectralModel,
    describe_compute_paths,
    set_compute_path,
    set_path_tuning,
    set_weight_cache,
    spectral_layers,
    tune_compute_paths,
)

register(SpectralConfig, SpectralModel)
install_patches(push_to_hub, is_spectral_model, (guard_peft_from_pretrained, guard_peft_load_adapter,
                                                 guard_transformers_load_adapter))
install_mixed_model_support(SpectralConfig, SpectralModel, SpectralLayer)
install_hotswap_route(hotswap_adapter, is_spectral_adapter)

# Modules that moved into the subpackages keep their old import paths (``import hf_spectral.layer``,
# ``from hf_spectral.ecosystem.hub import ...``): the same module objects under both names.
_MOVED = {
    "config": "tuner.config", "model": "tuner.model", "layer": "tuner.layer", "quantized": "tuner.quantized",
    "dropout": "tuner.dropout", "embedding_conv": "tuner.embedding_conv", "expert_parameters": "tuner.expert_parameters",
    "hotswap": "tuner.hotswap", "gradient_layout": "tuner.gradient_layout",
    "bases": "transforms.bases", "dct": "transforms.dct", "fft_tables": "transforms.fft_tables",
    "layouts": "transforms.layouts", "coefficient_space": "transforms.coefficient_space",
    "index_codec": "transforms.index_codec", "stable_random": "transforms.stable_random",
    "triton_kernels": "transforms.triton_kernels", "rebuild_groups": "compute.rebuild_groups",
    "weight_cache": "compute.weight_cache", "loading": "io.loading", "ecosystem": "io",
    "ecosystem.adapter_files": "io.adapter_files", "ecosystem.hub": "io.hub", "ecosystem.model_card": "io.model_card",
    "ecosystem.checkpoints": "io.checkpoints",
}
for _old, _new in _MOVED.items():
    _module = importlib.import_module(f"{__name__}.{_new}")
    sys.modules[f"{__name__}.{_old}"] = _module
    if "." not in _old:
        globals()[_old] = _module
    else:
        setattr(sys.modules[f"{__name__}.{_old.split('.')[0]}"], _old.split(".")[1], _module)
del _old, _new, _module

# subpackages and modules reachable as attributes (``hf_spectral.optim``) without an explicit import
_LAZY_MODULES = ("mixing", "optim", "compute", "cli")

__all__ = [
    "SPECTRAL_PEFT_TYPE",
    "CoefficientSpace",
    "SpectralConfig",
    "SpectralLayer",
    "SpectralLinear",
    "SpectralModel",
    "__version__",
    "bases",
    "dct",
    "describe_compute_paths",
    "hotswap_adapter",
    "init_gradient_layout",
    "layouts",
    "prepare_model_for_compiled_hotswap",
    "set_compute_path",
    "set_path_tuning",
    "set_weight_cache",
    "spectral_layers",
    "tune_compute_paths",
]


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_MODULES))


from .mixing.auto import register_configs as _register_mixer_types  # noqa: E402

_register_mixer_types()  # mixer model types with AutoConfig / AutoModelForCausalLM (hf_spectral.mixing.auto)
