"""Loading a saved mixer model back: the settings come from ``config.spectral_mixing``.

    model.save_pretrained(path)                        # config.json carries "spectral_mixing"
    model = hf_spectral.mixing.from_pretrained(path)   # same class, same mixers, same weights

``AutoModelForCausalLM.from_pretrained(path)`` alone would build fresh attention modules and drop the
mixers' weights (transformers lists them as unused and the attention as newly initialised): use this.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from .config import SpectralMixingConfig
from .replace import CONFIG_KEY, replace_attention


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


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Rebuild a model saved after ``replace_attention``: from its config, with its mixers, then its weights."""
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    settings = getattr(config, CONFIG_KEY, None)
    if settings is None:
        raise ValueError(
            f"{path}/config.json has no {CONFIG_KEY!r} entry: it is not a spectral-mixer model. "
            "Load it with AutoModelForCausalLM.from_pretrained, or call replace_attention on it to make one."
        )
    mixing = SpectralMixingConfig.from_dict(dict(settings))
    delattr(config, CONFIG_KEY)
    model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
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
