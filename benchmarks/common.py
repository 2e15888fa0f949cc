"""Timing, peak memory and the machine's description, shared by the layer and model benchmarks."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from recipes.common.machine import cpu_name


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    for name in ("peft", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """One thing to time: ``step()`` runs it once (forward, or forward and backward)."""

    name: str
    step: Callable[[], None]
    info: dict = field(default_factory=dict)
    times: list = field(default_factory=list)  # seconds per step, one entry per repeat
    inner: int = 1
    peak_bytes: Optional[int] = None

    def summary(self) -> dict:
        ms = [t * 1e3 for t in self.times]
        return {
            "name": self.name,
            **self.info,
            "median_ms": statistics.median(ms) if ms else math.nan,
            "min_ms": min(ms) if ms else math.nan,
            "max_ms": max(ms) if ms else math.nan,
            "repeats": len(ms),
            "inner": self.inner,
            "peak_mib": None if self.peak_bytes is None else self.peak_bytes / 2**20,
        }


def _time_once(case: Case, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(case.inner):
        case.step()
    synchronize(device)
    return (time.perf_counter() - start) / case.inner


def time_interleaved(cases: list[Case], device: torch.device, repeats: int, warmup: int = 1, target_s: float = 0.05) -> None:
    """Median-ready timings: every repeat runs every case once, in a rotated order, so slow phases of a
    shared machine hit all cases alike. Short steps are repeated ``inner`` times per sample."""
    for case in cases:
        for _ in range(warmup):
            elapsed = _time_once(case, device)
        case.inner = max(1, min(200, math.ceil(target_s / max(elapsed, 1e-6))))
    for r in range(repeats):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            case.times.append(_time_once(case, device))


class _PeakTracker(TorchDispatchMode):
    """Bytes of tensor storage created inside the block and still alive, and their peak.

    Counts every storage an aten op returns that is not a view of an input (also inside custom autograd
    functions and the backward pass, which runs on this thread on the CPU). Workspaces that kernels
    allocate outside torch's tensors (FFT plans, MKL buffers) are not seen.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for i, value in enumerate(outputs):
            if i < len(returns) and returns[i].alias_info is not None:
                continue  # a view of (or an in-place result on) an input
            for tensor in tree_leaves(value):
                if isinstance(tensor, torch.Tensor) and not tensor.is_sparse and tensor.layout == torch.strided:
                    self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._alive:
            return
        nbytes = storage.nbytes()
        self._alive[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)


def peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by one ``step()`` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = _PeakTracker()
    with tracker:
        step()
    return tracker.peak


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)
