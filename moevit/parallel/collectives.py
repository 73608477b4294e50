"""The few collectives the training loop and evaluation need, safe to call in a single process.

Each works over all ranks (the default process group) and degrades to the single-process
answer when no process group is running, so library code can call them unconditionally.
Every rank must make the same calls in the same order, as with any collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor holding the sum of `tensor` over all ranks; the input is left unchanged.

    Not differentiable: pass detached statistics (the loop adds the remote part to its local,
    differentiable tensor, so gradients flow through local tokens only).
    """
    total = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(tensor: torch.Tensor) -> None:
    """Overwrites `tensor` on every rank, in place, with rank 0's."""
    if is_distributed():
        dist.broadcast(tensor, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
