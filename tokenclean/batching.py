"""Grouping ragged samples into padded batches under a token budget."""
from __future__ import annotations

import numpy as np
import torch

from tokenclean.artifacts import TokenTable


def budget_batches(lengths: np.ndarray, token_budget: int, order: np.ndarray | None = None) -> list[np.ndarray]:
    """Split samples into batches whose padded size (count x longest) stays within ``token_budget``.

    ``order`` defaults to longest-first, so each batch holds samples of similar length and padding is small;
    a sample longer than the budget forms a batch of its own.
    """
    if token_budget < 1:
        raise ValueError("token_budget must be positive")
    if order is None:
        order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, longest = 0, 0
    for i, s in enumerate(order):
        longest_new = max(longest, int(lengths[s]))
        if i > start and longest_new * (i - start + 1) > token_budget:
            batches.append(order[start:i])
            start, longest_new = i, int(lengths[s])
        longest = longest_new
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
