"""Reading a saved spectral adapter (a folder, or a repo on the Hub) without building a model.

Used by ``hf-spectral inspect`` and ``spectrum`` and by the model card: everything they report is
read from the files themselves (``adapter_config.json`` and the safetensors header), so a card
or a listing cannot disagree with what was saved. Only safetensors are read; an adapter saved
as a pickle (``adapter_model.bin``) is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .._names import PEFT_KEY_PREFIX, PREFIX

COEFFICIENTS_SUFFIX = f".{PREFIX}coefficients"
INDICES_SUFFIX = f".{PREFIX}indices"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


class AdapterFileError(ValueError):
    """A folder or repo that is not a readable spectral adapter; the message says what to do."""


@dataclass
class LayerRecord:
    """One spectral layer of a saved adapter."""

    name: str  # module path in the base model, e.g. "transformer.h.0.attn.c_attn"
    shape: Optional[tuple[int, int]]  # (out, in), from the config's layer_shapes
    n_coefficients: int  # K as saved
    has_saved_indices: bool  # True for data-dependent layouts (energy, banded)

    @property
    def dense_parameters(self) -> Optional[int]:
        return None if self.shape is None else self.shape[0] * self.shape[1]


@dataclass
class AdapterSummary:
    """What a saved spectral adapter holds, read from its files."""

    path: str  # local folder the files were read from
    config: dict
    layers: list[LayerRecord]
    other_tensors: dict[str, int] = field(default_factory=dict)  # saved non-spectral tensors -> numel
    file_sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes

    @property
    def mode(self) -> str:
        return self.config.get("mode", "delta")

    @property
    def spectral_parameters(self) -> int:
        return sum(layer.n_coefficients for layer in self.layers)

    @property
    def other_parameters(self) -> int:
        return sum(self.other_tensors.values())

    @property
    def total_parameters(self) -> int:
        return self.spectral_parameters + self.other_parameters

    @property
    def dense_parameters(self) -> Optional[int]:
        """m * n summed over the spectral layers (what dense layers would hold), if all shapes are known."""
        sizes = [layer.dense_parameters for layer in self.layers]
        return None if any(s is None for s in sizes) else sum(sizes)

    @property
    def size_on_disk(self) -> int:
        return sum(self.file_sizes.values())

    @property
    def base_model(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path") or None


def resolve_adapter_dir(dir_or_repo: str, revision: Optional[str] = None, token=None) -> str:
    """A local folder holding the adapter: ``dir_or_repo`` itself, or a Hub download of its files."""
    if os.path.isdir(dir_or_repo):
        return dir_or_repo
    if os.path.exists(dir_or_repo):
        raise AdapterFileError(f"{dir_or_repo!r} is a file; give the adapter's folder (the one with {CONFIG_NAME}).")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError

    try:
        config_path = hf_hub_download(dir_or_repo, CONFIG_NAME, revision=revision, token=token)
    except HFValidationError:
        raise AdapterFileError(f"{dir_or_repo!r} is neither a local folder nor a valid Hub repo id (owner/name).") from None
    except RepositoryNotFoundError:
        raise AdapterFileError(f"{dir_or_repo!r} is not a local folder, and the Hub has no repo of that name.") from None
    except EntryNotFoundError:
        raise AdapterFileError(f"The Hub repo {dir_or_repo!r} has no {CONFIG_NAME}: it is not a PEFT adapter.") from None
    except OSError as error:  # offline, connection refused, ...
        raise AdapterFileError(f"{dir_or_repo!r} is not a local folder, and the Hub could not be reached: {error}") from error
    try:
        hf_hub_download(dir_or_repo, WEIGHTS_NAME, revision=revision, token=token)
    except EntryNotFoundError:
        raise AdapterFileError(
            f"The Hub repo {dir_or_repo!r} has no {WEIGHTS_NAME}; hf_spectral reads safetensors only."
        ) from None
    return os.path.dirname(config_path)


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterFileError(f"{folder!r} has no {CONFIG_NAME}: it is not a PEFT adapter folder.")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"{path} is not valid JSON ({error}); the adapter folder is damaged.") from error
    if str(config.get("peft_type", "")).upper() != "SPECTRAL":
        raise AdapterFileError(
            f"{folder!r} holds a {config.get('peft_type')!r} adapter, not a spectral one (peft_type 'SPECTRAL')."
        )
    return config


def read_adapter(dir_or_repo: str, revision: Optional[str] = None, token=None) -> AdapterSummary:
    """Summarise a saved spectral adapter: its config, its layers with K and shape, its other tensors."""
    from safetensors import safe_open

    folder = resolve_adapter_dir(dir_or_repo, revision=revision, token=token)
    config = _read_config(folder)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS_NAME)):
            raise AdapterFileError(
                f"{folder!r} holds its weights as a pickle ({PICKLE_WEIGHTS_NAME}), which hf_spectral does not load. "
                "Re-save the adapter with save_pretrained(..., safe_serialization=True)."
            )
        raise AdapterFileError(f"{folder!r} has no {WEIGHTS_NAME}.")
    shapes = {name: tuple(shape) for name, shape in (config.get("layer_shapes") or {}).items()}
    layers, other, keys = [], {}, set()
    with safe_open(weights, framework="numpy") as handle:  # the header only: no torch needed
        keys = set(handle.keys())
        for key in sorted(keys):
            numel = 1
            for dim in handle.get_slice(key).get_shape():
                numel *= dim
            if key.endswith(COEFFICIENTS_SUFFIX):
                name = key.removesuffix(COEFFICIENTS_SUFFIX).removeprefix(PEFT_KEY_PREFIX)
                has_indices = key.removesuffix(COEFFICIENTS_SUFFIX) + INDICES_SUFFIX in keys
                layers.append(LayerRecord(name, shapes.get(name), numel, has_indices))
            elif not key.endswith(INDICES_SUFFIX):
                other[key.removeprefix(PEFT_KEY_PREFIX)] = numel
    if not layers:
        raise AdapterFileError(f"{weights} holds no spectral coefficients; the file does not match its config.")
    sizes = {
        name: os.path.getsize(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name))
    }
    return AdapterSummary(path=folder, config=config, layers=layers, other_tensors=other, file_sizes=sizes)


def _spectral_config(summary: AdapterSummary):
    from ..tuner.config import SpectralConfig

    return SpectralConfig.from_pretrained(summary.path)


def layer_matrices(summary: AdapterSummary, names: Optional[list[str]] = None):
    """Yield ``(layer, matrix)``: each layer's out x in matrix rebuilt from the saved coefficients alone.

    Delta mode: the update ``scaling * B_m^T S B_n`` that the adapter adds to the frozen weight.
    Replace mode: the layer's weight itself. Index sets are read from the file (energy, banded) or
    computed from shape, budget and seed (random, lowfreq, triangle) by the same function the layer uses.
    """
    import torch
    from safetensors import safe_open

    from ..transforms.coefficient_space import make_space
    from ..transforms.index_codec import decode

    config = _spectral_config(summary)
    wanted = None if names is None else set(names)
    with safe_open(os.path.join(summary.path, WEIGHTS_NAME), framework="pt") as handle:
        for layer in summary.layers:
            if wanted is not None and layer.name not in wanted:
                continue
            if layer.shape is None:
                raise AdapterFileError(
                    f"The adapter config has no layer_shapes entry for {layer.name!r}; re-save it with this "
                    "version of hf_spectral to record the shapes."
                )
            m, n = layer.shape
            key = PEFT_KEY_PREFIX + layer.name
            values = handle.get_tensor(key + COEFFICIENTS_SUFFIX).to(torch.float64)
            saved = handle.get_tensor(key + INDICES_SUFFIX) if layer.has_saved_indices else None
            try:
                budget = config.budget_for(layer.name, m, n)
                positions = None if saved is None else decode(saved, m, n, k=budget, name=layer.name)
                space = make_space(
                    m, n, budget, layout=config.layout, basis=config.basis,
                    seed=config.seed, indices=positions, name=layer.name, **config.layout_options(),
                )
            except ValueError as error:
                raise AdapterFileError(f"{summary.path}: {error}") from None
            if space.k != values.numel():
                raise AdapterFileError(
                    f"Layer {layer.name!r} has {values.numel()} coefficients but its index set has "
                    f"{space.k}: the weights file and {CONFIG_NAME} do not belong together."
                )
            matrix = space.to_matrix(values)
            if config.mode == "delta":
                matrix = matrix * config.scaling
            yield layer, matrix
