"""The fused activation-domain function of scattered coefficients (``functions.ScatteredSpectral``, the
``spectral`` path of every scattered layout) computes what the dense path and the three-piece composition
compute: outputs and every gradient, in float64, on bare functions and through a real transformers model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

import hf_spectral
from hf_spectral import CoefficientSpace, SpectralConfig
from hf_spectral.compute import dispatch, functions
from tests.tiny_models import make_gpt2, make_llama

TOLERANCE = dict(rtol=0, atol=1e-10)


def _space(m, n, k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return CoefficientSpace(m, n, "dct", 0, indices=torch.randperm(m * n, generator=generator)[:k].sort().values)


def _composed(x, values, space, base_weight, bias, scaling, fan_in_fan_out):
    """The path as it was put together from three autograd pieces, plus the frozen product."""
    x_2d = x.reshape(-1, x.shape[-1])
    update = functions.composed_spectral_update(x_2d, values, space).to(x.dtype).view(*x.shape[:-1], -1) * scaling
    if base_weight is None:
        return update if bias is None else update + bias
    return F.linear(x, functions.orient(base_weight, fan_in_fan_out), bias) + update


def _run(path, *args):
    x, values, space, base_weight, bias, scaling, fan_in_fan_out = args
    if path == "composed":
        return _composed(*args)
    return dispatch.run_path(
        path, x, values, space, base_weight=base_weight, bias=bias, scaling=scaling, fan_in_fan_out=fan_in_fan_out
    )


def _outputs_and_grads(path, leaves, space, scaling, fan_in_fan_out):
    x, values, base_weight, bias = (t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in leaves)
    out = _run(path, x, values, space, base_weight, bias, scaling, fan_in_fan_out)
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    inputs = [t for t in (x, values, base_weight, bias) if t is not None and t.requires_grad]
    return out.detach(), torch.autograd.grad(out, inputs, upstream)


# (m, n, k): odd and even sizes (both branches of each transform), more coefficients than either side, one
CASES = [(21, 34, 90), (34, 21, 90), (16, 16, 200), (7, 9, 1), (12, 5, 60)]


@pytest.mark.parametrize("m,n,k", CASES)
@pytest.mark.parametrize(
    "mode,fan_in_fan_out,trainable_base",
    [("delta", False, False), ("delta", True, False), ("delta", False, True), ("delta", True, True), ("replace", False, False)],
)
def test_fused_function_equals_the_dense_path_and_the_composed_pieces(m, n, k, mode, fan_in_fan_out, trainable_base):
    torch.manual_seed(m * n + k)
    space = _space(m, n, k)
    x = torch.randn(3, 4, n, dtype=torch.float64, requires_grad=True)
    values = torch.randn(k, dtype=torch.float64, requires_grad=True)
    base_weight = None
    if mode == "delta":
        base_weight = torch.randn(*((n, m) if fan_in_fan_out else (m, n)), dtype=torch.float64, requires_grad=trainable_base)
    bias = torch.randn(m, dtype=torch.float64, requires_grad=True)
    scaling = 2.5 if mode == "delta" else 1.0
    leaves = (x, values, base_weight, bias)
    fused, fused_grads = _outputs_and_grads("spectral", leaves, space, scaling, fan_in_fan_out)
    assert fused.shape == (3, 4, m)
    for reference in ("dense", "composed"):
        expected, expected_grads = _outputs_and_grads(reference, leaves, space, scaling, fan_in_fan_out)
        torch.testing.assert_close(fused, expected, **TOLERANCE, msg=reference)
        assert len(fused_grads) == len(expected_grads) == 3 + trainable_base
        for got, want in zip(fused_grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, **TOLERANCE, msg=f"gradient against {reference}")


def test_fused_function_passes_gradcheck():
    space = _space(5, 6, 11)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    values = torch.randn(11, dtype=torch.float64, requires_grad=True)
    base_weight = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for fan_in_fan_out in (False, True):
        weight = base_weight.detach().T.contiguous().requires_grad_() if fan_in_fan_out else base_weight

        def fn(x, values, weight, bias, fan_in_fan_out=fan_in_fan_out):
            return functions.ScatteredSpectral.apply(x, values, weight, bias, space, 1.5, fan_in_fan_out)

        assert torch.autograd.gradcheck(fn, (x, values, weight, bias))
    replace = lambda x, values: functions.ScatteredSpectral.apply(x, values, None, None, space, 1.0, False)  # noqa: E731
    assert torch.autograd.gradcheck(replace, (x, values))


def test_fused_function_keeps_float32_activations_and_bf16_outputs():
    space = _space(24, 18, 40)
    values = torch.randn(40)
    weight = torch.randn(24, 18)
    x = torch.randn(6, 18)
    expected = dispatch.run_path("dense", x.double(), values.double(), space, base_weight=weight.double(), bias=None, scaling=2.0)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        got = dispatch.run_path("spectral", x.to(dtype), values, space, base_weight=weight, bias=None, scaling=2.0)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def _peft_model(factory, target_modules, conv):
    config = SpectralConfig(
        mode="delta", layout="random", n_coefficients=40, init_weights=False, scaling=2.0, target_modules=target_modules,
        fan_in_fan_out=conv,
    )
    return get_peft_model(factory().double(), config)


@pytest.mark.parametrize(
    "factory,target_modules,conv,layers",
    [(make_llama, ["q_proj", "v_proj", "gate_proj", "down_proj"], False, 8), (make_gpt2, ["c_attn", "c_fc", "c_proj"], True, 8)],
)
def test_the_spectral_path_through_a_transformers_model_equals_the_dense_path(factory, target_modules, conv, layers):
    model = _peft_model(factory, target_modules, conv)
    model.train()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    results = {}
    for path in ("dense", "spectral"):
        copy_of_model = copy.deepcopy(model)
        assert hf_spectral.set_compute_path(copy_of_model, path) == layers
        out = copy_of_model(input_ids=ids, labels=ids)
        out.loss.backward()
        spectral = list(hf_spectral.spectral_layers(copy_of_model))
        assert {layer.last_compute_path for _, layer in spectral} == {path}
        grads = {name: layer.spectral_coefficients["default"].grad for name, layer in spectral}
        assert all(g is not None and g.abs().max() > 0 for g in grads.values())
        results[path] = (out.logits.detach(), grads)
    torch.testing.assert_close(results["spectral"][0], results["dense"][0], **TOLERANCE)
    for name, grad in results["dense"][1].items():
        torch.testing.assert_close(results["spectral"][1][name], grad, **TOLERANCE, msg=name)


@pytest.mark.parametrize("block", [None, (2, 5)])
def test_every_path_takes_an_empty_batch(block):
    space = CoefficientSpace(6, 8, "dct", 0, block=block) if block else _space(6, 8, 10)
    for path in dispatch.available_paths(space, "delta"):
        values = torch.randn(space.k, requires_grad=True)
        x = torch.zeros(2, 0, 8, requires_grad=True)
        y = dispatch.run_path(path, x, values, space, base_weight=torch.randn(6, 8), bias=torch.randn(6), scaling=2.0)
        y.sum().backward()
        assert y.shape == (2, 0, 6) and x.grad.shape == x.shape, path
        assert torch.equal(values.grad, torch.zeros(space.k)), path
