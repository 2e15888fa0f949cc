"""Batched maps over same-shape layers give exactly what the per-layer maps give (float64)."""

import pytest
import torch
from hf_spectral.coefficient_space import group_from_matrix, group_key, group_to_matrix, make_space
from peft import get_peft_model
from torch import nn

import hf_spectral
from hf_spectral import SpectralConfig, rebuild_groups
from hf_spectral.optim import SpectralAdamW, spectral_projectors


def _spaces(layout, basis, count=3, m=24, n=40, k=300):
    spaces = []
    for seed in range(count):
        weight = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        spaces.append(make_space(m, n, k, layout=layout, basis=basis, seed=0 if basis != "dct" else seed, weight=weight))
    return spaces


@pytest.mark.parametrize("basis, method", [("dct", "fft"), ("dct", "matmul"), ("random_orthonormal", "matmul")])
@pytest.mark.parametrize("layout", ["lowfreq", "random", "energy"])
def test_group_maps_equal_the_per_space_maps(layout, basis, method):
    spaces = _spaces(layout, basis)
    assert len({group_key(space, method) for space in spaces}) == 1
    generator = torch.Generator().manual_seed(1)
    values = [torch.randn(space.k, dtype=torch.float64, generator=generator) for space in spaces]
    batched = group_to_matrix(spaces, values, method)
    assert batched.shape == (3, 24, 40)
    for space, v, w in zip(spaces, values, batched, strict=True):
        torch.testing.assert_close(w, space.to_matrix(v, method), rtol=0, atol=1e-12)
    matrices = torch.randn(3, 24, 40, dtype=torch.float64, generator=generator)
    for space, c, w in zip(spaces, group_from_matrix(spaces, matrices, method), matrices, strict=True):
        torch.testing.assert_close(c, space.from_matrix(w, method), rtol=0, atol=1e-12)


def test_spaces_that_cannot_share_a_map_have_different_keys():
    a = make_space(24, 40, 300, layout="lowfreq")
    assert group_key(a, "fft") != group_key(make_space(24, 40, 100, layout="lowfreq"), "fft")  # another block
    assert group_key(a, "fft") != group_key(make_space(40, 24, 300, layout="lowfreq"), "fft")  # another shape
    assert group_key(a, "fft") != group_key(a, "matmul")
    random_a = make_space(24, 40, 300, layout="random", basis="random_orthonormal", seed=0)
    random_b = make_space(24, 40, 300, layout="random", basis="random_orthonormal", seed=1)
    assert group_key(random_a, "matmul") != group_key(random_b, "matmul")  # another basis


def _reference_step(param, grad, state, projector, lr, betas, eps, wd, moments):
    """SpectralAdamW's step for one tensor, from the formulas of its module doc."""
    beta1, beta2 = betas
    state["step"] += 1
    t = state["step"]
    param.mul_(1 - lr * wd)
    state["m"] = beta1 * state["m"] + (1 - beta1) * grad
    lifted = projector.lift(grad)
    if moments == "weight":
        state["v"] = beta2 * state["v"] + (1 - beta2) * lifted * lifted
        second = state["v"] / (1 - beta2**t)
    else:
        squared = lifted * lifted
        state["r"] = beta2 * state["r"] + (1 - beta2) * squared.mean(1)
        state["c"] = beta2 * state["c"] + (1 - beta2) * squared.mean(0)
        second = torch.outer(state["r"], state["c"]) / (state["r"].mean() * (1 - beta2**t))
    direction = projector.lift(state["m"] / (1 - beta1**t)) / (second.sqrt() + eps)
    param.sub_(lr * projector.restrict(direction))


