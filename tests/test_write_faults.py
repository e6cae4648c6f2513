"""Faults of the machine while writing (issue 31, part 1): every command that writes (all of tests/fuzz.py's
COMMANDS, with their valid arguments) is run with its output on a full disk, on a read-only file system, and with a
failure at each of its write steps. Each must end in exactly one line ``tokenclean <cmd>: error: <output>: cannot
be written: <cause in words> (<ERRNO>); <what to do>``, exit code 2, no traceback, no temporary left, and the
previous output (a good run's, made first) untouched, byte for byte.

- **full disk**: a small tmpfs where the tests run as root and may mount (as CI does): a good run writes the
  output, the tmpfs is then shrunk to what it holds (or to that and room for all its files but the largest) and
  the command runs again; the writers' own errors (numpy's short write, safetensors' and tokenizers' "os error
  28", matplotlib's, datasets') meet the kernel's ENOSPC.
  Elsewhere an ENOSPC raised at every write step (below) stands in for it.
- **read-only**: the tmpfs remounted read-only (elsewhere an EROFS at the first write step).
- **each write step**: an audit hook counts the steps of a good run under the output folder (an open for
  writing, a directory made, a link, a rename), then fails the k-th with ENOSPC, EDQUOT, EROFS, EIO or EACCES
  in turn, for every k.

The last test removes each piece of the handling in turn and shows a case that then ends wrongly.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fuzz
from tests.listing import all_files
from tokenclean import artifacts
from tokenclean.artifacts import TokenTable

SLOW = {"evaluate"}  # lm-eval answers: seconds per run
COMMANDS = [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.name in SLOW else []) for c in fuzz.COMMANDS]
STEP_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES)


@pytest.fixture(scope="module")
def pool(fuzz_inputs) -> TokenTable:
    return TokenTable.load(fuzz_inputs["tokens"])[0]


# ---------------------------------------------------------------------------------------------------------
# a small file system (root, as in CI), and the fault injector (anywhere)
# ---------------------------------------------------------------------------------------------------------
def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], check=False, capture_output=True).returncode == 0


def _can_mount() -> bool:
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        if not _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", d):
            return False  # a container without CAP_SYS_ADMIN
        subprocess.run(["umount", d], check=True)
    return True


CAN_MOUNT = _can_mount()
needs_mount = pytest.mark.skipif(not CAN_MOUNT, reason="mounting a tmpfs needs root (and CAP_SYS_ADMIN); the "
                                                       "write-step faults stand in for it")


@contextlib.contextmanager
def tmpfs(directory: Path) -> Iterator[Path]:
    """A 512 MiB tmpfs at ``directory`` for the duration."""
    directory.mkdir(parents=True, exist_ok=True)
    assert _mount("-t", "tmpfs", "-o", "size=512m", "tmpfs", str(directory)), "mount tmpfs failed"
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path, room: str) -> None:
    """Shrink the tmpfs at ``directory`` to what it holds (``room="none"``: the first block written finds no
    space) or to that and room for every output file but the largest (``"all_but_the_largest"``: the big write,
    numpy's, safetensors', matplotlib's, datasets', is the one that fails)."""
    st = os.statvfs(directory)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    pages = sorted(-(-p.stat().st_size // st.f_frsize) for p in directory.rglob("*") if p.is_file())
    extra = sum(pages[:-1]) * st.f_frsize if room == "all_but_the_largest" else 0
    assert used > 0 and _mount("-o", f"remount,size={used + extra}", str(directory))


def read_only(directory: Path) -> None:
    assert _mount("-o", "remount,ro", str(directory))


class Faults:
    """Counts the write steps under ``root`` (an audit hook sees every open for writing, directory made, link and
    rename, whoever makes it from Python) and fails the ``fail_at``-th with ``code``. One hook for the session
    (an audit hook cannot be removed); it does nothing while ``root`` is None."""

    root: Path | None = None
    steps = 0
    fail_at = 0
    code = errno.ENOSPC
    installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.root is None:
            return
        if event == "open":
            path, mode, flags = args
            if isinstance(mode, str):
                writes = any(c in mode for c in "wax+")
            else:
                writes = isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event in ("os.rename", "os.link"):
            path, writes = args[1], True
        elif event == "os.mkdir":  # one that exists: EEXIST comes first (and mkdir(exist_ok=True) ignores it)
            path, writes = args[0], not os.path.isdir(args[0])
        else:
            return
        if not writes or not isinstance(path, (str, bytes, os.PathLike)):
            return
        path = os.fsdecode(path)
        if not os.path.abspath(path).startswith(str(cls.root) + os.sep):
            return
        cls.steps += 1
        if cls.steps == cls.fail_at:
            raise OSError(cls.code, os.strerror(cls.code), path)

    @classmethod
    @contextlib.contextmanager
    def under(cls, root: Path, fail_at: int = 0, code: int = errno.ENOSPC) -> Iterator[type[Faults]]:
        if not cls.installed:
            sys.addaudithook(cls.hook)
            cls.installed = True
        cls.root, cls.steps, cls.fail_at, cls.code = root.resolve(), 0, fail_at, code
        try:
            yield cls
        finally:
            cls.root = None


# ---------------------------------------------------------------------------------------------------------
# a run and its outcome
# ---------------------------------------------------------------------------------------------------------
def snapshot(directory: Path) -> dict[str, str]:
    """Every file and directory under ``directory`` (hidden temporaries included) with its bytes' hash."""
    return {name: (hashlib.sha256((directory / name).read_bytes()).hexdigest() if (directory / name).is_file()
                   else "dir") for name in all_files(directory)}


