"""The configuration classes of mixer models: a base family's config with a model type of its own.

A model after ``replace_attention`` is saved with ``model_type`` ``hf_spectral_mixing_<family>`` and its mixer
settings under ``spectral_mixing``, so ``AutoConfig`` (once ``hf_spectral.mixing.auto`` has registered these
classes) rebuilds this class, and transformers without hf_spectral refuses the model instead of quietly building
attention. Light: imports transformers' config classes only (no torch).
"""

from __future__ import annotations

# from the submodules: this runs while transformers itself is still importing its Auto modules
from transformers.models.gpt2.configuration_gpt2 import GPT2Config
from transformers.models.llama.configuration_llama import LlamaConfig

# what the saved config.json says to a reader who does not have hf_spectral
LOAD_HINT = "pip install hf-spectral, then import hf_spectral before loading (its autoload hook does it for you)"


class _MixerConfig:
    # set by hf_spectral.mixing.auto when it registers these classes with AutoConfig: registers the model classes
    on_create = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # a mixer config exists, so a model may be looked up by it: AutoModelForCausalLM must know the model
        # classes by now (registering them when transformers' modeling_auto loads would be circular)
        if _MixerConfig.on_create is not None:
            _MixerConfig.on_create()


class SpectralMixingGPT2Config(_MixerConfig, GPT2Config):
    """A GPT-2 config whose self-attention is a spectral mixer (settings in ``spectral_mixing``)."""

    model_type = "hf_spectral_mixing_gpt2"
    base_model_type = "gpt2"


class SpectralMixingLlamaConfig(_MixerConfig, LlamaConfig):
    """A Llama config whose self-attention is a spectral mixer (settings in ``spectral_mixing``)."""

    model_type = "hf_spectral_mixing_llama"
    base_model_type = "llama"


# the family's model_type -> the mixer config class
CONFIG_CLASSES = {cls.base_model_type: cls for cls in (SpectralMixingGPT2Config, SpectralMixingLlamaConfig)}


def base_model_type(config) -> str | None:
    """``gpt2`` or ``llama`` for a plain or a mixer config of that family; the model_type otherwise."""
    return getattr(type(config), "base_model_type", getattr(config, "model_type", None))
