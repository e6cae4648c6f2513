"""How a training job is started: one process, or one per GPU through `torchrun` or `accelerate launch`.

Kept free of heavy imports: the Snakefile calls it while planning the DAG. The trainer sets up its data
parallelism (torch DDP, tokenclean/distributed.py) from the RANK / WORLD_SIZE the launcher sets, so both launchers
give the same training; with ``hardware.sharding: fsdp`` it shards the model across them instead (torch FSDP2).
On one machine, GPU jobs start through tokenclean/gpu_slots.py, which gives each its own GPUs.
"""
from __future__ import annotations

import shlex

LAUNCHERS = ("torchrun", "accelerate")


# The collective timeout of multi-process training (tokenclean/distributed.py reads it from this variable):
# hardware, not recipe, so it travels in the launch command's environment, not as a `train` flag.
TIMEOUT_ENV = "TOKENCLEAN_DIST_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 60
# How multi-process training holds the model (hardware.sharding): `none`, a full copy per process under DDP;
# `fsdp`, parameters, gradients and optimizer state sharded across the processes (tokenclean/distributed.py).
SHARDING_ENV = "TOKENCLEAN_SHARDING"
SHARDINGS = ("none", "fsdp")


def tokenclean_command(python: str, gpus: int = 1, launcher: str = "torchrun", port: int | None = None,
                       timeout_minutes: float | None = None, gpu_slots: int = 0, sharding: str = "none") -> str:
    """Shell prefix that runs ``tokenclean <command>`` on ``gpus`` GPUs of one node (one process each).

    ``timeout_minutes`` (hardware.timeout_minutes) becomes the processes' collective timeout, passed in the
    environment so that it stays out of the training recipe (and of the run's identity). ``gpu_slots`` > 0: the
    command starts through :mod:`tokenclean.gpu_slots`, on that many GPUs no other job of the machine holds.
    ``sharding`` (hardware.sharding) travels the same way; a single process has nothing to shard.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r} (one of {', '.join(LAUNCHERS)})")
    if timeout_minutes is not None and not timeout_minutes > 0:
        raise ValueError(f"timeout_minutes must be positive, got {timeout_minutes}")
    if sharding not in SHARDINGS:
        raise ValueError(f"hardware.sharding: unknown {sharding!r} (one of {', '.join(SHARDINGS)})")
    if sharding != "none" and gpus == 1:
        raise ValueError(f"hardware.sharding: {sharding} needs hardware.gpus > 1 (one process has nothing to shard)")
    python = shlex.quote(python)
    slots = f"{python} -m tokenclean.gpu_slots --gpus {gpu_slots} -- " if gpu_slots > 0 else ""
    if gpus == 1:
        return f"{slots}{python} -m tokenclean.cli"
    variables = ([] if timeout_minutes is None else [f"{TIMEOUT_ENV}={timeout_minutes:g}"]) + (
        [] if sharding == "none" else [f"{SHARDING_ENV}={sharding}"])
    env = slots + (f"env {' '.join(variables)} " if variables else "")
    if launcher == "torchrun":
        rendezvous = "--standalone" if port is None else f"--master_port {port}"
        return f"{env}{python} -m torch.distributed.run {rendezvous} --nproc_per_node {gpus} -m tokenclean.cli"
    port_flag = "" if port is None else f" --main_process_port {port}"
    return (f"{env}{python} -m accelerate.commands.launch --num_processes {gpus} --num_machines 1 --multi_gpu"
            f" --mixed_precision no --dynamo_backend no{port_flag} -m tokenclean.cli")
