"""The paper pipeline at a real model's shape, as one command: ``make gpu-check``.

    make gpu-check                                   # CUDA: the Llama-3.2-1B shape; no CUDA: the tiny preset
    .venv/bin/python scripts/gpu_check.py --preset llama-3.2-3b [--out results/gpu-check]

It makes everything locally (nothing is downloaded) under ``<out>/<preset>/inputs/``:

- a **random-initialised** Llama of the preset's shape (:data:`SHAPES`, e.g. Llama-3.2-1B: hidden 2048, 16
  layers, a 128256-token vocabulary, tied embeddings), saved as a Hugging Face directory with a byte-level BPE
  tokenizer trained on the embedded world's corpus (:func:`tokenclean.world.build_tokenizer`). The tokenizer is
  far smaller than the model's vocabulary; the model keeps its 128256 rows, so the output head costs what it
  costs at paper scale;
- SFT data (JSON lines the ``data`` rule reads): multi-turn chats of the embedded world's questions and answers,
  each about ``sample_tokens`` tokens long (2048 at a paper shape), truncated by ``max_length`` to that length;
- a small lm-eval task: the answer likelihood of the world's held-out ``add`` questions (``tc_add_nll``, written
  by :func:`tokenclean.evaluation.write_tasks`; a likelihood task, so the random model never has to generate).

Then it runs the real workflow (Snakefile) on it with ``configs/gpu-check.yaml`` plus the preset's overrides
(``<out>/<preset>/overrides.yaml``): tokenize, warm-up LoRA training, per-token losses of the base and the warm-up
model (scoring), RHO selection at ratio 0.6, LoRA training of the selected tokens in bf16 with the paper's
LoRA and optimiser settings (configs/paper/llama-3.2-3b.yaml), and evaluation. Each run starts from scratch.

It prints **one JSON line** read from what the jobs wrote (never by timing the workflow):

- ``score_tokens_per_s``: the base model's scoring of the pool (its loss sidecar: every token of the table over
  the seconds of the scoring loop, model loading excluded);
- ``train_tokens_per_s``: the selected-token LoRA run (the last line of its ``train_log.jsonl``: every token of
  its samples over the seconds since training began, the first step included; the LoRA merge excluded);
- ``score_mfu`` / ``train_mfu``: model FLOP utilisation, ``tokens_per_s * F / peak`` with the device's peak
  dense bf16 FLOP/s (:data:`PEAK_BF16_FLOPS`; null on an unknown device or the CPU) and ``F = 2N`` (a forward)
  for scoring, ``6N`` (forward and backward) for training, N = :func:`model_flop_params`. These are *model*
  FLOPs in PaLM's sense (Chowdhery et al. 2022, appendix B), not the work the kernels did: LoRA's backward skips
  the frozen weights' gradients (about 4N + LoRA's own, so 6N overstates the work by up to a third), gradient
  checkpointing recomputes the forward (uncounted), scoring applies the output head only at response positions
  (so 2N overstates scoring's head work), and attention's sequence-length term (PaLM's 12·L·H·Q·T, about 10%
  of 6N for the 1B shape at 2048 tokens) is left out (understating);
- ``score_peak_memory_bytes`` / ``train_peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` as the jobs
  recorded it (the loss sidecar's and the trained model's ``tokenclean.json``'s ``peak_memory_bytes``); null
  on the CPU;
- ``preset``, ``device``, ``device_name``, ``dtype``, ``flop_params`` (N), ``sample_tokens``, ``score_tokens``,
  ``train_tokens``, ``peak_flops``, ``eval_score`` (the model's mean answer NLL on the task, nats), ``results``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Llama 3.2 rope: theta 500000 with the llama3 frequency scaling of the released config.json files.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Model shapes. The Llama-3.2 ones are the public config.json files of meta-llama/Llama-3.2-1B and -3B (copies
# read with the `search` tool: kevinstephano/thunder_model_blocks hf_llama/llama_config.py holds the 1B-Instruct
# config.json at commit 4e20de36: hidden_size 2048, num_hidden_layers 16, num_attention_heads 32,
# num_key_value_heads 8, head_dim 64, intermediate_size 8192, vocab_size 128256, tie_word_embeddings true,
# rope_theta 500000, the llama3 rope_scaling above, max_position_embeddings 131072, rms_norm_eps 1e-5; the 3B:
# hidden 3072, 28 layers, 24 heads, 8 KV heads, intermediate 8192, vocab 128256, tied, in oumi's
# configs/recipes/llama3_2 README and silvaxxx1/MyLLM_101 models/LLAMA/Llama3.2/Llama_configs.py).
# `tiny` is no real model: the same code path at a size the tests run on a CPU in seconds, just wide enough for the
# paper's LoRA rank 64 (tokenclean train refuses an adapter wider than every layer it adapts).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192,
                     "vocab": 128256, "max_positions": 131072, "rope": LLAMA3_ROPE},
    "llama-3.2-3b": {"hidden": 3072, "layers": 28, "heads": 24, "kv_heads": 8, "intermediate": 8192,
                     "vocab": 128256, "max_positions": 131072, "rope": LLAMA3_ROPE},
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 384,
             "max_positions": 131072, "rope": LLAMA3_ROPE},
}
# What each preset runs: sample length, samples of the pool / warm-up set, held-out questions, the tokenizer's
# own vocabulary, the training and scoring dtype, and the configuration keys that differ from
# configs/gpu-check.yaml (the paper's LoRA run on 2048-token samples). A paper shape trains in optimiser steps of
# 48 samples (8 micro-batches of 6, the paper's); SIZES sets each shape's pool and warm-up set so that the whole
# check is estimated (:func:`estimate`) at about 8 minutes on one H100 SXM: a GPU session may be 15 minutes,
# start-up included.
RUNS: dict[str, dict[str, Any]] = {
    "paper": {"sample_tokens": 2048, "pool": 192, "warmup": 48, "eval": 32, "tokenizer_vocab": 2048,
              "dtype": "bfloat16", "config": {}},
    "tiny": {"sample_tokens": 64, "pool": 8, "warmup": 4, "eval": 4, "tokenizer_vocab": 300, "dtype": "float32",
             "config": {"max_length": 64, "train": {"batch_size": 4, "micro_batch_size": 2}}},
}
PRESETS = {"llama-3.2-1b": "paper", "llama-3.2-3b": "paper", "tiny": "tiny"}
SIZES: dict[str, dict[str, int]] = {
    "llama-3.2-1b": {"pool": 2928, "warmup": 288},   # 61 + 6 optimiser steps: estimated 8.0 min
    "llama-3.2-3b": {"pool": 1104, "warmup": 96},    # 23 + 2 steps: estimated 7.9 min
}


def run_of(preset: str) -> dict[str, Any]:
    """What ``preset`` runs: its RUNS entry with its SIZES."""
    return {**RUNS[PRESETS[preset]], **SIZES.get(preset, {})}


# The time estimate of a check (:func:`estimate`): model FLOPs (6N per training token, 2N per scored token, as
# the JSON line counts them) at an assumed model FLOP utilisation, plus fixed costs. The assumptions are guesses
# for one H100 until a measured line replaces them: LoRA training in bf16 with gradient checkpointing at 25% of
# the peak (a 1B model's kernels are small, the 128256-column head's loss is computed in float32), scoring at 35%;
# 150 s of fixed costs (about 15 s to start each of the 5 GPU jobs: Python, torch, CUDA, the model's loading;
# the inputs' generation; the CPU jobs; lm-eval's start); the disk traffic of 3 float32 copies of the model (the
# warm-up and selected-token models are merged and saved in float32, then loaded) at 1 GB/s; 10 ms of CPU per
# sample (generating, validating and tokenizing it).
ASSUMED_MFU = {"train": 0.25, "score": 0.35}
FIXED_S, DISK_BYTES_PER_S, CPU_S_PER_SAMPLE = 150.0, 1e9, 0.010
EVAL_FAMILY = "add"
METHOD, RATIO, SEED = "rho", 0.6, 1   # the paper's fixed-reference cleaning (loss(base) - loss(warm-up))

# Peak dense bf16 tensor FLOP/s by device name (torch.cuda.get_device_name()), first match wins. NVIDIA's
# datasheets give bf16 "with sparsity"; dense is half: H100 SXM 1979 -> 989 TFLOPS, H100 NVL 1671 -> 835,
# H100 PCIe 1513 -> 756 (H100 datasheet); H200 SXM 1979 -> 989, H200 NVL 1671 -> 835 (H200 datasheet);
# A100 312 dense (A100 datasheet); L40S 733 -> 362 (L40S datasheet); L40 362 -> 181 (L40 datasheet);
# L4 242 -> 121 (L4 datasheet); RTX 4090 165 dense with FP32 accumulate (Ada Lovelace architecture whitepaper,
# appendix table). Unknown devices get null, never a guess.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    (r"H100.*(PCIe|PCI-E)", 756e12), (r"H100.*NVL", 835e12), (r"H100", 989e12),
    (r"H200.*NVL", 835e12), (r"H200", 989e12), (r"A100", 312e12), (r"L40S", 362e12), (r"L40\b", 181e12),
    (r"\bL4\b", 121e12), (r"RTX 4090", 165e12),
]


def peak_flops(device_name: str) -> float | None:
    """The device's peak dense bf16 FLOP/s (:data:`PEAK_BF16_FLOPS`), None when it is not in the table."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


