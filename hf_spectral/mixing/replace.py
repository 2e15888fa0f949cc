"""Swapping a causal LM's self-attention modules for spectral mixers, in place: the public entry point.

``install`` builds the mixers; this also turns the model into a mixer model (its class and its config's model
type: ``modeling``, ``configuration``), which is what ``save_pretrained`` records and the Auto classes rebuild.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import SpectralMixingConfig
from .configuration import CONFIG_CLASSES
from .install import (  # noqa: F401  (re-exported: the names this module has always offered)
    CONFIG_KEY,
    FAMILIES,
    family_of,
    install_mixers,
    is_mixer_model,
    matched_atoms,
    mixer_parameter_count,
    supported_families,
)
from .modeling import MODEL_CLASSES


def replace_attention(model: nn.Module, config: SpectralMixingConfig | None = None) -> nn.Module:
    """Swap every self-attention module of a GPT-2 or Llama causal LM for a ``SpectralMixer``; return the model.

    The model becomes a mixer model in place: its class the family's mixer class
    (``SpectralMixingGPT2LMHeadModel``, ``SpectralMixingLlamaForCausalLM``), its config's model type
    ``hf_spectral_mixing_<family>`` with the settings in ``config.spectral_mixing``. It keeps its transformers
    interface: ``forward(..., labels=)`` (in training mode its ``loss`` includes the weighted auxiliary terms
    that are on), ``generate`` (with a recurrent cache), ``save_pretrained`` / ``push_to_hub`` (with a model
    card), ``AutoModelForCausalLM.from_pretrained`` after ``import hf_spectral``, and ``Trainer``.
    """
    config = SpectralMixingConfig() if config is None else config
    if not isinstance(config, SpectralMixingConfig):
        raise TypeError(f"config must be a SpectralMixingConfig, got {type(config).__name__}")
    model_type = family_of(model)
    if is_mixer_model(model):
        raise ValueError("this model already has spectral mixers: replace_attention was called on it before")
    install_mixers(model, config)
    # a model type of its own: AutoModelForCausalLM rebuilds the mixers, and transformers alone refuses the model
    model.config.__class__ = CONFIG_CLASSES[model_type]
    mixer_class = MODEL_CLASSES[model_type]
    if type(model) in mixer_class.__bases__:  # exactly the family's causal LM (not a subclass): the mixer class
        model.__class__ = mixer_class
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of the model, of its token mixers (attention or spectral) and of the rest."""
    mixing = 0
    for module in model.modules():
        name = type(module).__name__
        if getattr(module, "is_spectral_mixer", False) or name.endswith("Attention"):
            mixing += sum(p.numel() for p in module.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "mixing": mixing, "rest": total - mixing}


@torch.no_grad()
def dictionary_summary(model: nn.Module) -> list[dict]:
    """Per layer: the atoms' frequencies (radians per token) and half-lives (tokens), for plots and docs."""
    rows = []
    for mixer in (m for m in model.modules() if getattr(m, "is_spectral_mixer", False)):
        decay = torch.exp(mixer.log_decay.float())
        rows.append({
            "layer": mixer.layer_idx,
            "omega": mixer.omega.float().tolist(),
            "half_life": (math.log(2.0) / decay).tolist(),
        })
    return rows
