"""Which compute path ``auto`` takes: the fastest one measured on this machine, once per layer shape.

The cost model (``cost_model.py``) ranks paths from counts of flops and passes over memory, with
constants fitted on one machine at one thread. Their real order moves with the thread count (matmuls
speed up with threads, FFTs and sparse products much less), the CPU and the device: at two threads the
model's choices cost a SmolLM2-sized step 13% more than the fastest forced path. So ``auto`` measures:
the first time it meets a kind of layer (mode, shape, index set kind, basis, dtype, which gradients) at
a token count (rounded to a power of two), it times the candidate paths on random inputs of that shape,
forward and backward as the layer will run them, and keeps the fastest. Same-shape layers share the
result; it is kept for the process and on disk per machine (device name, torch version, thread count),
so a later run on the same machine starts with it.

The cost model still decides where timing cannot run or is not wanted: under ``torch.compile`` (no
timing inside a trace), in a job of several processes (``torch.distributed`` initialised: every rank must take
the same path, and timings differ between ranks), and with ``HF_SPECTRAL_AUTOTUNE=0`` or :func:`set_path_tuning` ``(False)``
(reproducible choices, e.g. in tests). Every path is exact, so a choice costs time, never accuracy.

The disk cache is ``$HF_SPECTRAL_CACHE/compute_paths.json`` (default ``~/.cache/hf_spectral``); delete
it to measure again.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
import warnings
from typing import Optional

import torch

from . import cost_model
from .dispatch import available_paths, run_path

__all__ = ["choose", "set_path_tuning", "path_tuning_enabled", "cache_file", "clear_memory_cache", "CACHE_VERSION"]

CACHE_VERSION = 1
_REPEATS = 3  # timed runs per candidate (the minimum is kept: noise only ever adds time)
_PRUNE = 4.0  # candidates the cost model puts above this multiple of its cheapest are not timed

_enabled: Optional[bool] = None  # None: follow HF_SPECTRAL_AUTOTUNE
_memory: dict[str, str] = {}  # machine|signature -> path, for this process
_disk_loaded = False
_warned_write = False


def set_path_tuning(enabled: Optional[bool]) -> None:
    """Measure paths (True), use the cost model alone (False), or follow ``HF_SPECTRAL_AUTOTUNE`` (None)."""
    global _enabled
    _enabled = enabled


def path_tuning_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("HF_SPECTRAL_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_file() -> str:
    root = os.environ.get("HF_SPECTRAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_spectral"
    )
    return os.path.join(root, "compute_paths.json")


def clear_memory_cache() -> None:
    """Forget this process's measurements (the disk cache is read again on the next choice)."""
    global _disk_loaded
    _memory.clear()
    _disk_loaded = False


def choose(
    space,
    mode: str,
    tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    coefficient_grad: bool,
    input_grad: bool,
    base_weight: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    fan_in_fan_out: bool = False,
    compiling: bool = False,
) -> str:
    """The path ``auto`` takes for one layer: measured (see the module doc) or, where timing cannot run,
    the cost model's."""
    half = dtype in (torch.bfloat16, torch.float16)
    if compiling or not path_tuning_enabled() or _distributed():
        return cost_model.choose_path(
            space, mode, tokens, device.type, coefficient_grad=coefficient_grad, input_grad=input_grad, half=half,
            sparse=not compiling,
        )
    candidates = _candidates(space, mode, tokens, device.type, coefficient_grad, input_grad, half)
    if len(candidates) == 1:
        return candidates[0]
    bucket = 2 ** round(math.log2(max(tokens, 1)))
    key = f"{_machine(device)}|{_signature(space, mode, bucket, dtype, coefficient_grad, input_grad, base_weight, fan_in_fan_out)}"
    _load_disk()
    path = _memory.get(key)
    if path not in candidates:  # new, or from a cache written by a version with other paths
        times = _time_paths(candidates, space, mode, bucket, device, dtype, coefficient_grad, input_grad,
                            base_weight, scaling, fan_in_fan_out)
        path = min(candidates, key=times.__getitem__)
        _memory[key] = path
        _save_disk(key, path)
    return path


