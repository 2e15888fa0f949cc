"""SpectralAdamW: Adam with its statistics in the weight basis, for every layout and basis."""

import copy
import math

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_gpt2
from torch import nn

import hf_spectral  # noqa: F401  (registers the method)
from hf_spectral import SpectralConfig, SpectralLayer, SpectralLinear
from hf_spectral.optim import (
    SpectralAdamW,
    create_optimizer,
    optimizer_state_elements,
    spectral_projectors,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: these tensors are tiny anyway

LAYOUTS = ["lowfreq", "triangle", "random"]
BASES = ["dct", "random_orthonormal"]


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 6)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def spectral_model(layout, basis, fraction, seed=0, init="project"):
    torch.manual_seed(seed)
    base = TwoLayers().double()
    dense = copy.deepcopy(base)
    config = SpectralConfig(
        mode="replace",
        layout=layout,
        basis=basis,
        coefficient_fraction=fraction,
        target_modules=["up", "down"],
        init_weights=init,
        seed=3,
    )
    return get_peft_model(base, config), dense


def layers(model):
    return [m for m in model.modules() if isinstance(m, SpectralLayer)]


def explicit_basis(layer):
    """K x mn matrix whose rows are the kept basis matrices, flattened: vec(W) = M^T S."""
    m, n = layer.out_features, layer.in_features
    eye = torch.eye(layer.spectral_coefficients["default"].numel(), dtype=torch.float64)
    rows = []
    for e in eye:
        coefficients = layer.spectral_coefficients["default"]
        with torch.no_grad():
            saved = coefficients.detach().clone()
            coefficients.copy_(e)
            rows.append(layer.rebuild("default").reshape(-1).clone())
            coefficients.copy_(saved)
    return torch.stack(rows).reshape(-1, m * n)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_projector_lift_is_the_layer_rebuild_and_restrict_inverts_it(layout, basis):
    model, _ = spectral_model(layout, basis, 0.3)
    projectors = spectral_projectors(model)
    assert len(projectors) == 2
    for layer in layers(model):
        param = layer.spectral_coefficients["default"]
        projector = projectors[param]
        values = torch.randn_like(param)
        with torch.no_grad():
            saved = param.detach().clone()
            param.copy_(values)
            rebuilt = layer.rebuild("default")
            param.copy_(saved)
        torch.testing.assert_close(projector.lift(values), rebuilt)
        torch.testing.assert_close(projector.restrict(projector.lift(values)), values)


