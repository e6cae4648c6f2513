"""Data parallelism without a framework, for `torchrun` or `accelerate launch` (which set RANK and WORLD_SIZE).

Every process knows the whole step schedule; process r trains samples r, r+W, r+2W, ... of each step, scales
its loss by the step's *global* count of selected tokens, and the gradients are summed across processes. The
update therefore equals the single-process one exactly (up to float summation order), whatever the split of
kept tokens across processes, which a per-process mean followed by gradient averaging would not give.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_size() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """The GPU of this process (LOCAL_RANK) when several processes share a node."""
    if device.type == "cuda" and device.index is None and rank_and_size()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched with several processes; (rank, world size)."""
    rank, size = rank_and_size()
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, size


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every gradient over the processes (a process that had no sample this step contributes zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def sum_values(*values: float, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
