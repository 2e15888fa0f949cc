"""Index sets take the fewest bytes that hold them: int32 positions in memory, and on disk a bitmap of the
layer's m x n bits or int32 positions, whichever is smaller; every read path decodes both (and the int64
positions earlier versions wrote), and a damaged bitmap is refused by name."""

from __future__ import annotations

import math

import hf_spectral.index_codec as index_codec
import pytest
import torch
from hf_spectral.coefficient_space import make_space
from hf_spectral.ecosystem.adapter_files import layer_matrices, read_adapter
from hf_spectral.layouts import select_indices
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tiny_models import example_inputs, logits_of, make_gpt2

from hf_spectral import SpectralConfig, SpectralLayer

KEY = "base_model.model.transformer.h.0.attn.c_attn.spectral_indices"  # c_attn of make_gpt2: 96 x 32


# --------------------------------------------------------------------------------------------------
# the codec itself


def test_memory_dtype_is_int32_while_every_position_fits():
    assert index_codec.memory_dtype(96, 32) == torch.int32
    assert index_codec.memory_dtype(2**16, 2**15 - 1) == torch.int32  # m * n = 2^31 - 2^16
    assert index_codec.memory_dtype(2**16, 2**15) == torch.int64  # m * n = 2^31


@pytest.mark.parametrize("m,n,k", [(96, 32, 30), (96, 32, 96), (96, 32, 97), (96, 32, 1536), (7, 13, 50), (1, 9, 9)])
def test_encode_picks_the_smaller_form_and_decode_gives_the_positions_back(m, n, k):
    positions = select_indices("random", m, n, k, seed=2)
    stored = index_codec.encode(positions, m, n)
    bitmap = math.ceil(m * n / 8) < 4 * k
    assert stored.dtype == (torch.uint8 if bitmap else torch.int32)
    assert stored.numel() * stored.element_size() == min(math.ceil(m * n / 8), 4 * k) == index_codec.encoded_bytes(k, m, n)
    decoded = index_codec.decode(stored, m, n, k=k)
    assert decoded.dtype == torch.int32 and torch.equal(decoded.long(), positions)


def test_int64_positions_of_earlier_versions_decode_as_they_are():
    positions = select_indices("random", 96, 32, 1000, seed=0)  # int64, as 0.1 and 0.2 saved them
    assert torch.equal(index_codec.decode(positions, 96, 32, k=1000).long(), positions)


def test_int64_positions_out_of_range_are_not_wrapped_into_int32():
    positions = torch.tensor([3, 2**32 + 5], dtype=torch.int64)  # would wrap to 5
    with pytest.raises(ValueError, match=r"run from 3 to 4294967301, outside 0\.\.3071"):
        make_space(96, 32, 2, layout="energy", indices=index_codec.decode(positions, 96, 32, k=2))


def test_positions_out_of_order_are_never_turned_into_a_bitmap():
    positions = torch.tensor([5, 1, 2, 3, 4, 6, 7, 8, 9, 10], dtype=torch.int64)  # 40 bytes as int32, 2 as a bitmap
    stored = index_codec.encode(positions, 4, 4)
    assert stored.dtype == torch.int32 and torch.equal(stored.long(), positions)


def test_a_bitmap_with_bits_past_the_layer_is_refused():
    stored = index_codec.encode(torch.arange(10), 3, 5)  # 15 positions in 2 bytes: bit 15 is padding
    stored[1] |= 0x80
    with pytest.raises(ValueError, match=r"layer 'x' has 1 bits set past its 15 positions \(allowed: 0\)"):
        index_codec.decode(stored, 3, 5, k=10, name="x")


# --------------------------------------------------------------------------------------------------
# saved adapters


def _save_and_reload(model, folder, base, inputs):
    expected = logits_of(model, inputs)
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(base, folder).eval()
    assert torch.equal(logits_of(loaded, inputs), expected)
    return loaded


def test_a_small_k_delta_adapter_saves_int32_positions_and_loads_to_the_same_logits(tmp_path):
    model = get_peft_model(make_gpt2(), SpectralConfig(n_coefficients=30, layout="energy", target_modules=["c_attn"],
                                                       init_weights=False)).eval()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.spectral_indices["default"].dtype == torch.int32  # in memory: 4 bytes per position
    loaded = _save_and_reload(model, tmp_path, make_gpt2(), example_inputs("gpt2"))
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))[KEY]
    assert stored.dtype == torch.int32 and stored.numel() * stored.element_size() == 30 * 4  # < 96 * 32 / 8 = 384
    assert loaded.base_model.model.transformer.h[0].attn.c_attn.spectral_indices["default"].dtype == torch.int32


