"""The whole workflow on a disk that fills up in the middle of the run (issue 31): the run stops, the failing
rule's log says why in one line, nothing half-written is left at an output path, and once space is freed the same
command completes with the same table, recomputing only the jobs Snakemake had not recorded as complete.

The disk is a small tmpfs, mounted where the tests run as root and may mount (as in CI); elsewhere the test is
skipped with the reason. The command-level cases (every writer on a full or read-only file system, each write step
failing) are in tests/test_write_faults.py.
"""
from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.test_workflow import snakemake

pytestmark = pytest.mark.slow  # two Snakemake runs of the smoke workflow

FULL_AT = "1536k"  # the smoke run writes about 3.5 MiB of results and 0.7 MiB of Snakemake records: fills midway
FREED = "64m"


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights: {proc.stderr.strip()})")


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs the tests as root)")
    disk = tmp_path / "disk"
    mount_tmpfs(disk, FULL_AT)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def artifacts_with_mtimes(results: Path) -> dict[str, int]:
    """Every file of the results but the logs and benchmarks (a rerun job rewrites its own), by workdir path."""
    return {str(p.relative_to(results.parent.parent)): p.stat().st_mtime_ns for p in results.rglob("*")
            if p.is_file() and not {"logs", "benchmarks"} & set(p.relative_to(results).parts)}


def incomplete_outputs(work: Path) -> set[str]:
    """The outputs Snakemake marked as started and never recorded as finished (.snakemake/incomplete/<base64>)."""
    marks = work / ".snakemake" / "incomplete"
    names = set()
    for mark in marks.iterdir() if marks.is_dir() else ():
        try:
            names.add(base64.urlsafe_b64decode(mark.name).decode())
        except ValueError:
            continue
    return names


def test_a_disk_that_fills_midway_stops_the_run_in_one_line_and_the_same_command_completes_after(
        smoke_run, small_disk):
    work = small_disk
    proc = snakemake(work)
    assert proc.returncode != 0, "the smoke run fitted in the small disk; lower FULL_AT"
    failed = re.findall(r"Error in rule (\w+):.*?\n\s+log: (\S+)", proc.stderr, flags=re.S)
    if failed:  # a job of ours met the full disk: its log ends in the one line of the command's error
        rule, log = failed[0]
        lines = (work / log).read_text().strip().splitlines()
        last = lines[-1] if lines else ""
        if last.startswith("tokenclean ") and ": error: " in last:
            assert "no space left" in last.lower() and ("free" in last or "results_dir" in last), (rule, last)
        else:  # the log lies on the full disk too and could not take that line (the earlier lines of the log may
            # have fitted): the exit code of the one-line error says it, never a traceback's 1
            assert "exit status 2" in proc.stderr, (rule, last, proc.stderr[-3000:])
            assert "Traceback" not in (work / log).read_text(), (rule, log)
    else:  # Snakemake met it first, recording a finished job: its own error says so
        assert "No space left on device" in proc.stderr, proc.stderr[-3000:]
    results = work / "results" / "smoke"
    leftovers = [p for p in results.rglob("*") if re.match(r"^\..+\.[a-z0-9_]{8}\.tmp", p.name)]
    assert not leftovers, leftovers  # every writer removed its temporaries
    before = artifacts_with_mtimes(results)
    unrecorded = incomplete_outputs(work)

    subprocess.run(["mount", "-o", f"remount,size={FREED}", str(work)], check=True)
    proc = snakemake(work)  # the very same command
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (results / "table.csv").read_bytes() == (smoke_run / "table.csv").read_bytes()
    after = artifacts_with_mtimes(results)
    rewritten = sorted(f for f, mtime in before.items() if after.get(f) != mtime)
    # an output's own files: itself, what lies inside it (a model directory), its sidecar (x.npy -> x.json)
    owned = unrecorded | {re.sub(r"\.(npy|npz)$", ".json", o) for o in unrecorded}
    beyond = [f for f in rewritten if not any(f == o or f.startswith(o + "/") for o in owned)]
    assert not beyond, (beyond, sorted(unrecorded))
