"""profiles/slurm against a real Slurm: the one-node cluster of scripts/local-slurm.sh (docs/slurm.md).

Every job goes through sbatch, the executor plugin polls squeue, jobs run under slurmd with srun: the smoke
experiment gives the local run's table, and the faults a cluster brings are tested, each against the real
controller: a training job cancelled mid-run (scancel) resumes from its checkpoint, a job Slurm requeues leaves no
half-written output, and a job beyond the cluster stops the run before anything is submitted.

Skipped when no local cluster runs (start one: `scripts/local-slurm.sh start`); under CI, which starts one
(.ci/run sets TOKENCLEAN_REQUIRE_SLURM=1), a missing cluster is a failure. Every wait is bounded.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.snakemake_plan import plan, to_run
from tests.test_workflow import snakemake

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
CLUSTER = Path(os.environ.get("TOKENCLEAN_SLURM_DIR", ROOT / ".cache" / "local-slurm"))
PROFILES = ["--profile", str(ROOT / "profiles" / "slurm"), "--profile", str(ROOT / "profiles" / "local-slurm")]
LOCAL_RULES = {"all", "report", "rounds_report", "provenance"}  # rules/report.smk: on the submitting machine
TARGET = "results/smoke/models/sft/full_s1"
# one SFT job long enough to be interrupted mid-run (about 4 s of training here), with checkpoints
LONGER = "sft:\n  train: {steps: 600, batch_size: 8, lr: 0.001, checkpoint_every: 20}\n"


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """The environment that reaches the local cluster (its Slurm commands first on PATH)."""
    script = ROOT / "scripts" / "local-slurm.sh"
    proc = subprocess.run([str(script), "status"], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        reason = f"no local Slurm cluster is running ({proc.stdout.strip()}; docs/slurm.md)"
        if os.environ.get("TOKENCLEAN_REQUIRE_SLURM") == "1":
            pytest.fail(reason + ", and TOKENCLEAN_REQUIRE_SLURM=1 (CI starts one: .ci/run)")
        pytest.skip(reason)
    return {**os.environ, "PATH": f"{CLUSTER / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def slurm(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=30, check=True)
    return proc.stdout


class Workflow:
    """Snakemake through profiles/slurm (+ profiles/local-slurm) on the smoke config, in its own session; as a
    context manager, it never outlives the test: whatever of it still runs is stopped, its jobs cancelled."""

    def __init__(self, work: Path, env: dict[str, str], *args: str, overrides: Path | None = None):
        self.work, self.env, self.log = work, env, work.parent / f"{work.name}.snakemake.log"
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
               *args, *PROFILES, "--configfile", str(SMOKE), *([str(overrides)] if overrides else [])]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pid = self.proc.pid

    def __enter__(self) -> Workflow:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()

    def stop(self) -> None:
        """SIGTERM (Snakemake cancels its jobs), SIGKILL 60 s later; then whatever of its run is still queued."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGCONT)
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        run = re.search(r"SLURM run ID: (\S+)", self.log.read_text())
        if run:
            subprocess.run(["scancel", "--name", run.group(1)], env=self.env, timeout=30, check=False)

    def finish(self, timeout: float) -> tuple[int, str]:
        """Its exit status and output, waiting at most `timeout` s (then it is stopped and the test fails)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"snakemake through Slurm did not end within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")
        return self.proc.returncode, self.log.read_text()


def sbatch_logs(work: Path) -> dict[str, list[Path]]:
    """The executor plugin's log of every sbatch job (profiles/local-slurm keeps them), by rule."""
    logs: dict[str, list[Path]] = {}
    for path in sorted((work / ".snakemake" / "slurm_logs").rglob("*.log")):
        rule = path.relative_to(work / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        logs.setdefault(rule, []).append(path)
    return logs


@pytest.mark.slow  # Snakemake through Slurm
def test_the_smoke_experiment_through_slurm_gives_the_local_table(cluster, smoke_run, tmp_path):
    """`snakemake --profile profiles/slurm --profile profiles/local-slurm --configfile configs/smoke.yaml`: every
    job but the report's local rules is its own sbatch job, and the tables are the local run's, byte for byte."""
    work = tmp_path / "work"
    work.mkdir()
    began = time.monotonic()
    with Workflow(work, cluster) as run:
        rc, out = run.finish(timeout=1500)
    assert rc == 0, out[-4000:]
    print(f"smoke through Slurm: {time.monotonic() - began:.0f} s")
    planned = to_run(plan(tmp_path / "plan", SMOKE))
    logs = sbatch_logs(work)
    assert {rule: len(paths) for rule, paths in logs.items()} == \
        {rule: n for rule, n in planned.items() if rule not in LOCAL_RULES}
    job_ids = [p.stem for paths in logs.values() for p in paths]
    assert len(set(job_ids)) == len(job_ids) == sum(planned.values()) - len(LOCAL_RULES & set(planned))
    results = work / "results" / "smoke"
    for name in ("table.csv", "table.md", "table.tex", "significance.csv", "rounds.csv"):
        assert (results / name).read_bytes() == (smoke_run / name).read_bytes(), f"{name} differs from the local run"


@pytest.fixture(scope="module")
def straight(smoke_run, tmp_path_factory) -> Path:
    """The longer SFT job run locally without interruption: the weights every interrupted run must end with."""
    work = with_inputs(smoke_run, tmp_path_factory.mktemp("straight"))
    proc = snakemake(work, TARGET, overrides=work.parent / "longer.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / TARGET


def with_inputs(smoke_run: Path, where: Path) -> Path:
    """A workdir holding the SFT job's inputs, copied from the smoke run (mtimes kept: they count as done)."""
    work = where / "work"
    for rel in ("world", "models/base", "tokens/pool.tokens.npz", "tokens/pool.tokens.json", "masks/full.mask.npy",
                "masks/full.mask.json"):
        dst = work / "results" / "smoke" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (smoke_run / rel).is_dir() else shutil.copy2)(smoke_run / rel, dst)
    (where / "longer.yaml").write_text(LONGER)
    return work


def running_sft_job(work: Path, env: dict[str, str], proc: subprocess.Popen) -> str:
    """The Slurm id of the SFT job, once it has written its first checkpoint (at most 600 s)."""
    state = work / f"{TARGET}.resume" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 600
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not state.exists():
        pytest.fail("the SFT job ended (or never started) before its first checkpoint; raise the steps in LONGER")
    jobs = [line.split("|") for line in slurm(env, "squeue", "-h", "-t", "running", "-o", "%i|%k").split()]
    # The executor names a job rule_<rule>_wildcards_<values joined by "_">; the replicate wildcard is empty here.
    ids = [i for i, comment in jobs if comment.startswith("rule_sft_wildcards_") and comment.endswith("_full_s1")]
    assert len(ids) == 1, jobs
    return ids[0]


def assert_resumed_to_the_straight_weights(work: Path, straight: Path) -> None:
    import torch
    from safetensors.torch import load_file

    log = (work / "results" / "smoke" / "logs" / "sft" / "full_s1.log").read_text()
    resumed = re.findall(r"resuming from \S+ at step (\d+)", log)
    assert resumed and int(resumed[-1]) > 0, f"the job started over instead of resuming:\n{log[-2000:]}"
    target = work / TARGET
    assert not (work / f"{TARGET}.resume").exists()
    assert [p.name for p in target.parent.iterdir()] == ["full_s1"]  # no temporary of the killed job left
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(target / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # Snakemake through Slurm
def test_a_training_job_cancelled_on_slurm_resumes_to_the_uninterrupted_weights(cluster, smoke_run, straight,
                                                                                  tmp_path):
    """scancel the SFT job after its first checkpoint: Snakemake sees it CANCELLED (squeue), submits it again
    (profiles/slurm: retries 1), and the new job resumes from the checkpoint and saves exactly the weights of the
    uninterrupted run."""
    work = with_inputs(smoke_run, tmp_path)
    with Workflow(work, cluster, TARGET, overrides=tmp_path / "longer.yaml") as run:
        job = running_sft_job(work, cluster, run.proc)
        slurm(cluster, "scancel", job)
        rc, out = run.finish(timeout=900)
    assert rc == 0, out[-4000:]
    assert re.search(rf"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'", out), out[-3000:]
    assert len(sbatch_logs(work)["sft"]) == 2  # the cancelled job and its second submission
    assert_resumed_to_the_straight_weights(work, straight)


@pytest.mark.slow  # Snakemake through Slurm
def test_a_requeued_training_job_leaves_no_half_written_output(cluster, smoke_run, straight, tmp_path):
    """The SFT job dies at once mid-run (SIGKILL to every process of the job: a node lost, an out-of-memory kill;
    nothing can clean up) and Slurm requeues it (scontrol requeue: as with --requeue after a node failure). While
    it waits in the queue nothing is at the output path (the trainer writes a temporary beside it and renames it
    when done); Slurm starts the same job again, which resumes from the checkpoint and saves the uninterrupted
    run's weights, with no temporary left."""
    work = with_inputs(smoke_run, tmp_path)
    with Workflow(work, cluster, TARGET, overrides=tmp_path / "longer.yaml") as run:
        job = running_sft_job(work, cluster, run.proc)
        os.kill(run.pid, signal.SIGSTOP)  # Snakemake does not look while the job dies and is requeued
        try:
            for line in slurm(cluster, "scontrol", "listpids", job).splitlines()[1:]:  # the job's processes
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[0]), signal.SIGKILL)
            wait_for_state(cluster, job, lambda s: s not in ("RUNNING", "COMPLETING"))
            slurm(cluster, "scontrol", "requeue", job)
            wait_for_state(cluster, job, lambda s: s == "PENDING")
        finally:
            os.kill(run.pid, signal.SIGCONT)
        assert not (work / TARGET).exists()  # nothing half-written where the rule's output goes
        rc, out = run.finish(timeout=900)
    assert rc == 0, out[-4000:]
    assert [p.stem for p in sbatch_logs(work)["sft"]] == [job]  # one sbatch job: Slurm ran it again itself
    assert_resumed_to_the_straight_weights(work, straight)


