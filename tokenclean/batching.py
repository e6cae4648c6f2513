"""Grouping ragged samples into padded batches under a token budget."""
from __future__ import annotations

import numpy as np
import torch

from tokenclean.artifacts import TokenTable


def budget_batches(lengths: np.ndarray, token_budget: int, order: np.ndarray | None = None,
                   max_padding: float = 0.05) -> list[np.ndarray]:
    """Split samples into batches whose padded size (count x longest) stays within ``token_budget``.

    ``order`` defaults to longest-first, so each batch holds samples of similar length. A batch also ends where
    the next sample would raise its padding above ``max_padding`` of its cells: in the sparse long tail of
    real SFT lengths a 2000-token sample would otherwise pad a few 600-token ones to its width (a third of
    the compute spent on padding, measured). A sample longer than the budget forms a batch of its own.
    """
    if token_budget < 1:
        raise ValueError("token_budget must be positive")
    if order is None:
        order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, longest, real = 0, 0, 0
    for i, s in enumerate(order):
        length = int(lengths[s])
        longest_new, real_new = max(longest, length), real + length
        cells = longest_new * (i - start + 1)
        if i > start and (cells > token_budget or cells - real_new > max_padding * cells):
            batches.append(order[start:i])
            start, longest_new, real_new = i, length, length
        longest, real = longest_new, real_new
    if len(order) > start:
        batches.append(order[start:])
    return batches


def collate(table: TokenTable, samples: np.ndarray, pad_id: int, mask: np.ndarray | None = None,
            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and a per-position ``target`` mask for the given samples.

    ``target[b, p]`` is True where token p of sample b is trained/scored (``mask``, default ``loss_mask``).
    """
    mask = table.loss_mask if mask is None else mask
    lengths = table.lengths[samples]
    width = int(lengths.max())
    ids = np.full((len(samples), width), pad_id, dtype=np.int64)
    attn = np.zeros((len(samples), width), dtype=np.int64)
    target = np.zeros((len(samples), width), dtype=bool)
    for row, s in enumerate(samples):
        a, b = table.offsets[s], table.offsets[s + 1]
        ids[row, : b - a] = table.input_ids[a:b]
        attn[row, : b - a] = 1
        target[row, : b - a] = mask[a:b]
    return {
        "input_ids": torch.from_numpy(ids).to(device),
        "attention_mask": torch.from_numpy(attn).to(device),
        "target": torch.from_numpy(target).to(device),
    }


def _first_fit(lengths: np.ndarray, order: np.ndarray, width: int) -> list[list[int]]:
    """First-fit of ``order``'s items (positions in ``lengths``) into rows of ``width``; each row a list."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        row = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(int(i))
        free[row] -= int(lengths[i])
    return rows


def pack(table: TokenTable, samples: np.ndarray, width: int, pad_id: int, mask: np.ndarray | None = None,
         device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Samples packed end to end into rows of at most ``width`` tokens (first-fit, longest first), no padding
    between.

    The rows are then evened out: of the widths that still pack into as few rows, the narrowest is used, so the
    padding is a thin tail on every row rather than a part-filled last row (for batches of 32 samples of 20-60
    tokens in rows of 128: 8.6% of the cells with plain first-fit, 4.8% evened out). ``position_ids`` restart at 0
    for every sample; a model that derives a block-diagonal causal mask from them (transformers' Llama family
    does when no ``attention_mask`` is given) then computes exactly the per-sample losses of :func:`collate`,
    on about a third fewer positions for short ragged samples. A sample longer than ``width`` gets a row of its
    own. ``target`` as in :func:`collate`; ``index`` (CPU) holds each cell's token index in the table, -1 in a
    row's padded tail.
    """
    mask = table.loss_mask if mask is None else mask
    lengths = table.lengths[samples]
    longest = int(lengths.max())
    width = max(width, longest)
    order = np.argsort(-lengths, kind="stable")
    rows = _first_fit(lengths, order, width)
    low, high = max(longest, -(-int(lengths.sum()) // len(rows))), width  # binary search of the narrowest
    while low < high:
        mid = (low + high) // 2
        trial = _first_fit(lengths, order, mid)
        if len(trial) <= len(rows):
            rows, high = trial, mid
        else:
            low = mid + 1
    rows = [[int(samples[i]) for i in row] for row in rows]
    width = max(int(table.lengths[row].sum()) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    target = np.zeros((len(rows), width), dtype=bool)
    index = np.full((len(rows), width), -1, dtype=np.int64)
    for r, members in enumerate(rows):
        col = 0
        for s in members:
            a, b = table.offsets[s], table.offsets[s + 1]
            ids[r, col: col + b - a] = table.input_ids[a:b]
            pos[r, col: col + b - a] = np.arange(b - a)
            target[r, col: col + b - a] = mask[a:b]
            index[r, col: col + b - a] = np.arange(a, b)
            if mask[a]:
                raise ValueError(f"sample {s}: its first token is a target, but it has no context")
            col += b - a
        pos[r, col:] = np.arange(width - col)  # the padded tail is a segment of its own, never a target
    return {"input_ids": torch.from_numpy(ids).to(device), "position_ids": torch.from_numpy(pos).to(device),
            "target": torch.from_numpy(target).to(device), "index": torch.from_numpy(index)}
