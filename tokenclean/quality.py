"""Cleaning quality: which ground-truth token classes each selection kept (embedded world only).

Real data has no token labels; the synthetic world does, so there we can measure what a method actually
removed. For every mask: the fraction of response tokens kept in each class, and the precision and recall of
"kept" against "informative" (precision: kept tokens that are informative; recall: informative tokens kept).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from tokenclean.artifacts import ArtifactError, TokenTable, atomic_file, load_array
from tokenclean.data import TOKEN_CLASSES


def class_counts(token_class: np.ndarray, loss_mask: np.ndarray, keep: np.ndarray) -> dict[str, Any]:
    """Kept fraction per class, precision/recall of kept vs informative, over response tokens."""
    if np.any(keep & ~loss_mask):
        raise ArtifactError("mask selects tokens outside loss_mask")
    row: dict[str, Any] = {"n_response_tokens": int(loss_mask.sum()), "n_kept": int(keep.sum())}
    for c, name in enumerate(TOKEN_CLASSES):
        in_class = loss_mask & (token_class == c)
        row[f"n_{name}"] = int(in_class.sum())
        row[f"kept_{name}"] = float(keep[in_class].mean()) if in_class.any() else float("nan")
    informative = loss_mask & (token_class == TOKEN_CLASSES.index("informative"))
    hits = int((keep & informative).sum())
    row["precision_informative"] = hits / row["n_kept"] if row["n_kept"] else float("nan")
    row["recall_informative"] = hits / int(informative.sum()) if informative.any() else float("nan")
    return row


def quality_table(tokens: str | os.PathLike, masks: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per mask file (named ``<mask>.mask.npy``) over the token table ``tokens``."""
    table, meta = TokenTable.load(tokens)
    token_class = table.extras.get("token_class")
    if token_class is None or not np.any(token_class[table.loss_mask] >= 0):
        raise ArtifactError(f"{tokens} carries no ground-truth token classes (only the embedded world has them)")
    rows = []
    for path in masks:
        keep, mmeta = load_array(path)
        if mmeta.get("tokens_fingerprint") != meta["fingerprint"]:
            raise ArtifactError(f"{path} was made for {mmeta.get('tokens')}, not for {tokens}")
        rows.append({"mask": Path(path).name.removesuffix(".mask.npy"),
                     **class_counts(token_class, table.loss_mask, keep)})
    return rows


def write_quality(tokens: str | os.PathLike, masks: list[str | os.PathLike], out_csv: str | os.PathLike) -> None:
    rows = quality_table(tokens, masks)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_file(out_csv) as tmp:
        tmp.write_text(buf.getvalue())