@pytest.mark.parametrize("moments", ["weight", "factored"])
@pytest.mark.parametrize("layout", ["lowfreq", "random"])
def test_batched_spectral_adamw_equals_the_step_of_each_layer(layout, moments):
    torch.manual_seed(0)
    # three 32 x 32 layers share a batched step; the 16 x 32 one steps alone
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Linear(32, 16))
    model = get_peft_model(model.double(), SpectralConfig(
        mode="replace", coefficient_fraction=0.4, layout=layout, target_modules=["0", "2", "4", "5"]
    ))
    projectors = spectral_projectors(model)
    params = [p for p in model.parameters() if p.requires_grad]
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    optimizer = SpectralAdamW(params, projectors=projectors, moments=moments, **settings)
    reference = {p: p.detach().clone() for p in params}
    states = {}
    x = torch.randn(8, 32, dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        grads = {p: p.grad.detach().clone() for p in params}
        optimizer.step()
        for p in params:
            projector = projectors.get(p)
            if projector is None:  # plain AdamW (the biases)
                continue
            state = states.setdefault(p, {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros(projector.m, projector.n,
                                      dtype=p.dtype), "r": torch.zeros(projector.m, dtype=p.dtype),
                                      "c": torch.zeros(projector.n, dtype=p.dtype)})
            _reference_step(reference[p], grads[p], state, projector, settings["lr"], settings["betas"],
                            settings["eps"], settings["weight_decay"], moments)
            with torch.no_grad():
                p.copy_(reference[p])  # the next gradient is taken at the reference point, so errors cannot pile up
    for p in projectors:
        torch.testing.assert_close(p.detach(), reference[p], rtol=0, atol=1e-12)


def test_plain_adamw_part_equals_torch_adamw():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3, dtype=torch.float64)), nn.Parameter(torch.randn(7, dtype=torch.float64))]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    ours = SpectralAdamW(params, lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(3):
        for group in (params, twins):
            for i, p in enumerate(group):
                p.grad = torch.full_like(p, float(step + i + 1)).sin()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


# -- batched rebuilds in a training forward (hf_spectral/compute/rebuild_groups.py) --------------------------------


def _stack(mode, layout, path, fan_in_fan_out=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 48), nn.Linear(48, 24))
    config = dict(mode="replace", coefficient_fraction=0.5) if mode == "replace" else dict(n_coefficients=300)
    model = get_peft_model(model.double(), SpectralConfig(layout=layout, target_modules=["0", "2", "4", "5"], **config))
    if mode == "delta":  # a non-zero update, so that a wrong weight shows
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
    hf_spectral.set_compute_path(model, path)
    return model


def _spy_prebuilt(model, monkeypatch):
    """Counts the layers of ``model`` whose forward used a weight built ahead."""
    used = []
    layers = {id(layer) for _, layer in hf_spectral.spectral_layers(model)}
    take = rebuild_groups.take

    def spy(layer, *args, **kwargs):
        grouped = layer in rebuild_groups._waiting
        weight = take(layer, *args, **kwargs)
        if id(layer) in layers and grouped and kwargs.get("needs_weight", True):
            used.append(weight is not None)
        return weight

    monkeypatch.setattr(rebuild_groups, "take", spy)
    return used


def _nothing_waits(model):
    """No layer of ``model`` waits on a group, and no group holds a weight for it, after a forward."""
    return all(layer not in rebuild_groups._waiting for _, layer in hf_spectral.spectral_layers(model))


