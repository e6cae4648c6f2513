"""Training throughput: `tokenclean train`'s loop beside a bare forward+backward+AdamW loop on the same batches.

Run both with and without packing on a finished embedded experiment and print tokens/s (real, unpadded tokens)
and the fraction of computed positions that are padding. The gap between the trainer and the bare loop is the
trainer's own overhead (schedule, masks, logging); the gap between padded and packed is the padding waste.
Measure ratios in one run: absolute figures move with the machine's load. Ends with one JSON line.

    python benchmarks/train_speed.py results/embedded --steps 100
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from tokenclean.artifacts import TokenTable
from tokenclean.batching import collate, pack
from tokenclean.loss import target_nll
from tokenclean.models import load_model, set_threads
from tokenclean.training import TrainConfig, step_schedule, train_model


def batches(table: TokenTable, cfg: TrainConfig, pad_id: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for samples in step_schedule(table.n_samples, cfg):
        if cfg.pack_length:
            out.append(pack(table, samples, cfg.pack_length, pad_id))
        else:
            out.append(collate(table, samples, pad_id))
    return out


def bare_loop(model, prepared: list[dict[str, torch.Tensor]], lr: float) -> float:
    """Seconds for forward + backward + AdamW over prepared batches: the floor any trainer pays."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    started = time.perf_counter()
    for batch in prepared:
        nll = target_nll(model, batch["input_ids"], batch.get("attention_mask"), batch["target"],
                         position_ids=batch.get("position_ids"))
        (nll.sum() / len(nll)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results/<experiment> of an embedded run (base model and pool tokens)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pack-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    set_threads(a.threads)
    table, _ = TokenTable.load(f"{a.results}/tokens/pool.tokens.npz")
    figures: dict[str, float] = {}
    for packed in (False, True):
        cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=1e-3, seed=0,
                          pack_length=a.pack_length if packed else 0)
        pad_id = load_model(f"{a.results}/models/base", "cpu", None).config.pad_token_id or 0
        prepared = batches(table, cfg, pad_id)
        real = sum(int(table.lengths[s].sum()) for s in step_schedule(table.n_samples, cfg))
        cells = sum(b["input_ids"].numel() for b in prepared)
        seconds_bare = bare_loop(load_model(f"{a.results}/models/base", "cpu", None), prepared, cfg.lr)
        _, summary = train_model(load_model(f"{a.results}/models/base", "cpu", None), table, table.loss_mask,
                                 cfg, pad_id, progress=False)
        tag = "packed" if packed else "padded"
        figures[f"{tag}_padding_fraction"] = round(1 - real / cells, 4)
        figures[f"{tag}_bare_tokens_per_s"] = round(real / seconds_bare)
        figures[f"{tag}_trainer_tokens_per_s"] = round(summary["tokens_processed"] / summary["seconds"])
    print(f"{'':8} {'padding':>8} {'bare tok/s':>11} {'trainer tok/s':>14}")
    for tag in ("padded", "packed"):
        print(f"{tag:8} {figures[f'{tag}_padding_fraction']:8.1%} {figures[f'{tag}_bare_tokens_per_s']:11,d} "
              f"{figures[f'{tag}_trainer_tokens_per_s']:14,d}")
    print(json.dumps({"steps": a.steps, "batch_size": a.batch_size, "threads": a.threads, **figures}))


if __name__ == "__main__":
    main()
