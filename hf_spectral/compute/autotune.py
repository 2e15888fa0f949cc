"""Measured compute paths: an explicit step a user runs, never a forward.

``auto`` takes the cost model's path (``cost_model.py``): the same on every rank and in every run, with no
timing and no file. The model only ranks paths from counts of flops and passes over memory, and the real
order moves with the thread count, the CPU and the device, so a user who wants the paths that are fastest
on this machine measures them once, before training: :func:`measure` times the candidate paths of one kind
of layer (mode, shape, index set, basis, dtype) on random inputs, forward and backward as a training step
runs them, and returns the fastest. ``hf_spectral.tune_compute_paths(model, tokens)`` does that for every
layer of a model (same-shape layers share one measurement) and stores the result on the layers, where
their forwards read it; nothing is written to disk. Every path is exact, so a choice costs time, never
accuracy.
"""

from __future__ import annotations

import math
import time

import torch

from . import cost_model
from .dispatch import available_paths, run_path

__all__ = ["measure", "token_bucket"]

_REPEATS = 3  # timed runs per candidate (the minimum is kept: noise only ever adds time)
_PRUNE = 4.0  # candidates the cost model puts above this multiple of its cheapest are not timed


def token_bucket(tokens: int) -> int:
    """The power of two nearest ``tokens``: measured paths are kept, and looked up, per bucket."""
    return 2 ** round(math.log2(max(tokens, 1)))


def measure(
    space,
    mode: str,
    tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    coefficient_grad: bool,
    input_grad: bool,
    base_weight=None,
    scaling: float = 1.0,
    fan_in_fan_out: bool = False,
    repeats: int = _REPEATS,
) -> str:
    """The fastest path for one kind of layer at ``tokens`` tokens, timed here (see the module doc)."""
    candidates = candidates_for(space, mode, tokens, device.type, coefficient_grad, input_grad,
                                dtype in (torch.bfloat16, torch.float16))
    if len(candidates) == 1:
        return candidates[0]
    times = _time_paths(candidates, space, mode, tokens, device, dtype, coefficient_grad, input_grad,
                        base_weight, scaling, fan_in_fan_out, repeats)
    return min(candidates, key=times.__getitem__)


def candidates_for(space, mode, tokens, device_type, coefficient_grad, input_grad, half) -> list[str]:
    """The paths worth timing (``separate`` never beats ``dense``), less those the cost model puts far above
    its cheapest. All the others are timed, on every device: the measured order is the one that counts."""
    allowed = ("dense", "sampled", "factored", "spectral")
    estimates = cost_model.estimate_costs(
        space, mode, tokens, device_type, coefficient_grad=coefficient_grad, input_grad=input_grad, half=half
    )
    paths = [p for p in available_paths(space, mode) if p in allowed and p in estimates]
    cheapest = min(estimates[p] for p in paths)
    return [p for p in paths if estimates[p] <= _PRUNE * cheapest]


def _time_paths(candidates, space, mode, tokens, device, dtype, coefficient_grad, input_grad, base_weight, scaling,
                fan_in_fan_out, repeats) -> dict[str, float]:
    """Seconds per forward (+ backward) of each candidate on random inputs, the minimum of a few runs each,
    the candidates taking turns so that a slow phase of the machine hits them alike."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    values_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(tokens, space.n, generator=generator).to(device=device, dtype=dtype)
    values = (torch.randn(space.k, generator=generator) * 0.01).to(device=device, dtype=values_dtype)
    grad_out = torch.randn(tokens, space.m, generator=generator).to(device=device, dtype=dtype)
    weight = None if base_weight is None else base_weight.detach()
    backward = coefficient_grad or input_grad

    def run(path):
        x_in = x.detach().requires_grad_(input_grad)
        v_in = values.detach().requires_grad_(coefficient_grad)
        y = run_path(path, x_in, v_in, space, base_weight=weight, bias=None, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
        if backward:
            torch.autograd.backward(y, grad_out)

    with torch.inference_mode(False), torch.enable_grad():
        for path in candidates:  # warm-up: sparse patterns, FFT plans, allocator
            run(path)
        times = {path: math.inf for path in candidates}
        for repeat in range(repeats):
            order = candidates[repeat % len(candidates):] + candidates[: repeat % len(candidates)]
            for path in order:
                _synchronize(device)
                start = time.perf_counter()
                run(path)
                _synchronize(device)
                times[path] = min(times[path], time.perf_counter() - start)
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
