"""Registers hf_spectral with PEFT as soon as PEFT is imported, so that a saved spectral adapter
loads with ``PeftModel.from_pretrained`` (or ``AutoPeftModel``, or transformers' ``load_adapter``) even in a
program that never imports hf_spectral.

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
import warnings

_TRIGGER = "peft"


def _register() -> None:
    """Import hf_spectral: its import registers it with PEFT. Mid-way through ``import hf_spectral`` itself
    (which imports peft) this finds the package in ``sys.modules`` and leaves the registration to it."""
    importlib.import_module("hf_spectral")


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``peft`` so that registration runs once peft's ``__init__`` has finished.

    A ``find_spec("peft")`` that does not import (transformers' ``is_peft_available`` asks this way) leaves
    the hook in place: only the import that actually executes peft fires it.
    """

    def __init__(self):
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRIGGER or self._searching:
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
                _register()
            except Exception as error:  # never break `import peft` itself
                warnings.warn(f"hf_spectral could not register with PEFT: {error!r}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """What the ``.pth`` file runs at interpreter start; ``HF_SPECTRAL_AUTOLOAD=0`` turns it off."""
    if os.environ.get("HF_SPECTRAL_AUTOLOAD", "1") == "0":
        return
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterPeft) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())


install()
