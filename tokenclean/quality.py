"""Cleaning quality: which ground-truth token classes each selection kept (embedded world only).

Real data has no token labels; the synthetic world does, so there we can measure what a method actually
removed. For every mask: the fraction of response tokens kept in each class (``kept_<class>``), and the
precision and recall of "kept" against the informative tokens, both classes of them: ``informative`` and
``novel`` (answers only the pool teaches; precision: kept tokens that are informative or novel; recall:
informative and novel tokens kept). ``kept_novel`` is the recall of the novel tokens alone: whether a method
keeps what its reference could not know, the blind spot self-evolving cleaning exists for; set it beside
``kept_informative``, the recall of the informative tokens the reference could learn.
And, independent of any ratio, how well the score itself separates the classes (:func:`separation_table`):
when cleaning loses to full SFT, this says whether the reference or the selection rule is to blame.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from tokenclean.artifacts import ArtifactError, TokenTable, atomic_file, load_array
from tokenclean.data import INFORMATIVE_CLASSES, NOISY_CLASSES, TOKEN_CLASSES


def _in_classes(token_class: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    return np.isin(token_class, [TOKEN_CLASSES.index(c) for c in names])


def class_counts(token_class: np.ndarray, loss_mask: np.ndarray, keep: np.ndarray) -> dict[str, Any]:
    """Kept fraction per class, precision/recall of kept vs the informative classes (informative and novel),
    over response tokens."""
    if np.any(keep & ~loss_mask):
        raise ArtifactError("mask selects tokens outside loss_mask")
    row: dict[str, Any] = {"n_response_tokens": int(loss_mask.sum()), "n_kept": int(keep.sum())}
    for c, name in enumerate(TOKEN_CLASSES):
        in_class = loss_mask & (token_class == c)
        row[f"n_{name}"] = int(in_class.sum())
        row[f"kept_{name}"] = float(keep[in_class].mean()) if in_class.any() else float("nan")
    informative = loss_mask & _in_classes(token_class, INFORMATIVE_CLASSES)
    hits = int((keep & informative).sum())
    row["precision_informative"] = hits / row["n_kept"] if row["n_kept"] else float("nan")
    row["recall_informative"] = hits / int(informative.sum()) if informative.any() else float("nan")
    return row


def quality_table(tokens: str | os.PathLike, masks: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per mask file (named ``<mask>.mask.npy``) over the token table ``tokens``."""
    table, meta = TokenTable.load(tokens)
    token_class = table.extras.get("token_class")
    if token_class is None or not np.any(token_class[table.loss_mask] >= 0):
        raise ArtifactError(f"{tokens}: carries no ground-truth token classes (only the embedded world has them)")
    rows = []
    for path in masks:
        keep, _ = load_array(path, "mask", made_on=(tokens, meta))
        try:
            counts = class_counts(token_class, table.loss_mask, keep)
        except ArtifactError as e:
            raise ArtifactError(f"{path}: {e}") from None
        rows.append({"mask": Path(path).name.removesuffix(".mask.npy"), **counts})
    return rows


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting one half (Mann-Whitney U)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    values = np.concatenate([positive, negative])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    rank_sum = mid_ranks[inverse[: len(positive)]].sum()
    return float((rank_sum - len(positive) * (len(positive) + 1) / 2.0) / (len(positive) * len(negative)))


def separation_rows(token_class: np.ndarray, loss_mask: np.ndarray, base: np.ndarray, ref: np.ndarray
                    ) -> list[dict[str, Any]]:
    """Per class: token count, score quantiles, mean losses under both models, and, for every class that is not
    noise (informative, boilerplate, novel), the AUROC of the score against the noisy tokens (corrupted and
    garbage): 1.0 = every token of the class outscores every noisy one. A reference that never saw the novel
    knowledge should score novel tokens lower than informative ones: that is its blind spot."""
    score = np.where(loss_mask, base - ref, np.nan)
    noisy = loss_mask & _in_classes(token_class, NOISY_CLASSES)
    rows = []
    for c, name in enumerate(TOKEN_CLASSES):
        sel = loss_mask & (token_class == c)
        if not sel.any():
            continue
        q10, q50, q90 = np.quantile(score[sel], [0.1, 0.5, 0.9])
        rows.append({"class": name, "n_tokens": int(sel.sum()), "mean_score": float(score[sel].mean()),
                     "p10_score": float(q10), "median_score": float(q50), "p90_score": float(q90),
                     "mean_base_loss": float(base[sel].mean()), "mean_ref_loss": float(ref[sel].mean()),
                     "auroc_vs_noisy": auroc(score[sel], score[noisy]) if name not in NOISY_CLASSES
                     else float("nan")})
    return rows


def separation_table(tokens: str | os.PathLike, base_loss: str | os.PathLike, ref_loss: str | os.PathLike
                     ) -> list[dict[str, Any]]:
    """How the scores (base loss - reference loss) of the pool's tokens fall by ground-truth class."""
    from tokenclean.selection import load_losses, scores

    table, meta = TokenTable.load(tokens)
    token_class = table.extras.get("token_class")
    if token_class is None or not np.any(token_class[table.loss_mask] >= 0):
        raise ArtifactError(f"{tokens}: carries no ground-truth token classes (only the embedded world has them)")
    base, ref, _ = load_losses(meta, tokens, base_loss, ref_loss)
    scores(base, ref, table.loss_mask)  # every response token has finite losses
    return separation_rows(token_class, table.loss_mask, base, ref)


def write_csv(rows: list[dict[str, Any]], out_csv: str | os.PathLike) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_file(out_csv) as tmp:
        tmp.write_text(buf.getvalue())


def write_quality(tokens: str | os.PathLike, masks: list[str | os.PathLike], out_csv: str | os.PathLike) -> None:
    write_csv(quality_table(tokens, masks), out_csv)
