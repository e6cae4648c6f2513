"""How training jobs are launched: one process, or one per GPU (the command the workflow builds)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import pytest

from tokenclean.launch import tokenclean_command


def test_one_gpu_is_a_plain_process():
    assert tokenclean_command("/venv/bin/python") == "/venv/bin/python -m tokenclean.cli"


@pytest.mark.parametrize("launcher,module,count_flag", [
    ("torchrun", "torch.distributed.run", "--nproc_per_node"),
    ("accelerate", "accelerate.commands.launch", "--num_processes")])
def test_several_gpus_start_one_process_each_through_the_launcher(launcher, module, count_flag):
    argv = shlex.split(tokenclean_command("/path with space/python", 4, launcher))
    assert argv[0] == "/path with space/python" and argv[1:3] == ["-m", module]
    assert argv[argv.index(count_flag) + 1] == "4"
    assert argv[-2:] == ["-m", "tokenclean.cli"]  # `train ...` follows


def test_bad_launch_settings_are_refused():
    with pytest.raises(ValueError, match="launcher"):
        tokenclean_command("python", 2, "mpirun")
    with pytest.raises(ValueError, match="gpus"):
        tokenclean_command("python", 0)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_hardware_timeout_reaches_the_training_processes(launcher):
    from tokenclean.distributed import TIMEOUT_ENV

    argv = shlex.split(tokenclean_command("python", 8, launcher, timeout_minutes=120))
    assert argv[:2] == ["env", f"{TIMEOUT_ENV}=120"] and argv[2] == "python"
    assert not tokenclean_command("python", 1, launcher, timeout_minutes=120).startswith("env")  # no group
    with pytest.raises(ValueError, match="timeout"):
        tokenclean_command("python", 2, launcher, timeout_minutes=0)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_hardware_sharding_reaches_the_training_processes(launcher):
    from tokenclean.launch import SHARDING_ENV, TIMEOUT_ENV

    argv = shlex.split(tokenclean_command("python", 8, launcher, timeout_minutes=60, sharding="fsdp"))
    assert argv[:3] == ["env", f"{TIMEOUT_ENV}=60", f"{SHARDING_ENV}=fsdp"] and argv[3] == "python"
    assert SHARDING_ENV not in tokenclean_command("python", 8, launcher)  # none: DDP, nothing to pass
    with pytest.raises(ValueError, match=r"^hardware.sharding: fsdp needs hardware.gpus > 1"):
        tokenclean_command("python", 1, launcher, sharding="fsdp")
    with pytest.raises(ValueError, match=r"^hardware.sharding: unknown 'zero3'"):
        tokenclean_command("python", 8, launcher, sharding="zero3")


def fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")


def test_bfloat16_on_a_gpu_without_it_is_refused_and_auto_falls_back_to_float32(monkeypatch):
    import torch

    from tokenclean.models import pick_dtype

    fake_gpus(monkeypatch, 1, bf16=False)
    gpu = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"^dtype bfloat16: Tesla V100 has no bfloat16 support; set dtype"):
        pick_dtype("bfloat16", gpu)
    assert pick_dtype("auto", gpu) == torch.float32 and pick_dtype("float16", gpu) == torch.float16
    fake_gpus(monkeypatch, 1, bf16=True)
    assert pick_dtype("auto", gpu) == torch.bfloat16
    cpu = torch.device("cpu")
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16 and pick_dtype(None, cpu) == torch.float32


def test_a_gpu_job_starts_through_the_slot_allocator_before_its_launcher():
    argv = shlex.split(tokenclean_command("python", 8, "torchrun", timeout_minutes=60, gpu_slots=8))
    assert argv[:6] == ["python", "-m", "tokenclean.gpu_slots", "--gpus", "8", "--"]
    assert argv[6:8] == ["env", "TOKENCLEAN_DIST_TIMEOUT_MINUTES=60"] and "torch.distributed.run" in argv
    assert shlex.split(tokenclean_command("python", 1, gpu_slots=1)) == [
        "python", "-m", "tokenclean.gpu_slots", "--gpus", "1", "--", "python", "-m", "tokenclean.cli"]
    assert "gpu_slots" not in tokenclean_command("python", 1)  # the embedded world on the CPU: no allocator


def slot_job(tmp_path, name: str, gpus: int, hold_s: float, visible: str = "0,1") -> subprocess.Popen:
    """A job through the allocator that records the GPUs it got and when it held them."""
    record = (f"import os, time; t = time.time(); time.sleep({hold_s}); "
              f"open({str(tmp_path / name)!r}, 'w')"
              ".write(os.environ['CUDA_VISIBLE_DEVICES'] + ' %f %f' % (t, time.time()))")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    env["CUDA_VISIBLE_DEVICES"] = visible
    return subprocess.Popen([sys.executable, "-m", "tokenclean.gpu_slots", "--gpus", str(gpus), "--lock-dir",
                             str(tmp_path / "locks"), "--", sys.executable, "-c", record], env=env,
                            stderr=subprocess.PIPE, text=True)


def test_one_gpu_jobs_run_side_by_side_on_their_own_gpus_and_a_two_gpu_job_waits_for_both(tmp_path):
    first, second = slot_job(tmp_path, "a", 1, 2.0), slot_job(tmp_path, "b", 1, 2.0)
    time.sleep(0.5)  # both hold their GPU when the third asks for two
    both = slot_job(tmp_path, "c", 2, 0.0)
    for job in (first, second, both):
        assert job.wait(timeout=60) == 0, job.stderr.read()
    got = {name: (tmp_path / name).read_text().split() for name in "abc"}
    assert {got["a"][0], got["b"][0]} == {"0", "1"}  # side by side, each on its own GPU
    assert max(float(got["a"][1]), float(got["b"][1])) < min(float(got["a"][2]), float(got["b"][2]))
    assert got["c"][0] == "0,1" and float(got["c"][1]) >= max(float(got["a"][2]), float(got["b"][2])) - 0.05


def test_a_job_asking_for_more_gpus_than_the_machine_shows_stops_in_one_line(tmp_path):
    job = slot_job(tmp_path, "a", 4, 0.0, visible="0,1")
    assert job.wait(timeout=60) == 2 and not (tmp_path / "a").exists()
    assert job.stderr.read().strip() == ("gpu_slots: error: hardware.gpus: 4 GPUs asked for, 2 visible here "
                                         "(CUDA_VISIBLE_DEVICES=0,1); set hardware.gpus to at most 2")


def test_without_gpus_or_under_a_cluster_scheduler_the_command_runs_as_it_is(tmp_path):
    job = slot_job(tmp_path, "cpu", 2, 0.0, visible="")  # no GPU: the processes train on the CPU
    assert job.wait(timeout=60) == 0, job.stderr.read()
    assert (tmp_path / "cpu").read_text().startswith(" ") and not (tmp_path / "locks").exists()  # nothing set
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "5,7", "SLURM_JOB_ID": "1"}  # Slurm chose this job's GPUs
    out = subprocess.run([sys.executable, "-m", "tokenclean.gpu_slots", "--gpus", "2", "--lock-dir",
                          str(tmp_path / "locks"), "--", sys.executable, "-c",
                          "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"], env=env, capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "5,7" and not (tmp_path / "locks").exists()
