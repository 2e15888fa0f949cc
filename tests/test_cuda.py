"""On a GPU: no host-device copies or synchronisations in the forward and backward passes,
and half-precision models train. Skipped where there is no CUDA device."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import example_inputs, make_llama

from hf_spectral import SpectralConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("mode,layout", [("delta", "random"), ("delta", "energy"), ("replace", "lowfreq"), ("replace", "random"), ("replace", "triangle")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_do_not_synchronise(mode, layout, dtype):
    kwargs = {"n_coefficients": 200} if mode == "delta" else {"coefficient_fraction": 0.5}
    model = get_peft_model(make_llama().to("cuda", dtype), SpectralConfig(mode=mode, layout=layout, target_modules="all-linear", **kwargs))
    inputs = {k: v.cuda() for k, v in example_inputs("llama").items()}
    model(**inputs, labels=inputs["input_ids"]).loss.backward()  # warm the basis caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        if "spectral_coefficients" in name:
            assert param.device.type == "cuda" and param.dtype == torch.float32
            assert param.grad is not None
