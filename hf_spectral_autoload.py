"""Registers hf_spectral with PEFT as soon as PEFT is imported, so that a saved spectral adapter
loads with ``PeftModel.from_pretrained`` even in a program that never imports hf_spectral; and its
spectral-mixer model types with transformers' ``AutoConfig`` / ``AutoModelForCausalLM`` as soon as
transformers loads those (``hf_spectral.mixing.auto``), so a saved mixer model loads the same way.

PEFT has no plugin discovery: without this, loading fails with ``KeyError('SPECTRAL')``.
The installed ``hf_spectral_autoload.pth`` imports this module at interpreter start. It costs
nothing until ``peft`` is imported (no torch, no peft imported here), and it steps aside after
that. Set ``HF_SPECTRAL_AUTOLOAD=0`` to turn it off (then ``import hf_spectral`` yourself).

``import hf_spectral`` uses the same hook (:func:`watch_for_peft`), whatever the variable says:
the package imports nothing heavy itself, and registers right after ``peft`` finishes importing.
"""

import functools
import importlib
import importlib.abc
import os
import sys
import warnings

_TRIGGER = "peft"
# transformers' Auto modules -> the function of hf_spectral.mixing.auto that registers the mixer configs after them
_MIXER_TRIGGERS = {
    "transformers.models.auto.configuration_auto": "register_configs_when_ready",
    "transformers.models.auto.modeling_auto": "register_configs_after_modeling_auto",
}


def _register() -> None:
    """Import hf_spectral and register it with PEFT (idempotent)."""
    package = importlib.import_module("hf_spectral")
    register = getattr(package, "register_with_peft", None)
    if register is not None:  # an hf_spectral that imports peft eagerly has registered on import
        register()
    if any(trigger in sys.modules for trigger in _MIXER_TRIGGERS):  # skipped while peft was importing
        _register_mixer("register_configs_when_ready", peft_complete=True)


def _register_mixer(function: str, peft_complete: bool = False) -> None:
    peft = sys.modules.get(_TRIGGER)
    if not peft_complete and peft is not None and getattr(peft.__spec__, "_initializing", False):
        return  # inside `import peft` (which imports transformers): its hook registers once peft is complete
    getattr(importlib.import_module("hf_spectral.mixing.auto"), function)()


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``peft`` (or of another ``trigger`` module) so that registration runs once its
    module has finished executing.

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


def watch_for_peft() -> None:
    """Register now if peft is imported, else as soon as it is (used by ``import hf_spectral``)."""
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterPeft) and f.trigger == _TRIGGER for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())


def watch_for_transformers() -> None:
    """Register the mixer model types with each Auto module now if loaded, else as soon as it is."""
    for trigger, function in _MIXER_TRIGGERS.items():
        if trigger in sys.modules:  # loaded, or loading further up this stack (then modeling_auto's hook registers)
            _register_mixer("register_configs_when_ready")
        elif not any(isinstance(f, _RegisterAfterPeft) and f.trigger == trigger for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterPeft(trigger, functools.partial(_register_mixer, function)))


def install() -> None:
    """What the ``.pth`` file runs at interpreter start; ``HF_SPECTRAL_AUTOLOAD=0`` turns it off."""
    if os.environ.get("HF_SPECTRAL_AUTOLOAD", "1") == "0":
        return
    watch_for_peft()
    watch_for_transformers()


install()
