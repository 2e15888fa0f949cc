"""Serving a spectral delta on a LoRA-only server: ``peft.convert_to_lora`` / ``save_as_lora`` (docs/serving.md).

At full rank the converted LoRA reproduces the spectral model's logits (GPT-2's Conv1D and Llama's Linear);
at a lower rank the error that ``recipes/serving/lora_conversion.py`` reports is the Eckart-Young tail of the
update's singular values, checked against numpy's SVD of the update read off the merged model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ecosystem_utils import token_rows
from peft import PeftModel, convert_to_lora, get_peft_model, save_as_lora
from tiny_models import make_gpt2, make_llama

from hf_spectral import SpectralConfig
from recipes.serving.lora_conversion import lora_update_error

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "gpt2-conv1d": (make_gpt2, ["c_attn", "c_fc"]),
    "llama-linear": (make_llama, ["q_proj", "v_proj", "down_proj"]),
}


def _spectral(name: str):
    factory, targets = MODELS[name]
    config = SpectralConfig(n_coefficients=200, target_modules=targets, init_weights=False, seed=1)
    return factory, get_peft_model(factory(seed=0), config).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_rank_lora_reproduces_the_spectral_logits(name, tmp_path):
    factory, spectral = _spectral(name)
    inputs = token_rows(2, seed=3)
    save_as_lora(tmp_path / "lora", spectral, rank=1.0)  # threshold 1.0: every singular value with energy
    lora = PeftModel.from_pretrained(factory(seed=0), tmp_path / "lora").eval()
    base = factory(seed=0).eval()
    with torch.no_grad():
        expected, got, plain = (m(input_ids=inputs).logits for m in (spectral, lora, base))
    assert (expected - plain).abs().max() > 1e-2  # the update is not a no-op
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert type(lora.peft_config["default"]).__name__ == "LoraConfig"


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_lower_rank_error_is_the_svd_tail(name, rank):
    factory, spectral = _spectral(name)
    base = {n: p.detach().double() for n, p in factory(seed=0).named_parameters()}
    lora_config, state = convert_to_lora(spectral, rank)
    report = lora_update_error(spectral, state)

    # independent update: merged weight minus base weight, as out x in
    merged = {n: p.detach().double() for n, p in spectral.merge_and_unload().named_parameters()}
    lost = total = 0.0
    conv1d = name.startswith("gpt2")
    for layer, row in report["layers"].items():
        key = layer.removeprefix("base_model.model.") + ".weight"
        delta = (merged[key] - base[key]).numpy()
        delta = delta.T if conv1d else delta
        singular = np.linalg.svd(delta, compute_uv=False)
        tail, energy = float((singular[rank:] ** 2).sum()), float((singular**2).sum())
        assert row["rank"] == rank
        assert row["relative_error"] == pytest.approx(math.sqrt(tail / energy), rel=1e-4, abs=1e-6)
        lost, total = lost + tail, total + energy
    assert len(report["layers"]) == 2 * len(MODELS[name][1])
    assert report["relative_error"] == pytest.approx(math.sqrt(lost / total), rel=1e-4)
    m_n = sum(r["rank"] for r in report["layers"].values())  # sum r (m + n) checked through shapes below
    assert report["lora_parameters"] == sum(state[k].numel() for k in state) and m_n == rank * len(report["layers"])
    assert lora_config.r == rank == lora_config.lora_alpha  # the LoRA scaling is 1: B A is the update


@pytest.mark.parametrize("layout", ["lowfreq", "grid"])
def test_a_block_adapter_converts_exactly_at_the_rank_of_its_block(layout):
    factory, targets = MODELS["llama-linear"]
    config = SpectralConfig(n_coefficients=12, layout=layout, target_modules=targets, init_weights=False, seed=1)
    spectral = get_peft_model(factory(seed=0), config).eval()
    ranks = {min(layer.spectral_settings["default"].block) for layer in spectral.modules()
             if hasattr(layer, "spectral_settings")}
    _, state = convert_to_lora(spectral, max(ranks))
    assert lora_update_error(spectral, state)["relative_error"] < 1e-5
    _, state = convert_to_lora(spectral, min(ranks) - 1)
    assert lora_update_error(spectral, state)["relative_error"] > 1e-3  # the block's rank is all of it


def test_a_sparse_grid_adapter_converts_exactly_at_its_grid_rank():
    factory, targets = MODELS["llama-linear"]
    config = SpectralConfig(n_coefficients=12, layout="sparse_grid", grid_rank=4, target_modules=targets,
                            init_weights=False, seed=1)
    spectral = get_peft_model(factory(seed=0), config).eval()
    _, state = convert_to_lora(spectral, 4)
    assert lora_update_error(spectral, state)["relative_error"] < 1e-5
    _, state = convert_to_lora(spectral, 2)
    assert lora_update_error(spectral, state)["relative_error"] > 1e-3


def test_a_rank_above_the_layer_size_names_the_limit():
    _, spectral = _spectral("gpt2-conv1d")
    with pytest.raises(ValueError, match="larger than the weight shape"):
        convert_to_lora(spectral, 33)  # c_attn is 96 x 32


def test_a_replace_mode_adapter_is_refused_with_the_way_to_serve_it():
    spectral = get_peft_model(make_gpt2(seed=0), SpectralConfig(mode="replace", coefficient_fraction=0.5))
    assert spectral.supports_lora_conversion() is False  # the question answers; the converter is told what to do
    with pytest.raises(TypeError, match=r"replace-mode spectral adapter.*merge_and_unload\(\)"):
        convert_to_lora(spectral, 4)
    with pytest.raises(TypeError, match="merge_and_unload"):
        save_as_lora("unused", spectral, rank=4)
    delta = _spectral("llama-linear")[1]
    assert delta.supports_lora_conversion() is True