def good_run(command: fuzz.Command, inputs: dict[str, Path], table: TokenTable, tmp: Path,
             out: Path | None = None) -> tuple[list[str], Path]:
    """The command's argv on good inputs, its output folder ``tmp/out``, after a good run has written it."""
    argv, _, values = fuzz.prepare(fuzz.Case(command, "", "none", "accept"), inputs, table, tmp)
    out = Path(values["out"])
    out.mkdir(exist_ok=True)
    code, err, tb = fuzz.run_cli(argv)
    assert code == 0 and tb is None, f"the good run of {command.name} failed:\n{err[-2000:]}\n{tb or ''}"
    return argv, out


def faulty_run(argv: list[str], out: Path, code: int | None, before: dict[str, str]) -> str | None:
    """None when ``tokenclean <argv>``, run where writing under ``out`` fails with ``code`` (None: a short
    write, whose errno the writer did not say), ended as it must; otherwise what went wrong."""
    rc, err, tb = fuzz.run_cli(argv)
    if tb is not None:
        return f"escaped with a traceback: {tb.strip().splitlines()[-1]}"
    errors = [line for line in err.splitlines() if ": error: " in line]
    after = snapshot(out)
    if after != before:
        changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
        return f"the previous output changed or a temporary was left (exit {rc}): {changed[:6]}"
    if rc == 0 and not errors:
        return None  # the writer recovered (zipfile opens "w+b", then "wb"), and wrote what the good run did
    if rc != 2 or len(errors) != 1 or "Traceback" in err:
        return f"exit code {rc}, not one error line: {err.strip()[-600:]}"
    line = errors[0]
    if not line.startswith(f"tokenclean {argv[0]}: error: {out}"):
        return f"the error line does not name the output under {out}: {line}"
    words, remedy = artifacts.WRITE_FAULTS[code] if code is not None else ("", "another results_dir")
    name = f"({errno.errorcode[code]}); " if code is not None else ""
    if f": cannot be written: {words}" not in line or name not in line or not line.endswith(remedy):
        return f"the error line does not say the cause ({errno.errorcode.get(code)}) in words and a remedy: {line}"
    if f"{os.sep}." in line.split(": cannot be written")[0]:
        return f"the error names a hidden temporary: {line}"
    return None


