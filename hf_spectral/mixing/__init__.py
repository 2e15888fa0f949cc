"""Spectral token mixing: a learned Fourier dictionary over positions in place of self-attention.

    from hf_spectral.mixing import SpectralMixingConfig, replace_attention
    model = replace_attention(AutoModelForCausalLM.from_config(cfg), SpectralMixingConfig())
    model.save_pretrained("out"); model = AutoModelForCausalLM.from_pretrained("out")  # after import hf_spectral

A mixer model is a transformers model of its own type (``hf_spectral_mixing_gpt2``, ``hf_spectral_mixing_llama``),
registered with ``AutoConfig`` and ``AutoModelForCausalLM`` (``hf_spectral.mixing.auto``).
``docs/mixing.md`` has the maths, the knobs and how they map onto the spectral-dictionary paper.

The names below load on first use, so ``import hf_spectral`` stays light (no torch) while it installs the
registration hook.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_LAZY_NAMES = {
    "causal_mix": ".atoms",
    "causal_read": ".atoms",
    "scan": ".atoms",
    "SpectralStateLayer": ".cache",
    "SpectralMixingConfig": ".config",
    "from_pretrained": ".loading",
    "auxiliary_loss": ".losses",
    "auxiliary_terms": ".losses",
    "SpectralMixer": ".mixer",
    "SpectralMixingGPT2Config": ".configuration",
    "SpectralMixingLlamaConfig": ".configuration",
    "SpectralMixingGPT2LMHeadModel": ".modeling",
    "SpectralMixingLlamaForCausalLM": ".modeling",
    "dictionary_summary": ".replace",
    "is_mixer_model": ".install",
    "matched_atoms": ".install",
    "mixer_parameter_count": ".install",
    "parameter_counts": ".replace",
    "replace_attention": ".replace",
    "supported_families": ".install",
}

__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))
