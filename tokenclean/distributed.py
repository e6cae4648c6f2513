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

With ``hardware.sharding: fsdp`` (``$TOKENCLEAN_SHARDING``, set by the launch command) the same arithmetic runs
under torch's FSDP2 (:func:`fully_sharded`): each process holds 1/W of the parameters, gradients and AdamW
moments; gradients are reduce-scattered as a sum, accumulated without communication for all but the last
micro-batch, and every process runs the same number of passes (weight 0 where it has no micro-batch), since
each forward all-gathers every layer's parameters.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tokenclean.launch import DEFAULT_TIMEOUT_MINUTES, SHARDING_ENV, SHARDINGS, TIMEOUT_ENV


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


def sharding() -> str:
    """``$TOKENCLEAN_SHARDING`` (the launch command's copy of ``hardware.sharding``), ``none`` when unset."""
    name = os.environ.get(SHARDING_ENV, "").strip() or "none"
    if name not in SHARDINGS:
        raise ValueError(f"hardware.sharding: unknown {name!r} (one of {', '.join(SHARDINGS)})")
    return name


def check_sharding(lora_r: int) -> str:
    """The sharding this run will use, or a one-line ValueError naming ``hardware.sharding`` before any training:
    FSDP2 missing from the installed torch, or settings the sharded trainer does not support. One process
    trains plain (there is nothing to shard)."""
    name = sharding()
    if name == "none" or rank_and_size()[1] == 1:
        return "none"
    needed = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms", "set_requires_gradient_sync")
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401  (FSDP2)
        missing = [method for method in needed if not hasattr(FSDPModule, method)]
    except ImportError:
        missing = ["fully_shard"]
    if missing:
        raise ValueError(f"hardware.sharding: fsdp needs torch's FSDP2 (torch.distributed.fsdp.fully_shard with "
                         f"{', '.join(needed)}); the installed torch {torch.__version__} lacks {missing[0]}")
    if lora_r > 0:
        raise ValueError("hardware.sharding: fsdp with lora_r > 0 is not supported yet (LoRA trains few weights: "
                         "set hardware.sharding: none)")
    return name


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


def fully_sharded(forward: torch.nn.Module, model: Any, device: torch.device) -> torch.nn.Module:
    """``forward`` (the whole training forward, holding ``model``) sharded by torch's FSDP2: each decoder layer
    its own unit (the classes the model names in ``_no_split_modules``, the layers Hugging Face keeps whole,
    which accelerate's FSDP auto-wrap policy also wraps by default: accelerate 1.15, utils/fsdp_utils.py
    ``fsdp2_prepare_auto_wrap_policy``), the rest (embeddings, final norm, head) in the root unit
    on ``forward``, whose forward is the only one called (ours reads the decoder and the head apart).

    Gradients are summed, not averaged: divide factor 1 (the loss is already normalised by the step's global
    count) with plain SUM collectives, as gloo has no PREMUL_SUM. The parameters are replaced by DTensor
    shards: read ``parameters()`` after this call.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"hardware.sharding: fsdp: {type(model).__name__} names no decoder-layer class "
                         "(_no_split_modules) to shard by")
    mesh = init_device_mesh(device.type, (rank_and_size()[1],))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(forward, mesh=mesh)
    for unit in forward.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return forward


@contextmanager
def gradient_sync(forward: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Within it, a backward pass of ``forward`` (DDP or FSDP) syncs gradients across the processes only if
    ``sync``; otherwise they accumulate locally (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``)."""
    if sync or not dist.is_initialized():
        yield
    elif hasattr(forward, "set_requires_gradient_sync"):
        forward.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            forward.set_requires_gradient_sync(True)
    else:
        with forward.no_sync():
            yield


def full_model(forward: torch.nn.Module, model: Any) -> Any:
    """On process 0, a plain copy of the FSDP-sharded ``model`` (inside ``forward``) with its full weights on the
    CPU, to save; None on the others. Every process must call it (the weights are gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(forward, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = type(model)(model.config)
    plain.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, assign=True)
    for name, buffer in model.named_buffers():  # not in the state dict when non-persistent (rotary frequencies)
        owner, _, leaf = name.rpartition(".")
        persistent = leaf not in model.get_submodule(owner)._non_persistent_buffers_set
        plain.get_submodule(owner).register_buffer(leaf, buffer.detach().cpu().clone(), persistent=persistent)
    plain.tie_weights()
    plain.generation_config = model.generation_config  # the loaded one (e.g. the base's eos ids), not the default
    return plain


def _trainable_names(model: Any) -> list[str]:
    """The names of the trainable parameters, in the order of the optimizer's ``params`` (the checkpoint's
    index); under FSDP the root unit is the training forward, whose names prefix ``model.``."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def storable_moment(value: torch.Tensor) -> torch.Tensor:
    """An optimizer state tensor as both checkpoint writers (unsharded and FSDP) store it: contiguous, and a 0-d
    one (AdamW's ``step``) as a copy of shape (1,); loading reshapes ``step`` back to ()."""
    return value.reshape(-1).clone() if value.dim() == 0 else value.contiguous()


def full_training_state(forward: torch.nn.Module, model: Any, optimizer: torch.optim.Optimizer,
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """On process 0, the full trainable weights (by name) and AdamW moments (``<index>.<key>``) of the
    FSDP-sharded ``model``, on the CPU: the layout of an unsharded checkpoint; None on the others. Every
    process must call it (the shards are gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(forward, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    names = _trainable_names(model)
    moments = {f"{i}.{key}": storable_moment(value)
               for i, name in enumerate(names) for key, value in optim["state"].get(f"model.{name}", {}).items()}
    return {name: weights[f"model.{name}"].contiguous() for name in names}, moments


def load_full_training_state(forward: torch.nn.Module, model: Any, optimizer: torch.optim.Optimizer,
                             weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`full_training_state`: process 0 passes the full tensors, the others empty dicts,
    and each process keeps its shards (broadcast from process 0, so one copy is held in host memory)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    names = _trainable_names(model)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        state.setdefault(f"model.{names[int(index)]}", {})[name] = value.reshape(()) if name == "step" else value
    fqn = {id(p): f"model.{name}" for name, p in model.named_parameters()}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [fqn[id(p)] for p in group["params"]]}
              for group in optimizer.param_groups]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    # apart: set_state_dict skips the model on a process whose (empty) model dict says "optimizer only"
    set_model_state_dict(forward, {f"model.{n}": weights[n] for n in weights}, options=options)
    set_optimizer_state_dict(forward, optimizer, {"state": state, "param_groups": groups} if moments else {},
                             options=options)


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
