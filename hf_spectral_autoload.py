"""Registers hf_spectral with PEFT as soon as PEFT is imported, so that a saved spectral adapter
loads with ``PeftModel.from_pretrained`` (or ``AutoPeftModel``, or transformers' ``load_adapter``) even in a
program that never imports hf_spectral.

It also tells transformers' ``AutoConfig`` where hf_spectral's spectral-mixer model types live, as soon as
transformers loads ``configuration_auto``, so ``AutoModelForCausalLM.from_pretrained`` and ``pipeline`` load a
saved mixer model too (:func:`_add_mixer_config_entries`; nothing of hf_spectral is imported until such a
model is loaded).

PEFT has no plugin discovery: without this, loading fails with ``KeyError('SPECTRAL')``.
The installed ``hf_spectral_autoload.pth`` imports this module at interpreter start. It costs
nothing until ``peft`` is imported (no torch, no peft imported here): then it imports hf_spectral, whose
import registers the method, and steps aside. Set ``HF_SPECTRAL_AUTOLOAD=0`` to turn it off (then
``import hf_spectral`` yourself).
"""

import importlib
import importlib.abc
import os
import sys
import types
import warnings

_TRIGGER = "peft"
_CONFIGURATION_AUTO = "transformers.models.auto.configuration_auto"
# the mixer model types (hf_spectral.mixing.configuration) -> their config class names
_MIXER_CONFIGS = {
    "hf_spectral_mixing_gpt2": "SpectralMixingGPT2Config",
    "hf_spectral_mixing_llama": "SpectralMixingLlamaConfig",
}


def _register() -> None:
    """Import hf_spectral: its import registers it with PEFT. Mid-way through ``import hf_spectral`` itself
    (which imports peft) this finds the package in ``sys.modules`` and leaves the registration to it."""
    importlib.import_module("hf_spectral")


class _MixerConfigModule(types.ModuleType):
    """Stands in ``CONFIG_MAPPING``'s module cache for hf_spectral.mixing.configuration: imported on first lookup."""

    def __getattr__(self, name):
        auto = importlib.import_module("hf_spectral.mixing.auto")
        auto.register_configs()  # the real registration (AutoConfig.register), now that transformers is loaded
        return getattr(importlib.import_module("hf_spectral.mixing.configuration"), name)


def _add_mixer_config_entries(configuration_auto=None) -> None:
    """Put the mixer model types in ``AutoConfig``'s table by name, importing nothing: transformers is still
    importing itself when this runs, and hf_spectral imports PEFT, which imports transformers."""
    configuration_auto = configuration_auto or sys.modules[_CONFIGURATION_AUTO]
    mapping = configuration_auto.CONFIG_MAPPING  # a _LazyConfigMapping: names, and a cache of their modules
    for model_type, class_name in _MIXER_CONFIGS.items():
        mapping._mapping.setdefault(model_type, class_name)
        module_name = configuration_auto.model_type_to_module_name(model_type)
        mapping._modules.setdefault(module_name, _MixerConfigModule("hf_spectral.mixing.configuration"))


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``peft`` (or of ``trigger``) so that ``register`` runs once that module has finished.

    A ``find_spec("peft")`` that does not import (transformers' ``is_peft_available`` asks this way) leaves
    the hook in place: only the import that actually executes peft fires it.
    """

    def __init__(self, trigger=_TRIGGER, register=_register):
        self._searching = False
        self.trigger, self.register = trigger, register

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.trigger or self._searching:
            return None
        self._searching = True
        try:  # let the other finders locate peft (this one answers None while searching)
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module
        hook = self

        def exec_module(module):
            original_exec(module)
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)  # fire once
            try:
                hook.register()
            except Exception as error:  # never break the import itself
                warnings.warn(f"hf_spectral could not register with {hook.trigger}: {error!r}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """What the ``.pth`` file runs at interpreter start; ``HF_SPECTRAL_AUTOLOAD=0`` turns it off."""
    if os.environ.get("HF_SPECTRAL_AUTOLOAD", "1") == "0":
        return
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterPeft) and f.trigger == _TRIGGER for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())
    if _CONFIGURATION_AUTO in sys.modules:
        _add_mixer_config_entries()
    elif not any(isinstance(f, _RegisterAfterPeft) and f.trigger == _CONFIGURATION_AUTO for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft(_CONFIGURATION_AUTO, _add_mixer_config_entries))


install()
