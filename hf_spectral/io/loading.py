"""Loading a saved spectral adapter is all or nothing: what is checked before the model is touched, the
fingerprints that tie a config to its weights, and how a failed load is undone.

Before anything changes, :func:`check_adapter` reads ``adapter_config.json`` and the safetensors file
and checks: the file opens and its header covers it; every tensor's name, shape and dtype; every layer
the adapter was saved with exists in the model with its recorded shape, and no tensor belongs to a
layer the config does not record; index sets (a bitmap or positions, decoded by ``index_codec``) are in
range, unique and as long as the coefficients;
and, for adapters saved by 0.2 and later, the fingerprints: a hash of each layer's index set (recomputed
from the config for ``random``, ``triangle`` and ``lowfreq``) and a checksum of its saved tensors, so an
edited ``seed``, ``layout``, budget or ``basis``, or a weights file from another adapter, is refused and
the error names the field. Adapters saved before fingerprints existed still load (``tests/golden/``).

After the checks, :func:`transaction` wraps the load: if anything still fails, every module, parameter,
``requires_grad`` flag and ``peft_config`` entry goes back to what it was, so the model computes what it
computed before (replace mode's dense weights are only released for good once the load has succeeded).

A partial load (an adapter saved on more layers than the model has, or the reverse) is refused unless
asked for: ``PeftModel.from_pretrained(model, path, allow_partial_load=True)`` (or the config field of
that name) loads the layers that match and warns with the list of those that do not.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import os
import warnings
from typing import Optional

import torch
from torch import nn

from .._peft_registry import PEFT_KEY_PREFIX
from ..transforms import index_codec
from ..transforms.layouts import SAVED_LAYOUTS
from .adapter_files import (
    COEFFICIENTS_SUFFIX,
    CONFIG_NAME,
    INDICES_SUFFIX,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    AdapterFileError,
)

__all__ = [
    "AdapterLoadError", "FINGERPRINT_FIELDS", "check_adapter", "fingerprints", "partial_load_allowed", "transaction",
    "encode_index_sets", "guard_peft_from_pretrained", "guard_peft_load_adapter", "guard_transformers_load_adapter",
]

_PARTIAL_LOAD = contextvars.ContextVar("hf_spectral_allow_partial_load", default=False)


def partial_load_allowed() -> bool:
    """True inside a load that was given ``allow_partial_load=True``."""
    return _PARTIAL_LOAD.get()

# the config fields that decide what a layer computes; their values at save time are kept with the
# fingerprints, so an edit is named field by field
FINGERPRINT_FIELDS = (
    "mode", "layout", "basis", "seed", "scaling", "n_coefficients", "coefficient_fraction", "budget_pattern",
    "banded_rings", "banded_energy_share", "grid_rank",
)
FLOAT_DTYPES = {"F64", "F32", "BF16", "F16"}
INDEX_DTYPES = {"I64", "I32", "U8"}  # positions, or a bitmap (index_codec)


class AdapterLoadError(AdapterFileError):
    """A saved adapter that does not fit the model or does not match its own config; the model is unchanged."""


# --------------------------------------------------------------------------------------------------
# fingerprints, written at save time


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def index_fingerprint(space) -> str:
    """A hash of a coefficient space's basis and index set (its block, or its positions as int64)."""
    head = f"{space.basis}|{space.seed}|{space.m}x{space.n}|".encode()
    if space.grid is not None and space.block is not None:
        return _digest(head + f"grid {space.grid}".encode())
    if space.block is not None:
        return _digest(head + f"block {space.block[0]}x{space.block[1]}".encode())
    return _digest(head + _tensor_bytes(space.indices.to(torch.int64)))


def fingerprints(layers_of_model, config, adapter_name: str, saved: dict) -> dict:
    """What ``save_pretrained`` records in the config: the fields that decide each layer, and per layer
    ``"<index set hash>:<checksum of its saved tensors>"``. ``layers_of_model`` yields (name, spectral layer);
    ``saved`` is the adapter state dict being written."""
    layers = {}
    for name, layer in layers_of_model:
        if adapter_name not in layer.spectral_coefficients:
            continue
        key = name.removeprefix(PEFT_KEY_PREFIX)
        # the state dict being saved still has the adapter name at the end of its keys
        tensors = [saved.get(f"{PEFT_KEY_PREFIX}{key}{suffix}.{adapter_name}") for suffix in (COEFFICIENTS_SUFFIX, INDICES_SUFFIX)]
        if tensors[0] is None or any(_is_dtensor(t) for t in tensors if t is not None):
            checksum = ""  # not saved here, or a shard of a distributed tensor: no checksum to compare
        else:
            checksum = _digest(b"".join(_tensor_bytes(t) for t in tensors if t is not None))
        layers[key] = f"{index_fingerprint(layer.coefficient_space(adapter_name))}:{checksum}"
    return {"fields": {field: getattr(config, field) for field in FINGERPRINT_FIELDS}, "layers": layers}