def _distributed() -> bool:
    """Several processes train together: each would time on its own and could choose another path, and DDP's and
    DeepSpeed's gradient buckets need every rank to produce the same gradients in the same order. The cost model
    gives every rank the same choice."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


# -- what is timed --------------------------------------------------------------------------------------


def _candidates(space, mode, tokens, device_type, coefficient_grad, input_grad, half) -> list[str]:
    """The paths ``auto`` may take here (``separate`` never beats ``dense``), less those the cost model puts far
    above its cheapest. All the others are timed, on every device: the measured order is the one that counts."""
    allowed = ("dense", "sampled", "factored", "spectral")
    estimates = cost_model.estimate_costs(
        space, mode, tokens, device_type, coefficient_grad=coefficient_grad, input_grad=input_grad, half=half
    )
    paths = [p for p in available_paths(space, mode) if p in allowed and p in estimates]
    cheapest = min(estimates[p] for p in paths)
    return [p for p in paths if estimates[p] <= _PRUNE * cheapest]


def _signature(space, mode, bucket, dtype, coefficient_grad, input_grad, base_weight, fan_in_fan_out) -> str:
    where = f"block{space.block[0]}x{space.block[1]}" if space.block is not None else f"scattered{space.k}"
    base = "none" if base_weight is None else ("in_out" if fan_in_fan_out else "out_in")
    return (
        f"{mode}|{space.m}x{space.n}|{where}|{space.basis}|T{bucket}|{str(dtype).replace('torch.', '')}"
        f"|cg{int(coefficient_grad)}|ig{int(input_grad)}|base_{base}"
    )


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return f"{device.type}:{name}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def _time_paths(candidates, space, mode, tokens, device, dtype, coefficient_grad, input_grad, base_weight, scaling,
                fan_in_fan_out) -> dict[str, float]:
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

    # Inside a layer's forward: under no_grad / inference_mode (reentrant checkpointing's first pass, evaluation),
    # or under non-reentrant checkpointing's saved-tensor hooks, which must not see these throwaway tensors (the
    # recomputation, which does not time, would then save other tensors than the first pass): identity hooks on top.
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        for path in candidates:  # warm-up: sparse patterns, FFT plans, allocator
            run(path)
        times = {path: math.inf for path in candidates}
        for repeat in range(_REPEATS):
            order = candidates[repeat % len(candidates):] + candidates[: repeat % len(candidates)]
            for path in order:
                _synchronize(device)
                start = time.perf_counter()
                run(path)
                _synchronize(device)
                times[path] = min(times[path], time.perf_counter() - start)
    return times


def _keep(tensor):
    return tensor


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the disk cache ---------------------------------------------------------------------------------------


def _load_disk() -> None:
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    path = cache_file()
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        warnings.warn(f"Ignoring the compute-path cache {path!r} ({exc}); paths are measured again and it is rewritten.",
                      stacklevel=3)
        return
    if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("paths"), dict):
        for key, value in data["paths"].items():
            _memory.setdefault(key, value)


def _save_disk(key: str, path: str) -> None:
    global _warned_write
    target = cache_file()
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            with open(target) as f:
                data = json.load(f)
            if not (isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("paths"), dict)):
                data = None
        except (OSError, ValueError):
            data = None
        data = data or {"version": CACHE_VERSION, "paths": {}}
        data["paths"][key] = path
        # another process may write at the same time: write a whole file, then rename it into place
        handle, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".compute_paths.")
        with os.fdopen(handle, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, target)
    except OSError as exc:
        if not _warned_write:
            _warned_write = True
            warnings.warn(f"Cannot write the compute-path cache {target!r} ({exc}); measurements are kept for this "
                          "process only. Set HF_SPECTRAL_CACHE to a writable folder.", stacklevel=3)