def test_a_replace_energy_model_at_half_saves_bitmaps_and_loads_to_the_same_logits(tmp_path):
    config = SpectralConfig(mode="replace", coefficient_fraction=0.5, layout="energy", init_weights="project")
    model = get_peft_model(make_gpt2(), config).eval()
    inputs = example_inputs("gpt2")
    loaded = _save_and_reload(model, tmp_path, make_gpt2(seed=1), inputs)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    layers = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, SpectralLayer)]
    assert len(layers) == 8
    for name, layer in layers:
        m, n = layer.out_features, layer.in_features
        bitmap = stored[f"{name}.spectral_indices"]
        assert bitmap.dtype == torch.uint8 and bitmap.numel() == math.ceil(m * n / 8)  # against 8 * K as int64
        assert layer.spectral_indices["default"].dtype == torch.int32
    # the reader without a model decodes the bitmaps to the same weights
    merged = {name: layer.get_delta_weight("default").detach().T for name, layer in layers}  # Conv1D: in x out
    for record, matrix in layer_matrices(read_adapter(str(tmp_path))):
        torch.testing.assert_close(matrix.float(), merged["base_model.model." + record.name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_of(loaded.merge_and_unload(), inputs), logits_of(model, inputs))


def test_an_adapter_saved_with_int64_positions_and_fingerprints_still_loads(tmp_path, monkeypatch):
    # what 0.2 wrote: the index set as int64 positions, its checksum over those bytes
    model = get_peft_model(make_gpt2(), SpectralConfig(n_coefficients=1000, layout="banded", target_modules=["c_attn"],
                                                       init_weights=False)).eval()
    with monkeypatch.context() as patch:
        patch.setattr(index_codec, "encode", lambda positions, m, n: positions.to(torch.int64).cpu())
        model.save_pretrained(tmp_path)
    assert load_file(str(tmp_path / "adapter_model.safetensors"))[KEY].dtype == torch.int64
    inputs = example_inputs("gpt2")
    loaded = PeftModel.from_pretrained(make_gpt2(), tmp_path).eval()
    assert torch.equal(logits_of(loaded, inputs), logits_of(model, inputs))


# --------------------------------------------------------------------------------------------------
# a damaged bitmap


def _bitmap_adapter(folder):
    # K = 1000 of c_attn's 3072 coefficients: a bitmap (384 bytes) beats positions (4000)
    model = get_peft_model(make_gpt2(), SpectralConfig(n_coefficients=1000, layout="energy", target_modules=["c_attn"],
                                                       init_weights=False))
    model.save_pretrained(folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert tensors[KEY].dtype == torch.uint8 and tensors[KEY].numel() == 384
    return tensors


def _one_more_bit(bitmap):
    """The bitmap with one more position set: the first one it leaves out."""
    bitmap = bitmap.clone()
    kept = set(index_codec.decode(bitmap, 96, 32).tolist())
    free = next(p for p in range(96 * 32) if p not in kept)
    bitmap[free // 8] |= 1 << (free % 8)
    return bitmap


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b[:-1], r"layer 'transformer.h.0.attn.c_attn' has 383 bytes; its 96 x 32 weight needs 384"),
        (_one_more_bit, r"layer 'transformer.h.0.attn.c_attn' has 1001 bits set; the layer keeps K = 1000"),
    ],
    ids=["wrong_length", "wrong_count"],
)
def test_a_damaged_bitmap_is_refused_by_name_before_loading(tmp_path, damage, message):
    tensors = _bitmap_adapter(tmp_path)
    tensors[KEY] = damage(tensors[KEY]).contiguous()
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = make_gpt2()
    inputs = example_inputs("gpt2")
    expected = logits_of(base, inputs)
    with pytest.raises(ValueError, match=message) as error:
        PeftModel.from_pretrained(base, tmp_path)
    assert "save the adapter again" in str(error.value)
    assert not any(isinstance(m, SpectralLayer) for m in base.modules())
    assert torch.equal(logits_of(base, inputs), expected)
    # the reader without a model says the same
    with pytest.raises(ValueError, match=message):
        list(layer_matrices(read_adapter(str(tmp_path))))


def test_a_damaged_bitmap_in_a_state_dict_is_refused_by_name(tmp_path):
    # set_peft_model_state_dict skips the file checks: the tuner's own check decodes and refuses
    tensors = _bitmap_adapter(tmp_path)
    tensors[KEY] = _one_more_bit(tensors[KEY])
    model = get_peft_model(make_gpt2(), SpectralConfig(n_coefficients=1000, layout="energy", target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' has 1001 bits set; the layer keeps K = 1000"):
        set_peft_model_state_dict(model, tensors)
