"""hf_spectral: DCT-coefficient ("spectral") layers for Hugging Face models, as a PEFT method.

``import hf_spectral`` registers the method with PEFT, as PEFT's own tuners are registered: eagerly, here.
Then ``get_peft_model(model, SpectralConfig(...))``, ``PeftModel.from_pretrained`` and the rest of PEFT's API
work as for LoRA. Programs that load a spectral adapter without importing the package are served by
``hf_spectral_autoload`` (installed with a ``.pth`` file: it imports this package right after ``import peft``).
Every change this makes to PEFT's and transformers' classes is listed in ``_peft_registry.py``.
"""

from __future__ import annotations

import importlib

from ._peft_registry import (
    SPECTRAL_PEFT_TYPE,
    install_hotswap_route,
    install_mixed_model_support,
    install_patches,
    register,
)
from ._version import __version__
from .coefficient_space import CoefficientSpace
from .config import SpectralConfig
from .ecosystem.hub import is_spectral_model, push_to_hub
from .gradient_layout import init_gradient_layout
from .hotswap import hotswap_adapter, is_spectral_adapter, prepare_model_for_compiled_hotswap
from .layer import SpectralLayer, SpectralLinear
from .loading import guard_peft_from_pretrained, guard_peft_load_adapter, guard_transformers_load_adapter
from .model import (
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

# subpackages and modules reachable as attributes (``hf_spectral.optim``) without an explicit import
_LAZY_MODULES = ("bases", "dct", "layouts", "mixing", "optim", "ecosystem", "compute", "cli")

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