def wait_for_state(env: dict[str, str], job: str, done, timeout: float = 120) -> str:
    """The job's state (squeue), once `done(state)` holds (at most `timeout` s)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = slurm(env, "squeue", "-h", "--states=all", "-j", job, "-o", "%T").strip()
        if done(state):
            return state
        time.sleep(0.05)
    pytest.fail(f"Slurm job {job} is still {state} after {timeout:.0f} s")


def node_memory_mb(env: dict[str, str]) -> int:
    return max(int(m) for m in slurm(env, "sinfo", "-h", "-N", "-p", "local", "-o", "%m").split())


@pytest.mark.slow  # Snakemake through Slurm
@pytest.mark.parametrize("resource", ["mem_mb", "runtime"])
def test_a_job_beyond_the_cluster_stops_the_run_before_anything_is_submitted(cluster, resource, tmp_path):
    """A training job asking for more memory than the node has (sbatch would refuse it, but only when submitted,
    after the jobs it waits for), or for more time than the partition allows (Slurm would accept it and keep it
    PENDING forever, reason PartitionTimeLimit): the run stops while planning, one line naming the rule, the
    resource and the limit, exit 2, no job in the queue."""
    value = node_memory_mb(cluster) + 1 if resource == "mem_mb" else 1441  # the partition's MaxTime: one day
    work = tmp_path / "work"
    work.mkdir()
    with Workflow(work, cluster, "--set-resources", f"sft:{resource}={value}") as run:
        rc, out = run.finish(timeout=180)
    errors = [line for line in out.splitlines() if line.startswith("slurm error:")]
    assert rc == 2, out[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"slurm error: rule sft asks for {resource}={value} "), out
    assert ("MaxTime" if resource == "runtime" else "MB of memory") in errors[0]
    assert "set-resources: sft:" in errors[0]
    assert "has been submitted" not in out and not (work / ".snakemake" / "slurm_logs").exists()


# What `scontrol show partition -o` / `scontrol show node -o` print (Slurm 22.05), shortened: a GPU partition with
# one node drained, a CPU partition with a time and memory limit, a partition whose only node is down.
PARTITIONS = """\
PartitionName=gpu AllowGroups=ALL Default=YES MaxTime=2-00:00:00 MaxCPUsPerNode=UNLIMITED Nodes=g[1-2] State=UP
PartitionName=cpu Default=NO MaxTime=12:00:00 Nodes=c1 State=UP MaxMemPerNode=64000 MaxCPUsPerNode=32
PartitionName=old Default=NO MaxTime=UNLIMITED Nodes=o1 State=UP MaxMemPerNode=UNLIMITED
"""
NODES = """\
NodeName=g1 Arch=x86_64 CPUTot=64 Gres=gpu:a100:8(S:0-1) RealMemory=512000 State=IDLE Partitions=gpu  Reason=x y
NodeName=g2 Arch=x86_64 CPUTot=128 Gres=gpu:h100:8(S:0-1) RealMemory=1024000 State=IDLE+DRAIN Partitions=gpu
NodeName=c1 Arch=x86_64 CPUTot=48 Gres=(null) RealMemory=192000 State=MIXED Partitions=cpu
NodeName=o1 Arch=x86_64 CPUTot=8 Gres=(null) RealMemory=16000 State=DOWN* Partitions=old
"""


def test_the_cluster_check_reads_partitions_and_the_nodes_that_are_up():
    from tokenclean.slurm import gpu_count, minutes, parse_cluster

    assert [minutes(t) for t in ("UNLIMITED", "30", "30:30", "12:00:00", "2-00:00:00", "1-12", "1-00:30")] == \
        [float("inf"), 30, 30.5, 720, 2880, 2160, 1470]
    assert [gpu_count(g) for g in ("(null)", "gpu:4", "gpu:a100:8(S:0-1)", "gpu:2,shard:8", "gpu")] == [0, 4, 8, 2, 1]
    cluster = parse_cluster(PARTITIONS, NODES)
    assert [p.name for p in cluster.values() if p.default] == ["gpu"]
    gpu, cpu = cluster["gpu"], cluster["cpu"]
    assert [(n.name, n.cpus, n.mem_mb, n.gpus, n.usable) for n in gpu.nodes] == \
        [("g1", 64, 512000, 8, True), ("g2", 128, 1024000, 8, False)]
    assert (cpu.max_minutes, cpu.max_mem_mb, cpu.max_cpus) == (720, 64000, 32)


@pytest.mark.parametrize(("resources", "threads", "expected"), [
    ({"mem_mb": 512000, "cpus_per_task": 64, "gpu": 8, "runtime": 2880}, 1, []),  # g1 exactly; g2 is drained
    ({"mem_mb": 600000}, 1, ["rule r asks for mem_mb=600000 but the largest node of partition 'gpu' has 512000 MB"]),
    ({"mem_mb_per_cpu": 10000, "cpus_per_task": 64}, 1, ["rule r asks for mem_mb=640000 "]),
    ({}, 65, ["rule r asks for cpus_per_task=65 but the largest node of partition 'gpu' has 64 CPUs"]),
    ({"gres": "gpu:a100:9"}, 1, ["rule r asks for gpu=9 but the largest node of partition 'gpu' has 8 GPUs"]),
    ({"runtime": 2881}, 1, ["rule r asks for runtime=2881 minutes but partition 'gpu' allows 2880 (MaxTime)"]),
    ({"slurm_partition": "cpu", "mem_mb": 100000, "cpus_per_task": 40}, 1,
     ["rule r asks for mem_mb=100000 but the largest node of partition 'cpu' has 64000 MB",
      "rule r asks for cpus_per_task=40 but the largest node of partition 'cpu' has 32 CPUs"]),
    ({"slurm_partition": "cpu", "gpu": 1}, 1, ["rule r asks for gpu=1 but the largest node of partition 'cpu' has 0"]),
    ({"slurm_partition": "old"}, 1, ["rule r: partition 'old' has no node up (all down or drained)"]),
    ({"slurm_partition": "gpus"}, 1, ["rule r: partition 'gpus' does not exist (the cluster has: cpu, gpu, old)"]),
    ({"mem_mb": "<TBD>"}, 1, []),  # a size Snakemake determines later is not judged
])
def test_the_cluster_check_names_each_request_no_node_can_hold(resources, threads, expected):
    """Each problem is one line naming the rule, the resource, what it asked and what the cluster has."""
    from tokenclean.slurm import SlurmPlanError, check_plan, parse_cluster

    cluster = parse_cluster(PARTITIONS, NODES)
    if not expected:
        check_plan([("r", resources, threads)], cluster)
        return
    with pytest.raises(SlurmPlanError) as e:
        check_plan([("r", resources, threads), ("r", resources, threads)], cluster)  # one line per (rule, problem)
    lines = str(e.value).splitlines()
    assert len(lines) == len(expected) and all(line.startswith(x) for line, x in zip(lines, expected, strict=True))


# What `squeue -h --states=all -o '%i|%T|%P|%k|%r'` printed (Slurm 22.05): a job whose launch failed (its
# slurmstepd socket path too long), two held ones, one waiting for CPUs, one running, one done.
QUEUE = """\
11|PENDING|gpu|rule_sft_wildcards_full_s1|launch failed requeued held
12|PENDING|gpu|rule_token_loss_wildcards_pool|JobHeldAdmin
13|PENDING|cpu|rule_chunk_tokens|JobHeldUser
14|PENDING|gpu|rule_evaluate_wildcards_a_b|Resources
15|RUNNING|gpu|rule_select_wildcards_x|None
16|COMPLETED|gpu|rule_data|None
"""


def test_the_watch_names_the_rule_and_job_of_every_held_job_at_once():
    """A held job never starts by itself: each is named at the first look with Slurm's reason and what to do; a job
    waiting for resources on a partition with a node up, a running and a finished one are left alone."""
    from tokenclean.slurm import parse_cluster, parse_queue, stuck

    queue = parse_queue(QUEUE)
    assert [(q.job, q.rule) for q in queue] == [("11", "sft"), ("12", "token_loss"), ("13", "chunk_tokens"),
                                                ("14", "evaluate"), ("15", "select"), ("16", "data")]
    found = stuck(queue, lambda: parse_cluster(PARTITIONS, NODES), {}, now=0.0, node_wait=300)
    assert [(q.job, what.split(":")[0]) for q, what in found] == [
        ("11", "held (launch failed requeued held)"), ("12", "held (JobHeldAdmin)"), ("13", "held (JobHeldUser)")]
    assert "slurmd's log" in found[0][1] and "scontrol release" in found[1][1]


def test_the_watch_names_a_job_whose_partition_has_no_node_up_once_it_waited_long_enough():
    """A job on a partition whose every node is down or drained: named after `node_wait` seconds of that (a node
    back in time resets the clock), with Slurm's reason; the cluster is asked only while such a job waits."""
    from tokenclean.slurm import parse_cluster, parse_queue, stuck

    asked = []

    def cluster(nodes: str = NODES):
        asked.append(1)
        return parse_cluster(PARTITIONS, nodes)

    queue = parse_queue("21|PENDING|old|rule_sft_wildcards_x|ReqNodeNotAvail, UnavailableNodes:o1\n"
                        "22|PENDING|gpu|rule_sft_wildcards_y|Priority\n")
    since: dict[str, float] = {}
    assert stuck(queue, cluster, since, now=100.0, node_wait=60) == []
    assert stuck(queue, cluster, since, now=159.0, node_wait=60) == []
    found = stuck(queue, cluster, since, now=160.0, node_wait=60)
    assert [(q.job, what) for q, what in found] == [("21", "no node of partition 'old' up for 60 s (ReqNodeNotAvail, "
                                                     "UnavailableNodes:o1): run again once its nodes are back (sinfo "
                                                     "-p old), or choose another partition (slurm_partition in the "
                                                     "profile)")]
    back = NODES.replace("State=DOWN*", "State=IDLE")
    assert stuck(queue, lambda: cluster(back), since, now=170.0, node_wait=60) == [] and since == {}
    assert stuck(queue, cluster, since, now=200.0, node_wait=60) == []  # down again: the clock starts over
    n = len(asked)
    assert stuck(parse_queue(QUEUE.replace("Resources", "JobHeldUser")), cluster, {}, 0.0, 60) and len(asked) == n


