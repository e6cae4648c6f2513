"""Token scores and selection rules (DESIGN section 4).

score = loss(base) - loss(reference): how much the reference improved on a token; higher = more informative.
All rules choose among response tokens (``loss_mask``) only, keep exact counts, and break ties by position
(the earlier token wins), so a mask is a deterministic function of (scores, ratio, seed).

Counts use floor(ratio * n) computed exactly on the decimal value of ``ratio`` (0.29 * 100 keeps 29 tokens,
not the 28 that binary floating point would give).
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from tokenclean.artifacts import ArtifactError, TokenTable, load_array, save_array
from tokenclean.data import TOKEN_CLASSES, TRUTH_METHODS


def _ratio_fraction(ratio: float) -> Fraction:
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return Fraction(repr(float(ratio)))


def keep_count(ratio: float, n: int) -> int:
    """floor(ratio * n), exact for the decimal ratio."""
    r = _ratio_fraction(ratio)
    return (r.numerator * n) // r.denominator


def scores(base_loss: np.ndarray, ref_loss: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """loss_base - loss_ref on response tokens, NaN elsewhere."""
    if not (base_loss.shape == ref_loss.shape == loss_mask.shape):
        raise ArtifactError("loss arrays and loss_mask have different lengths")
    out = np.full(loss_mask.shape, np.nan, dtype=np.float32)
    out[loss_mask] = base_loss[loss_mask] - ref_loss[loss_mask]
    if not np.all(np.isfinite(out[loss_mask])):
        raise ArtifactError("a response token has a non-finite loss; re-run scoring")
    return out


def _mark_earliest(keep: np.ndarray, values: np.ndarray, value: float, need: int,
                   where: np.ndarray | None = None, block: int = 1 << 16) -> None:
    """Set ``keep`` at the first ``need`` positions where ``values == value`` (and ``where``), in blocks so that
    the positions of a large tie never need an index array the size of the data."""
    for start in range(0, len(values), block):
        if need <= 0:
            return
        hits = values[start: start + block] == value
        if where is not None:
            hits &= where[start: start + block]
        first = np.flatnonzero(hits)[:need]
        keep[start + first] = True
        need -= len(first)


def select_full(loss_mask: np.ndarray) -> np.ndarray:
    return loss_mask.copy()


def select_truth(method: str, loss_mask: np.ndarray, token_class: np.ndarray | None) -> np.ndarray:
    """Ground truth (embedded world only): the response tokens whose class ``TRUTH_METHODS[method]`` keeps.

    ``truth_drop_noisy`` drops exactly the corrupted and garbage tokens; ``truth_keep_informative`` keeps exactly
    the informative and novel ones (no template tokens either).
    """
    if token_class is None:
        raise ValueError(f"method {method!r} needs ground-truth token classes, which only the embedded world has")
    kept = np.isin(token_class, [TOKEN_CLASSES.index(c) for c in TRUTH_METHODS[method]])
    return loss_mask & kept


def select_random(loss_mask: np.ndarray, ratio: float, seed: int, block: int = 1 << 16) -> np.ndarray:
    """A uniformly random floor(ratio*N) of all N response tokens of the dataset, fixed by ``seed``.

    Linear time at any size: the response tokens are cut into blocks of ``block``; how many of the k kept tokens
    fall in each block is drawn from the multivariate hypergeometric distribution (exactly how many a uniform
    k-subset of all N puts there), then each block draws its own uniform subset, which stays in cache. The
    result is a uniform k-subset of all N, with one bool per response token of extra memory.
    """
    n = int(np.count_nonzero(loss_mask))
    k = keep_count(ratio, n)
    if k == n or k == 0:
        return loss_mask.copy() if k else np.zeros_like(loss_mask)
    rng = np.random.default_rng(seed)
    sizes = np.full(n // block, block, dtype=np.int64)
    if n % block:
        sizes = np.append(sizes, n % block)
    per_block = rng.multivariate_hypergeometric(sizes, k, method="marginals")
    keep = np.zeros(n, dtype=bool)
    start = 0
    for size, m in zip(sizes.tolist(), per_block.tolist()):
        keep[start + rng.choice(size, size=m, replace=False)] = True
        start += size
    mask = np.zeros_like(loss_mask)
    mask[loss_mask] = keep  # no index array of all response positions (8 bytes per token)
    return mask


def kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest of ``values`` (1 <= k <= len): fixed's global cut, which keeps every score above it and
    the earliest ties at it. Partitions ``values`` in place (linear time, no copy)."""
    n = len(values)
    values.partition(n - k)
    return values[n - k]


