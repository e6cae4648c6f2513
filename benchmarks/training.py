"""Training throughput: `tokenclean train`'s loop beside a bare forward+backward+AdamW loop on the same batches.

The trainer (:func:`tokenclean.training.train_model`, the code path of ``tokenclean train``: step schedule,
packing, learning-rate schedule, gradient clipping, logging, the packing check) and a bare loop (forward,
backward, AdamW step over batches packed beforehand, nothing else) train fresh copies of the same model on the
same steps, interleaved, repeated. Tokens/s count real (unpadded) tokens; the padding fraction is the share of
computed positions that are padding. The gap between the two loops is the trainer's own overhead.

Defaults mirror the embedded experiment's SFT (config.yaml): the h64 tiny Llama, batches of 32 samples of
20-60 tokens packed into rows of 128; ``--sft-like`` uses log-normal lengths clipped to 20..2048 in rows of
2048 instead. Ends with one JSON line of medians.

    python benchmarks/training.py --repeats 3
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch

from tokenclean.artifacts import TokenTable
from tokenclean.batching import collate, pack
from tokenclean.loss import target_nll
from tokenclean.models import tiny_llama
from tokenclean.training import TrainConfig, step_schedule, train_model

PAD = 0


def synthetic_table(n_samples: int, vocab: int, sft_like: bool, seed: int) -> TokenTable:
    rng = np.random.default_rng(seed)
    if sft_like:
        lengths = np.clip(np.round(rng.lognormal(np.log(250), 1.0, n_samples)), 20, 2048).astype(np.int64)
    else:
        lengths = rng.integers(20, 61, n_samples)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    prompt = np.maximum(1, (lengths * rng.uniform(0.1, 0.7, n_samples)).astype(np.int64))
    position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    return TokenTable(rng.integers(3, vocab, int(offsets[-1])), offsets, position >= np.repeat(prompt, lengths))


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
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pack-length", type=int, default=0, help="default 128 (2048 with --sft-like)")
    ap.add_argument("--sft-like", action="store_true", help="heavy-tailed lengths 20..2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pack_length = a.pack_length or (2048 if a.sft_like else 128)
    vocab = 512
    table = synthetic_table(a.steps * a.batch_size, vocab, a.sft_like, seed=0)
    model = tiny_llama(vocab, 1, 2, PAD, hidden=64, layers=3, heads=4, intermediate=192,
                       max_positions=max(pack_length, int(table.lengths.max())), seed=0)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=1e-3, seed=0, pack_length=pack_length)
    schedule = step_schedule(table.n_samples, cfg)  # every sample has response tokens: the trainer's schedule
    prepared = [pack(table, s, pack_length, PAD) for s in schedule]
    real = sum(int(table.lengths[s].sum()) for s in schedule)
    cells = sum(b["input_ids"].numel() for b in prepared)
    padded_cells = sum(collate(table, s, PAD)["input_ids"].numel() for s in schedule)

    bare_s, trainer_s = [], []
    for r in range(a.repeats):
        for name in (("bare", "trainer") if r % 2 == 0 else ("trainer", "bare")):
            fresh = copy.deepcopy(model)
            if name == "bare":
                bare_s.append(bare_loop(fresh, prepared, cfg.lr))
            else:
                _, summary = train_model(fresh, table, table.loss_mask, cfg, PAD, progress=False)
                assert summary["tokens_processed"] == real
                trainer_s.append(summary["seconds"])
    figures = {
        "threads": a.threads, "repeats": a.repeats, "steps": a.steps, "batch_size": a.batch_size,
        "pack_length": pack_length, "lengths": "sft-like 20..2048" if a.sft_like else "20..60",
        "padding_fraction": round(1 - real / cells, 4),
        "padding_fraction_unpacked": round(1 - real / padded_cells, 4),
        "bare_tokens_per_s": round(real / statistics.median(bare_s)),
        "trainer_tokens_per_s": round(real / statistics.median(trainer_s)),
        "trainer_over_bare": round(statistics.median(b / t for b, t in zip(bare_s, trainer_s)), 3),
    }
    for name, seconds in (("bare", bare_s), ("trainer", trainer_s)):
        print(f"{name:7} {figures[f'{name}_tokens_per_s']:8,d} tokens/s  (seconds: "
              + ", ".join(f"{s:.1f}" for s in seconds) + ")")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
