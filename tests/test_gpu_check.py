"""`make gpu-check` (scripts/gpu_check.py): on a CPU the documented command runs the whole workflow at the tiny
preset and prints one JSON line whose figures are the jobs' own; the FLOP and peak tables by brute force."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"preset", "device", "device_name", "dtype", "flop_params", "sample_tokens", "peak_flops", "score_tokens",
        "score_tokens_per_s", "score_mfu", "score_peak_memory_bytes", "train_tokens", "train_tokens_per_s",
        "train_mfu", "train_peak_memory_bytes", "eval_score", "results"}


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llama_flop_params(shape: dict) -> int:
    """N counted by hand: per layer q, k, v, o, the three MLP matrices and two norms; the final norm; the head
    (V x d); never the input embedding."""
    d, head_dim = shape["hidden"], shape["hidden"] // shape["heads"]
    attention = d * shape["heads"] * head_dim * 2 + d * shape["kv_heads"] * head_dim * 2
    per_layer = attention + 3 * d * shape["intermediate"] + 2 * d
    return shape["layers"] * per_layer + d + shape["vocab"] * d


@pytest.mark.parametrize("tied", [True, False])
def test_flop_params_are_every_weight_but_the_input_embedding(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = gpu_check().SHAPES["tiny"]
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"], tie_word_embeddings=tied))
    assert gpu_check().model_flop_params(model) == llama_flop_params(shape)


def test_paper_shapes_have_the_published_parameter_counts():
    """Llama-3.2-1B has 1.24B parameters, 3B 3.21B (tied: every weight once); N is all of them, the embedding
    being the head."""
    shapes = gpu_check().SHAPES
    assert round(llama_flop_params(shapes["llama-3.2-1b"]) / 1e9, 2) == 1.24
    assert round(llama_flop_params(shapes["llama-3.2-3b"]) / 1e9, 2) == 3.21


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165e12),
    ("Tesla T4", None), ("cpu", None)])
def test_peak_flops_by_device_name(name, peak):
    assert gpu_check().peak_flops(name) == peak


def test_mfu_is_model_flops_per_second_over_the_peak():
    check = gpu_check()
    assert check.mfu(1000.0, 6 * 2e9, 1e15) == pytest.approx(1000.0 * 6 * 2e9 / 1e15)
    assert check.mfu(1000.0, 6 * 2e9, None) is None and check.mfu(None, 1.0, 1e15) is None


# Set when the suite itself runs under `make test`: a make started with them prints "Entering directory" lines
# around the output; the command is tested as a user types it in a shell.
MAKE_ENV = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")


@pytest.mark.slow  # runs the gpu-check workflow
def test_make_gpu_check_runs_the_workflow_at_the_tiny_preset_on_a_cpu(tmp_path):
    """The documented command (make, without reinstalling the environment) on a machine without CUDA: the
    tiny preset through every rule, one JSON line on stdout, its figures those the jobs recorded."""
    args = shlex.quote(f"--out {tmp_path} --cores 2")
    proc = subprocess.run(f"make -o .venv/.installed gpu-check GPU_CHECK_ARGS={args}", shell=True, cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k not in MAKE_ENV},
                               "CUDA_VISIBLE_DEVICES": ""}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(line) == KEYS
    check = gpu_check()
    assert line["preset"] == "tiny" and line["device"] == "cpu" and line["dtype"] == "float32"
    assert line["flop_params"] == llama_flop_params(check.SHAPES["tiny"])
    # every pool sample is truncated to exactly the sample length
    assert line["score_tokens"] == check.RUNS["tiny"]["pool"] * check.RUNS["tiny"]["sample_tokens"]
    assert line["score_tokens_per_s"] > 0 and line["train_tokens_per_s"] > 0
    assert line["peak_flops"] is None and line["score_mfu"] is None and line["train_mfu"] is None
    assert line["score_peak_memory_bytes"] is None and line["train_peak_memory_bytes"] is None
    assert line["eval_score"] > 0  # a mean answer NLL in nats
    # the figures are the jobs' own records, not a timing of the workflow
    experiment = Path(line["results"])
    assert experiment == tmp_path / "tiny"
    loss = json.loads((experiment / "losses" / "base" / "pool.loss.json").read_text())
    assert line["score_tokens_per_s"] == loss["tokens_per_s"]
    assert loss["tokens_per_s"] == pytest.approx(loss["n_tokens"] / loss["seconds"], rel=0.01)
    model = experiment / "models" / "sft" / "rho_r0.6_s1"
    log = [json.loads(x) for x in (model / "train_log.jsonl").read_text().splitlines()]
    assert line["train_tokens_per_s"] == log[-1]["tokens_per_s"]
    summary = json.loads((model / "tokenclean.json").read_text())
    assert line["train_tokens"] == summary["tokens_processed"] > 0
    assert summary["train_config"]["lora_r"] == 64 and summary["train_config"]["lora_alpha"] == 16
    # a random-initialised model of the tiny shape, whose vocabulary is larger than its tokenizer's
    config = json.loads((experiment / "inputs" / "model" / "config.json").read_text())
    assert config["vocab_size"] == check.SHAPES["tiny"]["vocab"] and config["tie_word_embeddings"] is True


def test_peak_memory_is_cuda_max_memory_allocated_and_nothing_elsewhere(monkeypatch):
    import torch

    from tokenclean.models import peak_memory

    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: asked.append(device) or 123)
    assert peak_memory(torch.device("cpu")) == {} and asked == []
    assert peak_memory(torch.device("cuda", 1)) == {"peak_memory_bytes": 123}
    assert asked == [torch.device("cuda", 1)]


def test_the_loss_sidecar_and_the_training_summary_record_the_peak_and_the_rate(monkeypatch, tiny_model_dir,
                                                                                 tmp_path):
    """What `make gpu-check` reads: the jobs record peak_memory(device) (here a stand-in, as this machine has
    no GPU), and the scoring loop's rate."""
    import numpy as np

    import tokenclean.models
    import tokenclean.training
    from tokenclean.artifacts import TokenTable, read_sidecar
    from tokenclean.loss import loss_file
    from tokenclean.tokenization import tokenize_file
    from tokenclean.training import TrainConfig, train_model

    def fake(device):
        return {"peak_memory_bytes": 7 if device.type == "cpu" else -1}

    monkeypatch.setattr(tokenclean.models, "peak_memory", fake)
    monkeypatch.setattr(tokenclean.training, "peak_memory", fake)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and 5 .", "completion": f"The answer is {i + 5} ."})
                            + "\n" for i in range(4)))
    tokens = tmp_path / "t.tokens.npz"
    tokenize_file(str(data), str(tiny_model_dir), 64, str(tokens))
    out = tmp_path / "l.loss.npy"
    loss_file(str(tiny_model_dir), tokens, out, device="cpu", dtype="float32")
    meta = read_sidecar(out)
    table, _ = TokenTable.load(tokens)
    assert meta["peak_memory_bytes"] == 7 and meta["n_tokens"] == table.n_tokens
    assert meta["tokens_per_s"] == pytest.approx(table.n_tokens / meta["seconds"], rel=0.01)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    _, summary = train_model(model, table, table.loss_mask.copy(), TrainConfig(steps=1, batch_size=2), 2,
                             progress=False)
    assert summary["peak_memory_bytes"] == 7 and np.isfinite(summary["final_loss"])
