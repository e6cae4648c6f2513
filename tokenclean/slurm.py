"""What a Slurm cluster can run: every job of the plan against its partition, before the first ``sbatch``.

Under ``--executor slurm`` (profiles/slurm) the workflow calls :func:`check_plan` once, after Snakemake has built
the plan and before it submits anything (``onstart`` in rules/common.smk). Slurm alone would refuse a job asking
for more memory, CPUs or GPUs than any node of its partition has, but only when that job is submitted, which for a
training job can be hours into the run; and a job beyond a partition limit (``MaxTime``, ``MaxMemPerNode``,
``MaxCPUsPerNode``), or on a partition whose nodes are all down or drained, is accepted and then waits in the queue
forever (``PENDING``, reason ``PartitionTimeLimit`` or ``ReqNodeNotAvail``) on clusters that do not set
``EnforcePartLimits`` (Slurm's default). The executor plugin keeps waiting for such a job. Here each problem is one
line naming the rule, the resource, the limit and the setting to change, and nothing is submitted.

The job's request is read as the executor plugin turns it into ``sbatch`` flags: ``slurm_partition`` (else the
cluster's default partition), ``mem_mb`` or ``mem_mb_per_cpu`` × CPUs (``--mem``), ``cpus_per_task`` else the
rule's threads (``--cpus-per-task``), ``runtime`` in minutes (``-t``), ``gpu`` or ``gres: gpu[:type]:N``. The
cluster's side comes from ``scontrol show partition -o`` and ``scontrol show node -o``.

While the run goes on, :class:`JobWatch` (started from the same ``onstart``) looks at the run's queued jobs: the
executor plugin treats every ``PENDING`` job as one that will run, but a job Slurm holds (``launch failed requeued
held`` after its node could not start it, ``JobHeldAdmin``, ``JobHeldUser``) never starts by itself, nor does one
whose partition has no node up. Such a job is cancelled with one line naming the rule, the job and Slurm's reason;
the plugin then sees it ``CANCELLED`` and Snakemake handles it as a failed job (submitted again once under
``retries: 1``, then the run stops), instead of waiting for it forever.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

UNUSABLE = ("DOWN", "DRAIN", "FAIL", "FUTURE", "INVAL", "NOT_RESPONDING", "POWERED_DOWN", "POWER_DOWN")


class SlurmPlanError(RuntimeError):
    """Jobs of the plan that the cluster cannot run (one line per problem)."""


@dataclass
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    usable: bool


@dataclass
class Partition:
    name: str
    default: bool = False
    up: bool = True
    max_minutes: float = math.inf
    max_mem_mb: float = math.inf  # per node
    max_cpus: float = math.inf    # per node
    nodes: list[Node] = field(default_factory=list)


@dataclass(frozen=True)
class Request:
    """One job's request, as the executor plugin submits it."""
    rule: str
    partition: str | None
    mem_mb: float
    cpus: int
    minutes: float
    gpus: int


def _fields(line: str) -> dict[str, str]:
    """``Key=Value`` pairs of one line of ``scontrol show ... -o`` (values never hold spaces there, except a few
    free-text fields such as ``Reason``, which come last and are not read)."""
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))


def minutes(text: str) -> float:
    """A Slurm time (``UNLIMITED``, ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in
    minutes."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return math.inf
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
        return int(days) * 1440 + h * 60 + m + s / 60
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] + parts[1] / 60
    h, m, s = parts
    return h * 60 + m + s / 60


def gpu_count(gres: str) -> int:
    """GPUs in a GRES string: ``gpu:4``, ``gpu:a100:4(S:0-1)``, ``gpu:2,shard:8``; none for ``(null)``."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres or "").split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            total += int(re.match(r"\d+", parts[-1]).group()) if len(parts) > 1 and parts[-1][:1].isdigit() else 1
    return total


def _limit(text: str | None) -> float:
    return math.inf if text in (None, "", "UNLIMITED") else float(text)


def parse_cluster(partitions_text: str, nodes_text: str) -> dict[str, Partition]:
    """The partitions of ``scontrol show partition -o`` with their nodes from ``scontrol show node -o``."""
    parts = {}
    for line in partitions_text.splitlines():
        f = _fields(line)
        if "PartitionName" not in f:
            continue
        parts[f["PartitionName"]] = Partition(
            name=f["PartitionName"], default=f.get("Default") == "YES", up=f.get("State", "UP") == "UP",
            max_minutes=minutes(f.get("MaxTime", "UNLIMITED")), max_mem_mb=_limit(f.get("MaxMemPerNode")),
            max_cpus=_limit(f.get("MaxCPUsPerNode")))
    for line in nodes_text.splitlines():
        f = _fields(line)
        if "NodeName" not in f:
            continue
        state = f.get("State", "")
        node = Node(name=f["NodeName"], cpus=int(f.get("CPUTot", 0)), mem_mb=int(f.get("RealMemory", 0)),
                    gpus=gpu_count(f.get("Gres", "")), usable=not any(s in state for s in UNUSABLE))
        for name in f.get("Partitions", "").split(","):
            if name in parts:
                parts[name].nodes.append(node)
    return parts