def full_disk(command: fuzz.Command, inputs: dict[str, Path], table: TokenTable, tmp: Path,
              room: str = "none") -> str | None:
    with tmpfs(tmp / "out"):
        argv, out = good_run(command, inputs, table, tmp)
        before = snapshot(out)
        fill(out, room)
        return faulty_run(argv, out, errno.ENOSPC, before)


def on_read_only(command: fuzz.Command, inputs: dict[str, Path], table: TokenTable, tmp: Path) -> str | None:
    with tmpfs(tmp / "out"):
        argv, out = good_run(command, inputs, table, tmp)
        before = snapshot(out)
        read_only(out)
        return faulty_run(argv, out, errno.EROFS, before)


def write_steps(command: fuzz.Command, inputs: dict[str, Path], table: TokenTable, tmp: Path,
                only: int | None = None) -> list[str]:
    """Fail each write step of the command in turn (``only``: that one step); the problems found."""
    argv, out = good_run(command, inputs, table, tmp)
    before = snapshot(out)
    with Faults.under(out) as counted:
        assert fuzz.run_cli(argv)[0] == 0
    n = counted.steps
    assert n > 0, f"{command.name} wrote nothing under {out} that the audit hook saw"
    assert snapshot(out).keys() == before.keys()
    before = snapshot(out)  # the rerun's output (a training run stamps its seconds)
    problems = []
    for k in range(1, n + 1) if only is None else [only]:
        code = STEP_FAULTS[k % len(STEP_FAULTS)]
        with Faults.under(out, fail_at=k, code=code):
            problem = faulty_run(argv, out, code, before)
        if problem:
            problems.append(f"step {k} of {n} ({errno.errorcode[code]}): {problem}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------------------
@needs_mount
@pytest.mark.parametrize("room", ["none", "all_but_the_largest"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_ends_in_one_line_and_keeps_the_previous_output(command, room, fuzz_inputs, pool, tmp_path):
    problem = full_disk(command, fuzz_inputs, pool, tmp_path, room)
    assert problem is None, f"{command.name} on a full disk (room for {room}): {problem}"


@needs_mount
@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_file_system_ends_in_one_line_and_keeps_the_previous_output(command, fuzz_inputs, pool,
                                                                                 tmp_path):
    problem = on_read_only(command, fuzz_inputs, pool, tmp_path)
    assert problem is None, f"{command.name} on a read-only file system: {problem}"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_failure_at_each_write_step_ends_in_one_line_and_keeps_the_previous_output(command, fuzz_inputs, pool,
                                                                                      tmp_path):
    problems = write_steps(command, fuzz_inputs, pool, tmp_path)
    assert not problems, f"{command.name}:\n" + "\n".join(problems)


def test_every_command_that_writes_is_covered():
    """The fuzz's list of commands is this suite's: a command added there is run here too."""
    assert {c.values[0].name for c in COMMANDS} == {c.name for c in fuzz.COMMANDS}
    assert all(any(a.startswith("{out}") for a in c.argv) for c in fuzz.COMMANDS)


def test_the_cause_is_found_in_what_each_writer_raises(tmp_path):
    """The texts the writers give a full disk (seen on a tmpfs): an errno, safetensors' and tokenizers' Rust
    "os error 28", numpy's short write (its cause told by the free space), and nothing else."""
    fault = artifacts.write_fault
    target = tmp_path / "x.npy"
    assert fault(OSError(errno.EDQUOT, "Disk quota exceeded"), target).code == errno.EDQUOT
    assert fault(Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
                 target).code == errno.ENOSPC
    assert fault(Exception("Read-only file system (os error 30)"), target).code == errno.EROFS
    assert fault(OSError("pyarrow: [Errno 5] Input/output error"), target).code == errno.EIO
    short = fault(OSError("185382 requested and 992 written"), target)  # this disk has room: no ENOSPC claimed
    assert short.code is None and "992 of 185382 bytes" in str(short) and "another results_dir" in str(short)
    assert fault(OSError(f"{1 << 62} requested and 992 written"), target).code == errno.ENOSPC
    for harmless in (ValueError("ratio 2 is above 1"), KeyError("os error 28"), OSError(errno.ENOENT, "gone")):
        assert fault(harmless, target) is None
    line = str(fault(OSError(errno.ENOSPC, "No space left on device"), target))
    assert line == (f"{target}: cannot be written: no space left on the device (ENOSPC); free space there or write "
                    "to another file system (another results_dir)")


def _put_in_place_without_backups(pairs: list[tuple[Path, Path]]) -> None:
    """The renames as they were: a target already renamed is removed when a later one fails."""
    renamed = []
    try:
        for tmp, path in pairs:
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException:
        for path in renamed:
            path.unlink(missing_ok=True)
        raise


def _replace_dir_removing_first(tmp: Path, path: Path) -> None:
    """The directory swap as it was: the previous directory removed before the new one is renamed."""
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)


def _command(name: str) -> fuzz.Command:
    return next(c for c in fuzz.COMMANDS if c.name == name)


# (what is removed, its replacement, the case that must then end wrongly: a full disk, a read-only file system or
# a failure at write step k)
REMOVED = [
    ("tokenclean.artifacts.write_fault", lambda error, path: None, "select-fixed", "full"),
    ("tokenclean.artifacts.write_fault", lambda error, path: None, "train", "full_but_the_largest"),
    ("tokenclean.artifacts.write_fault", lambda error, path: None, "figure-ratios", "full_but_the_largest"),
    ("tokenclean.artifacts.write_fault", lambda error, path: None, "select-fixed", 1),
    ("tokenclean.artifacts.read_only", lambda directory: False, "report", "read_only"),
    ("tokenclean.artifacts._put_in_place", _put_in_place_without_backups, "select-fixed", 6),
    ("tokenclean.artifacts._replace_dir", _replace_dir_removing_first, "world", "last"),
    ("tokenclean.artifacts._discard", lambda temporary: None, "select-fixed", 3),
]


@pytest.mark.parametrize("target,replacement,name,case", REMOVED,
                         ids=[f"{t.rsplit('.', 1)[1]}-{n}-{c}" for t, _, n, c in REMOVED])
def test_a_removed_handling_lets_its_case_fail(monkeypatch, fuzz_inputs, pool, tmp_path, target, replacement, name,
                                               case):
    """The suite is no test that cannot fail: with one piece of the handling removed, a case of its class ends
    wrongly (and with it in place, the same case ends as it must)."""
    if case in ("full", "full_but_the_largest", "read_only") and not CAN_MOUNT:
        pytest.skip("needs the tmpfs")
    command = _command(name)

    def outcome(tmp: Path) -> str | None:
        tmp.mkdir()
        if case in ("full", "full_but_the_largest"):
            return full_disk(command, fuzz_inputs, pool, tmp, "none" if case == "full" else "all_but_the_largest")
        if case == "read_only":
            return on_read_only(command, fuzz_inputs, pool, tmp)
        if case == "last":  # the last write step: the directory's rename into place
            (tmp / "count").mkdir()
            argv, out = good_run(command, fuzz_inputs, pool, tmp / "count")
            with Faults.under(out) as counted:
                fuzz.run_cli(argv)
            return "\n".join(write_steps(command, fuzz_inputs, pool, tmp, only=counted.steps)) or None
        return "\n".join(write_steps(command, fuzz_inputs, pool, tmp, only=case)) or None

    assert outcome(tmp_path / "with") is None
    monkeypatch.setattr(target, replacement)
    assert outcome(tmp_path / "without") is not None
