"""Collectives: the one all-reduce and broadcast every distributed path of the package uses.

Gradient averaging (a Keras ``train_step`` under DDP), metric-state sums (exact epoch values),
loss means and BatchNorm statistics all go through :func:`all_reduce_sum`: one collective per
dtype through a flat buffer, on a device the process group's backend accepts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "all_reduce_sum",
    "broadcast",
    "is_distributed",
    "rank",
    "world_size",
]


def world_size() -> int:
    """Processes in the default process group (1 outside one)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return int(torch.distributed.get_world_size())


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return world_size() > 1


def rank() -> int:
    """The rank of this process (0 outside a process group)."""
    return int(torch.distributed.get_rank()) if is_distributed() else 0


def _backend_device(tensor: torch.Tensor) -> torch.device:
    if torch.distributed.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _flat_groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(index)
    return list(groups.values())


def all_reduce_sum(
    tensors: Sequence[torch.Tensor], divide_by: int = 1
) -> list[torch.Tensor]:
    """``tensors`` summed over all processes (then divided by ``divide_by``).

    One collective per dtype through a flat buffer (on the device the process group's backend
    takes, whatever devices the inputs are on); the results are new tensors on each input's
    device (the inputs are not changed). Outside a process group the inputs are
    returned as they are (divided by ``divide_by``). Every rank must pass tensors of the same
    dtypes and sizes in the same order.
    """
    result = list(tensors)
    distributed = is_distributed()
    for indices in _flat_groups(tensors):
        first = tensors[indices[0]]
        device = _backend_device(first) if distributed else first.device
        flat = torch.cat([tensors[i].detach().reshape(-1).to(device) for i in indices])
        if distributed:
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        if divide_by != 1:
            flat = flat / divide_by
        parts = torch.split(flat, [tensors[i].numel() for i in indices])
        for index, part in zip(indices, parts, strict=True):
            result[index] = part.view_as(tensors[index]).to(tensors[index].device)
    return result


def broadcast(tensors: Sequence[torch.Tensor], src: int = 0) -> list[torch.Tensor]:
    """Rank ``src``'s values of ``tensors`` on every process (new tensors; inputs unchanged)."""
    if not is_distributed():
        return list(tensors)
    result = list(tensors)
    for indices in _flat_groups(tensors):
        device = _backend_device(tensors[indices[0]])
        flat = torch.cat([tensors[i].detach().reshape(-1).to(device) for i in indices])
        torch.distributed.broadcast(flat, src=src)
        parts = torch.split(flat, [tensors[i].numel() for i in indices])
        for index, part in zip(indices, parts, strict=True):
            result[index] = part.view_as(tensors[index]).to(tensors[index].device)
    return result

