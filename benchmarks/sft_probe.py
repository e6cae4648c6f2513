"""How far one SFT budget gets on the embedded world: held-out loss of answer tokens after full-token SFT.

Trains the experiment's base model on all but the last ``--held-out`` pool samples (with the chosen selection
method) and reports the mean loss of the held-out samples' informative (answer) and boilerplate tokens. A cheap,
low-variance stand-in for the table when sizing the world or the step budget. Needs a finished
``results/<experiment>`` (world, base model and pool tokens). Ends with one JSON line.

    python benchmarks/sft_probe.py results/embedded --steps 1000 --batch-size 32 --lr 0.003
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from tokenclean.artifacts import TokenTable
from tokenclean.data import TOKEN_CLASSES, TRUTH_METHODS
from tokenclean.loss import token_losses
from tokenclean.models import load_model, set_threads
from tokenclean.selection import select
from tokenclean.training import TrainConfig, train_model


def subset(table: TokenTable, samples: range) -> TokenTable:
    spans = [slice(table.offsets[i], table.offsets[i + 1]) for i in samples]
    lengths = [s.stop - s.start for s in spans]

    def cat(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[s] for s in spans])

    return TokenTable(cat(table.input_ids), np.concatenate([[0], np.cumsum(lengths)]), cat(table.loss_mask),
                      {"token_class": cat(table.extras["token_class"])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results/<experiment> of an embedded run")
    ap.add_argument("--method", default="full", choices=["full", "random", *TRUTH_METHODS])
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--pack-length", type=int, default=128, help="0 = pad every sample")
    ap.add_argument("--held-out", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    set_threads(a.threads)
    table, _ = TokenTable.load(f"{a.results}/tokens/pool.tokens.npz")
    n = table.n_samples
    train, test = subset(table, range(0, n - a.held_out)), subset(table, range(n - a.held_out, n))
    model = load_model(f"{a.results}/models/base", "cpu", None)
    mask = select(a.method, train, a.ratio, a.seed)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, schedule="cosine", warmup_ratio=0.03,
                      seed=a.seed, pack_length=a.pack_length)
    model, summary = train_model(model, train, mask, cfg, pad_id=model.config.pad_token_id or 0, progress=False)
    losses = token_losses(model, test, progress=False)
    cls = test.extras["token_class"]
    figures = {"method": a.method, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
               "train_seconds": summary["seconds"]}
    for name in ("informative", "boilerplate"):
        in_class = test.loss_mask & (cls == TOKEN_CLASSES.index(name))
        figures[f"heldout_{name}_loss"] = round(float(np.nanmean(losses[in_class])), 4)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
