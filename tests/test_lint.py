"""The house is lint-clean (`make lint`, which CI runs, checks the same): `ruff` finds nothing in the Python (its
config is in pyproject.toml), and `snakemake --lint` finds nothing in the rules: rules are wiring only (helpers in
rules/common.smk), shell commands read only their rule's params, input, output and log, and every rule has a log,
a benchmark and a conda env."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
RUFF = Path(sys.executable).with_name("ruff")


@pytest.mark.pinned  # ruff is the pinned environment's (a node has none)
def test_ruff_finds_nothing():
    """The pinned ruff (requirements.lock) over the whole tree, with the project's config."""
    proc = subprocess.run([str(RUFF), "check", "--no-cache", "."], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.mark.slow  # about 5 s a config: Snakemake parses the whole workflow
@pytest.mark.parametrize("configfile", [None, "configs/paper/llama-3.2-3b.yaml"], ids=["config.yaml", "paper"])
def test_snakemake_lint_finds_nothing(configfile, tmp_path):
    # Offline: the hub switched off and every proxied connection refused, so a lint that tried to download
    # (a paper config names hub models) would fail instead.
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead, "NO_PROXY": "",
           "no_proxy": ""}
    # `--lint json` of Snakemake 9.27 still prints text: the exit status (1 with any finding) is the verdict.
    cmd = [str(SNAKEMAKE), "--lint", "--directory", str(tmp_path)]
    if configfile:
        cmd += ["--configfile", configfile]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "Lints for" not in out, out[-6000:]
