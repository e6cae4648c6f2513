"""Worlds x methods: several finished experiments side by side (``tokenclean compare``).

Each world is one finished experiment, given as ``NAME=RESULTS_DIR``; from its directory three files are read:

- ``table.csv`` (:func:`tokenclean.report.table.write_table`): per row (method, ratio), the headline metric on
  average over tasks, mean and std over seeds, and the number of seeds. Another metric (``--metric``) comes from
  ``table_<metric>.csv``, the same table for that metric;
- ``significance.csv`` (:mod:`tokenclean.report.significance`): the row minus full-token SFT, task ``average``,
  with its 95% paired-bootstrap interval; full itself is the reference (difference 0, no interval);
- ``cleaning_quality.csv`` (:mod:`tokenclean.report.quality`): per selection (a mask, named
  ``<method>[_r<ratio>][_s<seed>]``, or an online run's record, named by its run), the kept fraction of each
  ground-truth token class; a row's value is the mean over its selections (its seeds' masks or records; one mask
  shared by every seed counts once). Rows that select nothing over the pool (base, warmup, full+warmup, a
  self-evolving chain, whose masks are per chunk) have none.

The headline metric is not written in ``table.csv`` by name: it is the metric of ``significance.csv`` that has
no table of its own (``table_<metric>.csv``) and no ``average_<metric>_mean`` column in ``table.csv``, so a world
with another headline (not ``answer_acc``) is read without configuration.

Output: a CSV with one row per (world, method, ratio) that a world has, and a Markdown page with the headline
side by side (methods as rows, a column pair per world, "–" where a world lacks the row) and the kept fractions
(per row, one line per world). Both are written together, or neither.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenclean.artifacts import ArtifactError, csv_number, csv_text, read_csv_rows, require_file, write_texts
from tokenclean.data import INFORMATIVE_CLASSES, TOKEN_CLASSES
from tokenclean.methods import parse_run
from tokenclean.report.table import LOWER_IS_BETTER, METRIC_LABELS, ground_truth_row, metric_csv, metric_format

# The classes in reading order: worth learning, template, noise.
CLASSES = INFORMATIVE_CLASSES + tuple(c for c in TOKEN_CLASSES if c not in INFORMATIVE_CLASSES)
BASELINE = "full"
COLUMNS = (["world", "method", "ratio", "ground_truth", "metric", "mean", "std", "n_replicates", "n_seeds", "diff",
            "ci_low", "ci_high", "significant", "p_improve", "n_selections"] + [f"kept_{c}" for c in CLASSES])

TABLE, SIGNIFICANCE, QUALITY = "table.csv", "significance.csv", "cleaning_quality.csv"
WRITER = {TABLE: "tokenclean report", SIGNIFICANCE: "tokenclean significance", QUALITY: "tokenclean quality"}


@dataclass
class World:
    """One experiment's rows, keyed by (method, ratio tag or "")."""

    name: str
    results: Path
    metric: str
    rows: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


def parse_world(text: str) -> tuple[str, Path]:
    """``NAME=RESULTS_DIR`` -> (name, directory)."""
    name, sep, directory = text.partition("=")
    name = name.strip()
    if not sep or not name or not directory:
        raise ValueError(f"--world {text}: expected NAME=RESULTS_DIR (e.g. paper-setting=results/methods)")
    if "|" in name or "\n" in name:
        raise ValueError(f"--world {text}: a world's name cannot hold '|' or a line break (Markdown cells)")
    return name, Path(directory)


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------
def row_key(path: Path, line: int, name: str, ratio: str = "") -> tuple[str, str]:
    """(method, ratio) of a row; ``name`` a method (with ``ratio`` beside it) or a run / mask name."""
    try:
        method, tag, _ = parse_run(name)
    except ValueError:
        raise ArtifactError(f"{path}:{line}: {name!r} is not a method, run or mask name") from None
    if ratio and tag:
        raise ArtifactError(f"{path}:{line}: {name!r}: a method name carries no ratio (column ratio has it)")
    return method, (ratio or tag or "")


