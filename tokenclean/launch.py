"""How a training job is started: one process, or one per GPU through `torchrun` or `accelerate launch`.

Kept free of heavy imports: the Snakefile calls it while planning the DAG. The trainer does its own data
parallelism (tokenclean/distributed.py) from the RANK / WORLD_SIZE the launcher sets, so both launchers give
the same training; FSDP sharding is not supported yet.
"""
from __future__ import annotations

import shlex

LAUNCHERS = ("torchrun", "accelerate")


def tokenclean_command(python: str, gpus: int = 1, launcher: str = "torchrun", port: int | None = None) -> str:
    """Shell prefix that runs ``tokenclean <command>`` on ``gpus`` GPUs of one node (one process each)."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r} (one of {', '.join(LAUNCHERS)})")
    python = shlex.quote(python)
    if gpus == 1:
        return f"{python} -m tokenclean.cli"
    if launcher == "torchrun":
        rendezvous = "--standalone" if port is None else f"--master_port {port}"
        return f"{python} -m torch.distributed.run {rendezvous} --nproc_per_node {gpus} -m tokenclean.cli"
    port_flag = "" if port is None else f" --main_process_port {port}"
    return (f"{python} -m accelerate.commands.launch --num_processes {gpus} --num_machines 1 --multi_gpu"
            f" --mixed_precision no --dynamo_backend no{port_flag} -m tokenclean.cli")
