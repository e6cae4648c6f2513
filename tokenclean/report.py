"""Aggregating evaluation results into the experiment's table.

Evaluation files are named by run: ``<method>.json`` (one model, e.g. ``base``, ``warmup``) or
``<method>_r<ratio>_s<seed>.json`` (an SFT row). Cells are the mean and (sample) standard deviation over seeds.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from tokenclean.artifacts import atomic_file, read_json

RUN_NAME = re.compile(r"^(?P<method>[a-z0-9_+-]+?)(?:_r(?P<ratio>[0-9.]+))?(?:_s(?P<seed>\d+))?$")
HEADLINE = "answer_acc"
# Shown beside the headline as averages over tasks: whole-response match falls when a method drops template
# tokens and the model stops producing the format; the answer NLL has the lowest variance.
SECONDARY = ("response_em", "answer_nll")


def parse_run_name(path: str | os.PathLike) -> tuple[str, str, int | None]:
    name = Path(path).name.removesuffix(".json")
    m = RUN_NAME.match(name)
    if not m:
        raise ValueError(f"{path}: evaluation file name does not follow <method>[_r<ratio>][_s<seed>].json")
    return m["method"], m["ratio"] or "", int(m["seed"]) if m["seed"] else None


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def collect(eval_files: list[str | os.PathLike], metric: str = HEADLINE) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows (method, ratio) with per-task mean/std over seeds of ``metric``, in the order first seen."""
    runs: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    tasks: list[str] = []
    for f in eval_files:
        method, ratio, _ = parse_run_name(f)
        result = read_json(f)
        scores = {task: float(m[metric]) for task, m in result["metrics"].items()}
        for task in scores:
            if task not in tasks:
                tasks.append(task)
        scores["average"] = float(result["average"][metric])
        for extra in SECONDARY:
            if extra != metric and extra in result["average"]:
                scores[f"average_{extra}"] = float(result["average"][extra])
        runs[(method, ratio)].append(scores)
    rows = []
    for (method, ratio), seeds in runs.items():
        row: dict[str, Any] = {"method": method, "ratio": ratio, "n_seeds": len(seeds)}
        for task in tasks + ["average"] + [f"average_{x}" for x in SECONDARY if x != metric]:
            values = [s[task] for s in seeds if task in s]
            if values:
                row[f"{task}_mean"], row[f"{task}_std"] = mean_std(values)
        rows.append(row)
    return tasks, rows


def write_table(eval_files: list[str | os.PathLike], out_csv: str | os.PathLike, out_md: str | os.PathLike | None = None,
                metric: str = HEADLINE) -> list[dict[str, Any]]:
    tasks, rows = collect(eval_files, metric)
    extras = [f"average_{x}" for x in SECONDARY if x != metric and all(f"average_{x}_mean" in r for r in rows)]
    columns = ["method", "ratio", "n_seeds"] + [f"{t}_{s}" for t in tasks + ["average"] + extras
                                                for s in ("mean", "std")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k]) for k in columns})
    with atomic_file(out_csv) as tmp:
        tmp.write_text(buf.getvalue())
    if out_md:
        headers = tasks + ["average"] + [e.replace("average_", "avg ") for e in extras]
        lines = [f"| method | ratio | seeds | {' | '.join(headers)} |", "|---" * (len(headers) + 3) + "|"]
        for row in rows:
            cells = [f"{row[f'{t}_mean']:.3f} ± {row[f'{t}_std']:.3f}" for t in tasks + ["average"] + extras]
            lines.append(f"| {row['method']} | {row['ratio'] or '–'} | {row['n_seeds']} | {' | '.join(cells)} |")
        with atomic_file(out_md) as tmp:
            tmp.write_text(f"Metric: {metric} (mean ± std over seeds); the last columns average other metrics over "
                           f"tasks\n\n" + "\n".join(lines) + "\n")
    return rows


def write_rounds(eval_files: list[str | os.PathLike], rounds: int, out_csv: str | os.PathLike,
                 metric: str = HEADLINE) -> list[dict[str, Any]]:
    """The self-evolving curve: per (method, ratio, round), the mean and std over seeds of ``metric``.

    Round 0 is ``warmup.json`` (the first reference, where every chain starts); ``<row>_t<t>.json`` is round t of
    the chain ``<row>`` (e.g. ``self_evolving_r0.6_s1_t1``); a row's own file (``self_evolving_r0.6_s1.json``)
    is its last round, ``rounds``.
    """
    start: list[dict[str, float]] = []
    per_round: dict[tuple[str, str, int], list[dict[str, float]]] = defaultdict(list)
    tasks: list[str] = []
    for f in eval_files:
        result = read_json(f)
        scores = {task: float(m[metric]) for task, m in result["metrics"].items()}
        tasks += [t for t in scores if t not in tasks]
        scores["average"] = float(result["average"][metric])
        name = Path(f).name.removesuffix(".json")
        if name == "warmup":
            start.append(scores)
            continue
        m = re.match(r"^(?P<row>.+)_t(?P<round>\d+)$", name)
        row, round_ = (m["row"], int(m["round"])) if m else (name, rounds)
        method, ratio, _ = parse_run_name(row)
        per_round[(method, ratio, round_)].append(scores)
    if not per_round:
        raise ValueError("no round evaluations given")
    rows = []
    for method, ratio in sorted({(m, r) for m, r, _ in per_round}):
        chain = ([(0, start)] if start else []) + sorted(
            (t, seeds) for (m, r, t), seeds in per_round.items() if (m, r) == (method, ratio))
        for round_, seeds in chain:
            row: dict[str, Any] = {"method": method, "ratio": ratio, "round": round_, "n_seeds": len(seeds)}
            for task in tasks + ["average"]:
                row[f"{task}_mean"], row[f"{task}_std"] = mean_std([s[task] for s in seeds if task in s])
            rows.append(row)
    columns = ["method", "ratio", "round", "n_seeds"] + [f"{t}_{s}" for t in tasks + ["average"]
                                                         for s in ("mean", "std")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k]) for k in columns})
    with atomic_file(out_csv) as tmp:
        tmp.write_text(buf.getvalue())
    return rows
