"""Registering mixer models with transformers' Auto classes.

``register_configs`` (run by ``import hf_spectral``, and by the autoload hook's stand-in entry the first time
``AutoConfig`` looks a mixer model type up) teaches ``AutoConfig`` the mixer config classes.
``AutoModelForCausalLM`` learns the model classes when the first mixer config is built
(``configuration._MixerConfig.on_create``), which every Auto lookup of a mixer model does first, so torch and
the model classes are imported only when a mixer model is about to be built. A program that never imports
hf_spectral therefore loads a mixer model with the Auto classes and ``pipeline`` as long as the autoload
``.pth`` is installed and ``HF_SPECTRAL_AUTOLOAD`` is not 0 (``hf_spectral_autoload``).
"""

from __future__ import annotations


def register_configs() -> None:
    """``AutoConfig`` rebuilds mixer configs (idempotent; imports transformers' config classes only)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    from .configuration import CONFIG_CLASSES, _MixerConfig

    for config_class in CONFIG_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    _MixerConfig.on_create = register_models


_models_registered = False


def register_models() -> None:
    """``AutoModelForCausalLM`` (and so ``pipeline``) builds mixer models (idempotent; imports torch)."""
    global _models_registered
    if _models_registered:
        return
    from transformers import AutoModelForCausalLM

    from .modeling import MODEL_CLASSES

    register_configs()
    for model_class in MODEL_CLASSES.values():
        AutoModelForCausalLM.register(model_class.config_class, model_class, exist_ok=True)
    _models_registered = True
