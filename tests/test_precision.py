"""fp32, bf16 and fp16 models: the transform runs in fp32 and the result is cast back."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import example_inputs, logits_of, make_llama

from hf_spectral import SpectralConfig, SpectralLayer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,layout", [("delta", "random"), ("delta", "lowfreq"), ("replace", "random"), ("replace", "lowfreq")])
def test_half_precision_models_agree_with_fp32(dtype, mode, layout):
    kwargs = dict(mode=mode, layout=layout, target_modules=["q_proj", "down_proj"], init_weights=False if mode == "delta" else True)
    kwargs.update({"n_coefficients": 100} if mode == "delta" else {"coefficient_fraction": 0.5})
    torch.manual_seed(0)
    reference = get_peft_model(make_llama(), SpectralConfig(**kwargs)).eval()
    torch.manual_seed(0)
    half = get_peft_model(make_llama().to(dtype), SpectralConfig(**kwargs)).eval()
    for layer in half.modules():
        if isinstance(layer, SpectralLayer):
            assert layer.spectral_coefficients["default"].dtype == torch.float32  # a master copy in fp32
    inputs = example_inputs("llama")
    out = logits_of(half, inputs)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), logits_of(reference, inputs), atol=0.05, rtol=0.05)
    half.train()
    half(**inputs, labels=inputs["input_ids"]).loss.backward()
    layers = [m for m in half.modules() if isinstance(m, SpectralLayer)]
    assert all(layer.spectral_coefficients["default"].grad is not None for layer in layers)


def test_bf16_autocast_on_cpu_trains():
    # TRL's default on CPU: fp32 weights, forward under bf16 autocast
    model = get_peft_model(make_llama(), SpectralConfig(mode="replace", layout="random", target_modules=["q_proj", "v_proj"]))
    inputs = example_inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grad = model.base_model.model.model.layers[0].self_attn.q_proj.spectral_coefficients["default"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_float64_model_keeps_float64_coefficients():
    model = get_peft_model(make_llama().double(), SpectralConfig(n_coefficients=50, target_modules=["q_proj"], init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.spectral_coefficients["default"].dtype == torch.float64
    assert layer.rebuild("default").dtype == torch.float64
