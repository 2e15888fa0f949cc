"""Replace mode: the weight lives in coefficient space, and the model stays whole."""

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from tiny_models import example_inputs, logits_of, make_gpt2, make_llama

from hf_spectral import SpectralConfig, SpectralLayer, dct


def replace_model(factory=make_gpt2, **kwargs):
    kwargs.setdefault("coefficient_fraction", 0.5)
    return get_peft_model(factory(), SpectralConfig(mode="replace", **kwargs))


def layers_of(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, SpectralLayer)}


def test_dense_weights_are_released_and_everything_else_trains():
    model = replace_model()
    for layer in layers_of(model).values():
        assert layer.get_base_layer().weight is None
        assert layer.get_base_layer().bias.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, _ in model.named_parameters()} == trainable
    assert any("wte" in n for n in trainable) and any("ln_f" in n for n in trainable)


def test_llama_checkpoint_holds_k_coefficients_per_layer_plus_the_rest_and_its_size_matches(tmp_path):
    model = replace_model(make_llama, coefficient_fraction=0.25, layout="random")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = layers_of(model)
    for name, layer in layers.items():
        saved = tensors[f"base_model.model.{name}.spectral_coefficients"]
        assert saved.numel() == round(0.25 * layer.out_features * layer.in_features)
    spectral = sum(t.numel() for k, t in tensors.items() if "spectral_coefficients" in k)
    rest = sum(t.numel() for k, t in tensors.items() if "spectral_coefficients" not in k)
    non_spectral = sum(p.numel() for n, p in model.named_parameters() if "spectral_" not in n)
    assert rest == non_spectral  # embeddings, norms and head; random index sets are not stored
    assert spectral + rest == sum(p.numel() for p in model.parameters())
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert os.path.getsize(path) == 8 + header + 4 * (spectral + rest)


def test_tied_head_stays_tied_through_training_saving_and_loading(tmp_path):
    model = replace_model(layout="random")
    inner = model.base_model.model
    assert inner.lm_head.weight is inner.transformer.wte.weight
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = example_inputs("gpt2")
    model.train()
    for _ in range(2):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert inner.lm_head.weight is inner.transformer.wte.weight
    model.eval()
    expected = logits_of(model, inputs)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("wte.weight") for k in keys) and not any("lm_head" in k for k in keys)
    loaded = PeftModel.from_pretrained(make_gpt2(seed=7), tmp_path)
    assert loaded.base_model.model.lm_head.weight is loaded.base_model.model.transformer.wte.weight
    torch.testing.assert_close(logits_of(loaded, inputs), expected)


def test_project_init_keeps_the_best_approximation_of_a_pretrained_weight(tmp_path):
    base_dir = tmp_path / "base"
    make_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    pretrained = AutoModelForCausalLM.from_pretrained(base_dir)
    original = pretrained.model.layers[0].mlp.up_proj.weight.detach().clone()
    # init_weights=True on a model loaded from pretrained weights projects (compression)
    model = get_peft_model(pretrained, SpectralConfig(mode="replace", coefficient_fraction=0.3, layout="random", target_modules=["up_proj"]))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    indices = layer._indices("default")
    m, n = original.shape
    kept = torch.zeros(m * n).index_put((indices.long(),), dct.dct2(original).reshape(-1)[indices.long()]).view(m, n)
    expected = dct.dct_basis(m).T @ kept @ dct.dct_basis(n)  # W = C_m^T S C_n, S zero off the index set
    torch.testing.assert_close(layer.rebuild("default"), expected, atol=1e-5, rtol=1e-5)
    dropped = dct.dct2(original).reshape(-1).clone()
    dropped[indices] = 0
    torch.testing.assert_close((layer.rebuild("default") - original).norm(), dropped.norm(), atol=1e-4, rtol=1e-4)


