"""Spectral deltas on nn.Embedding and convolutions: the forward is the base module with W0 + scaling * dW, on
real transformers models (a ViT's patch embedding, a Llama's token embedding) and on convolutions with groups,
dilation, stride and a padding mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_spectral.embedding_conv import SpectralConv, SpectralEmbedding
from peft import PeftModel, get_peft_model
from tiny_models import example_inputs, logits_of, make_gpt2, make_llama
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from hf_spectral import SpectralConfig


def make_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=16,
                       patch_size=4, num_channels=3, num_labels=3)
    return ViTForImageClassification(config).eval()


class ConvNet(nn.Module):
    """A diffusers-shaped pair of convolutions: grouped and dilated with reflect padding, then strided."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2, padding_mode="reflect")
        self.conv1 = nn.Conv2d(8, 6, (3, 2), stride=2, bias=False)
        self.conv2 = nn.Conv1d(6, 5, 3, padding=1)

    def forward(self, x):
        y = self.conv1(F.silu(self.conv0(x)))
        return self.conv2(y.flatten(2)).mean(-1)


def make_convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def vit_inputs():
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


def conv_inputs():
    return {"x": torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(1))}


def output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# (factory, target modules, inputs): a transformers ViT (Conv2d + Linear), a Llama (Embedding + Linear), plain convs
CASES = {
    "vit": (make_vit, ["projection", "query"], vit_inputs),
    "llama": (make_llama, ["embed_tokens", "q_proj"], lambda: example_inputs("llama")),
    "convnet": (make_convnet, ["conv0", "conv1", "conv2"], conv_inputs),
}


def build(case: str, layout: str = "random", **overrides):
    factory, targets, _ = CASES[case]
    kwargs = dict(target_modules=targets, n_coefficients=30, init_weights=False, layout=layout, **overrides)
    return get_peft_model(factory(), SpectralConfig(**kwargs)).eval()


def explicit_weight(layer) -> torch.Tensor:
    """W0 + scaling * dW from the coefficient space directly, in the base weight's shape."""
    space = layer.coefficient_space("default")
    delta = space.to_matrix(layer.spectral_coefficients["default"].detach()) * layer.spectral_settings["default"].scaling
    base = layer.get_base_layer()
    return base.weight + delta.reshape(base.weight.shape)


