"""Selection speed and memory: `tokenclean select`'s rules beside sorting Python tuples, at 1M, 4M and 16M tokens.

For each size (counted in response tokens) one synthetic table shaped like SFT data (log-normal sample lengths
clipped to 20..2048, a prompt of 10-70% of each sample, float32 scores, NaN outside ``loss_mask``) and, per
method (fixed, rho, random at ratio 0.6):

- ``seconds``: median of repeated calls of :func:`tokenclean.selection.select` (the code path of
  ``tokenclean select``), the sizes interleaved; ``ns_per_token``: the same per response token, to check that
  time grows linearly;
- ``tuples``: the same rule done the plain Python way (a list of ``(-score, position)`` tuples sorted, globally
  for fixed and per sample for rho; ``random.Random(seed).sample`` for random), timed in the same run,
  interleaved with ours, at 1M and 4M tokens (measured, not extrapolated); ``speedup`` = tuples / ours;
- ``peak_bytes_per_token``: peak memory allocated during one call (the output mask included) over the number
  of response tokens, traced with ``tracemalloc`` (numpy reports its buffers to it) in a separate call.

Ends with one JSON line of medians.

    python benchmarks/selection.py --repeats 3
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
import tracemalloc

import numpy as np

from tokenclean.artifacts import TokenTable
from tokenclean.selection import keep_count, select

METHODS = ("fixed", "rho", "random")


def sft_like_table(response_tokens: int, seed: int) -> tuple[TokenTable, np.ndarray]:
    """A token table with at least ``response_tokens`` response tokens, and float32 scores (NaN elsewhere)."""
    rng = np.random.default_rng(seed)
    n_samples = int(response_tokens / 0.6 / 400 * 1.2) + 10  # mean length ~400, response ~60%: a margin
    lengths = np.clip(np.round(rng.lognormal(np.log(250), 1.0, n_samples)), 20, 2048).astype(np.int64)
    prompt = np.maximum(1, (lengths * rng.uniform(0.1, 0.7, n_samples)).astype(np.int64))
    response = np.cumsum(lengths - prompt)
    n_samples = int(np.searchsorted(response, response_tokens)) + 1
    lengths, prompt = lengths[:n_samples], prompt[:n_samples]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    loss_mask = position >= np.repeat(prompt, lengths)
    del position
    score = rng.normal(size=int(offsets[-1])).astype(np.float32)
    score[~loss_mask] = np.nan
    return TokenTable(np.zeros(int(offsets[-1]), dtype=np.int32), offsets, loss_mask), score


def tuples_rule(method: str, table: TokenTable, score: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """The same rules the plain way: Python tuples sorted by (-score, position)."""
    mask = np.zeros(table.n_tokens, dtype=bool)
    where = np.flatnonzero(table.loss_mask)
    positions, values = where.tolist(), score[where].tolist()
    if method == "fixed":
        cand = sorted(zip([-v for v in values], positions))
        keep = [p for _, p in cand[: keep_count(ratio, len(cand))]]
    elif method == "rho":
        bounds = np.searchsorted(where, table.offsets).tolist()  # each sample's slice of the response tokens
        keep = []
        for i, j in itertools.pairwise(bounds):
            cand = sorted(zip([-v for v in values[i:j]], positions[i:j]))
            keep += [p for _, p in cand[: keep_count(ratio, len(cand))]]
    else:
        keep = random.Random(seed).sample(positions, keep_count(ratio, len(positions)))
    mask[keep] = True
    return mask


def peak_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    result = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return peak - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,4M,16M", help="response tokens per table")
    ap.add_argument("--tuple-sizes", default="1M,4M", help="sizes at which the tuple baseline also runs")
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    def size(text: str) -> int:
        return int(float(text.rstrip("M")) * 1_000_000) if text.endswith("M") else int(text)

    figures: dict[str, float | int | str] = {"ratio": a.ratio, "repeats": a.repeats, "threads": 1}
    sizes = a.sizes.split(",")
    tables = {label: sft_like_table(size(label), a.seed) for label in sizes}
    ours: dict[str, list[float]] = {}
    tuples: dict[str, list[float]] = {}
    for _ in range(a.repeats):  # sizes interleaved, so a change of the machine's load hits every size alike
        for label in sizes:
            table, score = tables[label]
            for method in METHODS:
                key = f"{label}_{method}"
                started = time.perf_counter()
                mask = select(method, table, a.ratio, a.seed, score)
                ours.setdefault(key, []).append(time.perf_counter() - started)
                if label in a.tuple_sizes.split(","):
                    started = time.perf_counter()
                    theirs = tuples_rule(method, table, score, a.ratio, a.seed)
                    tuples.setdefault(key, []).append(time.perf_counter() - started)
                    if method != "random":  # the same rule gives the same tokens (random: the same count)
                        assert np.array_equal(mask, theirs), f"{method}: differs from the tuple version"
                    assert mask.sum() == theirs.sum()
                    del theirs
                del mask
    per_token: dict[str, float] = {}
    for label in sizes:
        table, score = tables[label]
        n = int(table.loss_mask.sum())
        figures[f"{label}_response_tokens"] = n
        figures[f"{label}_tokens"] = table.n_tokens
        for method in METHODS:
            key = f"{label}_{method}"
            figures[f"{key}_seconds"] = round(statistics.median(ours[key]), 4)
            per_token[key] = statistics.median(ours[key]) / n
            figures[f"{key}_ns_per_token"] = round(per_token[key] * 1e9, 2)
            if key in tuples:
                figures[f"{key}_tuples_seconds"] = round(statistics.median(tuples[key]), 3)
                figures[f"{key}_speedup"] = round(statistics.median(t / o for t, o in zip(tuples[key], ours[key])), 1)
            figures[f"{key}_peak_bytes_per_token"] = round(
                peak_bytes(lambda m=method, t=table, s=score: select(m, t, a.ratio, a.seed, s)) / n, 2)
            print(f"{label:>4} {method:6} {figures[f'{key}_seconds']:8.3f}s "
                  f"{figures[f'{key}_ns_per_token']:7.1f} ns/token "
                  f"{figures[f'{key}_peak_bytes_per_token']:6.2f} B/token"
                  + (f"  tuples {figures[f'{key}_tuples_seconds']:8.2f}s  x{figures[f'{key}_speedup']}"
                     if key in tuples else ""), flush=True)
    for method in METHODS:  # linear time: per-token time at the largest size over that at the smallest
        figures[f"{method}_time_per_token_{sizes[-1]}_over_{sizes[0]}"] = round(
            per_token[f"{sizes[-1]}_{method}"] / per_token[f"{sizes[0]}_{method}"], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
