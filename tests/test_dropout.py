"""spectral_dropout: dropout on the input of the update while training, as LoRA's lora_dropout."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import example_inputs, logits_of, make_gpt2, make_llama

from hf_spectral import SpectralConfig, SpectralLayer


def build(factory, targets, p: float):
    config = SpectralConfig(target_modules=targets, n_coefficients=40, init_weights=False, spectral_dropout=p)
    return get_peft_model(factory(), config)


@pytest.mark.parametrize("factory,targets", [(make_llama, ["q_proj", "down_proj"]), (make_gpt2, ["c_attn", "c_fc"])])
def test_evaluation_is_unaffected_by_dropout(factory, targets):
    inputs = example_inputs("llama")
    plain, dropped = build(factory, targets, 0.0).eval(), build(factory, targets, 0.5).eval()
    torch.testing.assert_close(logits_of(dropped, inputs), logits_of(plain, inputs))
    # merged in training mode: the base layer runs, nothing is dropped
    dropped.train()
    dropped.merge_adapter()
    torch.manual_seed(0)
    torch.testing.assert_close(logits_of(dropped, inputs), logits_of(plain, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory,targets", [(make_llama, ["q_proj"]), (make_gpt2, ["c_attn"])])  # Linear, Conv1D
def test_training_forward_is_base_plus_the_update_of_the_dropped_input(factory, targets):
    model = build(factory, targets, 0.3).train()
    layer = next(m for m in model.modules() if isinstance(m, SpectralLayer))
    x = torch.randn(3, 5, layer.in_features)
    torch.manual_seed(7)
    y = layer(x)
    assert layer.last_compute_path == "separate update"
    torch.manual_seed(7)
    mask_input = torch.nn.functional.dropout(x, 0.3, training=True)
    delta = layer.rebuild("default") * 10.0
    expected = layer.base_layer(x) + mask_input @ delta.T
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # and it differs from p = 0 (the dropout really acts), whose forward is base + update of x
    y0 = layer.base_layer(x) + x @ delta.T
    assert not torch.allclose(y, y0, atol=1e-4)
    # gradients reach the coefficients through the dropped path
    y.sum().backward()
    assert layer.spectral_coefficients["default"].grad.abs().sum() > 0


def test_training_with_dropout_differs_from_without():
    inputs = example_inputs("llama")
    plain, dropped = build(make_llama, ["q_proj", "v_proj"], 0.0).train(), build(make_llama, ["q_proj", "v_proj"], 0.5).train()
    torch.manual_seed(0)
    a = plain(**inputs).logits
    torch.manual_seed(0)
    b = dropped(**inputs).logits
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1", True])
def test_dropout_outside_its_range_is_refused(p):
    with pytest.raises(ValueError, match=r"spectral_dropout=.*outside \[0, 1\)"):
        SpectralConfig(spectral_dropout=p)


def test_dropout_in_replace_mode_is_refused():
    with pytest.raises(ValueError, match="spectral_dropout=0.1 needs mode='delta'"):
        SpectralConfig(mode="replace", spectral_dropout=0.1)


def test_layers_with_dropout_stay_out_of_batched_rebuilds():
    from hf_spectral import rebuild_groups

    with_dropout = next(m for m in build(make_llama, ["q_proj"], 0.3).train().modules() if isinstance(m, SpectralLayer))
    without = next(m for m in build(make_llama, ["q_proj"], 0.0).train().modules() if isinstance(m, SpectralLayer))
    assert rebuild_groups._request(with_dropout) is None  # its forward never reads a merged weight
    assert rebuild_groups._request(without) is not None
