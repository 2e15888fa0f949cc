"""Loading is all or nothing and never silent: a corrupt, edited or mismatched adapter is refused before the model
is touched, a failure after the checks is undone, and a partial load happens only when asked for."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hf_spectral.loading import AdapterLoadError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_spectral import SpectralConfig, SpectralLayer

TARGETS = ["q_proj", "v_proj", "down_proj"]  # not LoRA's default targets, so a dropped target_modules shows


def llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def save(tmp_path, mode="delta", layers=2, name="adapter", **overrides):
    budget = {"n_coefficients": 40} if mode == "delta" else {"coefficient_fraction": 0.5}
    kwargs = dict(mode=mode, init_weights=False if mode == "delta" else "random", target_modules=TARGETS, **budget)
    kwargs.update(overrides)
    model = get_peft_model(llama(layers), SpectralConfig(**kwargs)).eval()
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder, logits(model)


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def assert_unchanged(model, expected):
    """No spectral layer, no peft_config, every weight back in place, the same logits."""
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())
    assert "peft_config" not in model.__dict__
    assert all(m.weight is not None for m in model.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


@pytest.fixture
def base():
    model = llama()
    return model, logits(model)


# --------------------------------------------------------------------------------------------------
# corrupt files


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_a_truncated_weights_file_is_refused_by_name_and_the_model_is_unchanged(tmp_path, base, mode):
    folder, _ = save(tmp_path, mode)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    model, before = base
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors is not a readable safetensors file"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)
    with pytest.raises(AdapterLoadError, match="truncated or damaged"):
        model.load_adapter(str(folder))  # transformers' entry point
    assert_unchanged(model, before)


def test_a_pickled_adapter_is_checked_and_loads_as_peft_saved_it(tmp_path, base):
    model = get_peft_model(llama(), SpectralConfig(n_coefficients=40, init_weights=False, target_modules=TARGETS)).eval()
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "adapter_model.bin").is_file()
    torch.testing.assert_close(logits(PeftModel.from_pretrained(llama(), tmp_path / "pickled")), logits(model))
    edit_config(tmp_path / "pickled", seed=5)
    fresh, before = base
    with pytest.raises(AdapterLoadError, match="seed: saved"):
        PeftModel.from_pretrained(fresh, tmp_path / "pickled")
    assert_unchanged(fresh, before)


def test_a_flipped_byte_in_the_coefficients_is_refused(tmp_path, base):
    folder, _ = save(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's values
    weights.write_bytes(bytes(data))
    model, before = base
    with pytest.raises(AdapterLoadError, match="holds other values for layer"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


def test_a_second_adapter_that_fails_leaves_the_first_as_it_was(tmp_path):
    good, expected = save(tmp_path, name="good")
    bad, _ = save(tmp_path, name="bad", seed=4)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    model = PeftModel.from_pretrained(llama(), good)
    with pytest.raises(AdapterLoadError, match="truncated"):
        model.load_adapter(bad, adapter_name="other")
    assert set(model.peft_config) == {"default"}
    assert all(set(m.spectral_coefficients) == {"default"} for m in model.modules() if isinstance(m, SpectralLayer))
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# configs that no longer match their weights


@pytest.mark.parametrize(
    "field,value",
    [("seed", 5), ("layout", "triangle"), ("n_coefficients", 30), ("scaling", 3.0), ("basis", "random_orthonormal"),
     ("mode", "replace"), ("grid_rank", 32)],
)
def test_an_edited_config_field_is_refused_and_named(tmp_path, base, field, value):
    folder, _ = save(tmp_path)
    edit_config(folder, **{field: value})
    model, before = base
    with pytest.raises(AdapterLoadError, match=f"{field}: saved"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


def test_an_edited_budget_without_fingerprints_is_still_refused_by_the_coefficient_count(tmp_path, base):
    folder, _ = save(tmp_path)
    edit_config(folder, n_coefficients=30, fingerprints={})  # as an adapter saved before fingerprints existed
    model, before = base
    with pytest.raises(AdapterLoadError, match="holds 40 coefficients .* gives 30"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


def test_an_edited_seed_with_its_recorded_field_edited_too_is_caught_by_the_index_set_hash(tmp_path, base):
    folder, _ = save(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["seed"] = 5
    config["fingerprints"]["fields"]["seed"] = 5
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model, before = base
    with pytest.raises(AdapterLoadError, match="another index set"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


def test_a_removed_target_modules_is_refused_instead_of_falling_back_to_defaults(tmp_path, base):
    folder, _ = save(tmp_path)
    edit_config(folder, target_modules=None)
    model, before = base
    with pytest.raises(AdapterLoadError, match="saved but not targeted: .*down_proj"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------------
# adapters for other models, and partial loads on request


def test_an_adapter_saved_on_more_layers_is_refused_with_the_list(tmp_path, base):
    folder, _ = save(tmp_path, layers=4)
    model, before = base
    with pytest.raises(AdapterLoadError, match=r"6 of its 12 layers are not in this model: \['model.layers.2"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


def test_an_adapter_saved_on_fewer_layers_is_refused(tmp_path):
    folder, _ = save(tmp_path, layers=1)
    model = llama(2)
    before = logits(model)
    with pytest.raises(AdapterLoadError, match="saved with 3 layers, but its config targets 6"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


def test_a_partial_load_happens_when_asked_for_and_says_what_it_left_out(tmp_path):
    folder, _ = save(tmp_path, layers=4)
    with pytest.warns(UserWarning, match="6 of the adapter's 12 layers are not loaded"):
        model = PeftModel.from_pretrained(llama(2), folder, allow_partial_load=True)
    layers = [m for m in model.modules() if isinstance(m, SpectralLayer)]
    assert len(layers) == 6
    # the loaded layers hold the saved coefficients
    full = PeftModel.from_pretrained(llama(4), folder)
    saved = {n: m.spectral_coefficients["default"] for n, m in full.named_modules() if isinstance(m, SpectralLayer)}
    for name, layer in model.named_modules():
        if isinstance(layer, SpectralLayer):
            torch.testing.assert_close(layer.spectral_coefficients["default"], saved[name])


def test_shapes_for_another_model_are_refused(tmp_path, base):
    folder, _ = save(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    name = next(iter(config["layer_shapes"]))
    config["layer_shapes"][name] = [33, 32]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model, before = base
    with pytest.raises(AdapterLoadError, match="layers of other shapes"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------------
# a failure after the checks is undone


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_a_failure_inside_the_load_is_undone_replace_mode_keeping_its_dense_weights(tmp_path, base, monkeypatch, mode):
    folder, _ = save(tmp_path, mode)
    import peft.peft_model

    def broken(*args, **kwargs):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", broken)
    model, before = base
    with pytest.raises(RuntimeError, match="disk went away"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


def test_other_methods_load_as_before(tmp_path, base):
    model, _ = base
    lora = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    loaded = PeftModel.from_pretrained(model, tmp_path / "lora")
    torch.testing.assert_close(logits(loaded), logits(lora))


def _hub_calls_raise(monkeypatch) -> list:
    """Every huggingface_hub download raises, wherever a module imported it; returns the files that asked."""
    import inspect
    import sys

    import huggingface_hub

    callers = []

    def refuse(*args, **kwargs):
        callers.append(inspect.stack()[1].filename)
        raise OSError("no network in this test")

    originals = {huggingface_hub.hf_hub_download, huggingface_hub.snapshot_download}
    for module in list(sys.modules.values()):
        for name in ("hf_hub_download", "snapshot_download"):
            if getattr(module, name, None) in originals:
                monkeypatch.setattr(module, name, refuse)
    return callers


def test_a_lora_adapter_loads_with_no_request_of_ours(tmp_path, monkeypatch):
    lora = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    callers = _hub_calls_raise(monkeypatch)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(llama(), tmp_path / "lora")), logits(lora))
    model = llama()
    model.load_adapter(str(tmp_path / "lora"))
    torch.testing.assert_close(logits(model), logits(lora))
    peft_model = PeftModel.from_pretrained(llama(), tmp_path / "lora")
    peft_model.load_adapter(tmp_path / "lora", adapter_name="second")
    assert callers == []
    # a Hub id: PEFT fetches its config itself; hf_spectral asks for nothing (it learns the kind from PEFT's read)
    with pytest.raises((OSError, ValueError)):
        PeftModel.from_pretrained(llama(), "someone/a-lora-adapter")
    assert callers and not any(os.sep + "hf_spectral" + os.sep in caller for caller in callers), callers


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_every_entry_point_loads_a_good_adapter_to_the_same_logits(tmp_path, mode):
    folder, expected = save(tmp_path, mode)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(llama(), folder)), expected)
    model = llama()
    model.load_adapter(str(folder))
    torch.testing.assert_close(logits(model), expected)
    if mode == "delta":
        other, _ = save(tmp_path, name="other", seed=7)
        peft_model = PeftModel.from_pretrained(llama(), other)
        peft_model.load_adapter(folder, adapter_name="second")
        peft_model.set_adapter("second")
        torch.testing.assert_close(logits(peft_model), expected)


# --------------------------------------------------------------------------------------------------
# gradient checkpointing recomputes the same thing


@pytest.mark.parametrize("layout", ["random", "lowfreq"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(layout, reentrant):
    def gradients(checkpointing: bool):
        model = get_peft_model(
            llama(), SpectralConfig(n_coefficients=300, layout=layout, init_weights=False, target_modules=TARGETS)
        )
        model.train()
        for hook in model.base_model._rebuild_hooks:  # checkpointing turns the batched rebuild off (its numbers
            hook.remove()  # differ in the last bits): compare against per-layer rebuilds
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------------------------------
# fuzzed: random shapes, budgets, layouts and modes; random corruptions


class Stack(nn.Module):
    def __init__(self, sizes, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


EXAMPLES = int(os.environ.get("HF_SPECTRAL_FUZZ_EXAMPLES", "12"))  # more on demand
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def adapters(draw):
    sizes = draw(st.lists(st.integers(1, 9), min_size=2, max_size=4))
    mode = draw(st.sampled_from(["delta", "replace"]))
    layout = draw(st.sampled_from(["lowfreq", "triangle", "random", "energy", "banded"]))
    basis = draw(st.sampled_from(["dct", "random_orthonormal"]))
    fraction = draw(st.sampled_from([0.3, 0.5, 1.0]))
    return sizes, dict(mode=mode, layout=layout, basis=basis, coefficient_fraction=fraction,
                       seed=draw(st.integers(0, 3)), init_weights=False if mode == "delta" else "random",
                       target_modules=[str(i) for i in range(len(sizes) - 1)])


def _save_stack(folder, sizes, kwargs):
    model = get_peft_model(Stack(sizes, 0), SpectralConfig(**kwargs)).eval()
    model.save_pretrained(folder)
    x = torch.randn(3, sizes[0], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model, x, model(x)


@FUZZ
@given(adapters())
def test_fuzz_save_load_and_merge_agree(tmp_path_factory, case):
    sizes, kwargs = case
    folder = tmp_path_factory.mktemp("fuzz")
    model, x, expected = _save_stack(folder, sizes, kwargs)
    loaded = PeftModel.from_pretrained(Stack(sizes, 1 if kwargs["mode"] == "replace" else 0), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.merge_and_unload()(x), expected, rtol=1e-4, atol=1e-5)


CORRUPTIBLE_FIELDS = {
    "seed": st.integers(0, 5), "layout": st.sampled_from(["lowfreq", "triangle", "random", "energy", "banded"]),
    "basis": st.sampled_from(["dct", "random_orthonormal"]), "mode": st.sampled_from(["delta", "replace"]),
    "scaling": st.sampled_from([1.0, 10.0, 3.5]), "coefficient_fraction": st.sampled_from([0.3, 0.5, 1.0, None]),
    "n_coefficients": st.sampled_from([None, 2, 5]), "target_modules": st.sampled_from([None, ["0"], ["1"], ["0", "1", "2"]]),
    "layer_shapes": st.just({}), "fingerprints": st.just({}), "banded_rings": st.integers(1, 5),
}


@FUZZ
@given(adapters(), st.data())
def test_fuzz_corruptions_load_the_same_adapter_or_raise_with_the_model_untouched(tmp_path_factory, case, data):
    sizes, kwargs = case
    folder = tmp_path_factory.mktemp("corrupt")
    _, x, expected = _save_stack(folder, sizes, kwargs)
    if data.draw(st.booleans(), label="corrupt the weights file"):
        weights = folder / "adapter_model.safetensors"
        raw = bytearray(weights.read_bytes())
        position = data.draw(st.integers(0, len(raw) - 1), label="byte")
        raw[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        if data.draw(st.booleans(), label="truncate too"):
            raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
        weights.write_bytes(bytes(raw))
    else:
        field = data.draw(st.sampled_from(sorted(CORRUPTIBLE_FIELDS)), label="field")
        edit_config(folder, **{field: data.draw(CORRUPTIBLE_FIELDS[field], label="value")})
    base = Stack(sizes, 1 if kwargs["mode"] == "replace" else 0).eval()
    with torch.no_grad():
        before = base(x)
    try:
        loaded = PeftModel.from_pretrained(base, folder).eval()
    except Exception:
        assert not any(isinstance(m, SpectralLayer) for m in base.modules())
        assert "peft_config" not in base.__dict__
        with torch.no_grad():
            torch.testing.assert_close(base(x), before, rtol=0, atol=0)
        return
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)


def test_the_fuzz_cases_cover_both_outcomes(tmp_path):
    # a corruption that is caught and an edit that is harmless, so the fuzz test's two branches both run
    folder, _ = save(tmp_path)
    shutil.copytree(folder, tmp_path / "harmless")
    edit_config(tmp_path / "harmless", fingerprints={})
    PeftModel.from_pretrained(llama(), tmp_path / "harmless")
    edit_config(folder, seed=9)
    with pytest.raises(AdapterLoadError):
        PeftModel.from_pretrained(llama(), folder)
