"""Putting spectral mixers in place of a model's self-attention modules: the one place that knows where each
supported family keeps its attention, and what a mixer takes over from it (biases, dropout rates, the learned
position table's limit).

``replace.replace_attention`` (the public entry) and the mixer model classes' ``__init__`` (``modeling``) both
build their mixers here. The settings are recorded in ``model.config.spectral_mixing``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .config import SpectralMixingConfig
from .configuration import LOAD_HINT, base_model_type
from .losses import auxiliary_loss
from .mixer import SpectralMixer

CONFIG_KEY = "spectral_mixing"


@dataclass(frozen=True)
class Family:
    """Where a supported family keeps its attention, and what the mixer takes over from it."""

    attention_class: str  # the self-attention module's class name
    where: str  # where the decoder layers keep it (documentation)
    has_bias: Callable  # config -> whether the attention's linears have biases
    dropouts: Callable  # config -> (rate on the mix, like attention-weight dropout; rate on the output)
    position_table: str | None = None  # a learned position embedding (module name) and its size's config field
    position_limit: str | None = None


FAMILIES = {
    "gpt2": Family("GPT2Attention", "transformer.h[i].attn", lambda c: True,
                   lambda c: (float(c.attn_pdrop), float(c.resid_pdrop)), "wpe", "n_positions"),
    "llama": Family("LlamaAttention", "model.layers[i].self_attn", lambda c: bool(getattr(c, "attention_bias", False)),
                    lambda c: (float(getattr(c, "attention_dropout", 0.0)), 0.0)),
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


def family_of(model: nn.Module) -> str:
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise TypeError(
            "replace_attention got a PEFT model: swap the attention first, then call get_peft_model on the result "
            "(replace_attention(model); get_peft_model(model, SpectralConfig(mode='replace', ...)))."
        )
    config = getattr(model, "config", None)
    model_type = base_model_type(config)
    if model_type not in FAMILIES:
        raise ValueError(
            f"replace_attention supports the model families {supported_families()} (SmolLM2 is a llama); "
            f"got model_type={model_type!r} ({type(model).__name__}). For another family, add its attention class "
            "to hf_spectral.mixing.install.FAMILIES after checking that its decoder layer calls it as GPT-2's or Llama's does."
        )
    if getattr(config, "add_cross_attention", False) or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            "the spectral mixer replaces causal self-attention only; this model has cross-attention "
            "(add_cross_attention=True or an encoder-decoder), which has no causal, recurrent form"
        )
    return model_type


def install_mixers(model: nn.Module, config: SpectralMixingConfig) -> None:
    """Put a ``SpectralMixer`` in place of each attention module, record the settings, add the hooks."""
    model_type = family_of(model)
    family = FAMILIES[model_type]
    targets = [(name, module) for name, module in model.named_modules() if type(module).__name__ == family.attention_class]
    if not targets:
        raise ValueError(
            f"found no {family.attention_class} module in this {model_type} model: was its attention replaced by other code?"
        )
    model_config = model.config
    hidden = model_config.hidden_size
    bias = family.has_bias(model_config) if config.bias is None else config.bias
    mix_dropout, output_dropout = family.dropouts(model_config)
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
        mixer = SpectralMixer(hidden, n_atoms, config, position if layer_idx is None else layer_idx, bias,
                              mix_dropout=mix_dropout, output_dropout=output_dropout)
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
    model_config.hf_spectral = LOAD_HINT  # config.json says what a reader without hf_spectral needs
    model._spectral_mixing_hook = model.register_forward_hook(_add_auxiliary_loss)
    if family.position_table is not None:
        limit = getattr(model_config, family.position_limit)
        for name, module in model.named_modules():
            if name.rpartition(".")[2] == family.position_table and isinstance(module, nn.Embedding):
                module.register_forward_pre_hook(_position_check(family.position_limit, limit))


def _position_check(field: str, limit: int):
    def check(module: nn.Module, args) -> None:
        positions = args[0]
        if positions.numel() and int(positions.max()) >= module.num_embeddings:
            raise ValueError(
                f"position {int(positions.max())} is past the model's learned position table ({field}={limit}: "
                f"positions 0..{limit - 1}). The spectral mixers have no length limit, but this model's position "
                f"embedding does: keep the prompt plus the generated tokens within {limit} tokens, or build the "
                f"model with a larger {field} and train it at that length."
            )

    return check


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
