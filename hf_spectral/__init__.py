"""hf_spectral: DCT-coefficient ("spectral") layers for Hugging Face models, as a PEFT method.

``import hf_spectral`` registers the method with PEFT; then ``get_peft_model(model, SpectralConfig(...))``,
``PeftModel.from_pretrained`` and the rest of PEFT's API work as for LoRA.

The import itself is light (no torch, no peft: ``hf-spectral --help`` answers at once). The public names
are loaded on first use (PEP 562), and registration runs before PEFT can be used: now if ``peft`` is
already imported, otherwise right after ``import peft`` finishes (the import hook of
``hf_spectral_autoload``, which this installs whatever ``HF_SPECTRAL_AUTOLOAD`` says), and in any case
when a public name such as ``SpectralConfig`` is first read.
"""

from __future__ import annotations

import importlib
import importlib.abc
import inspect
import sys

from ._version import __version__

# public name -> the module that defines it
_LAZY_NAMES = {
    "SPECTRAL_PEFT_TYPE": "._peft_registry",
    "CoefficientSpace": ".coefficient_space",
    "SpectralConfig": ".config",
    "SpectralLayer": ".layer",
    "SpectralLinear": ".layer",
    "SpectralModel": ".model",
    "init_gradient_layout": ".gradient_layout",
    "set_compute_path": ".model",
    "set_path_tuning": ".compute.autotune",
    "set_weight_cache": ".model",
    "spectral_layers": ".model",
}
# subpackages and modules reachable as attributes (``hf_spectral.dct``) without an explicit import
_LAZY_MODULES = ("bases", "dct", "layouts", "mixing", "optim", "ecosystem", "compute", "cli")

__all__ = [
    "SPECTRAL_PEFT_TYPE",
    "CoefficientSpace",
    "SpectralConfig",
    "SpectralLayer",
    "SpectralLinear",
    "SpectralModel",
    "__version__",
    "bases",
    "dct",
    "init_gradient_layout",
    "layouts",
    "set_compute_path",
    "set_path_tuning",
    "set_weight_cache",
    "spectral_layers",
]

_registration = "not yet"  # -> "running" -> "done"


def register_with_peft() -> None:
    """Register the "spectral" method with PEFT and install the ``push_to_hub`` route; idempotent.

    Called by the import hook right after ``import peft``, and on first access to a public name.
    """
    global _registration
    if _registration != "not yet":  # done, or running further up this stack (the import of peft it triggers)
        return
    if _own_imports.depth > 0:  # a submodule (say hf_spectral.config) is importing peft: finish it first
        return  # _OwnImports registers when the outermost one is done
    _registration = "running"
    try:
        from ._peft_registry import install_patches, register
        from .config import SpectralConfig
        from .ecosystem.hub import is_spectral_model, push_to_hub
        from .model import SpectralModel

        register(SpectralConfig, SpectralModel)
        if "load_guards" in inspect.signature(install_patches).parameters:  # the load checks (hf_spectral.loading)
            from .loading import guard_peft_from_pretrained, guard_peft_load_adapter, guard_transformers_load_adapter

            guards = (guard_peft_from_pretrained, guard_peft_load_adapter, guard_transformers_load_adapter)
            install_patches(push_to_hub, is_spectral_model, guards)
        else:
            install_patches(push_to_hub, is_spectral_model)
    except BaseException:
        _registration = "not yet"
        raise
    _registration = "done"
    if _own_imports in sys.meta_path:
        sys.meta_path.remove(_own_imports)


class _OwnImports(importlib.abc.MetaPathFinder):
    """Counts the hf_spectral submodules being executed, and registers when the outermost one finishes.

    ``from hf_spectral.config import SpectralConfig`` imports peft from inside hf_spectral.config, so
    the hook that fires after ``import peft`` finds SpectralConfig not yet defined: registration waits
    for the submodule to finish (depth back to 0) and runs then.
    """

    def __init__(self):
        self.depth = 0

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + ".") or getattr(self, "_searching", False):
            return None
        self._searching = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            self.depth += 1
            try:
                original_exec(module)
            finally:
                self.depth -= 1
            if self.depth == 0 and "peft" in sys.modules:
                register_with_peft()

        spec.loader.exec_module = exec_module
        return spec


_own_imports = _OwnImports()


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        register_with_peft()  # every public name is a door to PEFT: register before it opens (no-op mid-import)
        value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES) | set(_LAZY_MODULES))


def _watch_for_peft() -> None:
    # a reload (importlib.reload) leaves the previous load's watcher behind: take it out
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__qualname__ != _OwnImports.__qualname__
                        or type(f).__module__ != __name__]
    if "peft" not in sys.modules:
        sys.meta_path.insert(0, _own_imports)
    try:
        import hf_spectral_autoload
    except ImportError:  # the module ships with the package; without it, register eagerly
        register_with_peft()
        return
    hf_spectral_autoload.watch_for_peft()


_watch_for_peft()