def slurm_installed() -> None:
    """Skip unless Slurm and munge are installed (a failure under CI, which installs them)."""
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(c, path=os.environ["PATH"]
                                                                                          + ":/usr/sbin")]
    if missing:
        reason = f"Slurm is not installed ({', '.join(missing)} not found; docs/slurm.md)"
        if os.environ.get("TOKENCLEAN_REQUIRE_SLURM") == "1":
            pytest.fail(reason + ", and TOKENCLEAN_REQUIRE_SLURM=1")
        pytest.skip(reason)


@pytest.mark.slow  # starts and stops a Slurm cluster
@pytest.mark.parametrize("where", ["63 characters", "deep", "space"])
def test_the_local_cluster_runs_jobs_from_a_deep_path_and_from_a_path_with_a_space(where, tmp_path):
    """scripts/local-slurm.sh in a clone deep enough that a socket under its .cache/ would pass the 108 bytes of a
    Unix socket path (at 63 characters, the issue's, a job's slurmstepd socket could not be made and every job was
    held, "launch failed requeued held"; deeper, munged would not start), and in a short one whose path holds a
    space (slurm.conf cannot quote one): a job with a step runs, and `stop` removes it all."""
    slurm_installed()
    if where == "63 characters":  # or deeper, where tmp_path is longer
        clone = tmp_path / ("c" * max(1, 62 - len(str(tmp_path))))
    elif where == "deep":
        clone = tmp_path / "deep" / ("d" * 70) / "clone"
    else:  # short, so that only the space is new
        clone = Path(tempfile.mkdtemp(prefix="tc slurm ")) / "clone"
        assert len(str(clone / ".cache" / "local-slurm" / "munge" / "munge.socket")) < 80
    (clone / "scripts").mkdir(parents=True)
    script = clone / "scripts" / "local-slurm.sh"
    shutil.copy2(ROOT / "scripts" / "local-slurm.sh", script)
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENCLEAN_SLURM_DIR", "SLURM_CONF")}
    assert len(str(clone / ".cache" / "local-slurm" / "spool" / "localnode" / "localnode_1.4294967291")) > 108 \
        or " " in str(clone)
    link = clone / ".cache" / "local-slurm"
    try:
        proc = subprocess.run([str(script), "start"], capture_output=True, text=True, env=env, timeout=180,
                              check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        env["PATH"] = f"{link / 'bin'}{os.pathsep}{env['PATH']}"
        job = slurm(env, "sbatch", "--parsable", "--output", "/dev/null", "--wrap", "srun true").strip().split(";")[0]
        assert wait_for_state(env, job, lambda s: s not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"),
                              timeout=90) == "COMPLETED"
    finally:
        proc = subprocess.run([str(script), "stop"], capture_output=True, text=True, env=env, timeout=180,
                              check=False)
        if where == "space":
            shutil.rmtree(clone.parent, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not os.path.lexists(link) and not os.path.lexists(proc.stdout.split(" and ")[-1].split()[0])


@pytest.fixture
def busy_node(cluster):
    """The node taken whole by a job of the test's own, so that the run's job waits in the queue; after the test,
    that job cancelled and the node up again (a test may drain it)."""
    job = slurm(cluster, "sbatch", "--parsable", "--exclusive", "--job-name", "busy", "--output", "/dev/null",
                "--wrap", "sleep 600")
    job = job.strip().split(";")[0]
    try:
        wait_for_state(cluster, job, lambda s: s == "RUNNING")
        yield job
    finally:
        subprocess.run(["scancel", job], env=cluster, timeout=30, check=False)
        subprocess.run(["scontrol", "update", "nodename=localnode", "state=resume"], env=cluster, capture_output=True,
                       timeout=30, check=False)  # refused when it was not drained


def queued_job(run: Workflow, timeout: float = 300) -> str:
    """The Slurm id of the run's first job, once it waits in the queue."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.proc.poll() is None:
        found = re.search(r"SLURM run ID: (\S+)", run.log.read_text())
        if found:
            jobs = slurm(run.env, "squeue", "-h", "-t", "pending", "--name", found.group(1), "-o", "%i").split()
            if jobs:
                return jobs[0]
        time.sleep(0.2)
    pytest.fail(f"no job of the run came into the queue:\n{run.log.read_text()[-3000:]}")


@pytest.mark.slow  # Snakemake through Slurm
@pytest.mark.parametrize("fault", ["held", "node drained"])
def test_a_job_slurm_will_never_start_ends_the_run_with_one_line(cluster, busy_node, fault, tmp_path):
    """The run's job waits in the queue (the node is busy), then Slurm holds it (`scontrol hold`: as after a failed
    launch, "launch failed requeued held") or its partition loses its only node (drained): the executor plugin
    would wait for it forever. It is cancelled within a bounded time with one line naming the rule, the job and
    Slurm's reason, and the run fails (--retries 0: no second submission); nothing of the run is left queued."""
    work = tmp_path / "work"
    work.mkdir()
    env = {**cluster, "TOKENCLEAN_SLURM_NODE_WAIT": "5"}
    with Workflow(work, env, "results/smoke/world", "--retries", "0") as run:
        job = queued_job(run)
        if fault == "held":
            slurm(cluster, "scontrol", "hold", job)
        else:
            slurm(cluster, "scontrol", "update", "nodename=localnode", "state=drain", "reason=tokenclean test")
        rc, out = run.finish(timeout=240)
    errors = [line for line in out.splitlines() if line.startswith("slurm error:")]
    said = "held (JobHeld" if fault == "held" else "no node of partition 'local' up for "
    assert rc == 1, out[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"slurm error: rule world, Slurm job {job}: {said}"), out[-3000:]
    assert re.search(rf"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'", out), out[-3000:]
    assert slurm(cluster, "squeue", "-h", "-j", job, "--states=all", "-o", "%T").strip() == "CANCELLED"
    assert not (work / "results" / "smoke" / "world").exists()
