"""The experiment's figures (PNG, matplotlib's Agg backend: no display needed).

- :func:`plot_ratios`: average score against the keep ratio, one line per method (methods without a ratio as
  horizontal lines), from ``table.csv``;
- :func:`plot_scores`: how the token scores (base loss - reference loss) are distributed, per ground-truth class
  in the embedded world, with the global cut of each configured ratio;
- :func:`plot_kept`: the kept fraction of each class per mask, from ``cleaning_quality.csv``;
- :func:`plot_rounds`: the self-evolving chain per task, round 0 = the warm-up model (the paper's "Matthew
  effect" figure), from ``rounds.csv``.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from tokenclean.artifacts import ArtifactError, TokenTable, atomic_file, read_csv_rows, reading
from tokenclean.data import TOKEN_CLASSES
from tokenclean.report.table import LOWER_IS_BETTER, METRIC_LABELS

# One colour per ground-truth class (tokenclean.data.TOKEN_CLASSES), in the figures and the token page: novel
# (informative tokens only the pool teaches) in purple, apart from the informative green and the noisy red/orange.
CLASS_COLORS = {"informative": "#2ca02c", "boilerplate": "#8c8c8c", "corrupted": "#d62728", "garbage": "#ff7f0e",
                "novel": "#9467bd"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.spines.top": False,
                         "axes.spines.right": False, "savefig.dpi": 130})
    return plt


def _save(fig: Any, out_png: str | os.PathLike) -> None:
    with atomic_file(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def read_csv(path: str | os.PathLike, columns: list[str] = ()) -> list[dict[str, str]]:
    """The rows of a CSV this package wrote, checked to have ``columns`` (artifacts.read_csv_rows)."""
    return [row for _, row in read_csv_rows(path, columns)[1]]


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def plot_ratios(table_csv: str | os.PathLike, out_png: str | os.PathLike, metric: str = "answer_acc") -> None:
    """Average ``metric`` (mean ± std over seeds) against the keep ratio."""
    rows = read_csv(table_csv, ["method", "ratio", "average_mean", "average_std"])
    scale = 100.0 if metric == "score" else 1.0
    with reading(table_csv):
        ratioed = {m: sorted((float(r["ratio"]), float(r["average_mean"]) * scale, float(r["average_std"] or 0) * scale)
                             for r in rows if r["method"] == m and r["ratio"])
                   for m in dict.fromkeys(r["method"] for r in rows if r["ratio"])}
        flat = [(r["method"], float(r["average_mean"]) * scale) for r in rows if not r["ratio"]]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (method, pts) in enumerate(ratioed.items()):
        x, y, e = map(np.array, zip(*pts))
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method, color=f"C{i}")
    for j, (method, y) in enumerate(flat):
        ax.axhline(y, ls="--", lw=1, color=f"C{len(ratioed) + j}", label=f"{method} (no ratio)")
    ax.set_xlabel("keep ratio (fraction of response tokens trained on)")
    ax.set_ylabel(f"average {_metric_label(metric)}")
    ax.set_title("Average over tasks against the keep ratio (mean ± std over seeds)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _save(fig, out_png)


def plot_scores(tokens: str | os.PathLike, base_loss: str | os.PathLike, ref_loss: str | os.PathLike,
                out_png: str | os.PathLike, ratios: list[float] = ()) -> None:
    """Histogram (density, log count axis) of response-token scores, per ground-truth class when the token
    table has them, with the global cut of each ratio (the ``fixed`` method's threshold) as a vertical line."""
    from tokenclean.selection import keep_count, kth_largest, load_losses, scores

    table, meta = TokenTable.load(tokens)
    base, ref, _ = load_losses(tokens, meta, table, base_loss, ref_loss)
    score = scores(base, ref, table.loss_mask)
    resp = table.loss_mask
    values = score[resp].astype(np.float64)
    token_class = table.token_classes()
    has_classes = token_class is not None
    lo, hi = np.quantile(values, [0.002, 0.998])
    bins = np.linspace(lo, hi, 81)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if has_classes:
        for c, name in enumerate(TOKEN_CLASSES):
            sel = resp & (token_class == c)
            if sel.any():
                share = sel.sum() / resp.sum()
                ax.hist(np.clip(score[sel], lo, hi), bins=bins, histtype="step", lw=1.8, color=CLASS_COLORS[name],
                        label=f"{name} ({share:.0%} of tokens)")
    else:
        ax.hist(np.clip(values, lo, hi), bins=bins, histtype="stepfilled", alpha=0.6, color="C0",
                label="all response tokens")
    for i, r in enumerate(sorted(ratios)):
        k = keep_count(r, len(values))
        if k == 0:
            continue
        cut = float(kth_largest(values.copy(), k))  # exactly the cut of the fixed rule
        ax.axvline(cut, color="k", ls=(0, (4, 2 + 2 * i)), lw=1, label=f"global cut, keep {r:g} (score ≥ {cut:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("token score = loss(base) − loss(reference)  [nats; higher = more informative]")
    ax.set_ylabel("tokens per bin (log scale)")
    ax.set_title("Scores of the pool's response tokens" + (" by ground-truth class" if has_classes else "")
                 + f"  (n = {resp.sum():,}; outer 0.2% clipped)")
    ax.legend(loc="upper left", frameon=False, fontsize=9)
    _save(fig, out_png)


def plot_kept(quality_csv: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Grouped bars: per mask, the fraction of each ground-truth class it kept."""
    rows = read_csv(quality_csv, ["mask"])
    classes = [c for c in TOKEN_CLASSES if f"kept_{c}" in rows[0]]
    if not classes:
        raise ArtifactError(f"{quality_csv}: no kept_<class> column (expected cleaning_quality.csv)")
    with reading(quality_csv):
        kept = {c: [float(r[f"kept_{c}"]) if r[f"kept_{c}"] not in ("", "nan") else math.nan for r in rows]
                for c in classes}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
    width = 0.8 / len(classes)
    x = np.arange(len(rows))
    for i, c in enumerate(classes):
        ax.bar(x + (i - (len(classes) - 1) / 2) * width, kept[c], width, color=CLASS_COLORS[c], label=c)
    ax.set_xticks(x, [r["mask"] for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of the class kept")
    ax.set_xlabel("selection over the pool: a mask, or an online run's mean weight per token")
    ax.set_title("What each selection kept, by ground-truth token class")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="token class")
    _save(fig, out_png)


def plot_rounds(rounds_csv: str | os.PathLike, out_png: str | os.PathLike, metric: str = "answer_acc") -> None:
    """One panel per task (and the average): score per self-evolving round, one line per chain (method, ratio)."""
    rows = read_csv(rounds_csv, ["method", "ratio", "round", "average_mean", "average_std"])
    tasks = [k.removesuffix("_mean") for k in rows[0] if k.endswith("_mean")]
    tasks = [t for t in tasks if t != "average"] + ["average"]
    chains = list(dict.fromkeys((r["method"], r["ratio"]) for r in rows))
    scale = 100.0 if metric == "score" else 1.0
    with reading(rounds_csv):
        series = {(task, chain): sorted((int(r["round"]), float(r[f"{task}_mean"]) * scale,
                                         float(r[f"{task}_std"] or 0) * scale)
                                        for r in rows if (r["method"], r["ratio"]) == chain)
                  for task in tasks for chain in chains}
        round_ticks = sorted({int(r["round"]) for r in rows})
    plt = _pyplot()
    ncols = 4 if len(tasks) > 6 else min(3, len(tasks))  # 5 panels: 3 + 2, 8 panels: 4 + 4
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.9 * nrows), squeeze=False, sharex=True)
    for ax, task in zip(axes.flat, tasks):
        for i, (method, ratio) in enumerate(chains):
            x, y, e = map(np.array, zip(*series[(task, (method, ratio))]))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=f"C{i}",
                        label=f"{method} {ratio}" if ratio else method)
        ax.set_title(task, fontweight="bold" if task == "average" else "normal")
        ax.set_xticks(round_ticks)
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes.flat):
        if i >= len(tasks):
            ax.set_visible(False)
        elif i + ncols >= len(tasks):  # the lowest panel of its column: round numbers and label below it
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("round (0 = warm-up model)")
    for ax in axes[:, 0]:
        ax.set_ylabel(_metric_label(metric).split(" (")[0] + (" (lower = better)" if metric in LOWER_IS_BETTER else ""))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Self-evolving cleaning, round by round (mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, out_png)
