"""Data parallelism: two processes (torchrun, CPU, gloo) end with the weights of one process on the same steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tokenclean.cli import main

TEXTS = [("Add 3 and 5 .", "Sure ! The answer is 8 ."), ("hello", "fine thanks and you"),
         ("how are you ?", "the quick brown fox"), ("Reverse the letters : c a t", "t a c"),
         ("x y z", "Hope this helps ."), ("what", "the lazy dog jumps"), ("a b", "c d e f g")]


def tokenized(tmp_path: Path, model_dir: Path) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TEXTS))
    tokens = tmp_path / "d.tokens.npz"
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(model_dir), "--max-length", "64",
                 "--out", str(tokens)]) == 0
    return tokens


def train_on_one_and_two_processes(tmp_path: Path, flags: list[str]) -> tuple[dict, dict]:
    """`tokenclean train FLAGS` as one process (into one/) and as two under torchrun (into two/): their weights."""
    assert main(["train", *flags, "--out", str(tmp_path / "one")]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tokenclean.cli", "train", *flags, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max() < 1e-4, (name, float((one[name] - two[name]).abs().max()))
    return one, two


@pytest.mark.slow  # torchrun: two processes
@pytest.mark.parametrize("extra", [
    [], ["--pack-length", "16", "--loss-normalization", "step"],
    # the paper's rule: micro-batches of 2 whose kept-token counts differ; the same samples must share a mean
    ["--loss-normalization", "micro_batch", "--micro-batch-size", "2"],
    ["--loss-normalization", "micro_batch", "--micro-batch-size", "2", "--pack-length", "16"],
    # one micro-batch per step: process 1 has none and joins the gradient sum with a pass of weight 0
    ["--loss-normalization", "micro_batch"],
])
def test_two_processes_train_like_one(tmp_path, tiny_model_dir, extra):
    train_on_one_and_two(tmp_path, tiny_model_dir, extra)


def train_on_one_and_two(tmp_path: Path, tiny_model_dir: Path, extra: list[str]) -> Path:
    """The same steps on one process and on two (torchrun): equal weights, and trained; the two's model dir."""
    tokens = tokenized(tmp_path, tiny_model_dir)
    # batch 5 over 2 processes: uneven shares (3 and 2 samples) with different counts of kept tokens
    flags = ["--tokens", str(tokens), "--model", str(tiny_model_dir), "--steps", "3", "--batch-size", "5",
             "--lr", "0.01", "--seed", "2", "--max-grad-norm", "1.0", *extra]
    one, _ = train_on_one_and_two_processes(tmp_path, flags)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any((one[n] - base[n]).abs().max() > 1e-3 for n in one)  # it did train
    return tmp_path / "two"


@pytest.mark.slow  # torchrun: two processes
@pytest.mark.parametrize("extra", [
    # one slice per process. A large epsilon makes AdamW's update depend on the gradients' scale: averaged
    # instead of summed gradients would show
    ["--adam-epsilon", "1e-3", "--max-grad-norm", "0"],
    # clipping reads the norm of the sharded gradients
    ["--adam-epsilon", "1e-3", "--max-grad-norm", "0.05"],
    # 3 micro-batches of 2 on 2 processes: process 1 adds a pass of weight 0 (each forward all-gathers)
    ["--loss-normalization", "micro_batch", "--micro-batch-size", "2", "--pack-length", "16"],
    # one micro-batch per step: process 1 has none; the layers recompute their activations in the backward pass
    ["--loss-normalization", "micro_batch", "--gradient-checkpointing", "true"],
    ["--online", "eaft"],
])
def test_two_sharded_processes_train_like_one(tmp_path, tiny_model_dir, monkeypatch, extra):
    """hardware.sharding: fsdp (FSDP2 on gloo): parameters, gradients and AdamW moments sharded, the same update."""
    from tokenclean.launch import SHARDING_ENV

    monkeypatch.setenv(SHARDING_ENV, "fsdp")  # one process trains plain; the two shard
    two = train_on_one_and_two(tmp_path, tiny_model_dir, extra)
    assert json.loads((two / "tokenclean.json").read_text())["sharding"] == "fsdp"
    assert "sharding" not in json.loads((tmp_path / "one" / "tokenclean.json").read_text())
    for name in ("config.json", "generation_config.json"):  # the saved copy is the model it trained
        assert json.loads((two / name).read_text()) == json.loads((tmp_path / "one" / name).read_text()), name


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


@pytest.mark.slow  # torchrun: two processes
@pytest.mark.parametrize("online", [
    # ranks across its micro-batch (2 samples: the same micro-batches on 1 process or 2), weights normaliser
    ["--online", "rho1", "--micro-batch-size", "2"],
    # per token from the logits, tokens normaliser; the step split into one slice per process
    ["--online", "eaft"],
])
def test_two_processes_train_an_online_method_like_one_with_the_same_record(tmp_path, tiny_model_dir, online):
    import numpy as np

    from tokenclean.artifacts import TokenTable, load_array, save_array

    tokens = tokenized(tmp_path, tiny_model_dir)
    table, tmeta = TokenTable.load(tokens)
    ref = np.where(table.loss_mask, np.random.default_rng(0).random(table.n_tokens) * 4, np.nan).astype(np.float32)
    save_array(tmp_path / "ref.loss.npy", ref, {"kind": "loss", "tokens": str(tokens),
                                                 "tokens_fingerprint": tmeta["fingerprint"]})
    flags = ["--tokens", str(tokens), "--model", str(tiny_model_dir), "--steps", "3", "--batch-size", "5",
             "--lr", "0.01", "--seed", "2", "--max-grad-norm", "1.0", *online]
    if "rho1" in online:
        flags += ["--ref-loss", str(tmp_path / "ref.loss.npy")]
    train_on_one_and_two_processes(tmp_path, flags)
    w1, _ = load_array(tmp_path / "one" / "weights.npy", "weights", made_on=(tokens, tmeta, table))
    w2, meta = load_array(tmp_path / "two" / "weights.npy", "weights", made_on=(tokens, tmeta, table))
    assert np.array_equal(np.isnan(w1), np.isnan(w2)) and meta["tokens_trained"] == int(np.isfinite(w1).sum())
    assert np.allclose(w1[np.isfinite(w1)], w2[np.isfinite(w2)], atol=1e-4)
    assert np.isfinite(w1).sum() > 0 and (w1[np.isfinite(w1)] < 1).any()  # it weighted, and not every token by 1


