"""Warm start (tokenclean/warm.py): a command forked from the run's warm server computes the same bits as a fresh
process, ends with the same exit code and output, runs fresh (saying why) where its environment differs, and ends
when its launcher is killed. The smoke run of the suite goes through it (its table hash is the recorded one)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import psutil
import pytest

from tokenclean import numerics, warm

ROOT = Path(__file__).resolve().parents[1]
PYTEST_VAR = "PYTEST_CURRENT_TEST"
Server = namedtuple("Server", "socket log")
MODEL = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "vocab_size": 200, "max_length": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A warm server as a workflow run starts one, its socket path, for this module's commands."""
    work = tmp_path_factory.mktemp("warm")
    current_test = os.environ.pop(PYTEST_VAR, None)  # pytest changes it from test to test
    try:
        path = warm.start(str(work), sys.executable, str(work / "warm.log"))
    finally:
        if current_test is not None:
            os.environ[PYTEST_VAR] = current_test
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert time.monotonic() < deadline, (work / "warm.log").read_text()
        time.sleep(0.2)
    yield Server(path, work / "warm.log")
    server_proc = warm._servers[path]
    warm.stop(path)
    assert server_proc.poll() is not None and not os.path.exists(path)


def tokenclean(argv: list[str], socket: str | None, extra_env: dict[str, str] | None = None,
               **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m tokenclean.cli ...` as a workflow job runs it: through the warm server when ``socket`` is named."""
    env = {k: v for k, v in os.environ.items() if k not in (warm.ENV, PYTEST_VAR)}
    if socket:
        env[warm.ENV] = socket
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "tokenclean.cli", *argv]
    if kwargs.pop("background", False):
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def corpus(work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    (work / "corpus.jsonl").write_text("".join(
        json.dumps({"text": f"{a} plus {b} makes {a + b} ."}) + "\n" for a in range(15) for b in range(15)))
    (work / "sft.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a} plus {b}", "completion": f"makes {a + b} ."}) + "\n" for a in range(0, 15, 4)
        for b in range(15)))
    return work


def pretrain_and_score(work: Path, socket: str | None) -> tuple[str, str, str]:
    """A short pretrain, tokenize and loss, each its own command: the weights' and the losses' sha256, and the log."""
    steps = [["pretrain", "--threads", "1", "--corpus", f"{work}/corpus.jsonl", "--model-params", json.dumps(MODEL),
              "--steps", "12", "--batch-size", "8", "--pack-length", "64", "--seed", "0", "--out", f"{work}/model"],
             ["tokenize", "--data", f"{work}/sft.jsonl", "--tokenizer", f"{work}/model", "--max-length", "64",
              "--out", f"{work}/sft.tokens.npz"],
             ["loss", "--threads", "1", "--model", f"{work}/model", "--tokens", f"{work}/sft.tokens.npz",
              "--out", f"{work}/sft.loss.npy"]]
    log = ""
    for argv in steps:
        proc = tokenclean(argv, socket)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log += proc.stderr
    return (numerics.weights_sha256(work / "model"),
            hashlib.sha256(np.load(work / "sft.loss.npy").tobytes()).hexdigest(), log)


@pytest.mark.slow
def test_a_forked_command_computes_the_same_bits_as_a_fresh_process(server, tmp_path):
    log = server.log
    jobs_before = log.read_text().count(": job ")
    fresh = pretrain_and_score(corpus(tmp_path / "fresh"), None)
    assert log.read_text().count(": job ") == jobs_before
    forked = pretrain_and_score(corpus(tmp_path / "forked"), server.socket)
    assert log.read_text().count(": job ") == jobs_before + 3, forked[2][:1500]  # the three were forks
    assert forked[:2] == fresh[:2]
    assert "warm start not used" not in forked[2]


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["select", "--method", "fixed", "--ratio", "0.6", "--tokens", "/nonexistent/pool.tokens.npz",
     "--out", "/tmp/never.npy"],
    ["train", "--no-such-flag"],
    ["--version"],
])
def test_exit_code_and_output_are_the_fresh_process_s(server, argv):
    fresh, forked = tokenclean(argv, None), tokenclean(argv, server.socket)
    assert forked.returncode == fresh.returncode
    assert forked.stdout == fresh.stdout
    assert forked.stderr.strip().splitlines()[-1:] == fresh.stderr.strip().splitlines()[-1:]


@pytest.mark.slow
def test_a_job_whose_environment_differs_runs_fresh_and_says_why(server):
    proc = tokenclean(["--version"], server.socket, {"TOKENIZERS_PARALLELISM": "maybe", "SOME_SETTING": "1"})
    assert proc.returncode == 0 and proc.stdout.strip()
    line, = [x for x in proc.stderr.splitlines() if "warm start" in x]
    assert "SOME_SETTING" in line and "TOKENIZERS_PARALLELISM" in line and "fresh process" in line


@pytest.mark.slow
def test_without_a_server_a_job_runs_fresh_without_a_word(tmp_path):
    proc = tokenclean(["--version"], str(tmp_path / "no.sock"))
    assert proc.returncode == 0 and proc.stdout.strip() and "warm" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_command_ends_when_its_launcher_is_killed(server, tmp_path, how):
    """Snakemake ends a job by signalling its process group; the fork runs outside it, so it must follow."""
    work = corpus(tmp_path)
    launcher = tokenclean(["pretrain", "--threads", "1", "--corpus", f"{work}/corpus.jsonl", "--model-params",
                           json.dumps(MODEL), "--steps", "100000", "--batch-size", "8", "--out", f"{work}/model"],
                          server.socket, background=True)
    server_proc = psutil.Process(warm._servers[server.socket].pid)
    deadline = time.monotonic() + 60
    while not server_proc.children():
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    launcher.send_signal(how)
    launcher.wait(timeout=30)
    deadline = time.monotonic() + 30
    while server_proc.children():
        assert time.monotonic() < deadline, "the forked command outlived its launcher"
        time.sleep(0.2)
    assert launcher.returncode != 0
    assert not (work / "model").exists()


def test_only_what_snakemake_sets_per_job_may_differ():
    server = {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    assert warm.mismatch({**server, "OMP_NUM_THREADS": "1", "TMPDIR": "/tmp/x", warm.ENV: "/s"}, server) is None
    assert "HF_HUB_OFFLINE" in warm.mismatch({**server, "HF_HUB_OFFLINE": "0"}, server)
    assert "HF_HUB_OFFLINE" in warm.mismatch({"PATH": "/bin"}, server)
    many = warm.mismatch({**server, **{f"V{i}": "1" for i in range(8)}}, server)
    assert many.endswith("and 3 more")


@pytest.mark.slow
def test_the_smoke_run_s_jobs_were_forks_of_its_warm_server(smoke_run):
    work = smoke_run.parents[1]
    assert "ready at" in (work / ".snakemake" / "tokenclean-warm.log").read_text()
    fresh = [str(p) for p in smoke_run.rglob("logs/**/*.log") if "warm start not used" in p.read_text()]
    assert not fresh, fresh
