"""What a run ran on, for its record, and one line that says it in a table's caption."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name and core count (``AMD EPYC 7B13 (2 cores)``), or the machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    models = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.is_file() else []
    if models:
        return f"{models[0].strip()} ({len(models)} cores)"
    return platform.processor() or platform.machine()


def hardware(device=None, world_size: int = 1) -> dict:
    """The device (``cpu``/``cuda``; default: cuda if there is one), its name, the CPU, threads and library versions."""
    import peft
    import torch
    import transformers

    import hf_spectral

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = cpu_name()
    return {
        "device": device.type,
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "world_size": world_size,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "hf_spectral": hf_spectral.__version__,
    }


def hardware_line(info: dict) -> str:
    """``NVIDIA H100 80GB HBM3 (cuda, 2 processes; AMD EPYC 9454 (16 cores)), torch 2.13.0, transformers 5.24.0, ...``.

    Reads older records too: the fine-tuning recipe once kept the GPU's name (or ``cpu``) under ``device``,
    the machine type under ``cpu`` and the core count under ``cpu_count``."""
    device, name, cpu = info.get("device", "?"), info.get("name"), info.get("cpu")
    if cpu and "cores" not in cpu and info.get("cpu_count"):
        cpu = f"{cpu}, {info['cpu_count']} CPUs"
    if name is None:  # an older fine-tuning record
        name, device = (cpu or device, "cpu") if device == "cpu" else (device, "cuda")
    where = device if info.get("world_size", 1) == 1 else f"{device}, {info['world_size']} processes"
    if device != "cpu" and cpu:
        where += f"; {cpu}"
    versions = [f"{lib} {info[lib]}" for lib in ("torch", "transformers", "peft", "hf_spectral") if info.get(lib)]
    return ", ".join([f"{name} ({where})", *versions])