def _is_dtensor(tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def encode_index_sets(layers_of_model, adapter_name: str, saved: dict) -> None:
    """Replace each saved index set in ``saved`` (the adapter state dict being written, keys still ending in the
    adapter name) by its smallest form on disk, a bitmap or int32 positions (``index_codec.encode``). Runs before
    :func:`fingerprints`, so the checksums cover the bytes the file holds."""
    for name, layer in layers_of_model:
        key = f"{name}{INDICES_SUFFIX}.{adapter_name}"
        tensor = saved.get(key)
        if tensor is not None and not _is_dtensor(tensor):
            saved[key] = index_codec.encode(tensor, layer.out_features, layer.in_features)


# --------------------------------------------------------------------------------------------------
# the checks, before the model is touched


def module_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """(out, in) of a module a spectral layer can wrap (or of a spectral layer), else None."""
    from transformers.pytorch_utils import Conv1D

    from ..tuner.layer import SpectralLayer

    if isinstance(module, SpectralLayer):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    from ..tuner.embedding_conv import matrix_shape

    if matrix_shape(module) is not None:  # nn.Embedding, nn.Conv1d/2d/3d: the weight read as a matrix
        return matrix_shape(module)
    from ..tuner import quantized

    if quantized.is_quantized(module):  # HQQ and others that are not nn.Linear
        in_features, out_features = quantized.features(module)
        return out_features, in_features
    return None


def _base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module names as an adapter records them: without PEFT's wrapper prefix and without ``base_layer``."""
    modules = {}
    for name, module in model.named_modules():
        name = name.removeprefix(PEFT_KEY_PREFIX)
        if name.endswith(".base_layer") or ".base_layer." in name:
            continue
        modules[name] = module
    return modules


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


def _read_weights(folder: str):
    """(path, {tensor name: (dtype, shape)}, get(name) -> tensor) of an adapter's weights file, after the file's own
    integrity check: safetensors' header must cover the file; a PEFT pickle (``adapter_model.bin``, written with
    ``safe_serialization=False``) is read with ``torch.load(weights_only=True)``, which never runs code."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        path = os.path.join(folder, PICKLE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise AdapterLoadError(f"{folder} has no {WEIGHTS_NAME}; it is not a complete spectral adapter.")
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise AdapterLoadError(
                f"{path} cannot be read ({error}); it is truncated or damaged. Download or save the adapter again; "
                "the model was left unchanged."
            ) from None
        header = {name: (_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for name, t in tensors.items()}
        return path, header, tensors.__getitem__
    try:
        handle = safe_open(path, framework="pt")
        header = {}
        for name in handle.keys():
            piece = handle.get_slice(name)
            header[name] = (piece.get_dtype(), tuple(piece.get_shape()))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterLoadError(
            f"{path} is not a readable safetensors file ({error}); it is truncated or damaged. Download or save the "
            "adapter again; the model was left unchanged."
        ) from None
    return path, header, handle.get_tensor


def _problem(path: str, message: str, fix: str) -> AdapterLoadError:
    return AdapterLoadError(f"{path}: {message} {fix} The model was left unchanged.")


def check_adapter(folder: str, config, model: nn.Module, adapter_name: str = "default") -> None:
    """Raise ``AdapterLoadError`` unless the adapter in ``folder`` can load into ``model`` as saved (see the
    module doc for the list of checks). Reads the files; changes nothing."""
    from ..transforms.coefficient_space import make_space

    weights, header, get_tensor = _read_weights(folder)
    shapes = {name: tuple(shape) for name, shape in (config.layer_shapes or {}).items()}
    if not shapes and not getattr(config, "target_parameters", None):  # parameters alone record no layers
        raise _problem(
            os.path.join(folder, CONFIG_NAME), "has no layer_shapes, so its layers cannot be checked against the model.",
            "Re-save the adapter with hf_spectral to record them.",
        )

    # every tensor belongs to a recorded layer (or is a non-spectral tensor), with the dtype it must have
    coefficient_layers = {}
    for key, (dtype, shape) in header.items():
        for suffix, allowed in ((COEFFICIENTS_SUFFIX, FLOAT_DTYPES), (INDICES_SUFFIX, INDEX_DTYPES)):
            if key.endswith(suffix):
                name = key.removesuffix(suffix).removeprefix(PEFT_KEY_PREFIX)
                if name not in shapes:
                    raise _problem(
                        weights, f"holds {key!r} for layer {name!r}, which its {CONFIG_NAME} does not record.",
                        "The weights file and the config do not belong together; save the adapter again.",
                    )
                if dtype not in allowed or len(shape) != 1:
                    raise _problem(
                        weights, f"holds {key!r} as {dtype} of shape {list(shape)}; expected a 1-D tensor of "
                        f"{' or '.join(sorted(allowed))}.", "The file is damaged; save the adapter again.",
                    )
                coefficient_layers.setdefault(name, {})[suffix] = shape[0]

    # every recorded layer is in the model with its shape, and in the file
    modules = _base_modules(model)
    missing = sorted(name for name in shapes if name not in modules)
    wrong = [f"{name}: adapter {shapes[name]} vs model {module_shape(modules[name])}" for name in sorted(shapes)
             if name in modules and module_shape(modules[name]) != shapes[name]]
    not_saved = sorted(name for name in shapes if COEFFICIENTS_SUFFIX not in coefficient_layers.get(name, {}))
    if wrong:
        raise _problem(
            folder, "was made for layers of other shapes (out, in):\n  " + "\n  ".join(wrong) + "\n",
            "Load it into the model it was trained on.",
        )
    partial = partial_load_allowed()
    if (missing or not_saved) and not partial:
        lines = [f"{len(missing)} of its {len(shapes)} layers are not in this model: {missing[:8]}"
                 f"{' ...' if len(missing) > 8 else ''}"] if missing else []
        if not_saved:
            lines.append(f"{len(not_saved)} recorded layers have no coefficients in {WEIGHTS_NAME}: {not_saved[:8]}")
        raise _problem(
            folder, "does not fit this model: " + "; ".join(lines) + ".",
            "Load it into the model it was saved from, or pass allow_partial_load=True to load only the layers "
            "that match.",
        )

    # the index sets, and the fingerprints of adapters that have them
    saved_prints = (config.fingerprints or {}).get("layers", {})
    saved_fields = (config.fingerprints or {}).get("fields", {})
    edited = [f"{field}: saved {saved_fields[field]!r}, config now {getattr(config, field)!r}"
              for field in FINGERPRINT_FIELDS if field in saved_fields and saved_fields[field] != getattr(config, field)]
    if edited:
        raise _problem(
            os.path.join(folder, CONFIG_NAME), "was edited after the adapter was saved: " + "; ".join(edited) + ".",
            "These fields decide which coefficients the weights are; restore the saved values.",
        )
    for name, (m, n) in shapes.items():
        if name in missing or name in not_saved:
            continue
        stored = coefficient_layers[name]
        count = stored[COEFFICIENTS_SUFFIX]
        key = PEFT_KEY_PREFIX + name
        indices = get_tensor(key + INDICES_SUFFIX) if INDICES_SUFFIX in stored else None
        if indices is None and config.layout in SAVED_LAYOUTS:
            raise _problem(weights, f"has no index set for layer {name!r} (layout {config.layout!r} saves one).",
                           "The file is damaged; save the adapter again.")
        try:
            budget = config.budget_for(name, m, n)
            positions = None if indices is None else index_codec.decode(indices, m, n, k=budget, name=name)
            space = make_space(m, n, budget, layout=config.layout, basis=config.basis,
                               seed=config.seed, indices=positions, name=name, **config.layout_options())
        except ValueError as error:
            raise _problem(weights, str(error), "Save the adapter again.") from None
        if space.k != count:
            raise _problem(
                weights, f"holds {count} coefficients for layer {name!r}, where its {CONFIG_NAME} (layout "
                f"{config.layout!r}, budget {config.budget_for(name, m, n)}) gives {space.k}.",
                "The weights file and the config do not belong together.",
            )
        record = saved_prints.get(name)
        if record is None:
            continue  # saved before fingerprints existed
        index_hash, _, checksum = record.partition(":")
        if index_fingerprint(space) != index_hash:
            raise _problem(
                os.path.join(folder, CONFIG_NAME), f"gives layer {name!r} another index set than the one its "
                "weights were trained on (layout, seed, budget, basis or target modules differ from the saved ones).",
                "Restore the config that was saved with these weights.",
            )
        if checksum:
            values = get_tensor(key + COEFFICIENTS_SUFFIX)
            data = _tensor_bytes(values) + (b"" if indices is None else _tensor_bytes(indices))
            if _digest(data) != checksum:
                raise _problem(
                    weights, f"holds other values for layer {name!r} than were saved with its {CONFIG_NAME}.",
                    "The file is damaged or comes from another adapter; download or save it again.",
                )
    if missing or not_saved:
        warnings.warn(
            f"allow_partial_load=True: {len(missing) + len(not_saved)} of the adapter's {len(shapes)} layers are not "
            f"loaded ({(missing + not_saved)[:8]}).",
            stacklevel=3,
        )


def read_config(folder: str):
    """The SpectralConfig in ``folder``, or None if the folder holds another kind of adapter."""
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterLoadError(f"{path} cannot be read ({error}); the adapter folder is damaged.") from None
    if str(data.get("peft_type", "")).upper() != "SPECTRAL":
        return None
    from ..tuner.config import SpectralConfig

    try:
        return SpectralConfig.from_pretrained(folder)
    except (TypeError, ValueError) as error:
        raise AdapterLoadError(f"{path} is not a valid spectral config: {error}") from None


# --------------------------------------------------------------------------------------------------
# undoing a failed load


class ModelSnapshot:
    """References (no copies) to every module's children and parameters, every ``requires_grad`` flag and the
    ``peft_config`` entries, so that a failed load can put the model back exactly as it was."""

    def __init__(self, *models: nn.Module):
        self.children, self.parameters, self.flags, self.configs = [], [], [], []
        for model in models:
            for module in model.modules():
                self.children.append((module, dict(module._modules)))
                self.parameters.append((module, dict(module._parameters)))
            self.flags += [(p, p.requires_grad) for p in model.parameters()]
            for holder in {id(m): m for m in model.modules()}.values():
                if "peft_config" in holder.__dict__:
                    self.configs.append((holder, "peft_config", holder.__dict__["peft_config"],
                                         dict(holder.__dict__["peft_config"])))
            self.configs.append((model, "_hf_peft_config_loaded", getattr(model, "_hf_peft_config_loaded", None), None))
            self.models = models
        self.had_config = {id(m): "peft_config" in m.__dict__ for model in models for m in model.modules()}

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for module, parameters in self.parameters:
            module._parameters.clear()
            module._parameters.update(parameters)
        for param, flag in self.flags:
            param.requires_grad_(flag)
        for holder, attribute, value, contents in self.configs:
            if contents is not None:
                value.clear()
                value.update(contents)
                holder.__dict__[attribute] = value
            elif value is None:
                holder.__dict__.pop(attribute, None)
            else:
                holder.__dict__[attribute] = value
        for model in self.models:
            for module in model.modules():
                if not self.had_config.get(id(module), True):
                    module.__dict__.pop("peft_config", None)


@contextlib.contextmanager
def transaction(*models: nn.Module):
    """Within the block, any exception puts ``models`` back as they were and is raised again."""
    snapshot = ModelSnapshot(*models)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise


# --------------------------------------------------------------------------------------------------
# the load entry points (installed by _peft_registry.install_patches)


HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only")


def hub_options(kwargs: dict) -> dict:
    """The keyword arguments of a load that ``hf_hub_download`` takes too."""
    return {key: kwargs[key] for key in HUB_OPTIONS if key in kwargs}


def download_adapter(repo: str, subfolder: Optional[str], hub: dict) -> str:
    """The local folder of a Hub adapter's weights and config, downloaded or found in the cache; hf_hub_download's
    own errors pass through (``EntryNotFoundError`` for an adapter saved without safetensors)."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo, WEIGHTS_NAME, subfolder=subfolder, **hub)
    hf_hub_download(repo, CONFIG_NAME, subfolder=subfolder, **hub)
    return os.path.dirname(path)


def local_folder(model_id, subfolder: Optional[str] = None) -> Optional[str]:
    """The adapter's folder when ``model_id`` (with ``subfolder``) is a local folder, else None. Never fetches."""
    if model_id is None:
        return None
    path = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    return path if os.path.isdir(path) else None


_IN_LOAD = contextvars.ContextVar("hf_spectral_in_load", default=False)
# a load from the Hub whose kind is not known yet: {"repo", "subfolder", "hub_kwargs", "spectral"}
_FROM_HUB = contextvars.ContextVar("hf_spectral_from_hub", default=None)


def check_before_injection(model: nn.Module, config, adapter_name: str) -> None:
    """Called by ``SpectralModel.inject_adapter`` before it changes a layer. In a load from the Hub, PEFT has
    just found the adapter to be spectral (it read the config): fetch its weights file and check the adapter
    now, before any layer changes. Another method's adapter never gets here, so nothing is fetched for it."""
    hub = _FROM_HUB.get()
    if hub is None or hub["spectral"]:
        return
    hub["spectral"] = True
    from huggingface_hub.errors import EntryNotFoundError

    try:
        folder = download_adapter(hub["repo"], hub["subfolder"], hub_options(hub["hub_kwargs"]))
    except EntryNotFoundError:  # a pickled adapter: PEFT reads it and the checks during its load apply
        return
    check_adapter(folder, config, model, adapter_name)


def _load(call, model_id, subfolder, hub_kwargs, given, model, adapter_name, partial, snapshot_of):
    """Run a load entry point (``call``): a spectral adapter checked first and undone if it fails; any other
    adapter handed to the original untouched."""
    from ..tuner.config import SpectralConfig

    if _IN_LOAD.get():  # an entry point called by another (from_pretrained calls load_adapter): checked already
        return call()
    folder = local_folder(model_id, subfolder)
    config = given if isinstance(given, SpectralConfig) else None
    if config is None and given is None and folder is not None:
        config = read_config(folder)
    # a Hub id: its kind shows once PEFT has read the config (check_before_injection)
    hub = folder is None and model_id is not None and not os.path.exists(str(model_id)) and (given is None or config is not None)
    if config is None and not hub:
        if partial:
            raise ValueError("allow_partial_load=True is for spectral adapters; this one is not.")
        return call()
    token, inside = _PARTIAL_LOAD.set(bool(partial)), _IN_LOAD.set(True)
    pending = {"repo": str(model_id), "subfolder": subfolder, "hub_kwargs": hub_kwargs, "spectral": False}
    from_hub = _FROM_HUB.set(pending if hub else None)
    try:
        if folder is not None:
            check_adapter(folder, config, model, adapter_name)
        snapshot = ModelSnapshot(*snapshot_of)
        try:
            return call()
        except BaseException:
            if not hub or pending["spectral"]:
                snapshot.restore()
            raise
    finally:
        _PARTIAL_LOAD.reset(token)
        _IN_LOAD.reset(inside)
        _FROM_HUB.reset(from_hub)


def guard_peft_from_pretrained(original):
    """``PeftModel.from_pretrained`` that checks a spectral adapter first and undoes a failed load."""
    function = original.__func__ if isinstance(original, classmethod) else original
    signature = inspect.signature(function)

    @functools.wraps(function)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        partial = kwargs.pop("allow_partial_load", False)
        bound = signature.bind(cls, model, model_id, *args, **kwargs)
        bound.apply_defaults()
        extra = bound.arguments.get("kwargs", {})
        return _load(lambda: function(cls, model, model_id, *args, **kwargs), model_id, extra.get("subfolder"), extra,
                     bound.arguments.get("config"), model, bound.arguments["adapter_name"], partial, (model,))

    return classmethod(from_pretrained)


def guard_peft_load_adapter(original):
    """``PeftModel.load_adapter`` that checks a spectral adapter first and undoes a failed load."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, model_id, *args, **kwargs):
        partial = kwargs.pop("allow_partial_load", False)
        bound = signature.bind(self, model_id, *args, **kwargs)
        bound.apply_defaults()
        extra = bound.arguments.get("kwargs", {})
        return _load(lambda: original(self, model_id, *args, **kwargs), model_id, extra.get("subfolder"), extra, None,
                     self.base_model.model, bound.arguments["adapter_name"], partial, (self,))

    return load_adapter


def guard_transformers_load_adapter(original):
    """transformers' ``model.load_adapter`` that checks a spectral adapter first and undoes a failed load."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        partial = kwargs.pop("allow_partial_load", False)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        extra = {**(arguments.get("adapter_kwargs") or {}), **arguments.get("kwargs", {})}
        return _load(lambda: original(self, *args, **kwargs), arguments.get("peft_model_id"), extra.get("subfolder"),
                     extra, arguments.get("peft_config"), self, arguments.get("adapter_name") or "default", partial,
                     (self,))

    return load_adapter
