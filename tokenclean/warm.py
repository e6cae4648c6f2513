"""Warm start: one process of a local workflow run imports torch, transformers and lm-eval once, and every
`tokenclean` job of the run is a fork of it instead of a fresh Python.

Why: on the embedded worlds a job computes for seconds and spends about five more importing the same libraries
(torch, then transformers' model code, lm-eval's task machinery). `make run` starts some sixty such jobs on two
cores: a fifth of its time went to imports (docs/worlds.md, "What each world costs").

What stays the same: a forked job runs the very same ``tokenclean.cli.main`` with the job's own arguments,
working directory, environment, standard streams and threads, on the kernels the same pin chose (the server
applies the pin before it imports torch, as every command does), so it computes the same bits as a fresh process;
``tests/test_warm.py`` compares the two, and the smoke run's recorded table hash is checked with warm start on.
A job whose environment differs from the server's in anything but what Snakemake sets per job (the thread and
temporary-directory variables) runs as a fresh process instead, saying so in one line of its log, as does every
job while no server answers.

How: the workflow's ``onstart`` starts ``python -m tokenclean.warm SOCKET`` when ``warm_start`` is on and jobs
run on this machine, and names the socket in :data:`ENV`, which the jobs inherit. ``tokenclean.cli.main`` hands
its command to the server (:func:`hand_off`): its standard streams travel over the Unix socket (SCM_RIGHTS), the
server forks, the child takes the job's streams, directory and environment, runs the command and sends back its
exit code. The launcher stays in the job's process tree: Snakemake's signals reach the command through it, and a
command whose launcher was killed ends too. What Snakemake's ``benchmark:`` files measure is the launcher:
their wall time is the job's, their memory and CPU columns are not (a run with ``warm_start: false`` measures
those).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import threading
from typing import Any

ENV = "TOKENCLEAN_WARM_SOCKET"
# What Snakemake sets for each job (snakemake.shell: threads, tmpdir), the shell adds and the terminal's size;
# everything else of a job's environment must equal the server's, since libraries read it when imported.
PER_JOB = frozenset({"OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "TMPDIR", "TMP", "TEMP", "TEMPDIR",
                     "_", "PWD", "OLDPWD", "SHLVL", "COLUMNS", "LINES"})
# Imported once by the server: what the commands of a workflow run import (training, scoring, evaluation).
PRELOAD = ("torch", "transformers", "tokenizers", "datasets", "lm_eval", "lm_eval.evaluator", "lm_eval.tasks",
           "lm_eval.models.huggingface", "transformers.models.llama.modeling_llama", "tokenclean.cli",
           "tokenclean.training", "tokenclean.pretrain", "tokenclean.loss", "tokenclean.evaluation",
           "tokenclean.tokenization", "tokenclean.models")
_LENGTH = struct.Struct("!Q")


# --- the job's side (imports nothing heavy) --------------------------------------------------------------------


def hand_off(argv: list[str]) -> int | None:
    """Run ``tokenclean <argv>`` in a fork of the run's warm server and return its exit code; None where this
    job runs as a fresh process (no server: the caller goes on as usual)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    env = {k: v for k, v in os.environ.items() if k != ENV}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env}).encode()
        socket.send_fds(conn, [_LENGTH.pack(len(payload)) + payload], [0, 1, 2])
        reply = _receive(conn)
    except OSError:  # no server (not started yet, or gone): this job starts fresh
        conn.close()
        return None
    if "fallback" in reply:
        print(f"tokenclean: warm start not used for this job ({reply['fallback']}): running it as a fresh "
              f"process", file=sys.stderr, flush=True)
        conn.close()
        return None
    child = int(reply["pid"])

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        reply = _receive(conn)
    except (OSError, ValueError):
        reply = {}
    conn.close()
    if "exit" not in reply:
        print("tokenclean: the command's process ended without an exit status (killed by a signal, e.g. out of "
              "memory); see above for its last output", file=sys.stderr, flush=True)
        return 1
    return int(reply["exit"])


def _send(conn: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    conn.sendall(_LENGTH.pack(len(data)) + data)


def _receive(conn: socket.socket, with_fds: int = 0) -> Any:
    """One length-prefixed JSON message (and, with ``with_fds``, the descriptors sent with its first bytes)."""
    fds: list[int] = []
    if with_fds:
        data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, with_fds)
    else:
        data = conn.recv(1 << 16)
    while len(data) < _LENGTH.size or len(data) < _LENGTH.size + _LENGTH.unpack(data[:_LENGTH.size])[0]:
        more = conn.recv(1 << 16)
        if not more:
            raise ValueError("connection closed in the middle of a message")
        data += more
    message = json.loads(data[_LENGTH.size:_LENGTH.size + _LENGTH.unpack(data[:_LENGTH.size])[0]])
    return (message, fds) if with_fds else message