@pytest.mark.parametrize("path", ["dense", "sampled"])
@pytest.mark.parametrize("mode, layout", [("delta", "random"), ("delta", "lowfreq"), ("replace", "lowfreq"), ("replace", "random")])
def test_batched_rebuild_gives_the_outputs_and_gradients_of_the_per_layer_rebuild(mode, layout, path, monkeypatch):
    batched, single = _stack(mode, layout, path), _stack(mode, layout, path)
    used = _spy_prebuilt(batched, monkeypatch)
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    outputs = {}
    for name, model in (("batched", batched), ("single", single)):
        if name == "single":
            monkeypatch.setattr(rebuild_groups, "plan", lambda layers: [])
        model.train()
        out = model(x)
        out.square().sum().backward()
        outputs[name] = (out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert used == [True, True, True]  # three 48 x 48 layers built together; the 24 x 48 one (alone) built its own
    torch.testing.assert_close(outputs["batched"][0], outputs["single"][0], rtol=0, atol=1e-12)
    for name, grad in outputs["single"][1].items():
        torch.testing.assert_close(outputs["batched"][1][name], grad, rtol=0, atol=1e-12)
    assert _nothing_waits(batched)


def test_no_batched_rebuild_where_it_would_not_be_used(monkeypatch):
    model = _stack("delta", "random", "dense")
    calls = []
    real = rebuild_groups.plan
    monkeypatch.setattr(rebuild_groups, "plan", lambda layers: calls.append(1) or real(layers))
    x = torch.randn(4, 48, dtype=torch.float64)
    model.eval()
    model(x)  # evaluation: the weight cache
    model.train()
    with torch.no_grad():
        model(x)
    assert calls == []
    hf_spectral.set_compute_path(model, "spectral")  # never builds the weight: asked, but nothing to build
    model(x).sum().backward()
    assert calls == [1] and _nothing_waits(model)
    assert rebuild_groups.prebuild(layer for _, layer in hf_spectral.spectral_layers(model)) == []


def test_a_group_is_built_only_when_its_first_layer_takes_a_path_that_reads_the_weight(monkeypatch):
    """The path is chosen per forward (here: long inputs dense, short ones spectral, as the cost model can go):
    a short step after a long one builds nothing, a long one after a short one builds the group."""
    from hf_spectral.compute import cost_model

    monkeypatch.setattr(cost_model, "choose_path", lambda space, mode, tokens, *a, **k: "dense" if tokens >= 16 else "spectral")
    builds = []
    real_build = rebuild_groups.Group.build
    monkeypatch.setattr(rebuild_groups.Group, "build", lambda self: builds.append(len(self.waiting())) or real_build(self))
    batched, single = _stack("delta", "random", "auto"), _stack("delta", "random", "auto")
    for hook in single.base_model._rebuild_hooks:  # the reference: every layer rebuilds its own weight
        hook.remove()
    for tokens, expected in ((32, [3]), (4, []), (4, []), (32, [3])):
        builds.clear()
        x = torch.randn(tokens, 48, dtype=torch.float64)
        results = []
        for model in (batched, single):
            model.train()
            out = model(x)
            out.square().sum().backward()
            results.append([out] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
            model.zero_grad()
        assert builds == expected, tokens
        paths = [layer.last_compute_path for _, layer in hf_spectral.spectral_layers(batched)]
        assert paths == ["dense" if tokens >= 16 else "spectral"] * 4
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert _nothing_waits(batched)


def test_a_weight_built_ahead_is_not_used_once_its_coefficients_changed():
    model = _stack("delta", "random", "sampled")
    layers = [layer for _, layer in hf_spectral.spectral_layers(model)]
    model.train()
    assert len(rebuild_groups.prebuild(layers)) == 3
    with torch.no_grad():
        layers[0].spectral_coefficients["default"].mul_(2.0)  # after the batched rebuild, before the forward
    x = torch.randn(4, 48, dtype=torch.float64)
    out = layers[0](x)
    hf_spectral.set_compute_path(model, "spectral")
    torch.testing.assert_close(out, layers[0](x), rtol=0, atol=1e-12)


def test_a_deep_copy_rebuilds_its_own_layers_and_unloading_removes_the_hooks(monkeypatch):
    import copy

    model = _stack("delta", "random", "sampled")
    twin = copy.deepcopy(model)
    used = _spy_prebuilt(twin, monkeypatch)
    x = torch.randn(4, 48, dtype=torch.float64)
    twin.train()
    twin(x).sum().backward()
    assert used == [True, True, True]
    plain = model.merge_and_unload()
    assert not plain._forward_pre_hooks and not plain._forward_hooks
