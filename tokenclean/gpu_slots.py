"""GPUs side by side on one machine: every GPU job runs on GPUs that no other job holds.

Snakemake counts GPUs (``--resources gpu=8`` and each rule's ``resources: gpu=N``) but does not say which ones a
job gets (snakemake/snakemake#281, open), so eight one-GPU jobs started together would all land on GPU 0. The
workflow therefore starts each GPU job through this module::

    python -m tokenclean.gpu_slots --gpus N -- COMMAND [ARGS ...]

which takes an exclusive lock (``fcntl.flock``) on one file per GPU, ``<lock dir>/gpu-<id>.lock``, for N free GPUs
of the machine, sets ``CUDA_VISIBLE_DEVICES`` to them and replaces itself with the command (``exec``): the command
holds the locks for as long as it runs, however it ends, and nothing else sits between it and Snakemake.
Snakemake's count keeps the GPUs asked for at any moment within the machine's, so a job waits only while the
jobs that held its GPUs are still exiting.

Nothing to allocate, the command runs as it is: on a machine without a GPU (the processes train on the CPU),
and under a cluster scheduler (``SLURM_JOB_ID`` set), which gave the job its own GPUs. Either way a job asking
for more GPUs than it can see stops first, in one line naming ``hardware.gpus``.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import random
import sys
import time
from pathlib import Path

DEFAULT_LOCK_DIR = ".snakemake/gpu-slots"  # inside the workflow's working directory: one machine's jobs


class GpuSlotError(ValueError):
    """A job that cannot get its GPUs on this machine (one line)."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use: the entries of ``CUDA_VISIBLE_DEVICES`` when it is set, else one per CUDA
    device torch sees (none without CUDA)."""
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    if shown is not None:
        return [g.strip() for g in shown.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def check_count(asked: int, gpus: list[str]) -> None:
    if gpus and asked > len(gpus):
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise GpuSlotError(f"hardware.gpus: {asked} GPUs asked for, {len(gpus)} visible here"
                           + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
                           + f"; set hardware.gpus to at most {len(gpus)}")


def try_lock(gpus: list[str], asked: int, lock_dir: Path) -> tuple[list[str], list[int]] | None:
    """Lock ``asked`` of ``gpus`` that no other job holds, in order; None (and nothing held) when fewer are free."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    taken: list[str] = []
    fds: list[int] = []
    for gpu in gpus:
        fd = os.open(lock_dir / f"gpu-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        taken.append(gpu)
        fds.append(fd)
        if len(taken) == asked:
            return taken, fds
    for fd in fds:
        os.close(fd)  # closing the descriptor releases its lock
    return None


def acquire(asked: int, lock_dir: Path, gpus: list[str], poll_s: float = 1.0) -> tuple[list[str], list[int]]:
    """Wait until ``asked`` GPUs are free and lock them: (their ids, the open lock descriptors)."""
    waited = False
    while True:
        got = try_lock(gpus, asked, lock_dir)
        if got is not None:
            return got
        if not waited:
            print(f"gpu_slots: waiting for {asked} free GPU(s) of {','.join(gpus)} (locks in {lock_dir})",
                  file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll_s * (0.5 + random.random()))  # jitter: jobs that start together do not retry in step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenclean.gpu_slots", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the command needs")
    parser.add_argument("--lock-dir", default=DEFAULT_LOCK_DIR, help="one lock file per GPU (default: %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS ...]")
    a = parser.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command or a.gpus < 1:
        parser.error("give --gpus N (at least 1) and the command after --")
    try:
        gpus = visible_gpus()
        check_count(a.gpus, gpus)
    except GpuSlotError as e:
        print(f"gpu_slots: error: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if gpus and "SLURM_JOB_ID" not in os.environ:
        taken, fds = acquire(a.gpus, Path(a.lock_dir), gpus)
        for fd in fds:
            os.set_inheritable(fd, True)  # the command keeps the locks: they end with it
        env["CUDA_VISIBLE_DEVICES"] = ",".join(taken)
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        print(f"gpu_slots: error: {command[0]}: {e.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached: the command has replaced this process


if __name__ == "__main__":
    sys.exit(main())
