"""Registers hf_spectral with PEFT as soon as PEFT is imported, so that a saved spectral adapter
loads with ``PeftModel.from_pretrained`` even in a program that never imports hf_spectral.

PEFT has no plugin discovery: without this, loading fails with ``KeyError('SPECTRAL')``.
The installed ``hf_spectral_autoload.pth`` imports this module at interpreter start. It costs
nothing until ``peft`` is imported (no torch, no peft imported here), and it steps aside after
that. Set ``HF_SPECTRAL_AUTOLOAD=0`` to turn it off (then ``import hf_spectral`` yourself).
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

_TRIGGER = "peft"


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # fire once, and let the real finders locate peft
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            try:
                importlib.import_module("hf_spectral")
            except Exception as error:  # never break `import peft` itself
                warnings.warn(f"hf_spectral could not register with PEFT: {error!r}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if os.environ.get("HF_SPECTRAL_AUTOLOAD", "1") == "0":
        return
    if _TRIGGER in sys.modules:  # peft is already there: register now
        importlib.import_module("hf_spectral")
    elif not any(isinstance(f, _RegisterAfterPeft) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())


install()
