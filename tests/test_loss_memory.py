"""benchmarks/loss_memory.py: the chunked training loss keeps the losses and gradients and lowers the peak."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a benchmark process over 64 MB logits: ~10 s
def test_loss_memory_benchmark_reports_a_lower_peak_with_the_same_losses():
    """At 512 targets x a 32k vocabulary (64 MB of logits per copy) in chunks of 64 rows, the chunked step's
    peak is well under the unchunked one's, with the same losses and gradients; one JSON line of named figures."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.loss_memory", "--targets", "512", "--vocab", "32768",
                          "--hidden", "16", "--chunk-rows", "64", "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("unchunked_peak_mb", "chunked_peak_mb", "chunked_peak_ratio", "chunked_max_abs_loss_diff",
                "chunked_max_abs_grad_diff", "logits_mb_per_copy", "chunk_rows"):
        assert key in figures, key
    assert figures["logits_mb_per_copy"] == 64.0 and figures["chunk_rows"] == 64
    assert figures["chunked_peak_ratio"] > 2, figures
    assert figures["chunked_max_abs_loss_diff"] <= 1e-6 and figures["chunked_max_abs_grad_diff"] <= 1e-6
