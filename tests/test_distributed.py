"""Data parallelism: two processes (torchrun, CPU, gloo) end with the weights of one process on the same steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tokenclean.cli import main

TEXTS = [("Add 3 and 5 .", "Sure ! The answer is 8 ."), ("hello", "fine thanks and you"),
         ("how are you ?", "the quick brown fox"), ("Reverse the letters : c a t", "t a c"),
         ("x y z", "Hope this helps ."), ("what", "the lazy dog jumps"), ("a b", "c d e f g")]


@pytest.mark.parametrize("extra", [
    [], ["--pack-length", "16", "--loss-normalization", "step"],
    # the paper's rule: micro-batches of 2 whose kept-token counts differ; the same samples must share a mean
    ["--loss-normalization", "micro_batch", "--micro-batch-size", "2"],
    ["--loss-normalization", "micro_batch", "--micro-batch-size", "2", "--pack-length", "16"],
])
def test_two_processes_train_like_one(tmp_path, tiny_model_dir, extra):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TEXTS))
    tokens = tmp_path / "d.tokens.npz"
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(tiny_model_dir), "--max-length", "64",
                 "--out", str(tokens)]) == 0
    # batch 5 over 2 processes: uneven shares (3 and 2 samples) with different counts of kept tokens
    flags = ["--tokens", str(tokens), "--model", str(tiny_model_dir), "--steps", "3", "--batch-size", "5",
             "--lr", "0.01", "--seed", "2", "--max-grad-norm", "1.0", *extra]
    assert main(["train", *flags, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tokenclean.cli", "train", *flags, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max() < 1e-4, (name, float((one[name] - two[name]).abs().max()))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any((one[n] - base[n]).abs().max() > 1e-3 for n in one)  # it did train


def test_the_process_group_gets_the_configured_timeout(monkeypatch):
    """Processes 1..N wait in a barrier while process 0 saves: torch's 10-minute default is not enough."""
    from datetime import timedelta

    import torch

    from tokenclean import distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.setup(torch.device("cpu")) == (1, 2)
    assert calls[-1] == {"backend": "gloo", "timeout": timedelta(minutes=60)}
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    distributed.setup(torch.device("cpu"))
    assert calls[-1]["timeout"] == timedelta(minutes=90)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="TOKENCLEAN_DIST_TIMEOUT_MINUTES"):
        distributed.setup(torch.device("cpu"))
