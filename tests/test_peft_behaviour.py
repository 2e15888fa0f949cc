"""PEFT's behaviour, checked like PEFT checks its own methods: a table of tiny models crossed
with both modes and every layout buys the same checks each."""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_spectral.layouts import LAYOUTS
from peft import PeftConfig, PeftModel, get_peft_model
from tiny_models import DELTA_ONLY_MODELS, MODELS, example_inputs, logits_of, make_gpt2

from hf_spectral import SpectralConfig, SpectralLayer

CASES = [(name, mode, layout, "dct") for name in MODELS for mode in ("delta", "replace") for layout in LAYOUTS]
# the paper's control basis, on both a block and a scattered layout
CASES += [(name, mode, layout, "random_orthonormal") for name in ("gpt2", "llama") for mode in ("delta", "replace") for layout in ("lowfreq", "random")]
# Conv2d and Embedding targets (delta mode only), as PEFT's own table has rows for them
CASES += [(name, "delta", layout, "dct") for name in DELTA_ONLY_MODELS for layout in LAYOUTS]
TABLE = {**MODELS, **DELTA_ONLY_MODELS}


def build(name: str, mode: str, layout: str, init_weights=False, seed: int = 0, **overrides):
    factory, targets, extra = TABLE[name]
    kwargs = dict(mode=mode, layout=layout, target_modules=targets, init_weights=init_weights, **extra)
    kwargs.update({"n_coefficients": 40} if mode == "delta" else {"coefficient_fraction": 0.5})
    kwargs.update(overrides)
    return get_peft_model(factory(seed), SpectralConfig(**kwargs)).eval()


def spectral_layers(model):
    return [m for m in model.modules() if isinstance(m, SpectralLayer)]


@pytest.mark.parametrize("name", list(TABLE))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_delta_mode_starts_as_the_identity(name, layout):
    factory, _, _ = TABLE[name]
    inputs = example_inputs(name)
    expected = logits_of(factory(), inputs)
    model = build(name, "delta", layout, init_weights=True)
    torch.testing.assert_close(logits_of(model, inputs), expected)
    # and init_weights=False really changes the output (so the checks below are not vacuous)
    changed = build(name, "delta", layout, init_weights=False)
    assert not torch.allclose(logits_of(changed, inputs), expected, atol=1e-4)


