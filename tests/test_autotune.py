"""``auto`` takes the cost model's path, decided before the forward and the same in every process; measured paths
come only from the explicit step ``tune_compute_paths`` (hf_spectral/compute/autotune.py)."""

import json
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_llama
from torch import nn

import hf_spectral
from hf_spectral import SpectralConfig, set_compute_path
from hf_spectral.compute import autotune, cost_model


@pytest.fixture
def fake_timer(monkeypatch):
    """Replaces the timing by fixed times, the last candidate fastest; counts the timings."""
    calls = []

    def fake(candidates, *args, **kwargs):
        calls.append(list(candidates))
        return {path: float(len(candidates) - i) for i, path in enumerate(candidates)}

    monkeypatch.setattr(autotune, "_time_paths", fake)
    return calls


def _stack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16))
    return get_peft_model(model, SpectralConfig(n_coefficients=100, layout="random", target_modules=["0", "1", "2"]))


def _train_step(model, tokens):
    x = torch.randn(tokens, 32, requires_grad=True)  # so the first layer, too, computes an input gradient
    model(x).sum().backward()
    return [layer.last_compute_path for _, layer in hf_spectral.spectral_layers(model)]


def test_without_tuning_auto_takes_the_cost_models_path_and_times_nothing(fake_timer):
    model = _stack()
    paths = _train_step(model, 256)
    for (_, layer), path in zip(hf_spectral.spectral_layers(model), paths, strict=True):
        expected = cost_model.choose_path(layer.coefficient_space("default"), "delta", 256, "cpu",
                                          coefficient_grad=True, input_grad=True)
        assert path == expected
    assert fake_timer == []
    assert set(hf_spectral.describe_compute_paths(model, 256).values()) == {f"{p} (cost model)" for p in paths}


def test_tuning_is_an_explicit_step_whose_paths_the_layers_keep_and_show(fake_timer):
    model = _stack()
    found = hf_spectral.tune_compute_paths(model, [256, 1000])
    assert len(fake_timer) == 4  # (32 x 32, 16 x 32) x (256, 1024 tokens): same-shape layers share one measurement
    fastest = {256: fake_timer[0][-1]}
    assert found["base_model.model.0"] == found["base_model.model.1"] and set(found["base_model.model.0"]) == {256, 1024}
    assert found["base_model.model.0"][256] == fastest[256]
    assert _train_step(model, 256)[:2] == [fastest[256]] * 2  # the forward reads what tuning stored
    assert _train_step(model, 260)[:2] == [fastest[256]] * 2  # same token bucket
    assert len(fake_timer) == 4  # and times nothing itself
    table = hf_spectral.describe_compute_paths(model, 256)
    assert table["base_model.model.0"] == f"{fastest[256]} (tuned)"
    set_compute_path(model, "dense")
    assert table != hf_spectral.describe_compute_paths(model, 256)
    assert set(hf_spectral.describe_compute_paths(model, 256).values()) == {"dense (forced)"}


def test_measuring_takes_the_fastest_timed_candidate(fake_timer):
    model = _stack()
    layer = next(layer for _, layer in hf_spectral.spectral_layers(model))
    space = layer.coefficient_space("default")
    path = autotune.measure(space, "replace", 256, torch.device("cpu"), torch.float32, coefficient_grad=True, input_grad=True)
    assert path == fake_timer[0][-1] and len(fake_timer[0]) > 1
    assert set(fake_timer[0]) <= set(hf_spectral.compute.available_paths(space, "replace")) - {"separate"}


def test_set_path_tuning_true_says_what_replaced_it():
    hf_spectral.set_path_tuning(False)  # the cost model: what auto does anyway
    with pytest.raises(ValueError, match="tune_compute_paths"):
        hf_spectral.set_path_tuning(True)


def test_a_first_training_step_writes_nothing_to_disk_and_times_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("HF_SPECTRAL_CACHE", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(autotune, "_time_paths", lambda *a, **k: pytest.fail("a training step timed paths"))
    model = get_peft_model(make_llama(), SpectralConfig(n_coefficients=64, layout="random"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert list(cache.iterdir()) == []


_PATHS_OF_A_FRESH_PROCESS = """
import json, torch
from peft import get_peft_model
import hf_spectral
from tiny_models import make_llama
model = get_peft_model(make_llama(), hf_spectral.SpectralConfig(n_coefficients=64, layout="random"))
model.train()
for tokens in (8, 512):
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    model(input_ids=ids, labels=ids).loss.backward()
    print(json.dumps([layer.last_compute_path for _, layer in hf_spectral.spectral_layers(model)]))
"""


@pytest.mark.slow
def test_two_fresh_processes_take_the_same_paths(tmp_path):
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.getcwd()])}
    runs = [
        subprocess.run([sys.executable, "-c", _PATHS_OF_A_FRESH_PROCESS], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
        for _ in range(2)
    ]
    paths = [[json.loads(line) for line in run.splitlines() if line.startswith("[")] for run in runs]
    assert len(paths[0]) == 2 and paths[0] == paths[1]