def other_metrics(results: Path, header: list[str]) -> set[str]:
    """The metrics that are not ``table.csv``'s own: its ``average_<metric>_mean`` columns, and those with a
    ``table_<metric>.csv`` beside it."""
    others = {c.removeprefix("average_").removesuffix("_mean") for c in header
              if c.startswith("average_") and c.endswith("_mean") and c != "average_mean"}
    return others | {p.name.removeprefix("table_").removesuffix(".csv") for p in results.glob("table_*.csv")}


def headline_metric(results: Path, header: list[str], sig_rows: list[tuple[int, dict[str, str]]]) -> str:
    """The metric of ``table.csv``: the one of significance.csv with no table of its own beside it."""
    in_sig = list(dict.fromkeys(r["metric"] for _, r in sig_rows))
    candidates = [m for m in in_sig if m not in other_metrics(results, header)]
    if len(candidates) == 1:
        return candidates[0]
    sig = results / SIGNIFICANCE
    if not in_sig:
        raise ArtifactError(f"{sig}: holds no rows, so the metric of {results / TABLE} is unknown: give --metric")
    raise ArtifactError(f"{sig}: cannot tell which of its metrics ({', '.join(in_sig)}) is the headline of "
                        f"{results / TABLE}: give --metric")


def read_world(name: str, results: str | os.PathLike, metric: str | None = None) -> World:
    """A world's rows: metric mean/std and seeds, difference from full with its interval, kept fractions."""
    results = Path(results)
    if not results.is_dir():
        raise ArtifactError(f"{results}: {'is not a directory' if results.exists() else 'not found'}, expected "
                            f"the results directory of a finished experiment (world {name})")
    table_path, sig_path, quality_path = results / TABLE, results / SIGNIFICANCE, results / QUALITY
    for path in (table_path, sig_path, quality_path):
        require_file(path)
    header, table_rows = read_csv_rows(table_path, ["method", "ratio", "n_seeds", "average_mean", "average_std"])
    _, sig_rows = read_csv_rows(sig_path, ["method", "ratio", "metric", "task", "diff", "ci_low", "ci_high"])
    if metric is None:
        metric = headline_metric(results, header, sig_rows)
    elif metric in other_metrics(results, header):  # not the headline: its own table
        table_path = metric_csv(table_path, metric)
        _, table_rows = read_csv_rows(table_path, ["method", "ratio", "n_seeds", "average_mean", "average_std"])
    world = World(name, results, metric)

    for line, r in table_rows:
        key = row_key(table_path, line, r["method"], r["ratio"])
        if key in world.rows:
            raise ArtifactError(f"{table_path}:{line}: a second row {key[0]} {key[1]}".rstrip())
        try:
            n_seeds = int(r["n_seeds"])
        except ValueError:
            raise ArtifactError(f"{table_path}:{line}: field n_seeds: expected a whole number, got "
                                f"{r['n_seeds']!r}") from None
        try:  # tables written before replicates existed are one draw
            n_replicates = int(r.get("n_replicates") or 1)
        except ValueError:
            raise ArtifactError(f"{table_path}:{line}: field n_replicates: expected a whole number, got "
                                f"{r['n_replicates']!r}") from None
        world.rows[key] = {"world": name, "method": key[0], "ratio": key[1], "ground_truth": ground_truth_row(key[0]),
                           "metric": world.metric, "mean": csv_number(table_path, line, r, "average_mean"),
                           "std": csv_number(table_path, line, r, "average_std"), "n_seeds": n_seeds,
                           "n_replicates": n_replicates}
    if not world.rows:
        raise ArtifactError(f"{table_path}: no rows")

    sig_metrics = list(dict.fromkeys(r["metric"] for _, r in sig_rows))
    if sig_rows and world.metric not in sig_metrics:
        raise ArtifactError(f"{sig_path}: no rows of metric {world.metric!r} (it holds {', '.join(sig_metrics)})")
    seen: set[tuple[str, str]] = set()
    for line, r in sig_rows:
        if r["metric"] != world.metric or r["task"] != "average" or r.get("baseline", BASELINE) != BASELINE:
            continue  # the headline's average against full SFT (other baselines have their own rows)
        key = row_key(sig_path, line, r["method"], r["ratio"])
        if key in seen:
            raise ArtifactError(f"{sig_path}:{line}: a second row {key[0]} {key[1]} of {world.metric} on average")
        seen.add(key)
        if key not in world.rows:
            raise ArtifactError(f"{sig_path}:{line}: row {' '.join(key).strip()} is not in {table_path} (files of "
                                "two different runs?)")
        lo, hi = csv_number(sig_path, line, r, "ci_low"), csv_number(sig_path, line, r, "ci_high")
        # the file's own verdict (made before its values were rounded to 4 decimals), else read off the interval
        significant = {"True": True, "False": False}.get(r.get("significant", ""), lo > 0 or hi < 0)
        world.rows[key].update(diff=csv_number(sig_path, line, r, "diff"), ci_low=lo, ci_high=hi,
                               significant=significant)
        if r.get("p_improve"):  # the share of replicates in which the row is ahead (significance over replicates)
            world.rows[key]["p_improve"] = csv_number(sig_path, line, r, "p_improve")
    for key, row in world.rows.items():
        if key[0] == BASELINE:
            row["diff"] = 0.0  # the reference: no interval
        elif key not in seen:
            raise ArtifactError(f"{sig_path}: no row for {' '.join(key).strip()} ({world.metric}, task average), "
                                f"which {table_path} has (files of two different runs?)")

    _, quality_rows = read_csv_rows(quality_path, ["mask"] + [f"kept_{c}" for c in CLASSES])
    kept: dict[tuple[str, str], list[dict[str, float]]] = {}
    names: set[str] = set()
    for line, r in quality_rows:
        if r["mask"] in names:
            raise ArtifactError(f"{quality_path}:{line}: a second row of selection {r['mask']!r}")
        names.add(r["mask"])
        key = row_key(quality_path, line, r["mask"])
        if key not in world.rows:
            raise ArtifactError(f"{quality_path}:{line}: selection {r['mask']!r} belongs to no row of {table_path} "
                                "(files of two different runs?)")
        kept.setdefault(key, []).append({c: csv_number(quality_path, line, r, f"kept_{c}", finite=False)
                                         for c in CLASSES})
    for key, selections in kept.items():
        world.rows[key]["n_selections"] = len(selections)
        for c in CLASSES:  # NaN (a class the pool does not hold) stays NaN
            world.rows[key][f"kept_{c}"] = sum(s[c] for s in selections) / len(selections)
    return world