def test_default_init_tells_loaded_weights_from_fresh_ones(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    make_llama().save_pretrained(tmp_path)
    config = SpectralConfig(mode="replace", coefficient_fraction=0.3, layout="random", target_modules=["up_proj"])
    # a fresh model built from a config that came from disk still has name_or_path set: it must not project
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert fresh.name_or_path
    weight = fresh.model.layers[0].mlp.up_proj.weight.detach().clone()
    layer = get_peft_model(fresh, config).base_model.model.model.layers[0].mlp.up_proj
    indices = layer._indices("default")
    projected = dct.dct2(weight).reshape(-1)[indices.long()]
    assert not torch.allclose(layer.spectral_coefficients["default"], projected)
    assert abs(layer.rebuild("default").std() / weight.std() - 1) < 0.15


@pytest.mark.parametrize("layout", ["random", "lowfreq", "triangle"])
def test_random_init_matches_the_variance_of_the_layer_init(layout):
    torch.manual_seed(0)
    base = make_gpt2()
    stds = {n: m.weight.std().item() for n, m in base.named_modules() if n.endswith(("c_attn", "c_fc"))}
    # init_weights=True on a model built from a config draws fresh random coefficients
    model = get_peft_model(base, SpectralConfig(mode="replace", coefficient_fraction=0.25, layout=layout))
    for name, layer in layers_of(model).items():
        if name in stds:
            assert abs(layer.rebuild("default").std().item() / stds[name] - 1) < 0.15, name


def test_explicit_project_on_a_fresh_model_shrinks_by_the_kept_share():
    torch.manual_seed(0)
    base = make_gpt2()
    std = base.transformer.h[0].mlp.c_fc.weight.std().item()
    model = get_peft_model(base, SpectralConfig(mode="replace", coefficient_fraction=0.25, layout="random", init_weights="project", target_modules=["c_fc"]))
    rebuilt = model.base_model.model.transformer.h[0].mlp.c_fc.rebuild("default")
    assert abs(rebuilt.std().item() / std - 0.5) < 0.1  # sqrt(K / mn) = sqrt(0.25)


def test_no_base_to_fall_back_on_gives_clear_errors_and_changes_nothing():
    model = replace_model()
    inputs = example_inputs("gpt2")
    expected = logits_of(model.eval(), inputs)
    with pytest.raises(ValueError, match="Cannot disable replace-mode"):
        with model.disable_adapter():
            pass
    with pytest.raises(ValueError, match="without merging"):
        model.unload()
    with pytest.raises(ValueError, match="Cannot delete replace-mode"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match="only adapter"):
        model.add_adapter("second", SpectralConfig(n_coefficients=10, target_modules=["c_attn"]))
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(logits_of(model, inputs), expected)


def test_replace_adapter_cannot_join_a_delta_adapter():
    model = get_peft_model(make_gpt2(), SpectralConfig(n_coefficients=10, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="only adapter"):
        model.add_adapter("r", SpectralConfig(mode="replace", target_modules=["c_attn"]))


def test_merge_writes_the_dense_weight_back_and_unmerge_releases_it_again():
    model = replace_model(layout="lowfreq").eval()
    inputs = example_inputs("gpt2")
    expected = logits_of(model, inputs)
    layer = layers_of(model)["transformer.h.0.mlp.c_fc"]
    model.merge_adapter()
    weight = layer.get_base_layer().weight
    assert weight is not None and weight.shape == (32, 128)  # Conv1D layout: in x out
    torch.testing.assert_close(weight.T, layer.rebuild("default"))
    torch.testing.assert_close(logits_of(model, inputs), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert layer.get_base_layer().weight is None
    dense = model.merge_and_unload()
    assert dense.transformer.h[0].mlp.c_fc.weight.shape == (32, 128)
    torch.testing.assert_close(logits_of(dense, inputs), expected, atol=1e-5, rtol=1e-5)


def test_frozen_body_option_trains_and_saves_only_coefficients(tmp_path):
    model = replace_model(train_non_spectral=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("spectral_coefficients" in n for n in trainable)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert all("spectral_" in k for k in f.keys())
