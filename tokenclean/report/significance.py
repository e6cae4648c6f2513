"""Is a method's difference from full-token SFT more than the luck of the test examples?

A paired bootstrap over evaluation examples. For each method and task, every example gets one difference:
the method's per-example score averaged over its seeds minus full SFT's averaged over its seeds (with the same
seeds on both sides this is the average of the per-seed paired differences; a single run, e.g. ``base``, is
compared with the seed average of full). Resampling examples with replacement (the same resample for both
methods, so the pairing is kept) gives the 95% percentile interval of the mean difference. The average over
tasks resamples each task's examples independently (stratified) and takes the unweighted mean of the task
differences, as the table's average does.

What it does not cover: the interval is conditional on the trained models. Seed-to-seed variation of training
is in the table's std, not here; with few seeds, a difference can be significant over examples and still
within the spread of seeds.

Per-example scores come from ``<eval>.samples.jsonl`` beside each evaluation JSON: the world's tasks
(``answer_correct``, ``response_em``, ``answer_nll`` per question) or a benchmark suite (``score`` per example,
keyed by subtask and doc id; a group pools its subtasks, which is lm-eval's size-weighted group score).
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tokenclean.artifacts import ArtifactError, csv_text, reading, require_file, write_texts
from tokenclean.evaluation import samples_path
from tokenclean.report.table import LOWER_IS_BETTER, metric_format, parse_run_name, read_eval

BASELINE = "full"
# Bootstrap resamples (`tokenclean significance --iters`; the workflow's is the config schema's
# report.bootstrap_iters, the same number).
BOOTSTRAP_ITERS = 2000
# samples.jsonl field of each table metric
WORLD_FIELDS = {"answer_acc": "answer_correct", "response_em": "response_em", "answer_nll": "answer_nll",
                "mc_acc": "mc_correct", "mix_acc": "mix_score"}


def load_samples(eval_json: str | os.PathLike, metric: str) -> dict[str, dict[Any, float]]:
    """``{task: {example key: value}}`` of ``metric`` from the run's per-example file."""
    path = samples_path(eval_json)
    if not path.exists():
        raise ArtifactError(f"{path}: per-example file of {eval_json} not found (re-run its evaluation)")
    require_file(path)
    out: dict[str, dict[Any, float]] = defaultdict(dict)
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        with reading(f"{path}:{n}"):
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ArtifactError(f"{path}:{n}: invalid UTF-8 at byte {e.start}") from None
            except json.JSONDecodeError as e:
                raise ArtifactError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ArtifactError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            if "family" in row:  # the world's tasks
                field = WORLD_FIELDS.get(metric)
                if field is None:
                    raise ArtifactError(f"{path}:{n}: world samples have no metric {metric!r}")
                task, key, value = row["family"], row["doc_id"], row.get(field)
            elif "task" in row:  # a benchmark suite
                if metric != "score":
                    raise ArtifactError(f"{path}:{n}: benchmark samples carry 'score', not {metric!r}")
                task, key, value = row["task"], (row.get("subtask", row["task"]), row["doc_id"]), row.get("score")
            else:
                raise ArtifactError(f"{path}:{n}: field 'family' or 'task' missing")
            if value is None:
                raise ArtifactError(f"{path}:{n}: field {metric!r} missing")
            if isinstance(key, list) or (isinstance(key, tuple) and any(isinstance(k, list) for k in key)):
                raise ArtifactError(f"{path}:{n}: field doc_id: expected a number or text, got {key!r}")
            if key in out[task]:
                raise ArtifactError(f"{path}:{n}: example {key!r} of task {task} appears twice")
            if isinstance(value, str) or not math.isfinite(float(value)):
                raise ArtifactError(f"{path}:{n}: field {metric!r}: expected a finite number, got {value!r}")
            out[task][key] = float(value)
    if not out:
        raise ArtifactError(f"{path}: holds no examples; re-run the evaluation of {eval_json}")
    return dict(out)


