"""Spectral delta adapters in PEFT's mixed model beside LoRA (and LoHa): with both active, a layer computes the
base plus both updates, whichever was added first; merging gives the same; replace mode is refused."""

from __future__ import annotations

import pytest
import torch
from peft import LoHaConfig, LoraConfig, get_peft_model
from peft.tuners.mixed import model as mixed_tuner
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import example_inputs, logits_of, make_llama

from hf_spectral import SPECTRAL_PEFT_TYPE, SpectralConfig, SpectralLayer

TARGETS = ["q_proj", "v_proj", "down_proj"]
INPUTS = example_inputs("llama")


def lora():
    return LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)


def spectral(**fields):
    return SpectralConfig(target_modules=TARGETS, n_coefficients=40, init_weights=False, **fields)


def explicit(model, names):
    """A plain Llama whose targeted weights are W0 plus each named adapter's delta weight, read off the layers."""
    plain = make_llama()
    for name, module in model.base_model.model.named_modules():
        if not name.endswith(tuple(TARGETS)) or not isinstance(module, BaseTunerLayer):
            continue
        linear = plain.get_submodule(name)
        with torch.no_grad():
            layer = module
            while isinstance(layer, BaseTunerLayer):  # each method's layer holds its own adapter
                for adapter in names:
                    if adapter in getattr(layer, "spectral_coefficients", {}) or adapter in getattr(layer, "lora_A", {}) \
                            or adapter in getattr(layer, "hada_w1_a", {}):
                        linear.weight += layer.get_delta_weight(adapter)
                layer = layer.base_layer
    return plain


@pytest.mark.parametrize("spectral_first", [False, True])
def test_lora_and_spectral_active_together_give_base_plus_both_deltas(spectral_first):
    torch.manual_seed(0)
    first, second = (("dct", spectral()), ("low_rank", lora())) if spectral_first else (("low_rank", lora()), ("dct", spectral()))
    model = get_peft_model(make_llama(), first[1], adapter_name=first[0], mixed=True)
    model.add_adapter(second[0], second[1])
    model.set_adapter(["low_rank", "dct"])
    model.eval()
    both = logits_of(model, INPUTS)
    torch.testing.assert_close(both, logits_of(explicit(model, ["low_rank", "dct"]), INPUTS), atol=1e-5, rtol=1e-5)
    for alone in ("low_rank", "dct"):  # each alone is its own update, and differs from both
        model.set_adapter(alone)
        single = logits_of(model, INPUTS)
        torch.testing.assert_close(single, logits_of(explicit(model, [alone]), INPUTS), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(single, both, atol=1e-4)
    model.set_adapter(["low_rank", "dct"])
    # only the two adapters train
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "spectral_" in n for n in trainable)
    assert any("spectral_" in n for n in trainable) and any("lora_" in n for n in trainable)
    model.eval()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits_of(merged, INPUTS), both, atol=1e-5, rtol=1e-5)


def test_loha_and_spectral_together():
    torch.manual_seed(0)
    model = get_peft_model(make_llama(), LoHaConfig(r=2, target_modules=TARGETS, init_weights=False), "hadamard", mixed=True)
    model.add_adapter("dct", spectral())
    model.set_adapter(["hadamard", "dct"])
    model.eval()
    torch.testing.assert_close(logits_of(model, INPUTS), logits_of(explicit(model, ["hadamard", "dct"]), INPUTS), atol=1e-5, rtol=1e-5)


def test_replace_mode_is_refused_in_a_mixed_model():
    model = get_peft_model(make_llama(), lora(), adapter_name="low_rank", mixed=True)
    with pytest.raises(ValueError, match="replace-mode spectral adapter cannot join a mixed model"):
        model.add_adapter("dct", SpectralConfig(mode="replace", target_modules=TARGETS))


def test_peft_mixed_model_internals_are_as_patched():
    """What hf_spectral._peft_registry changes in peft/tuners/mixed/model.py: if a peft release renames or reshapes
    these, this fails here rather than in a user's mixed model."""
    from peft import mixed_model
    from peft.tuners import mixed

    assert SPECTRAL_PEFT_TYPE in mixed_tuner.COMPATIBLE_TUNER_TYPES and SPECTRAL_PEFT_TYPE in mixed.COMPATIBLE_TUNER_TYPES
    assert SpectralConfig in mixed_tuner.Configs.__args__
    assert "spectral_" in mixed_tuner.PREFIXES and SpectralLayer in mixed_tuner.Layers
    assert mixed_tuner.MixedModel._create_and_replace._hf_spectral_original is not None
    mixed_model._check_config_compatible(spectral())  # PEFT's own check now accepts it
    import inspect

    assert "COMPATIBLE_TUNER_TYPES" in inspect.getsource(mixed_model._check_config_compatible)
    assert "Configs.__args__" in inspect.getsource(mixed_tuner.MixedModel._check_new_adapter_config)
