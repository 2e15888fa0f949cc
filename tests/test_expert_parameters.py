"""target_parameters (PEFT's meaning) on the 3-D expert weights of transformers' Mixtral and Qwen3-MoE: a spectral
delta per expert, checked against an explicit W0 + dW computation, through merge, unload, save and load."""

from __future__ import annotations

import pytest
import torch
from hf_spectral.coefficient_space import make_space
from hf_spectral.expert_parameters import ParamWrapper
from peft import PeftModel, get_peft_model
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_spectral import SpectralConfig

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_mixtral(seed: int = 0):
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=64,
                           max_position_embeddings=32, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return MixtralForCausalLM(config).eval()


def make_qwen3_moe(seed: int = 0):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            vocab_size=64, max_position_embeddings=32, head_dim=8, pad_token_id=0, bos_token_id=0,
                            eos_token_id=0)
    return Qwen3MoeForCausalLM(config).eval()


FACTORIES = {"mixtral": make_mixtral, "qwen3_moe": make_qwen3_moe}
IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def build(name: str, layout: str = "random", **overrides):
    config = SpectralConfig(target_modules=[], target_parameters=TARGETS, n_coefficients=30, init_weights=False,
                            layout=layout, **overrides)
    return get_peft_model(FACTORIES[name](), config).eval()


def explicit_model(name: str, peft_model):
    """A fresh base model whose expert weights are W0 + scaling * dW, dW built expert by expert from the
    coefficient space directly (not through the wrapper)."""
    plain = FACTORIES[name]()
    for module_name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        owner = plain.get_submodule(module_name.replace(".base_layer", ""))
        param = getattr(owner, module.parameter_name)
        settings = module.spectral_expert_settings["default"]
        space = make_space(module.out_features, module.in_features, 30, layout=settings.layout, seed=settings.seed)
        with torch.no_grad():
            for expert, values in enumerate(module.spectral_expert_coefficients["default"]):
                param[expert] += space.to_matrix(values.detach()) * settings.scaling
    return plain


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("layout", ["random", "lowfreq", "grid", "sparse_grid"])
def test_forward_is_the_model_with_each_expert_updated(name, layout):
    model = build(name, layout)
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 4 and {w.parameter_name for w in wrappers} == {"gate_up_proj", "down_proj"}
    assert all(w.spectral_expert_coefficients["default"].shape[0] == 4 for w in wrappers)
    expected = logits(explicit_model(name, model))
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, logits(FACTORIES[name]()), atol=1e-4)  # the update acts
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(FACTORIES[name]()))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_merge_unmerge_unload_and_training(name):
    model = build(name)
    expected = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("spectral_expert_coefficients" in n for n in trainable)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    plain = model.merge_and_unload()
    assert not any(isinstance(m, ParamWrapper) for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,layout", [("mixtral", "random"), ("qwen3_moe", "random"), ("mixtral", "grid")])
def test_save_then_load_gives_identical_logits(name, layout, tmp_path):
    model = build(name, layout)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(FACTORIES[name](), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), expected)
    with loaded.disable_adapter():
        assert not torch.allclose(logits(loaded), expected, atol=1e-4)  # the loaded update acts


def test_linear_targets_and_experts_save_and_load_together(tmp_path):
    config = SpectralConfig(target_modules=["q_proj"], target_parameters=TARGETS, n_coefficients=30, init_weights=False)
    model = get_peft_model(make_qwen3_moe(), config).eval()
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_qwen3_moe(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), expected)
    with loaded.disable_adapter():  # the experts' part is really loaded, not only q_proj's
        assert not torch.allclose(logits(loaded), expected, atol=1e-4)
    for name, module in loaded.named_modules():
        if isinstance(module, ParamWrapper):
            saved = model.get_submodule(name).spectral_expert_coefficients["default"]
            torch.testing.assert_close(module.spectral_expert_coefficients["default"], saved)


def test_a_second_adapter_and_linear_targets_beside_the_experts():
    model = get_peft_model(make_mixtral(), SpectralConfig(target_modules=["q_proj"], target_parameters=TARGETS,
                                                          n_coefficients=30, init_weights=False)).eval()
    model.add_adapter("other", SpectralConfig(target_modules=["q_proj"], target_parameters=TARGETS,
                                              n_coefficients=20, init_weights=False, seed=1))
    first = logits(model)
    model.set_adapter("other")
    second = logits(model)
    assert not torch.allclose(first, second, atol=1e-4)
    assert sum(isinstance(m, ParamWrapper) for m in model.modules()) == 4  # no extra nesting for the 2nd adapter
    model.set_adapter("default")
    torch.testing.assert_close(logits(model), first)


def test_what_expert_parameters_refuse():
    with pytest.raises(ValueError, match="layout='energy' ranks one weight's coefficients"):
        build("mixtral", "energy")
    with pytest.raises(ValueError, match="spectral_dropout=0.1 cannot apply to a parameter"):
        build("mixtral", spectral_dropout=0.1)
    with pytest.raises(ValueError, match="target_parameters needs mode='delta'"):
        SpectralConfig(mode="replace", target_parameters=TARGETS)
    with pytest.raises(ValueError, match="must be a list of parameter names"):
        SpectralConfig(target_parameters="experts.gate_up_proj")
    model = build("mixtral")
    with pytest.raises(ValueError, match="adapter_names .* not supported with target_parameters"):
        model(input_ids=IDS, adapter_names=["default", "__base__"])
