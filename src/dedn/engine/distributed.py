"""Process-group helpers for ``torchrun``: a single process works the same without any of it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device named in the config: ``auto`` (or None) is CUDA where present, else the CPU.

    CUDA without an index means this process's GPU, ``cuda:LOCAL_RANK`` (one GPU per process under
    torchrun, ``cuda:0`` otherwise). A device that cannot be used here (a malformed name, CUDA on a machine
    without it, a GPU index past the last one, more torchrun processes than GPUs) raises
    :class:`~dedn.errors.ConfigError` naming it, rather than failing later inside torch.
    """
    from dedn.errors import ConfigError

    if name is None or str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}': expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device '{name}': only cpu and cuda are supported")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(
            f"device '{name}': no CUDA device is available here (torch {torch.__version__}); "
            "use device=cpu or auto"
        )
    if device.index is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= count:
            raise ConfigError(
                f"device '{name}': torchrun started process {local_rank} on this machine, which has "
                f"{count} CUDA device(s); start at most one process per GPU (--nproc_per_node {count}) "
                "or set device=cpu"
            )
        return torch.device("cuda", local_rank)
    if device.index >= count:
        raise ConfigError(
            f"device '{name}': this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