@pytest.mark.parametrize("name,mode,layout,basis", CASES)
def test_merge_matches_unmerged_forward_and_unmerge_restores_it(name, mode, layout, basis):
    model = build(name, mode, layout, basis=basis)
    inputs = example_inputs(name)
    unmerged = logits_of(model, inputs)
    model.merge_adapter()
    assert all(layer.merged for layer in spectral_layers(model))
    torch.testing.assert_close(logits_of(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in spectral_layers(model))
    torch.testing.assert_close(logits_of(model, inputs), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,mode,layout,basis", CASES)
def test_save_then_load_gives_identical_logits(name, mode, layout, basis, tmp_path):
    model = build(name, mode, layout, basis=basis)
    inputs = example_inputs(name)
    expected = logits_of(model, inputs)
    model.save_pretrained(tmp_path)
    factory, _, _ = TABLE[name]
    # replace mode must restore the whole model from the adapter alone, so load into another random init
    loaded = PeftModel.from_pretrained(factory(seed=1 if mode == "replace" else 0), tmp_path).eval()
    torch.testing.assert_close(logits_of(loaded, inputs), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("name,mode,layout,basis", CASES)
def test_merge_and_unload_gives_a_plain_model_with_the_same_logits(name, mode, layout, basis):
    model = build(name, mode, layout, basis=basis)
    inputs = example_inputs(name)
    expected = logits_of(model, inputs)
    merged = model.merge_and_unload()
    assert not spectral_layers(merged)
    assert type(merged) is type(TABLE[name][0]())
    torch.testing.assert_close(logits_of(merged, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_only_the_intended_parameters_train(name, mode):
    model = build(name, mode, "random")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    coefficients = {n for n in trainable if ".spectral_coefficients." in n}
    assert coefficients and len(coefficients) == len(spectral_layers(model))
    if mode == "delta":
        rest = trainable - coefficients
        assert all("modules_to_save" in n for n in rest), sorted(rest)
        assert all(not layer.get_base_layer().weight.requires_grad for layer in spectral_layers(model))
    else:
        # replace mode trains everything: the released dense weights are gone, the rest is trainable
        assert all(layer.get_base_layer().weight is None for layer in spectral_layers(model))
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert all("original_module" in n for n in frozen), sorted(frozen)


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_one_training_step_moves_only_trainable_parameters(mode):
    model = build("gpt2", mode, "random", init_weights=True)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = example_inputs("gpt2")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        assert moved == p.requires_grad or (p.requires_grad and "bias" in n), n


def test_multiple_adapters_set_delete_and_disable():
    model = build("gpt2", "delta", "random", init_weights=False)
    inputs = example_inputs("gpt2")
    base = logits_of(MODELS["gpt2"][0](), inputs)
    first = logits_of(model, inputs)
    model.add_adapter("other", SpectralConfig(n_coefficients=30, layout="lowfreq", target_modules=["c_attn"], init_weights=False, seed=5))
    assert model.active_adapter == "default"
    torch.testing.assert_close(logits_of(model, inputs), first)
    model.set_adapter("other")
    second = logits_of(model, inputs)
    assert not torch.allclose(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, inputs), base)
    torch.testing.assert_close(logits_of(model, inputs), second)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert all("other" not in layer.spectral_coefficients for layer in spectral_layers(model))
    model.set_adapter("default")
    torch.testing.assert_close(logits_of(model, inputs), first)


def test_two_active_delta_adapters_add_up():
    model = build("mlp", "delta", "random", init_weights=False)
    model.add_adapter("b", SpectralConfig(n_coefficients=25, target_modules=["lin0", "lin1"], init_weights=False, seed=9))
    inputs = example_inputs("mlp")
    layer = model.base_model.model.lin0
    layer.set_adapter(["default", "b"])
    x = inputs["x"]
    w0 = layer.base_layer.weight
    expected = torch.nn.functional.linear(
        x, w0 + layer.get_delta_weight("default") + layer.get_delta_weight("b"), layer.base_layer.bias
    )
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_load_with_is_trainable_and_peft_config_from_pretrained(mode, tmp_path):
    model = build("llama", mode, "energy")
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, SpectralConfig) and config.mode == mode and config.layout == "energy"
    assert config.layer_shapes["model.layers.0.self_attn.q_proj"] == [32, 32]
    loaded = PeftModel.from_pretrained(MODELS["llama"][0](), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert any(".spectral_coefficients." in n for n in trainable)
    if mode == "replace":
        assert any("embed_tokens" in n for n in trainable)


def test_default_target_modules():
    delta = get_peft_model(MODELS["llama"][0](), SpectralConfig())
    names = {n.rsplit(".", 1)[-1] for n, m in delta.named_modules() if isinstance(m, SpectralLayer)}
    assert names == {"q_proj", "v_proj"}
    replace = get_peft_model(MODELS["llama"][0](), SpectralConfig(mode="replace"))
    names = {n.rsplit(".", 1)[-1] for n, m in replace.named_modules() if isinstance(m, SpectralLayer)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_default_budgets():
    delta = get_peft_model(MODELS["llama"][0](), SpectralConfig(target_modules=["gate_proj"], layout="random"))
    layer = delta.base_model.model.model.layers[0].mlp.gate_proj
    assert layer.spectral_coefficients["default"].numel() == 1000
    replace = get_peft_model(MODELS["llama"][0](), SpectralConfig(mode="replace", target_modules=["gate_proj"]))
    layer = replace.base_model.model.model.layers[0].mlp.gate_proj
    assert layer.spectral_coefficients["default"].numel() == 48 * 32 // 2


def test_all_linear_exclude_layers_to_transform_and_budget_pattern():
    model = get_peft_model(
        MODELS["gpt2"][0](),
        SpectralConfig(
            target_modules="all-linear", exclude_modules=["c_fc"], n_coefficients=50,
            budget_pattern={"c_proj": 0.25, r"h\.1\.attn\.c_attn": 77},
        ),
    )
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, SpectralLayer)}
    assert not any(n.endswith("c_fc") for n in layers) and "lm_head" not in layers
    assert layers["transformer.h.0.attn.c_attn"].spectral_coefficients["default"].numel() == 50
    assert layers["transformer.h.1.attn.c_attn"].spectral_coefficients["default"].numel() == 77
    assert layers["transformer.h.0.attn.c_proj"].spectral_coefficients["default"].numel() == 32 * 32 // 4
    assert layers["transformer.h.0.mlp.c_proj"].spectral_coefficients["default"].numel() == 32 * 128 // 4
    only_second = get_peft_model(
        MODELS["llama"][0](), SpectralConfig(target_modules=["q_proj"], layers_to_transform=[1], n_coefficients=10)
    )
    names = [n for n, m in only_second.named_modules() if isinstance(m, SpectralLayer)]
    assert names == ["base_model.model.model.layers.1.self_attn.q_proj"]


def test_trainable_token_indices_and_modules_to_save_fields(tmp_path):
    # TRL sets these two fields when it adds chat-template tokens
    config = SpectralConfig(target_modules=["q_proj"], n_coefficients=20, trainable_token_indices=[3, 5])
    model = get_peft_model(MODELS["llama"][0](), config)
    inputs = example_inputs("llama")
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("token_adapter" in n for n in trainable)
    model.eval()
    expected = logits_of(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MODELS["llama"][0](), tmp_path)
    torch.testing.assert_close(logits_of(loaded, inputs), expected)


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_gradient_checkpointing_trains_the_coefficients(mode):
    base = MODELS["llama"][0]()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    config = SpectralConfig(mode=mode, target_modules=["q_proj", "v_proj"], n_coefficients=30 if mode == "delta" else None)
    model = get_peft_model(base, config)
    model.train()
    inputs = example_inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for layer in spectral_layers(model):
        grad = layer.spectral_coefficients["default"].grad
        assert grad is not None and grad.abs().sum() > 0


def test_auto_peft_model_and_transformers_load_adapter_with_a_local_base(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    MODELS["llama"][0]().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, SpectralConfig(target_modules=["q_proj", "v_proj"], n_coefficients=30, init_weights=False)).eval()
    inputs = example_inputs("llama")
    expected = logits_of(model, inputs)
    model.save_pretrained(adapter_dir)
    assert PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path == str(base_dir)

    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    torch.testing.assert_close(logits_of(auto, inputs), expected)

    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    plain.load_adapter(str(adapter_dir))
    torch.testing.assert_close(logits_of(plain, inputs), expected)


def test_gpt2_conv1d_layers_are_handled_without_a_fan_in_fan_out_warning():
    # each layer reads its layout off its base; the config's default False is not the user's mistake to fix
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(make_gpt2(), SpectralConfig(n_coefficients=16, target_modules=["c_attn", "c_fc"]))
    assert [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)] == []
    assert model.peft_config["default"].fan_in_fan_out is True
    layers = spectral_layers(model)
    assert len(layers) == 4 and all(layer.fan_in_fan_out for layer in layers)