def adam_reference(param0, grads, basis_rows, lr, betas, eps, wd, moments, shape):
    """Explicit-matrix reference of the update rule in the module docstring, in float64."""
    s = param0.clone()
    m1 = torch.zeros_like(s)
    m, n = shape
    v = torch.zeros(m * n, dtype=torch.float64)
    row, col = torch.zeros(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        s = s * (1 - lr * wd)
        m1 = betas[0] * m1 + (1 - betas[0]) * g
        lifted = basis_rows.T @ g
        if moments == "weight":
            v = betas[1] * v + (1 - betas[1]) * lifted**2
            second = v / (1 - betas[1] ** t)
        else:
            sq = (lifted**2).reshape(m, n)
            row = betas[1] * row + (1 - betas[1]) * sq.mean(1)
            col = betas[1] * col + (1 - betas[1]) * sq.mean(0)
            second = (torch.outer(row, col) / row.mean() / (1 - betas[1] ** t)).reshape(-1)
        direction = (basis_rows.T @ m1) / (1 - betas[0] ** t) / (second.sqrt() + eps)
        s = s - lr * (basis_rows @ direction)
    return s


@pytest.mark.parametrize("moments", ["weight", "factored"])
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_update_matches_an_explicit_reference(layout, basis, moments):
    model, _ = spectral_model(layout, basis, 0.3)
    layer = layers(model)[0]
    param = layer.spectral_coefficients["default"]
    rows = explicit_basis(layer)
    start = param.detach().clone()
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(param.shape, generator=generator, dtype=torch.float64) for _ in range(4)]
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    optimizer = SpectralAdamW([param], projectors=spectral_projectors(model), moments=moments, **settings)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    expected = adam_reference(
        start,
        grads,
        rows,
        settings["lr"],
        settings["betas"],
        settings["eps"],
        settings["weight_decay"],
        moments,
        (layer.out_features, layer.in_features),
    )
    torch.testing.assert_close(param.detach(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_all_coefficients_with_weight_moments_is_adamw_on_the_dense_model(layout, basis):
    """K = mn is an orthonormal change of basis: SpectralAdamW on S must be AdamW on W, step for step."""
    model, dense = spectral_model(layout, basis, 1.0)
    for layer, name in zip(layers(model), ["up", "down"], strict=True):
        torch.testing.assert_close(layer.rebuild("default"), getattr(dense, name).weight)
    optimizer = create_optimizer(model, lr=3e-2, betas=(0.9, 0.99), weight_decay=0.1)
    reference = torch.optim.AdamW(
        [
            {"params": [dense.up.weight, dense.down.weight], "weight_decay": 0.1},
            {"params": [dense.up.bias, dense.down.bias], "weight_decay": 0.0},
        ],
        lr=3e-2,
        betas=(0.9, 0.99),
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(16, 12, generator=generator, dtype=torch.float64)
        y = torch.randn(16, 6, generator=generator, dtype=torch.float64)
        for net, opt in ((model, optimizer), (dense, reference)):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
    for layer, name in zip(layers(model), ["up", "down"], strict=True):
        torch.testing.assert_close(layer.rebuild("default"), getattr(dense, name).weight, rtol=1e-8, atol=1e-10)


def test_coefficient_moments_are_plain_adamw():
    model, _ = spectral_model("random", "dct", 0.4)
    twin = copy.deepcopy(model)
    ours = create_optimizer(model, moments="coefficient", lr=1e-2, weight_decay=0.05)
    theirs = torch.optim.AdamW(
        [
            {
                "params": [p for n, p in twin.named_parameters() if p.requires_grad and "bias" not in n],
                "weight_decay": 0.05,
            },
            {"params": [p for n, p in twin.named_parameters() if p.requires_grad and "bias" in n], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    x = torch.randn(8, 12, dtype=torch.float64)
    for _ in range(3):
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_factored_memory_does_not_grow_with_m_times_n():
    model, _ = spectral_model("random", "dct", 0.25)
    sizes = {}
    for moments in ("weight", "factored", "coefficient"):
        optimizer = create_optimizer(model, moments=moments)
        model(torch.randn(4, 12, dtype=torch.float64)).sum().backward()
        optimizer.step()
        sizes[moments] = optimizer_state_elements(optimizer)
        model.zero_grad()
    k = sum(layer.spectral_coefficients["default"].numel() for layer in layers(model))
    biases = 20 + 6
    mn = 20 * 12 + 6 * 20
    m_plus_n = (20 + 12) + (6 + 20)
    assert sizes["coefficient"] == 2 * k + 2 * biases
    assert sizes["weight"] == k + mn + 2 * biases
    assert sizes["factored"] == k + m_plus_n + 2 * biases


@pytest.mark.parametrize("moments", ["weight", "factored"])
def test_state_dict_round_trip_resumes_exactly(moments):
    model, _ = spectral_model("lowfreq", "dct", 0.5)
    x = torch.randn(8, 12, dtype=torch.float64)

    def train(net, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()

    optimizer = create_optimizer(model, moments=moments, lr=1e-2)
    train(model, optimizer, 3)
    resumed_model = copy.deepcopy(model)
    resumed = create_optimizer(resumed_model, moments=moments, lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train(model, optimizer, 2)
    train(resumed_model, resumed, 2)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# one block, 16 dims, 11 tokens, and GPT2Config's own dropout of 0.1
ONE_BLOCK_GPT2 = dict(n_layer=1, n_embd=16, n_positions=8, vocab_size=11, dropout=0.1)


def test_create_optimizer_follows_trainer_weight_decay_rule_and_arguments():
    from transformers import TrainingArguments

    config = SpectralConfig(mode="replace", coefficient_fraction=0.5, layout="random")
    model = get_peft_model(make_gpt2(**ONE_BLOCK_GPT2), config)
    args = TrainingArguments(
        output_dir="unused",
        learning_rate=3e-3,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        weight_decay=0.1,
        report_to=[],
    )
    optimizer = create_optimizer(model, args, moments="factored")
    decayed, plain = optimizer.param_groups
    assert (decayed["lr"], decayed["betas"], decayed["eps"], decayed["weight_decay"]) == (3e-3, (0.8, 0.95), 1e-7, 0.1)
    assert plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bias" in names[id(p)] or ".ln_" in names[id(p)] for p in plain["params"])
    coefficients = set(spectral_projectors(model))
    assert len(coefficients) == 4  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; the tied head stays dense
    assert {id(p) for p in coefficients} <= {id(p) for p in decayed["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.slow  # runs the Trainer
def test_trains_under_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    config = SpectralConfig(mode="replace", coefficient_fraction=0.5, layout="triangle")
    model = get_peft_model(make_gpt2(**ONE_BLOCK_GPT2), config)
    data = [{"input_ids": torch.arange(8) % 11, "labels": torch.arange(8) % 11} for _ in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(create_optimizer(model, args), None))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.8


def test_bad_settings_say_what_to_do():
    param = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="moments='adam' is not one of"):
        SpectralAdamW([param], moments="adam")
    with pytest.raises(ValueError, match="betas"):
        SpectralAdamW([param], betas=(1.0, 0.9))


@pytest.mark.parametrize("m,n,k,mode,low", [(192, 192, 256, "delta", 3.0), (96, 192, 9216, "replace", 1.05)])
def test_few_coefficients_take_larger_steps_than_adamw_by_up_to_sqrt_mn_over_k(m, n, k, mode, low):
    """What the module doc tells users about picking a learning rate: with K << mn the weight-basis step is
    several times AdamW's (so the rate must come down); at K = mn/2 the two are close."""
    torch.manual_seed(0)
    config = SpectralConfig(mode=mode, layout="random", n_coefficients=k, init_weights=False if mode == "delta" else "random")
    layer = SpectralLinear(nn.Linear(n, m), "default", config, "layer", from_pretrained=False)
    if mode == "replace":
        layer.release_base_weight()
    coefficients = layer.spectral_coefficients["default"]
    start = coefficients.detach().clone()
    x = torch.randn(64, n)
    moves = {}
    for name, optimizer in (
        ("adamw", torch.optim.AdamW([coefficients], lr=1e-3, weight_decay=0.0)),
        ("weight", SpectralAdamW([coefficients], spectral_projectors(layer), lr=1e-3)),
    ):
        for _ in range(3):
            optimizer.zero_grad()
            layer(x).pow(2).mean().backward()
            optimizer.step()
        with torch.no_grad():
            moves[name] = (coefficients - start).norm().item()
            coefficients.copy_(start)
    ratio = moves["weight"] / moves["adamw"]
    assert low < ratio <= math.sqrt(m * n / k) * 1.01, ratio
