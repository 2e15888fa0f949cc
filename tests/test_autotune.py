"""``auto`` takes the compute path measured fastest on this machine (hf_spectral/compute/autotune.py)."""

import json
import time

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hf_spectral
from hf_spectral import SpectralConfig, set_compute_path
from hf_spectral.compute import autotune, cost_model
from hf_spectral.coefficient_space import CoefficientSpace


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SPECTRAL_CACHE", str(tmp_path))
    autotune.clear_memory_cache()
    autotune.set_path_tuning(True)
    yield tmp_path
    autotune.set_path_tuning(None)
    autotune.clear_memory_cache()


@pytest.fixture
def fake_timer(monkeypatch):
    """Replaces the timing by fixed times, the last candidate fastest; counts the timings."""
    calls = []

    def fake(candidates, *args, **kwargs):
        calls.append(list(candidates))
        return {path: float(len(candidates) - i) for i, path in enumerate(candidates)}

    monkeypatch.setattr(autotune, "_time_paths", fake)
    return calls


def _space():
    return CoefficientSpace(64, 48, indices=torch.arange(0, 64 * 48, 7))


def _choose(space, tokens=256, **kwargs):
    kwargs = {"coefficient_grad": True, "input_grad": True, **kwargs}
    return autotune.choose(space, "replace", tokens, torch.device("cpu"), torch.float32, **kwargs)


def test_the_fastest_measured_path_is_taken_timed_once_and_kept_on_disk(fresh_cache, fake_timer):
    space = _space()
    path = _choose(space)
    assert len(fake_timer) == 1 and len(fake_timer[0]) > 1
    assert path == fake_timer[0][-1]  # the fastest of the fake times
    assert _choose(space) == path and _choose(_space(), tokens=260) == path  # same shape, same token bucket
    assert len(fake_timer) == 1
    saved = json.loads((fresh_cache / "compute_paths.json").read_text())
    assert saved["version"] == autotune.CACHE_VERSION
    (key, value), = saved["paths"].items()
    assert value == path and f"threads {torch.get_num_threads()}" in key and "64x48" in key and "T256" in key

    autotune.clear_memory_cache()  # a new process on the same machine: read from disk, no timing
    assert _choose(space) == path and len(fake_timer) == 1

    _choose(space, tokens=1024)  # another token bucket, another measurement
    assert len(fake_timer) == 2


def test_a_different_thread_count_is_measured_again(fresh_cache, fake_timer):
    threads = torch.get_num_threads()
    _choose(_space())
    try:
        torch.set_num_threads(threads + 1)
        _choose(_space())
    finally:
        torch.set_num_threads(threads)
    assert len(fake_timer) == 2
    keys = json.loads((fresh_cache / "compute_paths.json").read_text())["paths"]
    assert {f"threads {threads}", f"threads {threads + 1}"} == {k.split("|")[2] for k in keys}


def test_without_tuning_the_cost_model_decides(fresh_cache, fake_timer, monkeypatch):
    space = _space()
    expected = cost_model.choose_path(space, "replace", 256, "cpu", coefficient_grad=True, input_grad=True)
    autotune.set_path_tuning(None)
    monkeypatch.setenv("HF_SPECTRAL_AUTOTUNE", "0")
    assert _choose(space) == expected
    hf_spectral.set_path_tuning(False)
    monkeypatch.setenv("HF_SPECTRAL_AUTOTUNE", "1")
    assert _choose(space) == expected
    assert _choose(space, compiling=True) == cost_model.choose_path(
        space, "replace", 256, "cpu", coefficient_grad=True, input_grad=True, sparse=False
    )
    assert fake_timer == []


def test_a_broken_cache_file_is_ignored_with_a_warning_and_rewritten(fresh_cache, fake_timer):
    (fresh_cache / "compute_paths.json").write_text("{not json")
    with pytest.warns(UserWarning, match="Ignoring the compute-path cache"):
        path = _choose(_space())
    assert list(json.loads((fresh_cache / "compute_paths.json").read_text())["paths"].values()) == [path]


def test_same_shape_layers_share_one_measurement_and_take_its_path(fresh_cache, fake_timer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16))
    model = get_peft_model(model, SpectralConfig(n_coefficients=100, layout="random", target_modules=["0", "1", "2"]))
    x = torch.randn(4, 8, 32, requires_grad=True)  # so the first layer, too, computes an input gradient
    model(x).sum().backward()
    layers = [m for _, m in hf_spectral.spectral_layers(model)]
    assert len(fake_timer) == 2  # 32 x 32 (two layers) and 16 x 32
    assert [layer.last_compute_path for layer in layers[:2]] == [fake_timer[0][-1]] * 2
    assert layers[2].last_compute_path == fake_timer[1][-1]


def _layer_step_time(model, x, repeats):
    def step():
        model(x).sum().backward()

    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize(
    "mode, m, n, tokens, config",
    [
        ("replace", 512, 512, 2048, dict(mode="replace", coefficient_fraction=0.5, layout="lowfreq")),
        ("delta", 1536, 576, 512, dict(n_coefficients=1000, layout="random")),
    ],
    ids=["replace lowfreq mn/2 512x512 T=2048", "delta random K=1000 1536x576 T=512"],
)
def test_auto_is_within_ten_percent_of_the_fastest_forced_path(fresh_cache, mode, m, n, tokens, config):
    """Measured in one run: the path ``auto`` takes against every path forced (minimum of 5 steps each, the
    paths taking turns; measured again up to twice when noise puts auto out of the 10%)."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(n, m)), SpectralConfig(target_modules=["0"], **config))
    layer = next(layer for _, layer in hf_spectral.spectral_layers(model))
    # an inner layer's input needs its gradient (in training the choice is made for that case, see layer.py)
    x = torch.randn(tokens, n, requires_grad=True)
    model(x).sum().backward()
    chosen = layer.last_compute_path
    paths = [p for p in hf_spectral.compute.available_paths(layer.coefficient_space("default"), mode) if p != "separate"]
    assert chosen in paths
    for attempt in range(3):
        times = {p: float("inf") for p in paths}
        for _ in range(5):
            for path in paths:
                set_compute_path(model, path)
                times[path] = min(times[path], _layer_step_time(model, x, 1))
        if times[chosen] <= 1.10 * min(times.values()):
            break
    set_compute_path(model, "auto")
    summary = {p: f"{t * 1e3:.1f} ms" for p, t in times.items()}
    assert times[chosen] <= 1.10 * min(times.values()), f"auto took {chosen!r}; forced paths: {summary}"
