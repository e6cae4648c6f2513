"""Data parallelism for `torchrun` or `accelerate launch` (which set RANK and WORLD_SIZE), through torch's
DistributedDataParallel.

Every process knows the whole step schedule and cuts each step into the same global micro-batches
(:func:`tokenclean.training.micro_batches`); process r trains micro-batches r, r+W, r+2W, ..., scales its loss
by the step's *global* count of selected tokens (or, under ``micro_batch`` normalisation, of micro-batches),
and the gradients are *summed* across processes: DDP's bucketed all-reduce, overlapped with the backward pass of
each process's last micro-batch (the others accumulate under ``no_sync``), with a communication hook that sums
instead of DDP's average (:func:`data_parallel`). The update therefore equals the single-process one exactly
(up to float summation order), whatever the split of kept tokens across processes, which a per-process mean
followed by gradient averaging would not give.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from tokenclean.launch import DEFAULT_TIMEOUT_MINUTES, TIMEOUT_ENV


def rank_and_size() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """The GPU of this process (LOCAL_RANK) when several processes share a node."""
    if device.type == "cuda" and device.index is None and rank_and_size()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def timeout() -> timedelta:
    """How long a process waits for the others in a collective (NCCL / gloo) before the job aborts.

    Processes 1..N wait in a barrier while process 0 merges and writes the model, which for an 8B model on a
    slow shared file system can outlast torch's default of 10 minutes. ``$TOKENCLEAN_DIST_TIMEOUT_MINUTES``
    (set by the launch command from ``hardware.timeout_minutes``), else 60 minutes.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)
    try:
        minutes = float(text)
    except ValueError:
        minutes = 0.0
    if not minutes > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of minutes")
    return timedelta(minutes=minutes)


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched with several processes; (rank, world size)."""
    rank, size = rank_and_size()
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout())
    return rank, size


def _sum_hook(process_group, bucket):  # no annotations: DDP rejects a hook whose bucket is annotated otherwise
    """DDP communication hook: the bucket's gradients summed over the processes (DDP's own hook averages them,
    which would divide our globally normalised loss by the number of processes a second time)."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` under DistributedDataParallel whose gradient all-reduce sums (see the module docstring). Its
    forward must be the whole training forward: DDP syncs gradients only for passes through its own forward."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    ddp.register_comm_hook(state=None, hook=_sum_hook)
    return ddp


def sum_values(*values: float, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes, in place (e.g. the per-token record of an online method)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
