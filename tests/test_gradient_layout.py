"""layout="gradient": index sets chosen from the loss gradient on calibration batches (hf_spectral.gradient_layout)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from hf_spectral.gradient_layout import share_budget
from peft import PeftModel, get_peft_model
from tiny_models import make_gpt2, make_llama

import hf_spectral
from hf_spectral import SpectralConfig, spectral_layers

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
MAKERS = {"llama": make_llama, "gpt2": make_gpt2}


def _batches(count=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 10), generator=generator) for _ in range(count)]


def _gradient_model(name="llama", k=40, **config):
    config = SpectralConfig(layout="gradient", n_coefficients=k, target_modules=TARGETS[name], **config)
    return get_peft_model(MAKERS[name](), config)


def _reference_gradients(name, batches):
    """dL/dW of every base module, out x in, from a plain copy of the model (no adapter involved)."""
    model = MAKERS[name]()
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
    grads = {}
    for module_name, module in model.named_modules():
        if module_name.rsplit(".", 1)[-1] in TARGETS[name]:
            grad = module.weight.grad.double().numpy()
            grads[module_name] = grad.T if name == "gpt2" else grad  # Conv1D stores in x out
    return grads


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_chosen_set_is_the_top_k_of_the_gradients_dct(name):
    batches = _batches()
    model = _gradient_model(name)
    chosen = hf_spectral.init_gradient_layout(model, batches)
    reference = _reference_gradients(name, batches)
    assert sorted(chosen) == sorted(reference)
    for layer_name, layer in spectral_layers(model):
        key = layer_name.removeprefix("base_model.model.")
        spectrum = np.abs(scipy.fft.dctn(reference[key], norm="ortho")).reshape(-1)
        expected = np.sort(np.argsort(-spectrum, kind="stable")[:40])
        got = layer.spectral_indices["default"].numpy()
        assert np.array_equal(np.sort(got), expected), key
        # and the set really is not the placeholder it started from
        assert not np.array_equal(got, hf_spectral.layouts.random_indices(layer.out_features, layer.in_features, 40, 0).numpy())


def test_use_before_calibration_raises_naming_the_fix(tmp_path):
    model = _gradient_model()
    ids = _batches(1)[0]
    with pytest.raises(RuntimeError, match="init_gradient_layout"):
        model(input_ids=ids)
    with pytest.raises(RuntimeError, match="init_gradient_layout"):
        model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="init_gradient_layout"):
        model.merge_and_unload()
    with model.disable_adapter():  # the base model itself still runs
        model(input_ids=ids)


@pytest.mark.parametrize("global_budget", [False, True])
def test_saved_sets_reload_to_the_same_logits(tmp_path, global_budget):
    batches = _batches()
    model = _gradient_model()
    chosen = hf_spectral.init_gradient_layout(model, batches, global_budget=global_budget)
    assert sum(chosen.values()) == 40 * len(chosen)
    with torch.no_grad():  # a non-zero update, so the logits depend on the index set
        for _, layer in spectral_layers(model):
            layer.spectral_coefficients["default"].normal_(0, 0.01)
    ids = batches[0]
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    for (_, a), (_, b) in zip(spectral_layers(model), spectral_layers(loaded), strict=True):
        assert torch.equal(a.spectral_indices["default"], b.spectral_indices["default"])
    if global_budget:
        assert len({layer.spectral_coefficients["default"].numel() for _, layer in spectral_layers(loaded)}) > 1
    torch.testing.assert_close(loaded.merge_and_unload()(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_loaded_adapter_is_not_calibrated_again_and_trains(tmp_path):
    model = _gradient_model()
    hf_spectral.init_gradient_layout(model, _batches())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path, is_trainable=True)
    ids = _batches(1, seed=3)[0]
    loaded(input_ids=ids, labels=ids).loss.backward()
    grads = [layer.spectral_coefficients["default"].grad for _, layer in spectral_layers(loaded)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_calibration_restores_flags_grads_and_mode():
    model = _gradient_model()
    model.train()
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    hf_spectral.init_gradient_layout(model, _batches())
    assert model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all(not layer.disable_adapters for _, layer in spectral_layers(model))


def test_global_budget_follows_gradient_energy():
    model = _gradient_model(k=30)
    batches = _batches()
    chosen = hf_spectral.init_gradient_layout(model, batches, global_budget=True)
    reference = _reference_gradients("llama", batches)
    energies = {key: float((g**2).sum()) for key, g in reference.items()}
    assert sum(chosen.values()) == 30 * len(chosen)
    assert max(chosen, key=chosen.get) == max(energies, key=energies.get)
    config = model.peft_config["default"]
    for key, k in chosen.items():
        layer_budget = [layer for name, layer in spectral_layers(model) if name.endswith(key)][0]
        assert layer_budget.spectral_coefficients["default"].numel() == k
        assert config.budget_for(key, layer_budget.out_features, layer_budget.in_features) == k


def test_share_budget_is_proportional_bounded_and_exact():
    assert share_budget(10, [1.0, 1.0], [100, 100]) == [5, 5]
    assert share_budget(10, [3.0, 1.0], [100, 100]) == [8, 2] or share_budget(10, [3.0, 1.0], [100, 100]) == [7, 3]
    assert share_budget(10, [1.0, 0.0], [100, 100]) == [9, 1]  # every layer keeps one
    assert share_budget(10, [100.0, 1.0], [4, 100]) == [4, 6]  # a full layer spills to the others
    assert share_budget(6, [0.0, 0.0, 0.0], [5, 5, 5]) == [2, 2, 2]
    shares = share_budget(1000, [5.0, 3.0, 2.0, 0.001], [400, 1000, 1000, 1000])
    assert sum(shares) == 1000 and shares[0] == 400 and shares[3] == 1
    with pytest.raises(ValueError, match="global budget of 1"):
        share_budget(1, [1.0, 1.0], [5, 5])


@pytest.mark.parametrize(
    "batches,error,message",
    [
        (None, ValueError, "needs calibration data"),
        ([], ValueError, "no calibration batches"),
        ([torch.randint(0, 64, (10,))], ValueError, r"shape \[10\].*2-D integer token ids"),
        ([torch.randn(2, 10)], ValueError, "2-D integer token ids"),
        ([[1, 2, 3]], TypeError, "dict of model inputs"),
        ([{"input_ids": torch.randint(0, 64, (10,))}], ValueError, r"input_ids of shape \[10\]"),
        ([{"input_ids": torch.randint(0, 64, (2, 10))}], ValueError, "no loss.*labels"),
    ],
)
def test_bad_calibration_data_is_refused(batches, error, message):
    model = _gradient_model()
    with pytest.raises(error, match=message):
        hf_spectral.init_gradient_layout(model, batches)
    with pytest.raises(RuntimeError, match="init_gradient_layout"):  # nothing half-chosen
        model(input_ids=_batches(1)[0])
    assert all(not p.requires_grad for n, p in model.named_parameters() if "spectral_" not in n)


def test_a_loss_function_can_replace_labels():
    model = _gradient_model()
    ids = _batches(1)[0]
    hf_spectral.init_gradient_layout(model, [{"input_ids": ids}], loss_fn=lambda out, batch: out.logits.pow(2).mean())
    model(input_ids=ids)
    with pytest.raises(ValueError, match="scalar"):
        hf_spectral.init_gradient_layout(_gradient_model(), [{"input_ids": ids}], loss_fn=lambda out, batch: out.logits)


def test_other_layouts_and_modes_are_refused():
    model = get_peft_model(make_llama(), SpectralConfig(layout="random", n_coefficients=40, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="layout='random'.*layout='gradient'"):
        hf_spectral.init_gradient_layout(model, _batches())
    with pytest.raises(ValueError, match="mode='replace' is not supported"):
        SpectralConfig(layout="gradient", mode="replace")
    with pytest.raises(ValueError, match="no spectral adapter named 'other'"):
        hf_spectral.init_gradient_layout(_gradient_model(), _batches(), adapter_name="other")


def test_trained_coefficients_are_not_recalibrated():
    model = _gradient_model()
    hf_spectral.init_gradient_layout(model, _batches())
    with torch.no_grad():
        next(iter(spectral_layers(model)))[1].spectral_coefficients["default"].fill_(0.1)
    with pytest.raises(ValueError, match="trained"):
        hf_spectral.init_gradient_layout(model, _batches())


def test_the_pure_functions_need_the_gradient():
    from hf_spectral.coefficient_space import make_space

    with pytest.raises(ValueError, match="gradient.*none was given"):
        hf_spectral.layouts.select_indices("gradient", 4, 4, 3)
    with pytest.raises(ValueError, match="init_gradient_layout"):
        make_space(4, 4, 3, layout="gradient")
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        make_space(4, 4, 3, layout="gradient", gradient=torch.zeros(3, 4))
    gradient = torch.randn(6, 5, dtype=torch.float64)
    space = make_space(6, 5, 4, layout="gradient", gradient=gradient)
    spectrum = np.abs(scipy.fft.dctn(gradient.numpy(), norm="ortho")).reshape(-1)
    assert np.array_equal(space.indices.numpy(), np.sort(np.argsort(-spectrum)[:4]))


def test_a_saved_gradient_adapter_reads_without_a_model(tmp_path):
    from hf_spectral.ecosystem.adapter_files import layer_matrices, read_adapter

    model = _gradient_model()
    hf_spectral.init_gradient_layout(model, _batches(), global_budget=True)
    with torch.no_grad():
        for _, layer in spectral_layers(model):
            layer.spectral_coefficients["default"].normal_(0, 0.01)
    model.save_pretrained(tmp_path)
    summary = read_adapter(str(tmp_path))
    assert all(layer.has_saved_indices for layer in summary.layers)
    layers = {name.removeprefix("base_model.model."): layer for name, layer in spectral_layers(model)}
    for record, matrix in layer_matrices(summary):
        expected = layers[record.name].get_delta_weight("default").double()
        torch.testing.assert_close(matrix.to(expected.dtype), expected, atol=1e-6, rtol=1e-5)


def test_a_model_with_the_adapter_injected_is_calibrated_too():
    from peft import inject_adapter_in_model

    batches = _batches()
    model = inject_adapter_in_model(SpectralConfig(layout="gradient", n_coefficients=40, target_modules=["q_proj"]),
                                    make_llama())
    chosen = hf_spectral.init_gradient_layout(model, batches)
    reference = _reference_gradients("llama", batches)
    for name, layer in spectral_layers(model):
        spectrum = np.abs(scipy.fft.dctn(reference[name], norm="ortho")).reshape(-1)
        assert np.array_equal(layer.spectral_indices["default"].numpy(), np.sort(np.argsort(-spectrum)[:40]))
    assert sorted(chosen) == sorted(name for name, _ in spectral_layers(model))
    model(input_ids=batches[0])


@pytest.mark.parametrize("target", ["embed_tokens", "q_proj"])
def test_the_chosen_set_is_where_the_coefficients_gradient_is_largest(target):
    """Independent of how the layer reads its weight: with every position kept, the coefficients' own gradient (the
    layer's autograd) is scaling * DCT(G), so its K largest entries are the gradient layout's set."""
    batches = _batches(1)
    ids = batches[0]
    chosen = get_peft_model(make_llama(), SpectralConfig(layout="gradient", n_coefficients=50, target_modules=[target]))
    hf_spectral.init_gradient_layout(chosen, batches)
    full = get_peft_model(make_llama(), SpectralConfig(coefficient_fraction=1.0, target_modules=[target]))
    full(input_ids=ids, labels=ids).loss.backward()
    for (_, a), (_, b) in zip(spectral_layers(chosen), spectral_layers(full), strict=True):
        grad = b.spectral_coefficients["default"].grad.abs()
        positions = b.spectral_indices["default"] if "default" in b.spectral_indices else b.spectral_fixed_indices["default"]
        expected = torch.sort(positions[torch.topk(grad, 50).indices].long()).values
        assert torch.equal(a.spectral_indices["default"].long(), expected)
