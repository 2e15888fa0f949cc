"""Swapping a causal LM's self-attention modules for spectral mixers, in place.

The one place that knows where each supported family keeps its attention. The swap is recorded in
``model.config.spectral_mixing`` (saved by ``save_pretrained``), which is what ``from_pretrained``
in this package reads to rebuild the same model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import SpectralMixingConfig
from .losses import auxiliary_loss
from .mixer import SpectralMixer

CONFIG_KEY = "spectral_mixing"

# model_type -> (attention class name, where the decoder layers keep it, whether that attention has biases)
FAMILIES = {
    "gpt2": ("GPT2Attention", "transformer.h[i].attn", lambda config: True),
    "llama": ("LlamaAttention", "model.layers[i].self_attn", lambda config: bool(getattr(config, "attention_bias", False))),
}


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def mixer_parameter_count(hidden_size: int, n_atoms: int, bias: bool) -> int:
    """Weights and biases of one mixer (without the optional Gaussian-mixture prior): 4 d K + 3 K (+ 3 K + d)."""
    return 4 * hidden_size * n_atoms + 3 * n_atoms + (3 * n_atoms + hidden_size if bias else 0)


def matched_atoms(attention_parameters: int, hidden_size: int, bias: bool) -> int:
    """The K whose mixer has (about) as many parameters as the attention module it replaces."""
    per_atom = 4 * hidden_size + 3 + (3 if bias else 0)
    return max(1, round((attention_parameters - (hidden_size if bias else 0)) / per_atom))


def _model_type(model: nn.Module) -> str:
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise TypeError(
            "replace_attention got a PEFT model: swap the attention first, then call get_peft_model on the result "
            "(replace_attention(model); get_peft_model(model, SpectralConfig(mode='replace', ...)))."
        )
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"replace_attention supports the model families {supported_families()} (SmolLM2 is a llama); "
            f"got model_type={model_type!r} ({type(model).__name__}). For another family, add its attention class "
            "to hf_spectral.mixing.replace.FAMILIES after checking that its decoder layer calls it as GPT-2's or Llama's does."
        )
    if getattr(config, "add_cross_attention", False) or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            "the spectral mixer replaces causal self-attention only; this model has cross-attention "
            "(add_cross_attention=True or an encoder-decoder), which has no causal, recurrent form"
        )
    return model_type


def replace_attention(model: nn.Module, config: SpectralMixingConfig | None = None) -> nn.Module:
    """Swap every self-attention module of a GPT-2 or Llama causal LM for a ``SpectralMixer``; return the model.

    The model keeps its transformers interface: ``forward(..., labels=)`` (in training mode its ``loss``
    includes the weighted auxiliary terms that are on), ``generate`` (with a recurrent cache),
    ``save_pretrained`` (the settings are stored in ``config.spectral_mixing``; load with
    ``hf_spectral.mixing.from_pretrained(path)``) and ``Trainer``.
    """
    config = SpectralMixingConfig() if config is None else config
    if not isinstance(config, SpectralMixingConfig):
        raise TypeError(f"config must be a SpectralMixingConfig, got {type(config).__name__}")
    model_type = _model_type(model)
    class_name, _, has_bias = FAMILIES[model_type]
    if any(getattr(m, "is_spectral_mixer", False) for m in model.modules()):
        raise ValueError("this model already has spectral mixers: replace_attention was called on it before")
    targets = [(name, module) for name, module in model.named_modules() if type(module).__name__ == class_name]
    if not targets:
        raise ValueError(
            f"found no {class_name} module in this {model_type} model: was its attention replaced by other code?"
        )
    model_config = model.config
    hidden = model_config.hidden_size
    bias = has_bias(model_config) if config.bias is None else config.bias
    std = float(getattr(model_config, "initializer_range", 0.02))
    out_std = std / math.sqrt(2 * len(targets))
    resolved = None
    for position, (name, attention) in enumerate(targets):
        n_atoms = config.n_atoms
        if n_atoms is None:
            n_atoms = matched_atoms(sum(p.numel() for p in attention.parameters()), hidden, bias)
        if resolved is None:
            resolved = n_atoms
        reference = next(attention.parameters())
        layer_idx = getattr(attention, "layer_idx", None)
        mixer = SpectralMixer(hidden, n_atoms, config, position if layer_idx is None else layer_idx, bias)
        mixer.reset_projections(std, out_std)
        # the linears follow the model's dtype; the dictionary (frequencies, decays, phases) stays float32
        for linear in (mixer.in_proj, mixer.coef_proj, mixer.out_proj):
            linear.to(device=reference.device, dtype=reference.dtype)
        mixer.to(device=reference.device)
        mixer.train(attention.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, mixer)
    stored = config.to_dict()
    stored["n_atoms"] = resolved
    setattr(model_config, CONFIG_KEY, stored)
    model._spectral_mixing_hook = model.register_forward_hook(_add_auxiliary_loss)
    return model


def _add_auxiliary_loss(module: nn.Module, args, output):
    """In training mode, ``loss`` = the model's loss + the weighted auxiliary terms that are on."""
    loss = getattr(output, "loss", None)
    if not module.training or loss is None:
        return output
    extra = auxiliary_loss(module)
    if extra is not None:
        output.loss = loss + extra.to(loss.dtype)
    return output


def is_mixer_model(model: nn.Module) -> bool:
    return any(getattr(m, "is_spectral_mixer", False) for m in model.modules())


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
