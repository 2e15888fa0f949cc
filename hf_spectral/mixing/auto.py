"""Registering mixer models with transformers' Auto classes, when transformers loads them.

``AutoConfig`` learns the mixer config classes right after ``transformers.models.auto.configuration_auto``
is imported, or, when that happens inside transformers' own import of ``...modeling_auto`` (a config class
cannot be defined before that module is complete), right after ``modeling_auto`` (the import hooks of
``hf_spectral_autoload``); ``AutoModelForCausalLM`` learns the model classes
when the first mixer config is built (``configuration._MixerConfig.on_create``), which every Auto lookup of a mixer
model does first. So a program that never imports hf_spectral loads a mixer model with the Auto classes and
``pipeline`` as long as the autoload ``.pth`` is installed and ``HF_SPECTRAL_AUTOLOAD`` is not 0;
``import hf_spectral`` installs the same hook. Until then nothing heavy is imported.
"""

from __future__ import annotations

import importlib
import sys

_MODELING_AUTO = "transformers.models.auto.modeling_auto"


def register_configs() -> None:
    """``AutoConfig`` rebuilds mixer configs (idempotent; imports transformers' config classes only)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    from .configuration import CONFIG_CLASSES, _MixerConfig

    for config_class in CONFIG_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    _MixerConfig.on_create = register_models


def register_configs_when_ready() -> None:
    """What the import hooks run: ``register_configs``, unless transformers is mid-import (then a later hook does).

    While transformers imports its modeling stack, the config classes cannot be defined yet (their docstrings
    read ``modeling_auto``). The hook on ``modeling_auto``, the one after ``import peft`` and ``import hf_spectral``
    try again; if none succeeds, transformers raises its unknown-model-type error (it never builds attention).
    """
    modeling_auto = sys.modules.get(_MODELING_AUTO)
    if modeling_auto is not None and getattr(modeling_auto.__spec__, "_initializing", False):
        return  # inside modeling_auto's own import: its hook runs register_configs_after_modeling_auto
    register_configs_after_modeling_auto()


def register_configs_after_modeling_auto() -> None:
    """``register_configs``, keeping quiet if transformers is still mid-import (see ``register_configs_when_ready``)."""
    global _registering
    if _registering:  # our config module's import loads modeling_auto, whose hook lands here again
        return
    _registering = True
    try:
        register_configs()
    except (ImportError, AttributeError):
        pass
    finally:
        _registering = False


_registering = False
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


def watch() -> None:
    """Register each part now if transformers has loaded it, else right after it does (what ``import hf_spectral`` runs)."""
    try:
        autoload = importlib.import_module("hf_spectral_autoload")
    except ImportError:  # the hook module ships with the package; without it, register now
        register_models()
        return
    autoload.watch_for_transformers()