def model_flop_params(model: Any) -> int:
    """N of the FLOP counts: every parameter but the input embedding, plus the output head. The embedding is a
    lookup (no FLOPs); the head is a matrix multiply of V x d per token, tied or not."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters() if p is not embedding)
    return int(body + (head.numel() if head is embedding else 0))


def mfu(tokens_per_s: float | None, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the device's peak (None without a peak)."""
    if tokens_per_s is None or peak is None:
        return None
    return tokens_per_s * flops_per_token / peak


def shape_flop_params(shape: dict[str, Any]) -> int:
    """N of :func:`model_flop_params` from the shape alone (tied embeddings, no biases): per layer q, k, v, o, the
    three MLP matrices and two norms; the final norm; the head."""
    d, head_dim = shape["hidden"], shape["hidden"] // shape["heads"]
    attention = 2 * d * shape["heads"] * head_dim + 2 * d * shape["kv_heads"] * head_dim
    return shape["layers"] * (attention + 3 * d * shape["intermediate"] + 2 * d) + d + shape["vocab"] * d


ESTIMATE_DEVICE = "NVIDIA H100 80GB HBM3"   # the SXM card the sizes are set for


def estimate(preset: str, device_name: str = ESTIMATE_DEVICE) -> dict[str, Any]:
    """The check's expected wall time on ``device_name`` (None without a known peak: the CPU), in parts: the
    training (warm-up and selected-token runs over every token of their samples, 6N each), the scoring (the pool
    by the base and the warm-up model, 2N), at :data:`ASSUMED_MFU`; and the fixed, disk and CPU costs."""
    run, n = run_of(preset), shape_flop_params(SHAPES[preset])
    train_tokens = (run["pool"] + run["warmup"]) * run["sample_tokens"]
    score_tokens = 2 * run["pool"] * run["sample_tokens"]
    peak = peak_flops(device_name)
    parts = None if peak is None else {
        "train_s": train_tokens * 6 * n / (ASSUMED_MFU["train"] * peak),
        "score_s": score_tokens * 2 * n / (ASSUMED_MFU["score"] * peak),
        "fixed_s": FIXED_S, "disk_s": 3 * 4 * n / DISK_BYTES_PER_S,
        "cpu_s": CPU_S_PER_SAMPLE * (run["pool"] + run["warmup"])}
    return {"device_name": device_name, "flop_params": n, "train_tokens": train_tokens, "score_tokens": score_tokens,
            "train_flops": train_tokens * 6 * n, "score_flops": score_tokens * 2 * n, "parts": parts,
            "seconds": None if parts is None else sum(parts.values())}


