"""hf_spectral: DCT-coefficient ("spectral") layers for Hugging Face models, as a PEFT method.

``import hf_spectral`` registers the method with PEFT; then ``get_peft_model(model, SpectralConfig(...))``,
``PeftModel.from_pretrained`` and the rest of PEFT's API work as for LoRA.
"""

from . import bases, dct, layouts
from ._peft_registry import SPECTRAL_PEFT_TYPE, register
from .config import SpectralConfig
from .ecosystem.hub import install_peft_push_to_hub
from .layer import SpectralLayer, SpectralLinear
from .model import SpectralModel

register(SpectralConfig, SpectralModel)

# PeftModel.push_to_hub writes the spectral model card for spectral adapters (see hf_spectral/ecosystem/hub.py)
install_peft_push_to_hub()

__version__ = "0.1.0"

__all__ = [
    "SPECTRAL_PEFT_TYPE",
    "SpectralConfig",
    "SpectralLayer",
    "SpectralLinear",
    "SpectralModel",
    "bases",
    "dct",
    "layouts",
]
