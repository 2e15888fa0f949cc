"""hf_spectral: DCT-coefficient ("spectral") layers for Hugging Face models, as a PEFT method.

``import hf_spectral`` registers the method with PEFT; then ``get_peft_model(model, SpectralConfig(...))``,
``PeftModel.from_pretrained`` and the rest of PEFT's API work as for LoRA.
"""

from . import bases, dct, layouts
from ._peft_registry import SPECTRAL_PEFT_TYPE, install_patches, register
from ._version import __version__
from .coefficient_space import CoefficientSpace
from .config import SpectralConfig
from .ecosystem.hub import is_spectral_model, push_to_hub
from .layer import SpectralLayer, SpectralLinear
from .model import SpectralModel, set_compute_path, set_weight_cache, spectral_layers

register(SpectralConfig, SpectralModel)
install_patches(push_to_hub, is_spectral_model)

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
    "layouts",
    "set_compute_path",
    "set_weight_cache",
    "spectral_layers",
]