# --- the server ------------------------------------------------------------------------------------------------


def mismatch(job_env: dict[str, str], server_env: dict[str, str]) -> str | None:
    """Why a job with ``job_env`` cannot be a fork of a server started with ``server_env``; None where it can."""
    keys = {k for k in job_env.keys() | server_env.keys() if k not in PER_JOB and k != ENV}
    differ = sorted(k for k in keys if job_env.get(k) != server_env.get(k))
    if differ:
        return "its environment differs from the warm server's in " + ", ".join(differ[:5]) + (
            f" and {len(differ) - 5} more" if len(differ) > 5 else "")
    return None


def serve(path: str) -> None:
    """Import once, then fork one child per job until the workflow (the parent) ends or sends SIGTERM."""
    from tokenclean import numerics

    server_env = dict(os.environ)  # as the jobs inherit it (each applies the pin itself, to the same values)
    numerics.apply_from_env()  # the pin, before torch starts: as every command does
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    parent = os.getppid()
    _die_with_parent()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    listener.bind(staging)
    listener.listen(64)
    os.replace(staging, path)  # ready: jobs that start from now on are forks
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(OSError):  # its log may sit on a full disk: the server serves all the same
        print(f"tokenclean warm start: ready at {path} ({len(sys.modules)} modules imported)", file=sys.stderr,
              flush=True)
    listener.settimeout(5.0)
    try:
        while os.getppid() == parent:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            if os.fork() == 0:
                listener.close()
                _child(conn, server_env)  # never returns
            conn.close()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _die_with_parent() -> None:
    """Linux: end with the workflow even when it is killed outright (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _child(conn: socket.socket, server_env: dict[str, str]) -> None:
    """One job: take over its streams, directory and environment, run the command, report the exit code."""
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code: Any = 1
    try:
        request, fds = _receive(conn, with_fds=3)
        reason = mismatch(request["env"], server_env)
        if reason or len(fds) != 3:
            _send(conn, {"fallback": reason or "its standard streams did not arrive"})
            os._exit(0)
        with contextlib.suppress(OSError):  # the server's log says which job each fork ran (a full disk: not)
            print(f"tokenclean warm start: job {os.getpid()}: tokenclean {' '.join(request['argv'][:1])} in "
                  f"{request['cwd']}", file=sys.stderr, flush=True)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import tempfile

        tempfile.tempdir = None  # read TMPDIR again
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        _send(conn, {"pid": os.getpid()})
        threading.Thread(target=_end_with_launcher, args=(conn,), daemon=True).start()
        from tokenclean import cli

        sys.argv = [cli.__file__, *request["argv"]]
        try:
            code = cli.main(request["argv"])
        except SystemExit as e:  # argparse's usage errors (2), --help (0)
            code = e.code
            if isinstance(code, str):
                print(code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            code = 130
        except BaseException:  # a bug: its traceback, as a fresh process would print it
            import traceback

            traceback.print_exc()
            code = 1
        code = 0 if code is None else int(code)
    finally:
        import atexit

        with contextlib.suppress(Exception):  # what a fresh process does as it ends (temporary folders, logging)
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            _send(conn, {"exit": code})
        os._exit(code if isinstance(code, int) else 1)


def _end_with_launcher(conn: socket.socket) -> None:
    """The launcher holds the connection open until the command reports; if it goes first (killed), so does the
    command: nothing of a job keeps running after Snakemake ended it."""
    with contextlib.suppress(OSError):
        while conn.recv(1):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def socket_path(workdir: str) -> str:
    """A short path for the run's socket (a Unix socket's path has at most 107 bytes): /tmp, by user and run."""
    import hashlib

    key = hashlib.sha256(f"{os.path.realpath(workdir)}:{os.getpid()}".encode()).hexdigest()[:12]
    return f"/tmp/tokenclean-warm-{os.getuid()}-{key}.sock"


_servers: dict[str, Any] = {}  # socket path -> the server's Popen, in the workflow's process


def start(workdir: str, python: str, log_path: str) -> str:
    """Start the run's server (from the workflow's onstart) and return the socket path the jobs will use."""
    import subprocess

    path = socket_path(workdir)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "w") as log:
        _servers[path] = subprocess.Popen([python, "-m", "tokenclean.warm", path], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log, close_fds=True)
    return path


def stop(path: str) -> None:
    """End the run's server (from the workflow's onsuccess/onerror; it would end with the workflow anyway)."""
    server = _servers.pop(path, None)
    if server is not None and server.poll() is None:
        server.terminate()
        with contextlib.suppress(Exception):
            server.wait(timeout=10)
    with contextlib.suppress(OSError):
        os.unlink(path)


if __name__ == "__main__":
    serve(sys.argv[1])