# ---------------------------------------------------------------------------------------------------------
# the outputs
# ---------------------------------------------------------------------------------------------------------
def row_order(worlds: list[World]) -> list[tuple[str, str]]:
    """Every (method, ratio) of any world: methods in the order first seen, a method's ratios in ratio order."""
    keys = list(dict.fromkeys(k for w in worlds for k in w.rows))
    methods = list(dict.fromkeys(m for m, _ in keys))
    return sorted(keys, key=lambda k: (methods.index(k[0]), float(k[1]) if k[1] else -1.0))


def _label(method: str) -> str:
    return method + ("†" if ground_truth_row(method) else "")


def _score(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    scale, decimals = metric_format(row["metric"])
    text = f"{row['mean'] * scale:.{decimals}f}"
    spread = row["n_seeds"] > 1 or row.get("n_replicates", 1) > 1
    return text + (f" ± {row['std'] * scale:.{decimals}f}" if spread else "")


def _diff(row: dict[str, Any] | None) -> str:
    if row is None or "diff" not in row:
        return "–"
    if "ci_low" not in row:
        return "0"  # full: the reference
    scale, d = metric_format(row["metric"])
    return (f"{row['diff'] * scale:+.{d}f} [{row['ci_low'] * scale:+.{d}f}, {row['ci_high'] * scale:+.{d}f}]"
            + ("*" if row["significant"] else ""))


def _kept(row: dict[str, Any] | None, c: str) -> str:
    if row is None or f"kept_{c}" not in row:
        return "–"
    return "n/a" if math.isnan(row[f"kept_{c}"]) else f"{row[f'kept_{c}']:.3f}"


def _seeds_note(world: World) -> str:
    """``3 seeds (base, warmup: 1)``: a world's usual number of seeds per row and the rows that differ, after its
    number of draws (replicates) when it has several."""
    counts = Counter(r["n_seeds"] for r in world.rows.values())
    usual = max(counts, key=lambda n: (counts[n], n))
    others = [f"{' '.join(k).strip()}: {r['n_seeds']}" for k, r in world.rows.items() if r["n_seeds"] != usual]
    draws = max(r.get("n_replicates", 1) for r in world.rows.values())
    return (f"{world.name} {f'{draws} replicates × ' if draws > 1 else 'one draw, '}{usual} seed"
            f"{'s' if usual != 1 else ''}" + (f" ({', '.join(others)})" if others else ""))


def markdown(worlds: list[World]) -> str:
    keys = row_order(worlds)
    metrics = list(dict.fromkeys(w.metric for w in worlds))
    what = METRIC_LABELS.get(metrics[0], metrics[0]) if len(metrics) == 1 else "each world's headline metric"
    over = ("replicates" if any(r.get("n_replicates", 1) > 1 for w in worlds for r in w.rows.values())
            else "seeds")
    out = [f"### {what[0].upper() + what[1:]}, mean ± std over {over}; Δ = row − full-token SFT "
           "[95% paired-bootstrap interval]", "",
           "| method | ratio | " + " | ".join(f"{w.name}: {w.metric} | {w.name}: Δ" for w in worlds) + " |",
           "|---|---" + "|---|---" * len(worlds) + "|"]
    for key in keys:
        cells = [f"{_score(w.rows.get(key))} | {_diff(w.rows.get(key))}" for w in worlds]
        out.append(f"| {_label(key[0])} | {key[1] or '–'} | {' | '.join(cells)} |")
    notes = ["Worlds: " + "; ".join(f"{w.name} = `{w.results}`" for w in worlds) + ".",
             "Seeds per row: " + "; ".join(_seeds_note(w) for w in worlds) + ".",
             "Δ: averaged over tasks; the interval resamples replicates, then seeds, then test questions (with one "
             "replicate it says nothing of another draw of the world); * = the interval excludes 0; full is the "
             "reference (0). – : the world has no such row."]
    lower = [m for m in metrics if m in LOWER_IS_BETTER]
    if lower:
        notes.append(f"Lower is better for {', '.join(lower)}.")
    if any(ground_truth_row(m) for m, _ in keys):
        notes.append("† reads the ground-truth token classes, which no method can see.")
    out += [""] + [" ".join(notes)]

    kept_keys = [k for k in keys if any("n_selections" in w.rows.get(k, {}) for w in worlds)]
    if kept_keys:
        out += ["", "### Kept fraction of each ground-truth token class (mean over the row's selections: the masks or "
                "online records of its seeds)", "",
                "| method | ratio | world | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 3) + "|"]
        for key in kept_keys:
            for i, w in enumerate(worlds):
                row = w.rows.get(key)
                label = f"{_label(key[0])} | {key[1] or '–'}" if i == 0 else " | "
                out.append(f"| {label} | {w.name} | {' | '.join(_kept(row, c) for c in CLASSES)} |")
        none = [" ".join(k).strip() for k in keys if k not in kept_keys]
        out += ["", "An online row counts each token by the weight it received, averaged over its passes. – : the "
                "world has no selection for this row; n/a: its pool holds no token of the class."
                + (f" Rows without a selection over the pool: {', '.join(none)}." if none else "")]
    return "\n".join(out) + "\n"


def compare(worlds: list[tuple[str, str | os.PathLike]], metric: str | None = None) -> tuple[list[World], list[dict]]:
    """Read every world; the CSV's rows, world by world in the table's row order."""
    names = [n for n, _ in worlds]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"--world {dup}: given twice (each world needs its own name)")
    read = [read_world(name, results, metric) for name, results in worlds]
    keys = row_order(read)
    return read, [w.rows[k] for w in read for k in keys if k in w.rows]


def write_compare(worlds: list[str], out_csv: str | os.PathLike, out_md: str | os.PathLike,
                  metric: str | None = None) -> list[dict[str, Any]]:
    """``tokenclean compare``: ``worlds`` as ``NAME=RESULTS_DIR``; both outputs or neither."""
    if Path(out_csv).resolve() == Path(out_md).resolve():
        raise ValueError(f"{out_csv}: given as both --out-csv and --out-md")
    read, rows = compare([parse_world(w) for w in worlds], metric)
    write_texts({out_md: markdown(read), out_csv: csv_text(rows, COLUMNS)})
    return rows
