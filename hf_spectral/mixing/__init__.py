"""Spectral token mixing: a learned Fourier dictionary over positions in place of self-attention.

    from hf_spectral.mixing import SpectralMixingConfig, replace_attention, from_pretrained
    model = replace_attention(AutoModelForCausalLM.from_config(cfg), SpectralMixingConfig())
    model.save_pretrained("out"); model = from_pretrained("out")

``docs/mixing.md`` has the maths, the knobs and how they map onto the spectral-dictionary paper.
"""

from .atoms import causal_mix, scan
from .cache import SpectralStateLayer
from .config import SpectralMixingConfig
from .loading import from_pretrained
from .losses import auxiliary_loss, auxiliary_terms
from .mixer import SpectralMixer
from .replace import (
    dictionary_summary,
    is_mixer_model,
    matched_atoms,
    mixer_parameter_count,
    parameter_counts,
    replace_attention,
    supported_families,
)

__all__ = [
    "SpectralMixer",
    "SpectralMixingConfig",
    "SpectralStateLayer",
    "auxiliary_loss",
    "auxiliary_terms",
    "causal_mix",
    "dictionary_summary",
    "from_pretrained",
    "is_mixer_model",
    "matched_atoms",
    "mixer_parameter_count",
    "parameter_counts",
    "replace_attention",
    "scan",
    "supported_families",
]
