"""What a LoRA user relies on, for spectral deltas: the adapter dtype PEFT promises, mixed-batch inference with
``adapter_names``, and ``add_weighted_adapter``."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_spectral import SpectralConfig, SpectralLayer

IDS = torch.randint(1, 64, (3, 6), generator=torch.Generator().manual_seed(1))


def llama(dtype=torch.float32, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def spectral(targets=("q_proj", "v_proj"), **kwargs):
    return SpectralConfig(n_coefficients=40, init_weights=False, target_modules=list(targets), **kwargs)


def coefficient_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if "spectral_" in n}


# --------------------------------------------------------------------------------------------------
# adapter dtype: PEFT's test_adapter_dtype_autocast, for spectral adapters


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_adapter_dtype_follows_autocast_adapter_dtype_at_every_entry_point(
    tmp_path, dtype, autocast_adapter_dtype, low_cpu_mem_usage
):
    expected = {torch.float32} if autocast_adapter_dtype else {dtype}
    model = get_peft_model(llama(dtype), spectral(), autocast_adapter_dtype=autocast_adapter_dtype)
    model.add_adapter("other", spectral(seed=1), autocast_adapter_dtype=autocast_adapter_dtype)
    assert coefficient_dtypes(model) == expected
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        llama(dtype), tmp_path, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
    )
    loaded.load_adapter(
        tmp_path / "other", adapter_name="other", autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    assert coefficient_dtypes(loaded) == expected
    # the transform still runs in float32 inside the layer: a bf16/fp16 adapter gives the forward it holds
    with torch.no_grad():
        out = loaded(input_ids=IDS).logits
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_a_half_precision_adapter_computes_what_its_float32_copy_computes():
    model = get_peft_model(llama(torch.bfloat16), spectral(), autocast_adapter_dtype=False)
    layer = next(m for m in model.modules() if isinstance(m, SpectralLayer))
    values = layer.spectral_coefficients["default"]
    assert values.dtype == torch.bfloat16
    rebuilt = layer.rebuild("default")
    assert rebuilt.dtype == torch.float32  # the transform dtype, whatever the coefficients' dtype
    reference = layer.coefficient_space("default").to_matrix(values.detach().float())
    torch.testing.assert_close(rebuilt, reference)


# --------------------------------------------------------------------------------------------------
# mixed batches


@pytest.fixture
def two_adapters():
    model = get_peft_model(llama(), spectral(), adapter_name="one")
    model.add_adapter("two", spectral(("q_proj", "v_proj", "down_proj"), seed=3))
    return model.eval()


def _alone(model, name):
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(input_ids=IDS).logits
        model.set_adapter(name)
        return model(input_ids=IDS).logits


def test_each_row_of_a_mixed_batch_equals_running_it_alone_with_its_adapter(two_adapters):
    model = two_adapters
    alone = {name: _alone(model, name) for name in ("one", "two", "__base__")}
    names = ["two", "__base__", "one"]
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-6, atol=1e-6)
    # the rows really differ by adapter (so the check above is not vacuous)
    assert not torch.allclose(alone["one"], alone["two"], atol=1e-4)
    assert not torch.allclose(alone["one"], alone["__base__"], atol=1e-4)


def test_generate_takes_adapter_names_row_by_row(two_adapters):
    model = two_adapters
    prompt = IDS[:, :3]
    names = ["one", "two", "__base__"]
    mixed = model.generate(input_ids=prompt, adapter_names=names, max_new_tokens=4, do_sample=False)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=prompt[row : row + 1], max_new_tokens=4, do_sample=False)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=prompt[row : row + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(mixed[row], alone[0])


def test_mixed_batches_refuse_what_they_cannot_do(two_adapters):
    model = two_adapters
    with pytest.raises(ValueError, match=r"adapter\(s\) \['zz'\] that this model does not have"):
        model(input_ids=IDS, adapter_names=["one", "zz", "one"])
    with pytest.raises(ValueError, match="one adapter name .* per row"):
        model(input_ids=IDS, adapter_names=["one", "two"])
    model.train()
    with pytest.raises(ValueError, match="inference"):
        model(input_ids=IDS, adapter_names=["one", "two", "one"])
    model.eval()
    model.merge_adapter(["one"])
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=IDS, adapter_names=["one", "two", "one"])
    replace = get_peft_model(llama(), SpectralConfig(mode="replace", coefficient_fraction=0.5)).eval()
    with pytest.raises(ValueError, match="replace-mode"):
        replace(input_ids=IDS, adapter_names=["default"] * 3)


# --------------------------------------------------------------------------------------------------
# add_weighted_adapter


def test_a_weighted_adapter_is_the_weighted_sum_of_the_updates():
    model = get_peft_model(llama(), spectral(), adapter_name="one")
    model.add_adapter("two", spectral(scaling=4.0))  # same index sets, another scaling
    model.add_weighted_adapter(["one", "two"], [0.5, -2.0], "w")
    for _, layer in model.named_modules():
        if isinstance(layer, SpectralLayer):
            expected = 0.5 * layer.get_delta_weight("one") - 2.0 * layer.get_delta_weight("two")
            torch.testing.assert_close(layer.get_delta_weight("w"), expected, rtol=1e-5, atol=1e-6)
    model.set_adapter("w")
    assert all(p.requires_grad == n.endswith(".w") for n, p in model.named_parameters() if "spectral_coefficients" in n)


def test_grid_adapters_of_the_same_frequencies_combine():
    model = get_peft_model(llama(), spectral(layout="grid"), adapter_name="one")
    model.add_adapter("two", spectral(layout="grid", scaling=3.0))
    model.add_weighted_adapter(["one", "two"], [2.0, 0.5], "w")
    layers = [layer for layer in model.modules() if isinstance(layer, SpectralLayer)]
    assert layers and all(layer.coefficient_space("w").grid is not None for layer in layers)
    for layer in layers:
        expected = 2.0 * layer.get_delta_weight("one") + 0.5 * layer.get_delta_weight("two")
        torch.testing.assert_close(layer.get_delta_weight("w"), expected, rtol=1e-5, atol=1e-6)


def test_adapters_with_other_index_sets_are_refused_with_the_fields_and_the_way_out():
    model = get_peft_model(llama(), spectral(), adapter_name="one")
    model.add_adapter("two", spectral(seed=3))
    with pytest.raises(ValueError, match=r"differ in \['seed'\].*convert_to_lora"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "w")
    assert "w" not in model.peft_config
    assert not any("w" in m.spectral_coefficients for m in model.modules() if isinstance(m, SpectralLayer))
    model.add_adapter("grid", spectral(layout="grid"))
    model.add_adapter("grid_other", spectral(layout="grid", seed=3))  # the same block size, other frequencies
    with pytest.raises(ValueError, match=r"differ in \['seed'\]"):
        model.add_weighted_adapter(["grid", "grid_other"], [1.0, 1.0], "w")
    with pytest.raises(ValueError, match=r"differ in \['layout'\]"):
        model.add_weighted_adapter(["one", "grid"], [1.0, 1.0], "w")
    assert "w" not in model.peft_config
    with pytest.raises(ValueError, match="combination_type='svd' is not supported"):
        model.add_weighted_adapter(["one"], [1.0], "w", combination_type="svd")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["one"], [1.0, 2.0], "w")