def describe_estimate(e: dict[str, Any]) -> str:
    """One line: the FLOPs and the seconds of each part."""
    p = e["parts"]
    return (f"training {e['train_flops']:.2e} FLOP in {p['train_s']:.0f} s at {ASSUMED_MFU['train']:.0%} MFU, "
            f"scoring {e['score_flops']:.2e} FLOP in {p['score_s']:.0f} s at {ASSUMED_MFU['score']:.0%}, "
            f"fixed {p['fixed_s']:.0f} s, disk {p['disk_s']:.0f} s, CPU {p['cpu_s']:.0f} s")


def build_model(shape: dict[str, Any], tokenizer: Any, out: Path, device: str, dtype: str) -> int:
    """A random-initialised Llama of ``shape`` with ``tokenizer``, saved to ``out`` in ``dtype``; returns N
    (:func:`model_flop_params`). Built on ``device`` (a 3B model initialises in seconds on a GPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenclean.models import write_model_dir

    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"], intermediate_size=shape["intermediate"],
        max_position_embeddings=shape["max_positions"], rope_parameters=dict(shape["rope"]),
        rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    write_model_dir(model.cpu(), tokenizer, out, {"kind": "gpu_check_model", "shape": shape,
                                                  "flop_params": model_flop_params(model)})
    return model_flop_params(model)


def chats(turns: list[dict[str, Any]], tokenizer: Any, n: int, tokens: int) -> list[dict[str, Any]]:
    """``n`` multi-turn chats of at least ``tokens`` tokens each (the workflow truncates them to ``max_length``),
    made of the world samples' question and answer turns in order, reused round robin when they run out."""
    records, at = [], 0
    for _ in range(n):
        messages, length = [], 0
        while length < 1.25 * tokens:
            sample = turns[at % len(turns)]["messages"]
            at += 1
            messages += [{"role": m["role"], "content": m["content"]} for m in sample]
            length += sum(len(tokenizer.encode(m["content"])) + 3 for m in sample)  # + role header and end
        records.append({"messages": messages})
    return records