def bootstrap_mean_differences(diffs: dict[str, np.ndarray], iters: int = BOOTSTRAP_ITERS, seed: int = 0
                               ) -> dict[str, dict[str, float]]:
    """Per task and for the unweighted average over tasks: the mean difference, its 95% percentile interval
    and a two-sided bootstrap p-value (twice the share of resamples on the far side of zero, at most 1)."""
    rng = np.random.default_rng(seed)
    boots, out = {}, {}
    for task in sorted(diffs):  # a fixed order: the same seed gives the same resamples
        d = np.asarray(diffs[task], dtype=np.float64)
        if d.size == 0:
            raise ValueError(f"task {task}: no examples to compare")
        reps = np.empty(iters)
        block = max(1, 4_000_000 // d.size)  # bound the index matrix at ~32 MB
        for start in range(0, iters, block):
            n = min(block, iters - start)
            reps[start:start + n] = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
        boots[task] = reps
        out[task] = _summary(float(d.mean()), reps, d.size)
    avg = np.mean([boots[t] for t in sorted(diffs)], axis=0)
    out["average"] = _summary(float(np.mean([diffs[t].mean() for t in diffs])), avg,
                              sum(len(v) for v in diffs.values()))
    return out


def _summary(diff: float, reps: np.ndarray, n: int) -> dict[str, float]:
    lo, hi = np.quantile(reps, [0.025, 0.975])
    p = min(1.0, 2 * min(float(np.mean(reps <= 0)), float(np.mean(reps >= 0))))
    return {"diff": diff, "ci_low": float(lo), "ci_high": float(hi), "p_boot": p, "n_examples": n,
            "significant": bool(lo > 0 or hi < 0)}


def compare_with_full(eval_files: list[str | os.PathLike], metric: str, iters: int = BOOTSTRAP_ITERS, seed: int = 0,
                      baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One row per (method, ratio, task|average): difference from full SFT (or the row ``baseline``, e.g.
    ``full+warmup``, the fair baseline of the scored rows) with its 95% interval."""
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for f in eval_files:
        method, ratio, _ = parse_run_name(f)
        groups[(method, ratio)].append(Path(f))
    base_key = next((k for k in groups if k[0] == baseline), None)
    if base_key is None:
        raise ValueError(f"no {baseline}*.json among the evaluations: nothing to compare with")
    if len(groups) == 1:
        raise ValueError(f"only {baseline}'s evaluations were given: nothing to compare with it; add the other rows'")
    for f in eval_files:  # each a finished evaluation that reports the metric (its samples are read below)
        read_eval(f, metric)

    def seed_mean(files: list[Path]) -> dict[str, dict[Any, float]]:
        per_seed = [load_samples(f, metric) for f in files]
        means = {}
        for task in per_seed[0]:
            keys = per_seed[0][task].keys()
            for f, s in zip(files, per_seed):
                if task not in s or s[task].keys() != keys:
                    raise ArtifactError(f"{samples_path(f)}: task {task} has other examples than "
                                        f"{samples_path(files[0])}; compare runs evaluated on the same examples")
            means[task] = {k: float(np.mean([s[task][k] for s in per_seed])) for k in keys}
        return means

    full = seed_mean(groups[base_key])
    rows = []
    for (method, ratio), files in groups.items():
        if (method, ratio) == base_key:
            continue
        ours = seed_mean(files)
        diffs = {}
        for task, ref in full.items():
            if task not in ours or ours[task].keys() != ref.keys():
                raise ArtifactError(f"{samples_path(files[0])}: task {task} has other examples than "
                                    f"{samples_path(groups[base_key][0])}; compare runs evaluated on the same examples")
            keys = sorted(ref, key=str)
            diffs[task] = np.array([ours[task][k] - ref[k] for k in keys])
        for task, stats in bootstrap_mean_differences(diffs, iters, seed).items():
            rows.append({"method": method, "ratio": ratio, "metric": metric, "task": task, "n_seeds": len(files),
                         "n_seeds_full": len(groups[base_key]), **stats})
    return rows


def write_significance(eval_files: list[str | os.PathLike], metrics: list[str], out_csv: str | os.PathLike,
                       out_md: str | os.PathLike | None = None, iters: int = BOOTSTRAP_ITERS, seed: int = 0,
                       baseline: str = BASELINE) -> list[dict[str, Any]]:
    """``significance.csv`` (every metric, task and the average) and a Markdown table per metric; every row
    against ``baseline`` (full SFT; column ``n_seeds_full`` counts the baseline's seeds)."""
    rows = [r for m in metrics for r in compare_with_full(eval_files, m, iters, seed, baseline)]
    columns = ["method", "ratio", "metric", "task", "n_examples", "n_seeds", "n_seeds_full", "diff", "ci_low",
               "ci_high", "p_boot", "significant"]
    against = "full-token SFT (method − full)" if baseline == BASELINE else f"{baseline} (method − {baseline})"
    md = [f"Difference from {against}, paired bootstrap over evaluation examples "
          f"({iters} resamples, seed {seed}); per example, each side is averaged over its seeds. "
          "[95% interval]; * = the interval excludes 0. The interval covers the choice of test examples, "
          "not the training seed (see the table's std)."]
    for m in metrics:
        m_rows = [r for r in rows if r["metric"] == m]
        tasks = list(dict.fromkeys(r["task"] for r in m_rows))
        better = "lower is better" if m in LOWER_IS_BETTER else "higher is better"
        scale, decimals = metric_format(m)
        md += ["", f"### {m} ({better})", "", f"| method | ratio | {' | '.join(tasks)} |",
               "|---" * (len(tasks) + 2) + "|"]
        for key in dict.fromkeys((r["method"], r["ratio"]) for r in m_rows):
            cells = []
            for t in tasks:
                r = next(x for x in m_rows if (x["method"], x["ratio"], x["task"]) == (*key, t))
                cells.append(f"{r['diff'] * scale:+.{decimals}f} [{r['ci_low'] * scale:+.{decimals}f}, "
                             f"{r['ci_high'] * scale:+.{decimals}f}]{'*' if r['significant'] else ''}")
            md.append(f"| {key[0]} | {key[1] or '–'} | {' | '.join(cells)} |")
    write_texts({**({out_md: "\n".join(md) + "\n"} if out_md else {}), out_csv: csv_text(rows, columns)})
    return rows
