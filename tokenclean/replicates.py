"""Replicates: independent draws of an embedded experiment's world, base model and warm-up model.

The SFT seeds of a config vary only the rows' own training; the world, the pretrained base model and the warm-up
(reference) model are drawn once, and they move a row's difference from full SFT more than the seeds do
(docs/worlds.md, "The study"). Replicate ``r`` of a config is the same pre-registered design drawn again: its
world seed, pretraining seed and warm-up seed are the config's plus ``r``. Replicate 0 is the config itself, in
the experiment's own folder (``results/<experiment>/``), so a config of one replicate runs and lays out exactly as
before; replicate ``r >= 1`` lives in ``results/<experiment>/replicates/r<r>/`` with the same layout inside.
Adding a replicate adds a folder and recomputes nothing already there.

This module is the one home of that layout: the workflow's ``{rep}`` wildcard (the suffix after the experiment's
folder, empty for replicate 0), the seeds of a replicate, and the replicate an artifact's path belongs to (the
table and the significance test group evaluations by it).
"""
from __future__ import annotations

import os
import re
from pathlib import PurePath
from typing import Any

# The suffix of replicate r >= 1 after results/<experiment>; replicate 0 has none.
FOLDER = "replicates"
WILDCARD = r"(/replicates/r[1-9][0-9]*)?"  # Snakemake's constraint of the {rep} wildcard (empty: replicate 0)
_PART = re.compile(r"r([1-9][0-9]*)")


def suffix(index: int) -> str:
    """The ``{rep}`` wildcard's value of replicate ``index``: '' for 0, '/replicates/r<index>' after."""
    if index < 0:
        raise ValueError(f"a replicate index is at least 0, got {index}")
    return "" if index == 0 else f"/{FOLDER}/r{index}"


def index(rep: str) -> int:
    """The replicate of a ``{rep}`` wildcard value (the inverse of :func:`suffix`)."""
    if not rep:
        return 0
    m = re.fullmatch(WILDCARD, rep)
    if not m:
        raise ValueError(f"not a replicate suffix: {rep!r}")
    return int(rep.rsplit("/r", 1)[1])


def of_path(path: str | os.PathLike) -> int:
    """The replicate an artifact belongs to: ``r`` where its path has ``replicates/r<r>/`` (the last such pair),
    else 0 (the experiment's own folder)."""
    parts = PurePath(path).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == FOLDER and (m := _PART.fullmatch(parts[i + 1])):
            return int(m[1])
    return 0


def seeded(section: dict[str, Any], index_: int, key: str = "seed") -> dict[str, Any]:
    """A config section with its ``key`` moved by the replicate's index (a missing seed counts as 0, the
    default of every seeded section); replicate 0 returns the section unchanged (the same job parameters, so
    nothing re-runs)."""
    if index_ == 0:
        return section
    return {**section, key: int(section.get(key, 0)) + index_}


def seeded_train(section: dict[str, Any], index_: int) -> dict[str, Any]:
    """A recipe section (``{train: {...}}``) with its training seed moved by the replicate's index."""
    if index_ == 0:
        return section
    return {**section, "train": seeded(section.get("train", {}), index_)}