def test_conv_forward_is_the_base_conv_with_the_updated_kernel():
    model = build("convnet")
    inputs = conv_inputs()["x"]
    convnet = model.base_model.model
    conv0, conv1, conv2 = convnet.conv0, convnet.conv1, convnet.conv2
    assert isinstance(conv0, SpectralConv) and (conv0.out_features, conv0.in_features) == (8, 2 * 9)
    assert (conv1.out_features, conv1.in_features) == (6, 8 * 6)
    w0, w1, w2 = explicit_weight(conv0), explicit_weight(conv1), explicit_weight(conv2)
    padded = F.pad(inputs, (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(padded, w0, conv0.base_layer.bias, dilation=2, groups=2)
    y = F.conv2d(F.silu(y), w1, None, stride=2)
    expected = F.conv1d(y.flatten(2), w2, conv2.base_layer.bias, padding=1).mean(-1)
    torch.testing.assert_close(output(model, {"x": inputs}), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, output(make_convnet(), {"x": inputs}), atol=1e-4)  # the update acts


def test_embedding_forward_is_a_lookup_in_the_updated_table():
    model = build("llama")
    layer = model.base_model.model.model.embed_tokens
    assert isinstance(layer, SpectralEmbedding) and (layer.out_features, layer.in_features) == (64, 32)
    ids = example_inputs("llama")["input_ids"]
    torch.testing.assert_close(layer(ids), F.embedding(ids, explicit_weight(layer)))
    layer.train()  # the training path (gradients on) computes the same
    out = layer(ids)
    torch.testing.assert_close(out, F.embedding(ids, explicit_weight(layer)))
    out.sum().backward()
    assert layer.spectral_coefficients["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["random", "lowfreq", "energy"])
def test_merge_unmerge_and_merge_and_unload(case, layout):
    model = build(case, layout)
    inputs = CASES[case][2]()
    unmerged = output(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(output(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(output(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (SpectralConv, SpectralEmbedding)) for m in plain.modules())
    torch.testing.assert_close(output(plain, inputs), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["random", "energy"])
def test_save_then_load_gives_identical_outputs(case, layout, tmp_path):
    model = build(case, layout)
    inputs = CASES[case][2]()
    expected = output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(CASES[case][0](), tmp_path).eval()
    torch.testing.assert_close(output(loaded, inputs), expected)
    # the adapter alone made the difference
    assert not torch.allclose(output(CASES[case][0](), inputs), expected, atol=1e-4)


def test_disable_adapter_gives_the_base_model():
    model = build("vit")
    inputs = vit_inputs()
    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs), output(make_vit(), inputs))


@pytest.mark.parametrize("case", ["llama", "convnet"])
def test_mixed_batch_rows_match_their_adapters_run_alone(case):
    factory, targets, make_inputs = CASES[case]
    model = build(case)
    model.add_adapter("other", SpectralConfig(target_modules=targets, n_coefficients=20, init_weights=False, seed=3))
    inputs = make_inputs()
    rows = next(iter(inputs.values())).shape[0]
    names = (["default", "other", "__base__"] * rows)[:rows]
    mixed = output(model, {**inputs, "adapter_names": names})
    for row, name in enumerate(names):
        single = {k: v[row: row + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                expected = output(model, single)
        else:
            model.set_adapter(name)
            expected = output(model, single)
        torch.testing.assert_close(mixed[row: row + 1], expected, atol=1e-5, rtol=1e-5)


def test_conv_dropout_is_base_plus_the_update_of_the_dropped_input():
    model = build("convnet", spectral_dropout=0.4).train()
    conv = model.base_model.model.conv1
    x = torch.randn(2, 8, 7, 7)
    torch.manual_seed(5)
    y = conv(x)
    assert conv.last_compute_path == "dropout"
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.4, training=True)
    delta = explicit_weight(conv) - conv.get_base_layer().weight
    torch.testing.assert_close(y, conv.base_layer(x) + F.conv2d(dropped, delta, stride=2), atol=1e-5, rtol=1e-5)
    conv.eval()  # evaluation: no dropout
    torch.testing.assert_close(conv(x), F.conv2d(x, explicit_weight(conv), stride=2), atol=1e-5, rtol=1e-5)


def test_embedding_ignores_dropout_and_says_so():
    with pytest.warns(UserWarning, match="spectral_dropout=0.1 does not apply to the embedding 'model.embed_tokens'"):
        build("llama", spectral_dropout=0.1)


def test_tied_embedding_refuses_to_merge():
    model = get_peft_model(make_gpt2(), SpectralConfig(target_modules=["wte"], n_coefficients=30, init_weights=False))
    inputs = example_inputs("gpt2")
    unmerged = logits_of(model, inputs)
    with pytest.raises(ValueError, match=r"tied to \['lm_head'\].*Keep the adapter unmerged"):
        model.merge_adapter()
    torch.testing.assert_close(logits_of(model, inputs), unmerged)  # nothing was changed


def test_replace_mode_and_unsupported_modules_are_refused():
    with pytest.raises(ValueError, match="'conv0' is a Conv2d: .*mode='delta' only, not 'replace'"):
        get_peft_model(make_convnet(), SpectralConfig(mode="replace", target_modules=["conv0"]))
    transposed = nn.Sequential(nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(TypeError, match="ConvTranspose2d is not supported by spectral layers"):
        get_peft_model(transposed, SpectralConfig(target_modules=["0"], n_coefficients=10))
    normed = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="max_norm=1.0"):
        get_peft_model(normed, SpectralConfig(target_modules=["0"], n_coefficients=10))
