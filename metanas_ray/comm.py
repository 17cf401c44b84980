"""Where the workers of a meta-batch meet: one sum over all workers per meta-step.

The meta-training loop only needs a rank, a world size and an all-reduce sum. In one process that is the
identity (:class:`LocalComm`); under Ray Train it is ``torch.distributed.all_reduce`` on the process group
that Ray Train set up (:class:`TorchDistComm`).
"""
from __future__ import annotations

import torch


class LocalComm:
    rank = 0
    world = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class TorchDistComm:
    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
        return tensor


def my_share(n: int, comm) -> range:
    """Indices of the n tasks this worker runs: i ≡ rank (mod world)."""
    return range(comm.rank, n, comm.world)
