"""Cleaning quality: which ground-truth token classes each selection kept (embedded world only).

Real data has no token labels; the synthetic world does, so there we can measure what a method actually
removed. A selection is a mask (an offline method's, 1 kept and 0 dropped) or an online run's ``weights.npy``
(:func:`load_kept`: the weight each token received, averaged over the passes that trained it: for Rho-1 and
ssToken the fraction of passes that kept it, for DFT and EAFT its mean weight), read as a kept fraction per
token, so one formula covers both. For every selection: the (mean) fraction of response tokens kept in each
class (``kept_<class>``), and the
precision and recall of "kept" against the informative tokens, both classes of them: ``informative`` and
``novel`` (answers only the pool teaches; precision: kept tokens that are informative or novel; recall:
informative and novel tokens kept). ``kept_novel`` is the recall of the novel tokens alone: whether a method
keeps what its reference could not know, the blind spot self-evolving cleaning exists for; set it beside
``kept_informative``, the recall of the informative tokens the reference could learn.
And, independent of any ratio, how well the score itself separates the classes (:func:`separation_table`):
when cleaning loses to full SFT, this says whether the reference or the selection rule is to blame.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tokenclean.artifacts import ArtifactError, TokenTable, load_array, read_sidecar, require_file, write_csv
from tokenclean.data import INFORMATIVE_CLASSES, NOISY_CLASSES, TOKEN_CLASSES


def _in_classes(token_class: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    return np.isin(token_class, [TOKEN_CLASSES.index(c) for c in names])


# An online run kept a token when it weighted it at least this much on average: for Rho-1 and ssToken, in at least
# half of the passes that trained it (with one pass, exactly its decision); for DFT and EAFT, at least half as much
# as a full token (> 0 would call every DFT/EAFT token kept, and a token Rho-1 kept once in four passes). Used where
# a yes/no is needed (the token view); the table itself uses the fractions.
KEPT_THRESHOLD = 0.5


def load_kept(path: str | os.PathLike, tokens: str | os.PathLike, tmeta: dict[str, Any], table: TokenTable
              ) -> tuple[str, np.ndarray, str]:
    """A selection over the token table ``tokens`` as a kept fraction per token in [0, 1]: (its name, float64[N],
    ``mask`` or ``weights``).

    A mask (``<name>.mask.npy``): 1 where kept. An online run's record (``<models>/sft/<run>/weights.npy``, named
    by its run): each token's weight averaged over the passes that trained it, 0 where it was never trained
    (NaN in the file). A weight outside [0, 1] is refused: it cannot be read as a kept fraction.
    """
    meta = read_sidecar(require_file(path))  # older sidecars record no kind: their dtype says which
    if meta.get("kind", "weights" if str(meta.get("dtype", "")).startswith("float") else "mask") == "weights":
        weights, _ = load_array(path, "weights", made_on=(tokens, tmeta, table))
        trained = np.isfinite(weights)
        if np.any(trained & ((weights < 0) | (weights > 1))):
            raise ArtifactError(f"{path}: holds weights outside [0, 1], which cannot be read as a kept fraction")
        return Path(path).parent.name, np.where(trained, weights, 0.0).astype(np.float64), "weights"
    keep, _ = load_array(path, "mask", made_on=(tokens, tmeta, table))
    return Path(path).name.removesuffix(".mask.npy"), keep.astype(np.float64), "mask"


def class_counts(token_class: np.ndarray, loss_mask: np.ndarray, keep: np.ndarray) -> dict[str, Any]:
    """Kept fraction per class, precision/recall of kept vs the informative classes (informative and novel),
    over response tokens. ``keep``: a mask (bool) or a kept fraction per token (float in [0, 1], see
    :func:`load_kept`), where a token kept to 0.5 counts half: ``n_kept`` is then the sum of the fractions."""
    if np.any((keep > 0) & ~loss_mask):
        raise ArtifactError("selects tokens outside loss_mask")
    kept = keep.astype(np.float64)
    total = float(kept.sum())
    row: dict[str, Any] = {"n_response_tokens": int(loss_mask.sum()),
                           "n_kept": int(keep.sum()) if keep.dtype == np.bool_ else total}
    for c, name in enumerate(TOKEN_CLASSES):
        in_class = loss_mask & (token_class == c)
        row[f"n_{name}"] = int(in_class.sum())
        row[f"kept_{name}"] = float(kept[in_class].mean()) if in_class.any() else float("nan")
    informative = loss_mask & _in_classes(token_class, INFORMATIVE_CLASSES)
    hits = float(kept[informative].sum())
    row["precision_informative"] = hits / total if total > 0 else float("nan")
    row["recall_informative"] = hits / int(informative.sum()) if informative.any() else float("nan")
    return row


def labelled_table(tokens: str | os.PathLike) -> tuple[TokenTable, dict[str, Any], np.ndarray]:
    """The token table ``tokens``, its sidecar and its ground-truth classes; a one-line error where it has none."""
    table, meta = TokenTable.load(tokens)
    token_class = table.token_classes()
    if token_class is None:
        raise ArtifactError(f"{tokens}: carries no ground-truth token classes (only the embedded world has them)")
    return table, meta, token_class


def quality_table(tokens: str | os.PathLike, selections: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per selection over the token table ``tokens``: a mask (``<mask>.mask.npy``) or an online run's
    ``weights.npy`` (:func:`load_kept`); ``record`` says which."""
    table, meta, token_class = labelled_table(tokens)
    rows = []
    for path in selections:
        name, kept, record = load_kept(path, tokens, meta, table)
        try:
            counts = class_counts(token_class, table.loss_mask, kept if record == "weights" else kept > 0)
        except ArtifactError as e:
            raise ArtifactError(f"{path}: {e}") from None
        rows.append({"mask": name, "record": record, **counts})
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

    table, meta, token_class = labelled_table(tokens)
    base, ref, _ = load_losses(tokens, meta, table, base_loss, ref_loss)
    scores(base, ref, table.loss_mask)  # every response token has finite losses
    return separation_rows(token_class, table.loss_mask, base, ref)


def write_quality(tokens: str | os.PathLike, selections: list[str | os.PathLike], out_csv: str | os.PathLike) -> None:
    write_csv(out_csv, quality_table(tokens, selections))
