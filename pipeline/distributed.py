"""Data parallelism across processes launched by torchrun: joining the process group, DDP or FSDP2
(`fully_shard`: each rank holds a shard of every parameter, gradient and optimizer state), and the
full state of a sharded model gathered for rank 0 to write (and scattered back on resume), so a
checkpoint is the same safetensors file whichever way it was trained."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def join() -> tuple[int, int, torch.device]:
    """(rank, world size, device), joining the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


def shard(model: nn.Module, blocks: nn.ModuleList, world: int, device: torch.device) -> None:
    """FSDP2 in place: each block is one unit (gathered just before it runs, freed after), the rest
    (embeddings, final norm, tied head) the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _options(world: int) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload gathers onto rank 0 only; it needs a process group
    return StateDictOptions(full_state_dict=True, cpu_offload=world > 1)


def gather(model: nn.Module, optimizer: torch.optim.Optimizer, world: int) -> tuple[dict, dict]:
    """The full (unsharded) model and optimizer state on rank 0 (empty elsewhere); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return gather_model(model, world), get_optimizer_state_dict(model, optimizer, options=_options(world))


def gather_model(model: nn.Module, world: int) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(world))


def scatterer(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[dict, dict], None]:
    """Loads a full state (as `gather` gave it, read by every rank) into a sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def load(weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)

    return load


def mean_over_ranks(value: float, world: int, device: torch.device) -> float:
    """A scalar (a micro-batch loss) averaged over the ranks: the loss of the global batch."""
    if world == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)  # SUM: gloo's AVG has had bugs
    return total.item() / world