def select_fixed(score: np.ndarray, loss_mask: np.ndarray, ratio: float) -> np.ndarray:
    """Global ranking: the top floor(ratio*N) scores over all response tokens of the dataset.

    Linear time and about 5 bytes per response token: one copy of the response scores, partitioned in place
    around the k-th largest, then a pass over the scores in position order.
    """
    values = score[loss_mask]
    n = len(values)
    k = keep_count(ratio, n)
    if k == n or k == 0:
        return loss_mask.copy() if k else np.zeros_like(loss_mask)
    kth = kth_largest(values, k)
    del values
    mask = score > kth
    mask &= loss_mask
    _mark_earliest(mask, score, kth, k - int(np.count_nonzero(mask)), where=loss_mask)
    return mask


def response_counts(loss_mask: np.ndarray, offsets: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """int64[S]: the number of response tokens of every sample (counted a block of tokens at a time, so the
    running count needs 4 bytes per token of one block, not of the whole table)."""
    counts = np.zeros(len(offsets) - 1, dtype=np.int64)
    s = 0
    while s < len(counts):  # samples s..e-1 span about `block` tokens (at least one sample)
        e = max(s + 1, int(np.searchsorted(offsets, offsets[s] + block, side="right")) - 1)
        running = np.concatenate([[0], np.cumsum(loss_mask[offsets[s]: offsets[e]], dtype=np.int32)])
        counts[s:e] = np.diff(running[offsets[s: e + 1] - offsets[s]])
        s = e
    return counts


def select_rho(score: np.ndarray, loss_mask: np.ndarray, offsets: np.ndarray, ratio: float) -> np.ndarray:
    """Sample-level ranking: within each sample i, the top floor(ratio*n_i) of its n_i response tokens.

    Samples with the same number of response tokens n share a quota and form one (samples x n) matrix,
    partitioned row by row around each row's quota-th largest score: linear time, no Python loop over samples
    (one step per distinct n, at most the maximum length), a few bytes per response token.
    """
    r = _ratio_fraction(ratio)
    counts = response_counts(loss_mask, offsets)
    lengths, where = np.unique(counts, return_inverse=True)  # Python ints: a tiny ratio's denominator is huge
    quota = np.array([(r.numerator * int(n)) // r.denominator for n in lengths], dtype=np.int64)[where]
    first = np.cumsum(counts) - counts  # each sample's first index among the response tokens
    values = score[loss_mask]
    keep = np.zeros(len(values), dtype=bool)
    samples = np.flatnonzero(quota > 0)
    samples = samples[np.argsort(counts[samples], kind="stable")]
    for group in np.split(samples, np.flatnonzero(np.diff(counts[samples])) + 1) if len(samples) else []:
        n, q = int(counts[group[0]]), int(quota[group[0]])
        # a row = one sample's response tokens in position order; one sample alone is a slice (no index array)
        single = len(group) == 1
        index = slice(first[group[0]], first[group[0]] + n) if single else first[group][:, None] + np.arange(n)
        if q == n:
            keep[index] = True
            continue
        neg = np.atleast_2d(-values[index])  # ascending = by score, descending
        threshold = np.partition(neg, q - 1, axis=1)[:, q - 1: q]
        chosen = neg <= threshold
        tied = np.flatnonzero(np.count_nonzero(chosen, axis=1) > q)  # more than q at or above: a tie
        if len(tied):  # keep the earliest of the tied tokens
            above = neg[tied] < threshold[tied]
            at = chosen[tied] & ~above
            need = q - np.count_nonzero(above, axis=1, keepdims=True)
            chosen[tied] = above | (at & (np.cumsum(at, axis=1) <= need))
        keep[index] = chosen[0] if single else chosen
    mask = np.zeros_like(loss_mask)
    mask[loss_mask] = keep
    return mask


def select(method: str, table: TokenTable, ratio: float = 1.0, seed: int = 0,
           score: np.ndarray | None = None) -> np.ndarray:
    """The mask of a mask method (:mod:`tokenclean.methods`); always a subset of ``loss_mask``."""
    from tokenclean.methods import Selection, get

    m = get(method)
    if m.rule is None:
        raise ValueError(f"method {method!r} is a{'n' if m.kind == 'online' else ''} {m.kind} method: it has no "
                         "mask to select (the workflow trains it directly)")
    mask = m.rule(Selection(table, ratio, seed, score, table.token_classes()))
    if mask.shape != table.loss_mask.shape or mask.dtype != np.bool_ or np.any(mask > table.loss_mask):
        raise ValueError(f"method {method!r} returned no subset of loss_mask (a bool array, one entry per token)")
    return mask


def require_some_dropped_and_kept(mask: np.ndarray, table: TokenTable, tokens: str | os.PathLike, method: str,
                                  ratio: float) -> None:
    """A selection that keeps no token, or every token where a ratio below 1 asked for fewer, is no selection: a
    table row trained on it would silently be no training, or full SFT under another name."""
    from tokenclean.methods import get

    n, kept = int(table.loss_mask.sum()), int(mask.sum())
    if kept == 0:
        if not get(method).takes_ratio:
            raise ValueError(f"{tokens}: method {method!r} keeps none of its {n} response tokens")
        per_sample = (f"; rho keeps floor(ratio x n_i) of each sample, whose largest n_i is "
                      f"{int(response_counts(table.loss_mask, table.offsets).max())}" if method == "rho" else "")
        raise ValueError(f"--ratio {ratio}: method {method!r} keeps none of the {n} response tokens of {tokens}"
                         f"{per_sample}; raise --ratio")
    if get(method).takes_ratio and ratio < 1 and kept == n:
        raise ValueError(f"--ratio {ratio}: method {method!r} keeps all {n} response tokens of {tokens}, though the "
                         "ratio asks for fewer")


def load_losses(tokens: str | os.PathLike, tmeta: dict[str, Any], table: TokenTable, base_loss: str | os.PathLike,
                ref_loss: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The base and reference loss arrays, checked to be computed on ``tokens`` (``table``, sidecar ``tmeta``);
    and their provenance."""
    base, bmeta = load_array(base_loss, "loss", made_on=(tokens, tmeta, table))
    ref, rmeta = load_array(ref_loss, "loss", made_on=(tokens, tmeta, table))
    provenance = {"base_model": bmeta.get("model"), "base_model_fingerprint": bmeta.get("model_fingerprint"),
                  "ref_model": rmeta.get("model"), "ref_model_fingerprint": rmeta.get("model_fingerprint")}
    return base, ref, provenance


def select_file(method: str, tokens: str | os.PathLike, out: str | os.PathLike, ratio: float = 1.0,
                seed: int = 0, base_loss: str | os.PathLike | None = None,
                ref_loss: str | os.PathLike | None = None) -> dict[str, Any]:
    """CLI entry: build a mask from a token table (and, for scored methods, two loss files)."""
    table, tmeta = TokenTable.load(tokens)
    score = None
    meta: dict[str, Any] = {"kind": "mask", "method": method, "ratio": ratio, "seed": seed, "tokens": str(tokens),
                            "tokens_fingerprint": tmeta["fingerprint"]}
    from tokenclean.methods import get

    if {"base_loss", "ref_loss"} & set(get(method).needs):
        if base_loss is None or ref_loss is None:
            raise ValueError(f"method {method!r} needs --base-loss and --ref-loss")
        base, ref, provenance = load_losses(tokens, tmeta, table, base_loss, ref_loss)
        score = scores(base, ref, table.loss_mask)
        meta.update(provenance)
    try:
        mask = select(method, table, ratio, seed, score)
    except ValueError as e:
        if get(method).ground_truth:  # the token table lacks what the method reads: name it
            raise ValueError(f"{tokens}: {e}") from None
        raise
    require_some_dropped_and_kept(mask, table, tokens, method, ratio)
    meta.update(n_response_tokens=int(table.loss_mask.sum()), n_selected=int(mask.sum()),
                n_samples_without_selected=int(np.count_nonzero(np.add.reduceat(mask, table.offsets[:-1]) == 0))
                if table.n_samples else 0)
    save_array(Path(out), mask, meta)
    return meta
