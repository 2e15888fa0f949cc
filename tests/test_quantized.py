"""Spectral delta adapters on quantized bases, quantized for real on CPU: bitsandbytes 8-bit and 4-bit (nf4)
through transformers' ``BitsAndBytesConfig``, torchao int8 weight-only through ``TorchAoConfig`` (and through
``torchao.quantize_``, which gives no requantization config), and HQQ 4-bit (``HQQLinear`` put in the way
``hqq``'s own patching does: transformers 5.24 cannot load HQQ yet).

What would break if the feature broke: the layer must compute ``base_layer(x) + s * x dW^T`` with the
quantized layer's own kernel (the bug: bnb's int8 weight read as a float weight, or its packed 4-bit
weight as an m x n matrix), train, save and load, and merge through the backend's requantization.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hf_spectral.model import set_compute_path, spectral_layers
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_spectral import SpectralConfig

bnb = pytest.importorskip("bitsandbytes", reason="the quantized-base tests need bitsandbytes (in a checkout: pip install -c constraints.txt -e '.[quantization]')")

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
KINDS = ["bnb8", "bnb4", "torchao", "hqq"]
QUANTIZED_TYPES = {"bnb8": "Linear8bitLt", "bnb4": "Linear4bit", "torchao": "Linear", "hqq": "HQQLinear"}


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # an install that does not import (a torch mismatch) counts as missing
        return False


def _skip_unless_installed(kind: str) -> None:
    if kind.startswith("torchao") and not _have("torchao"):
        pytest.skip("torchao is not installed (pip install torchao), or does not import with this torch")
    if kind == "hqq" and not _have("hqq.core.quantize"):
        pytest.skip("hqq is not installed (pip install hqq)")


@pytest.fixture(autouse=True)
def _quiet_quantization_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        warnings.filterwarnings("ignore", message=".*requantizes its weight.*")
        warnings.filterwarnings("ignore", message=".*Merge lora module.*")
        yield


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    # 64 wide: every weight is a whole number of bitsandbytes' and HQQ's 64-entry quantization blocks
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_quantized(kind: str, path) -> nn.Module:
    """The saved tiny Llama, its block linears quantized for real by ``kind``."""
    _skip_unless_installed(kind)
    from transformers import BitsAndBytesConfig, TorchAoConfig

    quantization = None
    if kind == "bnb8":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    elif kind == "bnb4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    elif kind == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig

        quantization = TorchAoConfig(Int8WeightOnlyConfig())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)
    if kind == "torchao_quantize_":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model.model.layers, Int8WeightOnlyConfig())
    if kind == "hqq":
        from hqq.core.quantize import HQQLinear

        config = hqq_config()
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, HQQLinear(child, config, compute_dtype=torch.float32, device="cpu"))
    return model.eval()


def hqq_config() -> dict:
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=4, group_size=64)


def tokens(seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def quantized_bytes(model) -> dict[str, torch.Tensor]:
    """Every stored tensor of the quantized base layers, to check that training leaves them alone."""
    out = {}
    for name, layer in spectral_layers(model):
        base = layer.get_base_layer()
        for key, tensor in list(base.state_dict().items()):
            if hasattr(tensor, "__tensor_flatten__"):  # a torchao tensor subclass: its plain inner tensors
                inner, _ = tensor.__tensor_flatten__()
                for part in inner:
                    out[f"{name}.{key}.{part}"] = getattr(tensor, part).detach().clone()
            elif isinstance(tensor, torch.Tensor):
                out[f"{name}.{key}"] = tensor.detach().clone()
    return out


# --------------------------------------------------------------------------------------------------
# the forward


@pytest.mark.parametrize("kind", KINDS)
def test_an_identity_adapter_leaves_the_quantized_model_unchanged(saved_llama, kind):
    # the reported bug: on bnb 8-bit the loss went from 3.89 to 8.50 (raw int8 weight, no scale); 4-bit raised
    base = load_quantized(kind, saved_llama)
    ids = tokens()
    expected = logits(base, ids)
    model = get_peft_model(load_quantized(kind, saved_llama), SpectralConfig(n_coefficients=200, target_modules=TARGETS))
    layers = dict(spectral_layers(model))
    assert len(layers) == 2 * len(TARGETS)
    assert all(type(layer.get_base_layer()).__name__ == QUANTIZED_TYPES[kind] for layer in layers.values())
    assert all(layer.quantization_backend is not None for layer in layers.values())
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    model.train()  # the training-mode forward, with gradients
    base.train()
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.logits.detach(), logits(base, ids), rtol=0, atol=1e-5)
    out.loss.backward()
    assert all(layer.spectral_coefficients["default"].grad is not None for layer in layers.values())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "layout, path",
    [("random", "auto"), ("random", "dense"), ("random", "sampled"), ("random", "spectral"), ("lowfreq", "factored"),
     ("energy", "auto")],
)
def test_the_layer_computes_the_quantized_forward_plus_the_spectral_update(saved_llama, kind, layout, path):
    torch.manual_seed(1)
    config = SpectralConfig(n_coefficients=300, layout=layout, init_weights=False, scaling=2.0, target_modules=TARGETS)
    model = get_peft_model(load_quantized(kind, saved_llama), config)
    set_compute_path(model, path)
    x = torch.randn(2, 7, 64, requires_grad=True)
    for name, layer in spectral_layers(model):
        if layer.in_features != 64:
            continue
        layer.train()
        expected = layer.base_layer(x) + F.linear(x, layer.get_delta_weight("default"))
        got = layer(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)
        if path != "auto":
            assert layer.last_compute_path == path
        # the coefficients' gradient is the adjoint of the update's: compare with autograd through the rebuild
        g = torch.randn_like(got)
        (grad,) = torch.autograd.grad(got, layer.spectral_coefficients["default"], g)
        reference = layer.spectral_coefficients["default"].detach().clone().requires_grad_(True)
        delta = layer.coefficient_space("default").to_matrix(reference, "matmul") * 2.0
        (expected_grad,) = torch.autograd.grad(F.linear(x.detach(), delta), reference, g)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5, msg=name)
        layer.eval()
        with torch.no_grad():
            expected = layer.base_layer(x) + F.linear(x, layer.get_delta_weight("default"))
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5, msg=name)


def test_two_active_adapters_add_their_updates(saved_llama):
    model = get_peft_model(
        load_quantized("bnb4", saved_llama), SpectralConfig(n_coefficients=100, init_weights=False, target_modules=["q_proj"])
    )
    model.add_adapter("other", SpectralConfig(n_coefficients=150, init_weights=False, seed=3, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        for name, layer in spectral_layers(model):
            delta = layer.get_delta_weight("default") + layer.get_delta_weight("other")
            torch.testing.assert_close(layer(x), layer.base_layer(x) + F.linear(x, delta), rtol=1e-4, atol=1e-5, msg=name)


def test_energy_layout_ranks_the_dequantized_weight(saved_llama):
    # the index set of a data-dependent layout comes from the backend's dequantized W0, not the raw int8 bytes
    from hf_spectral.coefficient_space import make_space

    model = get_peft_model(
        load_quantized("bnb8", saved_llama), SpectralConfig(n_coefficients=100, layout="energy", target_modules=["q_proj"])
    )
    for _, layer in spectral_layers(model):
        dequantized = layer.quantization_backend.get_base_weight(layer.get_base_layer()).float()
        expected = make_space(64, 64, 100, layout="energy", weight=dequantized).indices
        assert torch.equal(layer.spectral_indices["default"].cpu(), expected.cpu())


def test_evaluation_keeps_no_dequantized_weight(saved_llama):
    model = get_peft_model(
        load_quantized("bnb4", saved_llama), SpectralConfig(n_coefficients=200, init_weights=False, target_modules=TARGETS)
    )
    model.eval()
    logits(model, tokens())
    for _, layer in spectral_layers(model):
        assert layer._weight_cache is None
        assert layer.last_compute_path != "cached"
        assert layer.get_base_layer().weight.dtype == torch.uint8  # still packed 4-bit


@pytest.mark.parametrize("kind", ["bnb8", "bnb4"])
def test_disabling_the_adapter_gives_the_quantized_base(saved_llama, kind):
    ids = tokens()
    expected = logits(load_quantized(kind, saved_llama), ids)
    model = get_peft_model(
        load_quantized(kind, saved_llama), SpectralConfig(n_coefficients=200, init_weights=False, target_modules=TARGETS)
    )
    assert (logits(model, ids) - expected).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# training, saving, loading


@pytest.mark.parametrize("kind", ["bnb8", "bnb4", "torchao", "hqq"])
def test_train_save_load(saved_llama, kind, tmp_path):
    layout = "energy" if kind == "bnb4" else "random"  # a saved data-dependent index set, on one backend
    model = get_peft_model(
        load_quantized(kind, saved_llama), SpectralConfig(n_coefficients=200, layout=layout, target_modules=TARGETS)
    )
    before = quantized_bytes(model)
    ids = tokens(1, batch=4, length=32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    after = quantized_bytes(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "training changed a quantized base tensor"

    model.eval()
    ids = tokens(2)
    trained = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_quantized(kind, saved_llama), tmp_path / "adapter")
    assert all(layer.quantization_backend is not None for _, layer in spectral_layers(loaded))
    torch.testing.assert_close(logits(loaded, ids), trained, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# merging


def requantization_bound(kind: str, base_layer: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """The largest error, per entry, of one requantization of ``target`` in the format of ``base_layer``.

    Taken from the quantizer's own format, not from a measured output: round-to-nearest on a grid scaled by
    an absmax (bitsandbytes nf4: half the widest gap of its 16-level code times the absmax of each block;
    int8 row-wise (bitsandbytes) or channel-wise (torchao): half a step of absmax / 127; bitsandbytes rounds the
    weight to float16 before its int8 quantization, which adds float16's rounding). HQQ fits a scale
    and zero point per group by optimisation, so it has no closed-form bound: the bound is the error of HQQ
    quantizing ``target`` afresh with the same settings (a merge may not be worse than that).
    """
    target = target.detach().to(torch.float32)
    slack = 1e-6 + 1e-5 * target.abs().max()  # float32 arithmetic in the dequantization
    if kind == "bnb4":
        state = base_layer.weight.quant_state
        gap = torch.diff(state.code.to(torch.float32).sort().values).max()
        blocks = target.reshape(-1, state.blocksize)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        # bitsandbytes' CPU path keeps the absmax in bfloat16 once a layer has run (functional.py,
        # _convert_weight_packed_for_cpu): the scale then carries bfloat16's rounding too (2**-9, doubled)
        bound = absmax * gap / 2 + absmax * 2.0**-8
        return bound.expand_as(blocks).reshape(target.shape) + slack
    if kind == "bnb8":  # Int8Params._quantize casts to float16 first: its rounding of the entry and of the absmax
        return target.abs().amax(dim=1, keepdim=True) / 127 / 2 + target.abs() * 2.0**-10 + slack
    if kind == "torchao":
        return target.abs().amax(dim=1, keepdim=True) / 127 / 2 + slack
    if kind == "hqq":
        from hqq.core.quantize import HQQLinear

        linear = nn.Linear(target.shape[1], target.shape[0], bias=False)
        linear.weight.data.copy_(target)
        fresh = HQQLinear(linear, hqq_config(), compute_dtype=torch.float32, device="cpu")
        return (fresh.dequantize().to(torch.float32) - target).abs().max() * 1.01 + slack
    raise AssertionError(kind)


def dequantized(layer) -> torch.Tensor:
    return layer.quantization_backend.get_base_weight(layer.get_base_layer()).detach().to(torch.float32).clone()


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_requantizes_the_merged_weight(saved_llama, kind):
    ids = tokens()
    base = logits(load_quantized(kind, saved_llama), ids)
    torch.manual_seed(2)
    config = SpectralConfig(n_coefficients=1000, init_weights=False, target_modules=TARGETS)
    model = get_peft_model(load_quantized(kind, saved_llama), config)
    with torch.no_grad():  # a delta as large as W0, so that a merge that dropped or doubled it shows
        for _, layer in spectral_layers(model):
            layer.spectral_coefficients["default"].mul_(8.0)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the output
    layers = dict(spectral_layers(model))
    before = {name: dequantized(layer) for name, layer in layers.items()}
    deltas = {name: layer.get_delta_weight("default").detach().to(torch.float32) for name, layer in layers.items()}

    # merge, unmerge, merge again: each a dequantize -> add -> requantize, each within one rounding of its input
    model.base_model.merge_adapter()
    for name, layer in layers.items():
        assert type(layer.get_base_layer()).__name__ == QUANTIZED_TYPES[kind]
        target = before[name] + deltas[name]
        error = (dequantized(layer) - target).abs()
        bound = requantization_bound(kind, layer.get_base_layer(), target)
        assert (error <= bound).all(), (name, float((error / bound).max()))
    merged_weights = {name: dequantized(layer) for name, layer in layers.items()}
    model.base_model.unmerge_adapter()
    for name, layer in layers.items():
        target = merged_weights[name] - deltas[name]
        error = (dequantized(layer) - target).abs()
        bound = requantization_bound(kind, layer.get_base_layer(), target)
        assert (error <= bound).all(), (name, float((error / bound).max()))

    # the whole model: the merged one is nearer the adapted model than the base (an adapter dropped would not be)
    merged = model.merge_and_unload()
    assert not list(spectral_layers(merged))
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == QUANTIZED_TYPES[kind]
    if kind == "bnb8":
        assert q_proj.weight.dtype == torch.int8
    elif kind == "bnb4":
        assert q_proj.weight.dtype == torch.uint8
    elif kind == "torchao":
        from torchao.utils import TorchAOBaseTensor

        assert isinstance(q_proj.weight, TorchAOBaseTensor)
    out = logits(merged, ids)
    assert (out - adapted).abs().max() < (out - base).abs().max()


def test_safe_merge_refuses_a_broken_adapter_and_leaves_the_base(saved_llama):
    model = get_peft_model(load_quantized("bnb8", saved_llama), SpectralConfig(n_coefficients=100, target_modules=["q_proj"]))
    before = quantized_bytes(model)
    layer = next(layer for _, layer in spectral_layers(model))
    with torch.no_grad():
        layer.spectral_coefficients["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert all(torch.equal(before[k], v) for k, v in quantized_bytes(model).items())


def test_merge_without_a_requantization_config_is_a_clear_error(saved_llama):
    # torchao.quantize_ on the model (no TorchAoConfig): forward and training work, merging cannot requantize
    ids = tokens()
    base = load_quantized("torchao_quantize_", saved_llama)
    expected = logits(base, ids)
    model = get_peft_model(base, SpectralConfig(n_coefficients=100, target_modules=TARGETS))
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="TorchAoConfig"):
        model.merge_and_unload()


# --------------------------------------------------------------------------------------------------
# what is refused


@pytest.mark.parametrize("kind", ["bnb8", "bnb4"])
def test_replace_mode_on_a_quantized_base_is_refused_and_the_model_left_unchanged(saved_llama, kind):
    model = load_quantized(kind, saved_llama)
    ids = tokens()
    expected = logits(model, ids)
    with pytest.raises(ValueError, match="Replace mode cannot wrap .*quantized.*mode='delta'"):
        get_peft_model(model, SpectralConfig(mode="replace", coefficient_fraction=0.5, target_modules=TARGETS))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == QUANTIZED_TYPES[kind]
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)


def test_an_unsupported_module_is_still_named(saved_llama):
    with pytest.raises(TypeError, match="model.norm.*RMSNorm.*exclude_modules"):
        get_peft_model(load_quantized("bnb8", saved_llama), SpectralConfig(n_coefficients=10, target_modules=["norm"]))


def test_the_base_layer_is_never_read_as_a_float_weight():
    # the root of the bug: bitsandbytes' layers subclass nn.Linear; their weight is int8 (8-bit) or packed uint8
    # (4-bit), which a float path would read as W0. The layer must route them through the quantized forward.
    from hf_spectral import quantized

    lin8 = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False)
    lin8.load_state_dict(nn.Linear(64, 32).state_dict())
    lin8 = lin8.to("cpu")
    lin4 = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    lin4.load_state_dict(nn.Linear(64, 32).state_dict())
    lin4 = lin4.to("cpu")
    assert isinstance(lin8, nn.Linear) and isinstance(lin4, nn.Linear)
    assert quantized.resolve_backend(lin8).backend_name == "bnb 8bit"
    assert quantized.resolve_backend(lin4).backend_name == "bnb 4bit"
    assert quantized.resolve_backend(nn.Linear(4, 4)) is None
    model = nn.Sequential()
    model.add_module("a", copy.deepcopy(lin8))
    model.add_module("b", nn.ReLU())
    model.add_module("c", nn.Linear(32, 64))
    peft_model = get_peft_model(model, SpectralConfig(n_coefficients=50, target_modules=["a", "c"]))
    layers = dict(spectral_layers(peft_model))
    assert layers["base_model.model.a"].quantization_backend is not None
    assert layers["base_model.model.c"].quantization_backend is None
    x = torch.randn(3, 64)
    torch.testing.assert_close(peft_model(x), model.c.base_layer(torch.relu(lin8(x))), rtol=0, atol=1e-5)
