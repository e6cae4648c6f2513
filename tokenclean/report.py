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
        runs[(method, ratio)].append(scores)
    rows = []
    for (method, ratio), seeds in runs.items():
        row: dict[str, Any] = {"method": method, "ratio": ratio, "n_seeds": len(seeds)}
        for task in tasks + ["average"]:
            row[f"{task}_mean"], row[f"{task}_std"] = mean_std([s[task] for s in seeds if task in s])
        rows.append(row)
    return tasks, rows


def write_table(eval_files: list[str | os.PathLike], out_csv: str | os.PathLike, out_md: str | os.PathLike | None = None,
                metric: str = HEADLINE) -> list[dict[str, Any]]:
    tasks, rows = collect(eval_files, metric)
    columns = ["method", "ratio", "n_seeds"] + [f"{t}_{s}" for t in tasks + ["average"] for s in ("mean", "std")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_file(out_csv) as tmp:
        tmp.write_text(buf.getvalue())
    if out_md:
        lines = [f"| method | ratio | seeds | {' | '.join(tasks)} | average |",
                 "|---" * (len(tasks) + 4) + "|"]
        for row in rows:
            cells = [f"{row[f'{t}_mean']:.3f} ± {row[f'{t}_std']:.3f}" for t in tasks + ["average"]]
            lines.append(f"| {row['method']} | {row['ratio'] or '–'} | {row['n_seeds']} | {' | '.join(cells)} |")
        with atomic_file(out_md) as tmp:
            tmp.write_text(f"Metric: {metric} (mean ± std over seeds)\n\n" + "\n".join(lines) + "\n")
    return rows
