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
