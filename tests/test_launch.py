"""How training jobs are launched: one process, or one per GPU (the command the workflow builds)."""
from __future__ import annotations

import shlex

import pytest

from tokenclean.launch import tokenclean_command


def test_one_gpu_is_a_plain_process():
    assert tokenclean_command("/venv/bin/python") == "/venv/bin/python -m tokenclean.cli"


@pytest.mark.parametrize("launcher,module,count_flag", [("torchrun", "torch.distributed.run", "--nproc_per_node"),
                                                         ("accelerate", "accelerate.commands.launch", "--num_processes")])
def test_several_gpus_start_one_process_each_through_the_launcher(launcher, module, count_flag):
    check, launch = tokenclean_command("/path with space/python", 4, launcher).split(" && ")
    assert shlex.split(check) == ["/path with space/python", "-m", "tokenclean.cli", "check-gpus", "--gpus", "4"]
    argv = shlex.split(launch)
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

    argv = shlex.split(tokenclean_command("python", 8, launcher, timeout_minutes=120).split(" && ")[1])
    assert argv[:2] == ["env", f"{TIMEOUT_ENV}=120"] and argv[2] == "python"
    assert not tokenclean_command("python", 1, launcher, timeout_minutes=120).startswith("env")  # no group
    with pytest.raises(ValueError, match="timeout"):
        tokenclean_command("python", 2, launcher, timeout_minutes=0)


def fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")


def test_asking_for_more_gpus_than_the_machine_shows_is_one_line_before_any_process_starts(monkeypatch, capsys):
    from tokenclean.cli import main

    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert main(["check-gpus", "--gpus", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("tokenclean check-gpus: error: hardware.gpus: 8 GPUs asked for, 2 visible here "
                   "(CUDA_VISIBLE_DEVICES=0,1); set hardware.gpus to at most 2")
    assert main(["check-gpus", "--gpus", "2"]) == 0
    fake_gpus(monkeypatch, 0)  # no GPU: the processes train on the CPU (gloo)
    assert main(["check-gpus", "--gpus", "8"]) == 0


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
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16 and pick_dtype(None, torch.device("cpu")) == torch.float32
