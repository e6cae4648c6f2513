"""Cost of online token weighting: seconds per optimizer step of each online method relative to plain SFT.

Every method trains a fresh copy of the same model on the same steps with the same trainer
(:func:`tokenclean.training.train_model`); the methods run interleaved, repeated, and each figure is a ratio of
timings taken side by side (the machine is shared). Defaults mirror the embedded experiment's SFT: the h64,
3-layer tiny Llama (vocabulary 512), batches of 32 samples of 20-60 tokens packed into rows of 128. The reference
and base losses the methods read are random arrays (their values do not change the cost). ``sstoken`` runs the
whole model under eager attention (its attention weights exist only there), which is part of its cost. Ends with
one JSON line of medians.

    python -m benchmarks.online --repeats 3
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import numpy as np
import torch

from benchmarks.training import PAD, synthetic_table
from tokenclean.models import tiny_llama
from tokenclean.online import ONLINE_METHODS, Online, resolve
from tokenclean.training import TrainConfig, train_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pack-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    vocab = 512
    table = synthetic_table(a.steps * a.batch_size, vocab, False, seed=0)
    rng = np.random.default_rng(1)
    arrays = {k: np.where(table.loss_mask, rng.uniform(1, 5, table.n_tokens), np.nan).astype(np.float32)
              for k in ("ref_loss", "base_loss")}
    base = tiny_llama(vocab, 1, 2, PAD, hidden=64, layers=3, heads=4, intermediate=192, max_positions=256)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, pack_length=a.pack_length, lr=1e-3, log_every=10**9)
    names = ["sft", *ONLINE_METHODS]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for repeat in range(a.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # rotate: no method always first
            online = None if name == "sft" else Online(name, resolve(name, None), arrays)
            _, summary = train_model(copy.deepcopy(base), table, table.loss_mask.copy(), cfg, PAD, progress=False,
                                     online=online)
            seconds[name].append(summary["seconds"] / a.steps)
    sft = statistics.median(seconds["sft"])
    result = {n: {"s_per_step": round(statistics.median(v), 4), "vs_sft": round(statistics.median(v) / sft, 3)}
              for n, v in seconds.items()}
    for n, r in result.items():
        print(f"{n:8s} {r['s_per_step'] * 1000:7.1f} ms/step  x{r['vs_sft']:.2f} of SFT")
    print(json.dumps({"steps": a.steps, "batch_size": a.batch_size, "pack_length": a.pack_length,
                      "threads": a.threads, "repeats": a.repeats, "methods": result}))


if __name__ == "__main__":
    main()
