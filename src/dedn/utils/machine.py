"""What a result was computed on: enough to tell two machines apart when their numbers differ.

On a CPU, the kernels PyTorch picks depend on the instruction set (AVX2, AVX-512) and the thread
count, and they change floating-point results in their last bits; 500 SGD steps can turn that into a
model a point of mIoU apart. Every stored result therefore records this next to its settings.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :func:`platform.processor` says."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: torch.device | str | None = None) -> dict:
    """The torch build, the CPU (model, instruction set PyTorch dispatches to, threads) and, on CUDA,
    the GPU's name. JSON-serialisable."""
    info = {
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