def make_inputs(preset: str, inputs: Path, device: str) -> int:
    """The model, tokenizer, SFT data and lm-eval task of ``preset`` under ``inputs``; returns N."""
    import tempfile

    from tokenclean.data import read_jsonl, write_jsonl
    from tokenclean.evaluation import write_tasks
    from tokenclean.world import build_tokenizer, generate_world

    run = run_of(preset)
    inputs.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        # about 40 tokens per world sample: enough samples for every chat, rarely reused
        world = Path(tmp) / "world"
        per_chat = max(2, run["sample_tokens"] // 30)
        generate_world({"seed": 0, "families": ["add", "max", "sort"], "pretrain_docs": 2000,
                        "warmup_samples": per_chat * run["warmup"], "pool_samples": per_chat * run["pool"],
                        "eval_samples": run["eval"]}, world)
        corpus = [r.messages[0].content for r in read_jsonl(world / "corpus.jsonl")]
        tokenizer = build_tokenizer(corpus, Path(tmp) / "tokenizer", run["tokenizer_vocab"])
        for split in ("pool", "warmup"):
            rows = [json.loads(line) for line in (world / f"{split}.jsonl").read_text().splitlines()]
            write_jsonl(inputs / f"{split}.jsonl", chats(rows, tokenizer, run[split], run["sample_tokens"]))
        (inputs / "eval").mkdir()
        shutil.copyfile(world / "eval" / f"{EVAL_FAMILY}.jsonl", inputs / "eval" / f"{EVAL_FAMILY}.jsonl")
    write_tasks(inputs / "eval", inputs / "tasks", [EVAL_FAMILY])
    return build_model(SHAPES[preset], tokenizer, inputs / "model", device, run["dtype"])


def overrides(preset: str, out: Path) -> dict[str, Any]:
    """The configuration keys over configs/gpu-check.yaml for ``preset`` (Snakemake merges nested keys)."""
    run = run_of(preset)
    inputs = out / preset / "inputs"
    train = {"dtype": run["dtype"], **run["config"].get("train", {})}
    config = {"experiment": preset, "results_dir": str(out),
              "base_model": {"name": str(inputs / "model")},
              "data": {"pool": {"path": str(inputs / "pool.jsonl")}, "warmup": {"path": str(inputs / "warmup.jsonl")}},
              "scoring": {"dtype": run["dtype"]},
              "warmup": {"train": dict(train)}, "sft": {"train": dict(train)},
              "evaluation": {"include_path": str(inputs / "tasks")}}
    config.update({k: v for k, v in run["config"].items() if k != "train"})
    return config


def run_workflow(preset: str, out: Path, cores: str, cuda: bool) -> Path:
    """Run the workflow up to the evaluation of the selected-token run; returns the experiment directory.
    On CUDA the GPU jobs run one at a time (``--resources gpu=1``; each job asks for one): scoring the base
    model beside the warm-up training would share the GPU and distort both rates. The greedy scheduler needs no
    ILP solver (PuLP is not among an offline node's wheels, envs/node-wheels.lock)."""
    import yaml

    from tokenclean.methods import run_name

    experiment = out / preset
    extra = experiment / "overrides.yaml"
    extra.write_text(yaml.safe_dump(overrides(preset, out), sort_keys=True))
    target = experiment / "eval" / f"{run_name(METHOD, RATIO, SEED)}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = experiment / "snakemake.log"
    with open(log, "w") as f:
        # the target first: --configfile and --resources take every argument after them
        proc = subprocess.run([sys.executable, "-m", "snakemake", str(target), "--snakefile", str(ROOT / "Snakefile"),
                               "--directory", str(out), "--cores", cores, "--configfile",
                               str(ROOT / "configs" / "gpu-check.yaml"), str(extra), "--scheduler", "greedy",
                               *(["--resources", "gpu=1"] if cuda else [])],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"the workflow failed (exit {proc.returncode}); {log} ends with:\n{tail}")
    return experiment


def figures(experiment: Path, preset: str, n: int, device_name: str) -> dict[str, Any]:
    """The JSON line's figures, read from what the jobs wrote (see the module docstring)."""
    from tokenclean.artifacts import read_sidecar
    from tokenclean.methods import run_name

    run = run_name(METHOD, RATIO, SEED)
    loss = read_sidecar(experiment / "losses" / "base" / "pool.loss.npy")
    model = experiment / "models" / "sft" / run
    summary = json.loads((model / "tokenclean.json").read_text())
    log = [json.loads(line) for line in (model / "train_log.jsonl").read_text().splitlines() if line.strip()]
    evaluation = json.loads((experiment / "eval" / f"{run}.json").read_text())
    peak = peak_flops(device_name)
    score_rate, train_rate = loss.get("tokens_per_s"), log[-1]["tokens_per_s"]
    return {
        "preset": preset, "device": loss["device"], "device_name": device_name,
        "dtype": summary["train_config"]["dtype"], "flop_params": n,
        "sample_tokens": run_of(preset)["sample_tokens"], "peak_flops": peak,
        "score_tokens": loss.get("n_tokens"), "score_tokens_per_s": score_rate,
        "score_mfu": mfu(score_rate, 2 * n, peak), "score_peak_memory_bytes": loss.get("peak_memory_bytes"),
        "train_tokens": summary["tokens_processed"], "train_tokens_per_s": train_rate,
        "train_mfu": mfu(train_rate, 6 * n, peak), "train_peak_memory_bytes": summary.get("peak_memory_bytes"),
        "eval_score": evaluation["average"]["score"], "results": str(experiment),
    }


def partial_figures(experiment: Path, preset: str, device_name: str) -> dict[str, Any]:
    """The JSON line's keys from whatever the finished jobs recorded (a check cut short): null where a job did not
    finish. Without the selected-token run, the training figures are the warm-up run's (``train_run``)."""
    from tokenclean.methods import run_name

    def read(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    run = run_of(preset) if preset in PRESETS else {"dtype": None, "sample_tokens": None}   # failed before "auto" was
    n = (read(experiment / "inputs" / "model" / "tokenclean.json") or {}).get("flop_params")
    loss = read(experiment / "losses" / "base" / "pool.loss.json") or {}
    peak = peak_flops(device_name)
    line: dict[str, Any] = {"preset": preset, "device_name": device_name, "device": loss.get("device"),
                            "dtype": run["dtype"], "flop_params": n, "sample_tokens": run["sample_tokens"],
                            "peak_flops": peak, "score_tokens": loss.get("n_tokens"),
                            "score_tokens_per_s": loss.get("tokens_per_s"),
                            "score_peak_memory_bytes": loss.get("peak_memory_bytes"),
                            "train_tokens": None, "train_tokens_per_s": None, "train_peak_memory_bytes": None,
                            "train_run": None, "eval_score": None, "results": str(experiment)}
    for name, model in (("sft", experiment / "models" / "sft" / run_name(METHOD, RATIO, SEED)),
                        ("warmup", experiment / "models" / "warmup")):
        summary = read(model / "tokenclean.json")
        if summary is not None:
            log = [json.loads(x) for x in (model / "train_log.jsonl").read_text().splitlines() if x.strip()]
            line.update(train_tokens=summary.get("tokens_processed"), train_run=name,
                        train_tokens_per_s=log[-1]["tokens_per_s"] if log else None,
                        train_peak_memory_bytes=summary.get("peak_memory_bytes"))
            break
    evaluation = read(experiment / "eval" / f"{run_name(METHOD, RATIO, SEED)}.json")
    if evaluation is not None:
        line["eval_score"] = evaluation["average"]["score"]
    line["score_mfu"] = None if n is None else mfu(line["score_tokens_per_s"], 2 * n, peak)
    line["train_mfu"] = None if n is None else mfu(line["train_tokens_per_s"], 6 * n, peak)
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="auto", choices=["auto", *SHAPES],
                   help="model shape; auto = llama-3.2-1b on a CUDA machine, tiny otherwise")
    p.add_argument("--out", default="results/gpu-check", help="results directory (one experiment per preset)")
    p.add_argument("--cores", default="all", help="snakemake --cores")
    a = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    preset = a.preset if a.preset != "auto" else ("llama-3.2-1b" if cuda else "tiny")
    out = Path(a.out).resolve()
    shutil.rmtree(out / preset, ignore_errors=True)  # every check measures a fresh run
    n = make_inputs(preset, out / preset / "inputs", "cuda" if cuda else "cpu")
    experiment = run_workflow(preset, out, a.cores, cuda)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(json.dumps(figures(experiment, preset, n, device_name), sort_keys=True))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        sys.exit(1)