def query_cluster() -> dict[str, Partition]:
    """The cluster as ``scontrol`` shows it now (10 s at most per query)."""
    if shutil.which("scontrol") is None:
        raise SlurmPlanError("scontrol not found: the slurm executor needs Slurm's commands on PATH (run snakemake "
                             "on the cluster's login node, or use a profile that runs locally)")
    out = []
    for what in ("partition", "node"):
        try:
            proc = subprocess.run(["scontrol", "show", what, "-o"], capture_output=True, text=True, timeout=10,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise SlurmPlanError(f"`scontrol show {what}` did not answer within 10 s: is the Slurm controller "
                                 "up (sinfo)?") from None
        if proc.returncode != 0:
            raise SlurmPlanError(f"`scontrol show {what}` failed: {' '.join(proc.stderr.split())[:300]}; is the "
                                 "Slurm controller up (sinfo)?")
        out.append(proc.stdout)
    return parse_cluster(*out)


def _number(value: Any) -> float | None:
    """A resource value that is a number now (a value Snakemake determines later, ``<TBD>``, is None)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(str(value))
    except ValueError:
        return None


def request(rule: str, resources: Mapping[str, Any], threads: int) -> Request:
    """A job's request from its evaluated resources (what the plugin reads) and its threads."""
    get = resources.get
    cpus = _number(get("cpus_per_task")) or threads or 1
    mem = _number(get("mem_mb")) or 0
    per_cpu = _number(get("mem_mb_per_cpu"))
    if per_cpu:
        mem = per_cpu * cpus
    gpus = int(_number(get("gpu")) or 0)
    gres = get("gres")
    if not gpus and isinstance(gres, str) and gres:
        gpus = gpu_count(gres)
    partition = get("slurm_partition")
    return Request(rule=rule, partition=str(partition) if partition else None, mem_mb=mem, cpus=int(cpus),
                   minutes=_number(get("runtime")) or 0, gpus=gpus)


def problems(requests: Iterable[Request], cluster: Mapping[str, Partition]) -> list[str]:
    """One line per (rule, problem): what the cluster cannot run, and what to change."""
    out: dict[tuple[str, str], str] = {}
    default = next((p.name for p in cluster.values() if p.default), None)
    fix = "lower it in the profile (set-resources: {rule}: {key}; or default-resources) or choose another partition"
    for r in requests:
        name = r.partition or default
        if name is None:
            out[(r.rule, "partition")] = (f"rule {r.rule}: no slurm_partition and the cluster has no default "
                                          "partition: set default-resources: slurm_partition in the profile")
            continue
        part = cluster.get(name)
        if part is None:
            out[(r.rule, "partition")] = (f"rule {r.rule}: partition '{name}' does not exist (the cluster has: "
                                          f"{', '.join(sorted(cluster))}): set slurm_partition in the profile")
            continue
        usable = [n for n in part.nodes if n.usable]
        where = f"partition '{name}'"
        if not part.up or not usable:
            out[(r.rule, "nodes")] = (f"rule {r.rule}: {where} " + ("is not up" if not part.up else
                                      "has no node up (all down or drained)") +
                                      ": its jobs would wait in the queue; choose another partition (slurm_partition)")
            continue
        checks = [("mem_mb", r.mem_mb, min(max(n.mem_mb for n in usable), part.max_mem_mb), "MB of memory"),
                  ("cpus_per_task", r.cpus, min(max(n.cpus for n in usable), part.max_cpus), "CPUs"),
                  ("gpu", r.gpus, max(n.gpus for n in usable), "GPUs")]
        for key, asked, has, unit in checks:
            if asked > has:
                todo = (f"choose a partition with {'enough ' if has else ''}GPUs (slurm_partition in the profile) or "
                        "lower hardware.gpus in the config" if key == "gpu" else fix.format(rule=r.rule, key=key))
                out[(r.rule, key)] = (f"rule {r.rule} asks for {key}={_fmt(asked)} but the largest node of {where} "
                                      f"has {_fmt(has)} {unit}: {todo}")
        if r.minutes > part.max_minutes:
            out[(r.rule, "runtime")] = (f"rule {r.rule} asks for runtime={_fmt(r.minutes)} minutes but {where} "
                                        f"allows {_fmt(part.max_minutes)} (MaxTime): "
                                        + fix.format(rule=r.rule, key="runtime"))
    return list(out.values())


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_plan(jobs: Iterable[tuple[str, Mapping[str, Any], int]],
               cluster: Mapping[str, Partition] | None = None) -> None:
    """Raise :class:`SlurmPlanError` listing every job (rule, evaluated resources, threads) the cluster cannot
    run; ``cluster`` defaults to what ``scontrol`` shows now."""
    requests = {request(rule, resources, threads) for rule, resources, threads in jobs}
    if not requests:
        return
    found = problems(sorted(requests, key=lambda r: r.rule), query_cluster() if cluster is None else cluster)
    if found:
        raise SlurmPlanError("\n".join(found))


# --- while the run goes on: jobs Slurm will never start -------------------------------------------------------

NODE_WAIT_ENV = "TOKENCLEAN_SLURM_NODE_WAIT"  # seconds a job may wait on a partition with no node up
NODE_WAIT = 300.0
POLL_SECONDS = 10.0
WAITING = ("PENDING", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT")  # queued, not running
QUEUE_FORMAT = "%i|%T|%P|%k|%r"  # job id, state, partition, comment (the plugin's rule_<rule>_...), reason


@dataclass(frozen=True)
class Queued:
    """One job of the run as ``squeue -o QUEUE_FORMAT`` shows it."""
    job: str
    state: str
    partition: str
    comment: str
    reason: str

    @property
    def rule(self) -> str:
        """The rule, from the comment the executor plugin gives a job: ``rule_<rule>`` or
        ``rule_<rule>_wildcards_<values>``."""
        m = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", self.comment)
        return m.group(1) if m else (self.comment or "?")


def parse_queue(text: str) -> list[Queued]:
    """The jobs of ``squeue -h -o QUEUE_FORMAT`` (the reason, free text, comes last)."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split("|", 4)
        if len(parts) == 5:
            out.append(Queued(*parts))
    return out


def held(job: Queued) -> bool:
    """Slurm will not start this job until someone releases it (``scontrol release``)."""
    return job.state in ("REQUEUE_HOLD", "SPECIAL_EXIT") or "held" in job.reason.lower()


def stuck(queue: Iterable[Queued], cluster: Callable[[], Mapping[str, Partition]], since: dict[str, float],
          now: float, node_wait: float) -> list[tuple[Queued, str]]:
    """The queued jobs that will never start, each with what to say of it: a held job at once; a job whose
    partition has had no node up for ``node_wait`` seconds (``since`` keeps when each such job was first seen so,
    across calls). ``cluster`` is asked only when a job waits for another reason than a hold."""
    queue = [q for q in queue if q.state in WAITING]
    for job in set(since) - {q.job for q in queue}:
        del since[job]
    found: list[tuple[Queued, str]] = []
    nodes: Mapping[str, Partition] | None = None
    for q in queue:
        if held(q):
            todo = (f"its node could not start it: slurmd's log on that node says why (BatchHost in scontrol show "
                    f"job {q.job})" if "launch failed" in q.reason.lower() else
                    "a held job starts only once released (scontrol release)")
            found.append((q, f"held ({q.reason}): {todo}"))
            continue
        if nodes is None:
            nodes = cluster()
        part = nodes.get(q.partition)
        if part is not None and part.up and any(n.usable for n in part.nodes):
            since.pop(q.job, None)
            continue
        first = since.setdefault(q.job, now)
        if now - first >= node_wait:
            found.append((q, f"no node of partition '{q.partition}' up for {_fmt(round(now - first))} s "
                             f"({q.reason}): run again once its nodes are back (sinfo -p {q.partition}), or "
                             "choose another partition (slurm_partition in the profile)"))
    return found


class JobWatch:
    """Every ``interval`` seconds, the run's queued jobs (``squeue --name <run id>``, the job name the executor
    plugin gives every job of a run): each one that will never start is cancelled (``scancel``) with one line on
    stderr, so that the plugin sees it fail."""

    def __init__(self, run_id: str, interval: float = POLL_SECONDS, node_wait: float | None = None):
        self.run_id, self.interval = run_id, interval
        self.node_wait = float(os.environ.get(NODE_WAIT_ENV, NODE_WAIT)) if node_wait is None else node_wait
        self.since: dict[str, float] = {}
        self.cancelled: set[str] = set()

    def check(self) -> list[str]:
        """One look at the queue: the lines said (none while Slurm does not answer: the next look tries again)."""
        try:
            proc = subprocess.run(["squeue", "-h", "--states=all", "--name", self.run_id, "-o", QUEUE_FORMAT],
                                  capture_output=True, text=True, timeout=30, check=True)
            found = stuck(parse_queue(proc.stdout), query_cluster, self.since, time.monotonic(), self.node_wait)
        except (OSError, subprocess.SubprocessError, SlurmPlanError):
            return []
        lines = []
        for q, what in found:
            if q.job in self.cancelled:
                continue
            try:
                subprocess.run(["scancel", q.job], capture_output=True, timeout=30, check=True)
            except (OSError, subprocess.SubprocessError):
                continue  # said once a later look cancels it
            self.cancelled.add(q.job)
            lines.append(f"slurm error: rule {q.rule}, Slurm job {q.job}: {what}; cancelled, as it would never start")
            print(lines[-1], file=sys.stderr, flush=True)
        return lines

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval)
            self.check()

    def start(self) -> JobWatch:
        """Watch from a daemon thread for as long as the workflow runs."""
        threading.Thread(target=self._loop, name="tokenclean-slurm-watch", daemon=True).start()
        return self
