"""Peak memory of the training loss: one step's head + cross-entropy + backward, unchunked (the code before issue 15)
beside the chunked loss of :func:`tokenclean.loss.head_nll`, at paper scale in targets and vocabulary.

A micro-batch's target rows (``--targets``, default 2048: one paper-length sample) leave the decoder as hidden
states [targets, hidden]; the step computes ``cross_entropy(head(hidden).float(), labels)`` per token and
backpropagates a mean over them into the hidden states and the head. The vocabulary is Llama-3's (128,256) and
the hidden size is small (64), so the logits dominate and the figure is measurable on a CPU: the logits scale as
targets x vocabulary, whatever the hidden size. Each variant runs in a fresh process; its peak is that process's
high-water mark during the step above what it held before (RSS on a CPU, ``torch.cuda.max_memory_allocated``
on CUDA). Variants: ``unchunked`` (one block), ``chunked`` (``--chunk-rows``, default
:func:`tokenclean.loss.head_chunk_rows`), and, where torch has it, ``torch_linear_ce``
(``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``, for comparison only). The losses and
gradients of each variant are compared with the unchunked ones. Ends with one JSON line of named figures.

    python -m benchmarks.loss_memory
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from tokenclean.loss import head_chunk_rows, head_nll

VARIANTS = ("unchunked", "chunked", "torch_linear_ce")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# glibc's malloc raises its mmap threshold after the first large free and then keeps freed blocks in its heap,
# which RSS goes on counting (the chunked step read 124 MB instead of 28 MB at 512 x 32k): a fixed threshold
# maps every large tensor on its own and returns it on free, so RSS follows the live tensors.
CHILD_ENV = {"PYTHONPATH": ROOT, "MALLOC_MMAP_THRESHOLD_": "131072"}


def _peak_bytes(device: torch.device) -> int:
    """This process's memory high-water mark so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def step(variant: str, head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor,
         chunk_rows: int) -> torch.Tensor:
    """One training step's loss and backward (a mean over the targets); returns the per-token losses."""
    if variant == "unchunked":
        nll = F.cross_entropy(head(hidden).float(), labels, reduction="none")
    elif variant == "chunked":
        nll = head_nll(head, hidden, labels, chunk_rows)
    else:
        nll = F.linear_cross_entropy(hidden, head.weight, labels, reduction="none",
                                     options=torch.nn.LinearCrossEntropyOptions())
    (nll.sum() / len(nll)).backward()
    return nll.detach()


def run_variant(variant: str, a: argparse.Namespace, out: str) -> None:
    """One variant, in this (fresh) process: the step's peak above the setup's, its seconds, and its losses and
    gradients saved to ``out`` for the parent to compare. A step at a toy size runs first, so that code loaded on
    first use (checkpoint's first call: about 80 MB and 1 s on a CPU, once per process) is not counted."""
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    toy = torch.nn.Linear(4, 8, bias=False, device=device, dtype=dtype)
    step(variant, toy, torch.randn(4, 4, device=device, dtype=dtype, requires_grad=True),
         torch.randint(0, 8, (4,), device=device), 1)
    torch.manual_seed(0)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False, device=device, dtype=dtype)
    torch.nn.init.normal_(head.weight, std=0.02)
    hidden = torch.randn(a.targets, a.hidden, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, a.vocab, (a.targets,), device=device)
    head.weight.grad = torch.zeros_like(head.weight)  # the step's accumulated gradient exists in every variant
    hidden.grad = torch.zeros_like(hidden)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak_bytes(device) if device.type == "cpu" else torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    nll = step(variant, head, hidden, labels, a.chunk_rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = _peak_bytes(device) - before
    torch.save({"peak_bytes": peak, "seconds": seconds, "nll": nll.float().cpu(),
                "grads": [hidden.grad.float().cpu(), head.weight.grad.float().cpu()]}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=2048, help="target rows of the micro-batch")
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama-3: 128,256)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=0, help="default: tokenclean.loss.head_chunk_rows")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant, this process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.chunk_rows = a.chunk_rows or head_chunk_rows(a.vocab, torch.device(a.device))
    if a.variant:
        run_variant(a.variant, a, a.out)
        return
    variants = [v for v in VARIANTS if v != "torch_linear_ce" or hasattr(F, "linear_cross_entropy")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            out = os.path.join(tmp, f"{variant}.pt")
            subprocess.run([sys.executable, "-m", "benchmarks.loss_memory", *sys.argv[1:], "--variant", variant,
                            "--out", out], check=True, cwd=ROOT, env={**os.environ, **CHILD_ENV})
            results[variant] = torch.load(out)
    ref = results["unchunked"]
    mb = 1 << 20
    figures = {
        "targets": a.targets, "vocab": a.vocab, "hidden": a.hidden, "dtype": a.dtype, "device": a.device,
        "threads": a.threads, "chunk_rows": a.chunk_rows,
        "measure": "torch.cuda.max_memory_allocated" if a.device.startswith("cuda") else "ru_maxrss of a fresh process",
        "logits_mb_per_copy": round(a.targets * a.vocab * 4 / mb, 1),
    }
    for variant, r in results.items():
        figures[f"{variant}_peak_mb"] = round(r["peak_bytes"] / mb, 1)
        figures[f"{variant}_seconds"] = round(r["seconds"], 3)
        if variant != "unchunked":
            figures[f"{variant}_peak_ratio"] = round(ref["peak_bytes"] / max(r["peak_bytes"], 1), 2)
            figures[f"{variant}_max_abs_loss_diff"] = float((r["nll"] - ref["nll"]).abs().max())
            figures[f"{variant}_max_abs_grad_diff"] = max(float((g - w).abs().max())
                                                          for g, w in zip(r["grads"], ref["grads"]))
    for variant in results:
        print(f"{variant:16s} peak {figures[f'{variant}_peak_mb']:9.1f} MB  {figures[f'{variant}_seconds']:7.2f} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
