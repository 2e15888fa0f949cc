"""Loading a saved mixer model: ``AutoModelForCausalLM.from_pretrained`` does it; this is a thin wrapper.

    model.save_pretrained(path)                        # config.json: model_type hf_spectral_mixing_<family>
    model = AutoModelForCausalLM.from_pretrained(path) # after import hf_spectral (or with its autoload hook)
    model = hf_spectral.mixing.from_pretrained(path)   # the same, and it also reads the earlier format

The earlier format (hf_spectral before mixer model types) saved the family's own ``model_type`` with a
``spectral_mixing`` entry; ``AutoModelForCausalLM`` would build fresh attention from it, so this function
rebuilds it with its mixers from the local safetensors instead (re-save it to get the current format).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from .auto import register_models
from .config import SpectralMixingConfig
from .configuration import CONFIG_CLASSES
from .install import CONFIG_KEY
from .replace import replace_attention


def from_pretrained(path: str | Path, **kwargs) -> torch.nn.Module:
    """A saved mixer model in eval mode; ``kwargs`` (``revision``, ``dtype``, ``device_map``, ``token``, ...) go to
    ``AutoModelForCausalLM.from_pretrained``. ``path`` is a folder or a Hub id."""
    register_models()
    config = AutoConfig.from_pretrained(str(path), **{k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS})
    if isinstance(config, tuple(CONFIG_CLASSES.values())):
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
    settings = getattr(config, CONFIG_KEY, None)
    if settings is None:
        raise ValueError(
            f"{path} has model_type {config.model_type!r} and no {CONFIG_KEY!r} entry: it is not a spectral-mixer "
            "model. Load it with AutoModelForCausalLM.from_pretrained, or call replace_attention on it to make one."
        )
    return _from_earlier_format(Path(path), config, settings, kwargs)


_CONFIG_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder")


def _from_earlier_format(path: Path, config, settings: dict, kwargs: dict) -> torch.nn.Module:
    unsupported = sorted(set(kwargs) - {"dtype"})
    if unsupported or not path.is_dir():
        raise ValueError(
            f"{path} holds a mixer model in the earlier format (model_type {config.model_type!r} with a "
            f"{CONFIG_KEY!r} entry), which loads from a local folder with dtype= only (got {unsupported or path}). "
            "Load it once with hf_spectral.mixing.from_pretrained(folder) and save_pretrained it again: the current "
            "format loads with AutoModelForCausalLM.from_pretrained and every option."
        )
    mixing = SpectralMixingConfig.from_dict(dict(settings))
    delattr(config, CONFIG_KEY)
    model = AutoModelForCausalLM.from_config(config, **({"dtype": kwargs["dtype"]} if "dtype" in kwargs else {}))
    replace_attention(model, mixing)
    state = _state_dict(path)
    result = model.load_state_dict(state, strict=False)
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in state}
    by_name = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in result.missing_keys if not (k in by_name and id(by_name[k]) in loaded)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the weights in {path} do not fit the rebuilt mixer model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}. Was it saved by a different hf_spectral or edited by hand?"
        )
    return model.eval()


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    raise FileNotFoundError(
        f"{path} has neither model.safetensors nor model.safetensors.index.json: save the model with "
        "save_pretrained(path) (safetensors, the default) and load from that folder"
    )
