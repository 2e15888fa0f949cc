"""hotswap_adapter: another adapter's weights copied into the held one, in place: the model then gives the new
adapter's logits, with no new module and, under torch.compile, no recompilation."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import example_inputs, logits_of, make_llama

import hf_spectral
from hf_spectral import SpectralConfig, SpectralLayer

TARGETS = ["q_proj", "v_proj", "down_proj"]
INPUTS = example_inputs("llama")


def save_adapter(path, seed: int, **fields):
    torch.manual_seed(100 + seed)
    # random positions by default: what these tests swap is scattered index sets of other seeds and budgets
    config = SpectralConfig(
        init_weights=False, seed=seed, **{"target_modules": TARGETS, "n_coefficients": 40, "layout": "random", **fields}
    )
    model = get_peft_model(make_llama(), config)
    model.save_pretrained(path)
    return logits_of(model.eval(), INPUTS)


def loaded(path):
    return PeftModel.from_pretrained(make_llama(), path).eval()


def tensors_of(model):
    return {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}


@pytest.mark.parametrize("new_fields", [
    {"seed": 1},                                 # other random positions
    {"seed": 2, "scaling": 3.0},                 # another scaling, folded into the coefficients
    {"seed": 3, "n_coefficients": 25},           # fewer coefficients: padded with zeros
    {"seed": 4, "layout": "energy"},             # a data-dependent index set, read from the file
    {"seed": 5, "layout": "triangle"},
])
def test_swapping_b_into_a_gives_b_logits_in_place(tmp_path, new_fields):
    save_adapter(tmp_path / "a", 0)
    expected = save_adapter(tmp_path / "b", **{"seed": 1, **new_fields})
    model = loaded(tmp_path / "a")
    before = logits_of(model, INPUTS)
    assert not torch.allclose(before, expected, atol=1e-4)
    held = tensors_of(model)
    modules = list(model.modules())
    hf_spectral.hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
    torch.testing.assert_close(logits_of(model, INPUTS), expected, atol=1e-5, rtol=1e-5)
    after = tensors_of(model)
    assert set(after) == set(held) and all(after[name] is held[name] for name in held)  # the same tensors
    assert list(model.modules()) == modules


def test_a_smaller_lowfreq_block_swaps_into_a_larger_one(tmp_path):
    save_adapter(tmp_path / "a", 0, layout="lowfreq", n_coefficients=100)
    expected = save_adapter(tmp_path / "b", 1, layout="lowfreq", n_coefficients=40)
    model = loaded(tmp_path / "a")
    hf_spectral.hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
    torch.testing.assert_close(logits_of(model, INPUTS), expected, atol=1e-5, rtol=1e-5)


def test_more_coefficients_need_room_made_first(tmp_path):
    save_adapter(tmp_path / "a", 0, n_coefficients=25)
    expected = save_adapter(tmp_path / "b", 1, n_coefficients=40)
    model = loaded(tmp_path / "a")
    with pytest.raises(ValueError, match=r"new adapter has 40 coefficients, the held one 25.*target_n_coefficients=40"):
        hf_spectral.hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
    before = logits_of(model, INPUTS)
    hf_spectral.prepare_model_for_compiled_hotswap(model, target_n_coefficients=40)
    torch.testing.assert_close(logits_of(model, INPUTS), before)  # padding changes nothing
    hf_spectral.hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
    torch.testing.assert_close(logits_of(model, INPUTS), expected, atol=1e-5, rtol=1e-5)


def test_adapters_that_cannot_be_swapped_are_refused_and_the_model_kept(tmp_path):
    save_adapter(tmp_path / "a", 0)
    model = loaded(tmp_path / "a")
    before = logits_of(model, INPUTS)
    save_adapter(tmp_path / "other_targets", 1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="the two adapters target other layers"):
        hf_spectral.hotswap_adapter(model, str(tmp_path / "other_targets"), adapter_name="default")
    save_adapter(tmp_path / "block", 1, layout="lowfreq")
    with pytest.raises(ValueError, match="the held adapter has scattered positions, the new one a block"):
        hf_spectral.hotswap_adapter(model, str(tmp_path / "block"), adapter_name="default")
    save_adapter(tmp_path / "basis", 1, basis="random_orthonormal")
    with pytest.raises(ValueError, match="basis: held 'dct', new 'random_orthonormal'"):
        hf_spectral.hotswap_adapter(model, str(tmp_path / "basis"), adapter_name="default")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        hf_spectral.hotswap_adapter(model, str(tmp_path / "basis"), adapter_name="nope")
    torch.testing.assert_close(logits_of(model, INPUTS), before)


@pytest.mark.parametrize("layout", ["grid", "sparse_grid"])
def test_a_grid_swaps_only_into_the_same_grid(tmp_path, layout):
    save_adapter(tmp_path / "a", 0, layout=layout)
    model = loaded(tmp_path / "a")
    before = logits_of(model, INPUTS)
    torch.manual_seed(7)  # same grid (seed 0), other coefficients
    config = SpectralConfig(init_weights=False, seed=0, layout=layout, target_modules=TARGETS, n_coefficients=40)
    other = get_peft_model(make_llama(), config)
    other.save_pretrained(tmp_path / "same_grid")
    expected = logits_of(other.eval(), INPUTS)
    save_adapter(tmp_path / "other_grid", 1, layout=layout)  # seed 1: other frequencies
    with pytest.raises(ValueError, match="another grid of frequencies"):
        hf_spectral.hotswap_adapter(model, str(tmp_path / "other_grid"), adapter_name="default")
    torch.testing.assert_close(logits_of(model, INPUTS), before)
    hf_spectral.hotswap_adapter(model, str(tmp_path / "same_grid"), adapter_name="default")
    torch.testing.assert_close(logits_of(model, INPUTS), expected, atol=1e-5, rtol=1e-5)


def test_a_sparse_grid_is_not_padded_for_compiled_hotswap(tmp_path):
    save_adapter(tmp_path / "a", 0, layout="sparse_grid", n_coefficients=25)
    model = loaded(tmp_path / "a")
    with pytest.raises(ValueError, match="is a sparse grid .* not padded to 40.*layout='random'"):
        hf_spectral.prepare_model_for_compiled_hotswap(model, target_n_coefficients=40)
    hf_spectral.prepare_model_for_compiled_hotswap(model, target_n_coefficients=25)  # the held budget: nothing to pad
    # after a random adapter that could be padded, the refusal still leaves every layer as it was
    save_adapter(tmp_path / "r", 1, n_coefficients=25)
    model = loaded(tmp_path / "r")
    model.load_adapter(str(tmp_path / "a"), adapter_name="s")
    before = {name: t.clone() for name, t in tensors_of(model).items()}
    with pytest.raises(ValueError, match="is a sparse grid"):
        hf_spectral.prepare_model_for_compiled_hotswap(model, target_n_coefficients=40)
    after = tensors_of(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("path", ["spectral", "sampled"])  # the paths that read sparse patterns of the index set
def test_swapped_index_sets_reach_every_compute_path(tmp_path, path):
    save_adapter(tmp_path / "a", 0)
    expected = save_adapter(tmp_path / "b", 1, layout="energy")
    model = loaded(tmp_path / "a")
    hf_spectral.set_weight_cache(model, False)
    hf_spectral.set_compute_path(model, path)
    logits_of(model, INPUTS)  # builds the layers' sparse patterns of the held index sets
    hf_spectral.hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
    torch.testing.assert_close(logits_of(model, INPUTS), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("weight_cache", [True, False])
def test_compiled_model_does_not_recompile_on_a_hotswap(tmp_path, weight_cache):
    save_adapter(tmp_path / "a", 0, n_coefficients=25)
    expected_b = save_adapter(tmp_path / "b", 1, scaling=4.0)
    expected_c = save_adapter(tmp_path / "c", 2, n_coefficients=30, layout="energy")
    model = loaded(tmp_path / "a")
    hf_spectral.prepare_model_for_compiled_hotswap(model, target_n_coefficients=40)
    hf_spectral.set_weight_cache(model, weight_cache)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        expected_a = logits_of(model, INPUTS)
        for _ in range(2):  # warm up: the first calls fill the layers' caches (index sets' spaces, weights)
            compiled(**INPUTS)
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(compiled(**INPUTS).logits, expected_a)
            hf_spectral.hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
            torch.testing.assert_close(compiled(**INPUTS).logits, expected_b, atol=1e-5, rtol=1e-5)
            hf_spectral.hotswap_adapter(model, str(tmp_path / "c"), adapter_name="default")
            torch.testing.assert_close(compiled(**INPUTS).logits, expected_c, atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, SpectralLayer) for m in model.modules())


def test_pefts_own_hotswap_adapter_routes_spectral_adapters_here(tmp_path):
    from peft.utils import hotswap as peft_hotswap

    save_adapter(tmp_path / "a", 0)
    expected = save_adapter(tmp_path / "b", 1)
    model = loaded(tmp_path / "a")
    peft_hotswap.hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(logits_of(model, INPUTS), expected, atol=1e-5, rtol=1e-5)
    assert peft_hotswap.hotswap_adapter._hf_spectral_original is not None  # PEFT's own, for LoRA adapters


def test_pefts_own_hotswap_adapter_still_swaps_lora_adapters(tmp_path):
    from peft import LoraConfig
    from peft.utils import hotswap as peft_hotswap

    expected = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        lora = get_peft_model(make_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
        lora.save_pretrained(tmp_path / str(seed))
        expected[seed] = logits_of(lora.eval(), INPUTS)
    model = PeftModel.from_pretrained(make_llama(), tmp_path / "0").eval()
    peft_hotswap.hotswap_adapter(model, str(tmp_path / "1"), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(logits_of(model, INPUTS), expected[1], atol=1e-5, rtol=1e-5)
