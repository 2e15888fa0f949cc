"""Every bad input gets a clear error that names the value, the allowed range and the fix,
and a failed load leaves the model as it was."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import example_inputs, logits_of, make_gpt2, make_mlp

from hf_spectral import SpectralConfig, SpectralLayer


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_coefficients": 10, "coefficient_fraction": 0.5}, "either n_coefficients"),
        ({"n_coefficients": 0}, "n_coefficients=0 must be a positive integer"),
        ({"n_coefficients": -5}, "n_coefficients=-5"),
        ({"coefficient_fraction": 0.0}, r"coefficient_fraction=0.0 is outside \(0, 1\]"),
        ({"coefficient_fraction": 1.2}, r"outside \(0, 1\]"),
        ({"budget_pattern": {"c_fc": 0}}, r"budget_pattern\['c_fc'\]"),
        ({"budget_pattern": {"c_fc": "lots"}}, "must be an int"),
        ({"mode": "additive"}, r"mode='additive' is not one of \('delta', 'replace'\)"),
        ({"layout": "zigzag"}, "layout='zigzag' is not one of"),
        ({"basis": "wavelet"}, "basis='wavelet' is not one of"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian' is not one of"),
        ({"init_weights": "project"}, "replace-mode init"),
        ({"scaling": float("nan")}, "scaling=nan must be a finite number"),
        ({"banded_rings": 0}, "banded_rings=0"),
        ({"banded_energy_share": 2.0}, r"banded_energy_share=2.0 is outside \[0, 1\]"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpectralConfig(**kwargs)


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_budget_above_a_layer_size_names_the_layer_and_leaves_the_model_unchanged(mode):
    model = make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # lin0 (20 x 12 = 240) fits, lin1 (16 x 20 = 320) does not: the failure comes after lin0 was built
    config = SpectralConfig(mode=mode, budget_pattern={"lin0": 200, "lin1": 321}, target_modules=["lin0", "lin1"])
    with pytest.raises(ValueError, match=r"n_coefficients=321 for layer 'lin1' \(16 x 20\) is more than its 320.*1 to 320"):
        get_peft_model(model, config)
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_target_module_is_named():
    with pytest.raises(TypeError, match=r"'transformer.ln_f' is a LayerNorm.*Linear.*Conv1D.*Embedding.*Conv1d/2d/3d"):
        get_peft_model(make_gpt2(), SpectralConfig(target_modules=["ln_f"]))


@pytest.mark.parametrize("kwargs", [{"layout": "energy"}, {"layout": "banded"}, {"mode": "replace", "init_weights": "project"}])
def test_weight_dependent_choices_need_a_weight(kwargs):
    with torch.device("meta"):
        model = make_gpt2(n_layer=1, n_embd=16, vocab_size=32, n_positions=16)
    kwargs = {"n_coefficients": 20, **kwargs} if kwargs.get("mode") != "replace" else kwargs
    with pytest.raises(ValueError, match="reads the existing weight of 'transformer.h.0.attn.c_attn'.*has none"):
        get_peft_model(model, SpectralConfig(target_modules=["c_attn"], **kwargs))


def test_loading_into_a_model_of_other_shapes_names_the_layers_and_changes_nothing(tmp_path):
    get_peft_model(make_gpt2(), SpectralConfig(n_coefficients=30, target_modules=["c_attn", "c_fc"])).save_pretrained(tmp_path)
    other = make_gpt2(seed=1, n_embd=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    inputs = example_inputs("gpt2")
    expected = logits_of(other, inputs)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn: adapter \(96, 32\) vs model \(144, 48\)"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, SpectralLayer) for m in other.modules())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    torch.testing.assert_close(logits_of(other, inputs), expected)


@pytest.mark.parametrize("corruption,message", [("out_of_range", r"outside 0\.\.3071"), ("duplicate", "duplicates")])
def test_corrupt_index_file_is_refused_before_loading(tmp_path, corruption, message):
    model = get_peft_model(make_gpt2(), SpectralConfig(n_coefficients=30, layout="energy", target_modules=["c_attn"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.transformer.h.0.attn.c_attn.spectral_indices"
    indices = tensors[key].clone()
    if corruption == "out_of_range":
        indices[-1] = 96 * 32 + 5
    else:
        indices[1] = indices[0]
    tensors[key] = indices
    save_file(tensors, str(path), metadata={"format": "pt"})
    base = make_gpt2()
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, SpectralLayer) for m in base.modules())  # the base model is as it was


def test_safe_merge_refuses_nan_and_leaves_the_layer_unmerged():
    model = get_peft_model(make_mlp(), SpectralConfig(n_coefficients=20, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.spectral_coefficients["default"][3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf found in the merged weight of adapter 'default'"):
        model.merge_adapter(safe_merge=True)
    assert not layer.merged and torch.equal(layer.base_layer.weight, weight)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_and_unload(safe_merge=True)