@pytest.mark.parametrize("case", ["lora", "no FSDP2", "an older FSDP2", "unknown"])
def test_sharding_the_trainer_cannot_do_is_refused_in_one_line_before_the_model_loads(
        case, tmp_path, tiny_model_dir, monkeypatch, capsys):
    from tokenclean import models
    from tokenclean.launch import SHARDING_ENV

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TEXTS))
    tokens = tmp_path / "d.tokens.npz"
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(tiny_model_dir), "--max-length", "64",
                 "--out", str(tokens)]) == 0
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the refusal comes before any process group
    monkeypatch.setenv(SHARDING_ENV, "zero3" if case == "unknown" else "fsdp")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    if case == "no FSDP2":  # a torch without torch.distributed.fsdp.fully_shard
        monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)
    if case == "an older FSDP2":  # fully_shard without the sum-only collectives that gloo needs
        from torch.distributed.fsdp import FSDPModule
        monkeypatch.delattr(FSDPModule, "set_force_sum_reduction_for_comms")
    flags = ["--lora-r", "4"] if case == "lora" else []
    capsys.readouterr()
    assert main(["train", "--tokens", str(tokens), "--model", str(tiny_model_dir), "--steps", "1", *flags,
                 "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    expected = {"lora": "hardware.sharding: fsdp with lora_r > 0 is not supported yet",
                "no FSDP2": "hardware.sharding: fsdp needs torch's FSDP2 (torch.distributed.fsdp.fully_shard",
                "an older FSDP2": "hardware.sharding: fsdp needs torch's FSDP2",
                "unknown": "hardware.sharding: unknown 'zero3' (one of none, fsdp)"}[case]
    assert err.startswith(f"tokenclean train: error: {expected}") and "\n" not in err, err
    if case == "an older FSDP2":
        assert err.endswith("lacks set_force_sum_reduction_for_comms"), err
    assert not (tmp_path / "m").exists()


JOB = """
import logging
import sys
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from tokenclean.artifacts import TokenTable
from tokenclean.training import TrainConfig, TrainingInterrupted, train_model

logging.basicConfig(level=logging.INFO)
model_dir, tokens, checkpoints, stop_after, out = sys.argv[1:]
table, _ = TokenTable.load(tokens)
cfg = TrainConfig(steps=5, batch_size=5, micro_batch_size=2, lr=0.01, seed=2, adam_epsilon=1e-3, checkpoint_every=2)
try:
    model, summary = train_model(AutoModelForCausalLM.from_pretrained(model_dir), table, table.loss_mask.copy(), cfg,
                           AutoTokenizer.from_pretrained(model_dir).pad_token_id, progress=False,
                           checkpoint_dir=checkpoints, stop_after=int(stop_after) or None)
except TrainingInterrupted:
    sys.exit(0)
print("sharding:", summary.get("sharding", "none"))
if int(__import__("os").environ.get("RANK", "0")) == 0:
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
"""


@pytest.mark.slow  # torchrun: two processes
def test_a_sharded_run_checkpoints_and_resumes_to_the_weights_of_one_uninterrupted_process(tmp_path, tiny_model_dir):
    """Under FSDP, process 0 writes the checkpoint from the gathered shards (the unsharded layout) and every
    process gets its shards of the weights and AdamW moments back: a killed sharded run ends like a plain one."""
    from pathlib import Path

    import tokenclean
    from tokenclean.launch import SHARDING_ENV

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TEXTS))
    tokens = tmp_path / "d.tokens.npz"
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(tiny_model_dir), "--max-length", "64",
                 "--out", str(tokens)]) == 0
    (tmp_path / "job.py").write_text(JOB)

    def job(processes: int, checkpoints: str, stop_after: int, out: str) -> str:
        here = str(Path(tokenclean.__file__).parents[1])  # a script's processes import this checkout's tokenclean
        env = {**os.environ, "OMP_NUM_THREADS": "1", SHARDING_ENV: "fsdp",
               "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(processes), str(tmp_path / "job.py"), str(tiny_model_dir), str(tokens),
                               str(tmp_path / checkpoints), str(stop_after), str(tmp_path / out)],
                              capture_output=True, text=True, env=env, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    assert "sharding: none" in job(1, "plain", 0, "one.safetensors")  # one process: nothing to shard
    job(2, "sharded", 3, "never.safetensors")  # killed after step 3: the checkpoint of step 2 stays
    assert json.loads((tmp_path / "sharded" / "state.json").read_text())["step"] == 2
    assert load_file(str(tmp_path / "sharded" / "optimizer.safetensors"))["0.exp_avg"].abs().max() > 0
    output = job(2, "sharded", 0, "two.safetensors")
    assert "resuming from" in output and output.count("sharding: fsdp") == 2
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    for name in one:
        assert (one[name] - two[name]).abs().max() < 1e-4, (name, float((one[name] - two[name]).abs().max()))
    assert not (tmp_path / "never.safetensors").exists()
