"""The model classes of mixer models: a family's causal LM whose self-attention modules are spectral mixers.

``replace_attention`` turns a GPT-2 or Llama model into one of these classes in place; ``__init__`` builds the
mixers from ``config.spectral_mixing`` so that ``AutoModelForCausalLM.from_pretrained`` / ``from_config`` and
``pipeline`` rebuild the same model (``hf_spectral.mixing.auto`` registers the classes). ``save_pretrained`` also
writes a model card that names the architecture and how to load it.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import GPT2LMHeadModel, LlamaForCausalLM

from .config import SpectralMixingConfig
from .configuration import LOAD_HINT, SpectralMixingGPT2Config, SpectralMixingLlamaConfig
from .install import CONFIG_KEY, install_mixers

CARD_MARK = "<!-- written by hf_spectral.mixing -->"
GENERIC_CARD = "This model card has been automatically generated"  # transformers' push_to_hub template


class _MixerModel:
    """What every mixer model class adds to its family's causal LM (listed first among the bases)."""

    def __init__(self, config):
        super().__init__(config)
        install_mixers(self, SpectralMixingConfig.from_dict(dict(getattr(config, CONFIG_KEY, None) or {})))

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        card = Path(save_directory) / "README.md"
        if kwargs.get("is_main_process", True) and (not card.exists() or CARD_MARK in card.read_text()):
            card.write_text(model_card(self))
        return result

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        # push_to_hub writes transformers' generic card over the one save_pretrained wrote: put ours back
        card = Path(working_dir) / "README.md"
        if not card.exists() or GENERIC_CARD in card.read_text():
            card.write_text(model_card(self))
        return super()._upload_modified_files(working_dir, *args, **kwargs)


class SpectralMixingGPT2LMHeadModel(_MixerModel, GPT2LMHeadModel):
    """GPT-2 (``GPT2LMHeadModel``) with every self-attention module a ``SpectralMixer``."""

    config_class = SpectralMixingGPT2Config


class SpectralMixingLlamaForCausalLM(_MixerModel, LlamaForCausalLM):
    """Llama (``LlamaForCausalLM``) with every self-attention module a ``SpectralMixer``."""

    config_class = SpectralMixingLlamaConfig


# the family's model_type -> the mixer model class
MODEL_CLASSES = {cls.config_class.base_model_type: cls for cls in (SpectralMixingGPT2LMHeadModel, SpectralMixingLlamaForCausalLM)}


def model_card(model) -> str:
    """README.md of a saved mixer model: the architecture, how to load it, its mixer settings."""
    config = model.config
    settings = getattr(config, CONFIG_KEY, {}) or {}
    family = type(config).base_model_type
    layers = getattr(config, "num_hidden_layers", None)
    name = getattr(config, "_name_or_path", "") or ""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- hf_spectral
- spectral-mixing
- {family}
---
{CARD_MARK}
# {Path(name).name or 'A spectral-mixing model'}

Architecture: `{type(model).__name__}` (model type `{config.model_type}`): a {family} causal LM whose
{layers} self-attention modules are spectral mixers from
[hf_spectral](https://pypi.org/project/hf-spectral/) (`hf_spectral.mixing`), each a learned dictionary of
{settings.get('n_atoms')} damped complex exponentials over positions with per-token mixing coefficients: linear in
the context length, a fixed-size recurrent state when generating.

## Loading

transformers alone does not know this model type: {LOAD_HINT}.

```python
import hf_spectral  # registers the mixer model types with AutoConfig / AutoModelForCausalLM
from transformers import AutoModelForCausalLM, pipeline

model = AutoModelForCausalLM.from_pretrained("{name or 'path/or/repo-id'}")
generator = pipeline("text-generation", model="{name or 'path/or/repo-id'}")
```

## Mixer settings (`config.json`, `{CONFIG_KEY}`)

```json
{json.dumps(settings, indent=1, sort_keys=True)}
```
"""
