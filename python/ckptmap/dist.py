"""Rank helpers: who am I in a `torch.distributed` job (rank 0 of 1 outside of one)."""

from __future__ import annotations

import torch.distributed as torch_dist

__all__ = ["get_dist_info", "is_main_process"]


def get_dist_info() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group when it is initialised, else `(0, 1)`."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true outside of a distributed job)."""
    return get_dist_info()[0] == 0
