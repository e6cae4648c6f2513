"""Is a row's difference from a baseline (full SFT, full+warmup) more than the luck of the draw?

Three things are drawn when a row is compared with a baseline: the world, its base model and its warm-up model
(a *replicate*, :mod:`tokenclean.replicates`), the SFT seed of each trained row, and the test questions. The
interval resamples all three, in that order (a hierarchical bootstrap, as Bouthillier et al., MLSys 2021,
recommend for comparing learning pipelines): draw replicates with replacement; within each drawn replicate,
draw its seeds with replacement (the same seeds for the row and the baseline when both ran the same seeds: a
row and its baseline of seed s share nothing but the seed number, yet pairing keeps the comparison balanced),
then its questions with replacement (the same questions for both: paired). Each drawn replicate gets its own
inner draw. The statistic is the mean over drawn replicates of (row − baseline), per task and for the
unweighted average over tasks (each task's questions drawn independently: stratified), as the table averages.
The 95% percentile interval and a two-sided bootstrap p-value follow; a difference is *significant* only when
the interval excludes 0. With one replicate the interval covers seeds and questions, not the draw of the world:
the output says so.

Beside it, the *probability of improvement*: the share of replicates in which the row's mean is above the
baseline's (ties count half), paired by replicate since both ran on the same draw; and the sign test's p-value
on those replicates (scipy.stats.binomtest; with five replicates it cannot go below 0.0625).

Why hand-written: neither scipy.stats.bootstrap nor rliable's stratified bootstrap resamples nested levels
(rliable resamples runs within tasks, one level); the nested draw is a few lines of numpy here, and a test holds
it to scipy.stats.bootstrap where the inner levels carry no variance.

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
from tokenclean.report.table import LOWER_IS_BETTER, metric_format, read_eval, runs_by_replicate

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


# One replicate's scores of a row and of its baseline on one task: (seeds x questions) each, questions in the same
# order on both sides.
Pair = tuple[np.ndarray, np.ndarray]
# Bound on the elements of one block of resampled questions (about 32 MB of float64).
BLOCK_ELEMENTS = 4_000_000


def nested_bootstrap(replicates: list[dict[str, Pair]], paired: list[bool] | None = None,
                     iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> dict[str, dict[str, float]]:
    """Row minus baseline per task and for the unweighted average over tasks, with its 95% interval over
    replicates, then seeds, then questions (the module docstring), the bootstrap p-value, the probability of
    improvement over replicates and the sign test's p-value.

    ``replicates[r][task] = (row, baseline)``, each an array (seeds x questions) of per-question scores; every
    replicate has the same tasks. ``paired[r]``: the row and the baseline ran the same seeds in replicate r (one
    draw of seeds serves both); default: paired where both have as many seeds.
    """
    if not replicates:
        raise ValueError("no replicate to compare")
    tasks = sorted(replicates[0])
    for r, rep in enumerate(replicates):
        if sorted(rep) != tasks:
            raise ValueError(f"replicate {r}: tasks {sorted(rep)} differ from replicate 0's {tasks}")
        for task, (x, y) in rep.items():
            if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or 0 in x.shape + y.shape:
                raise ValueError(f"replicate {r}, task {task}: expected (seeds x questions) arrays over the same "
                                 f"questions, got {x.shape} and {y.shape}")
    if paired is None:
        paired = [all(x.shape[0] == y.shape[0] for x, y in rep.values()) for rep in replicates]
    rng = np.random.default_rng(seed)
    n_rep = len(replicates)
    # point estimates: per replicate, the row's mean over seeds and questions minus the baseline's
    per_rep = np.array([[rep[t][0].mean() - rep[t][1].mean() for t in tasks] for rep in replicates])
    picks = rng.integers(0, n_rep, size=(iters, n_rep))
    boot = np.zeros((iters, len(tasks)))
    for slot in range(n_rep):  # each drawn replicate gets its own draw of seeds and questions
        for r in range(n_rep):
            chosen = np.flatnonzero(picks[:, slot] == r)
            if chosen.size:
                boot[chosen] += _inner_draw(replicates[r], tasks, paired[r], chosen.size, rng) / n_rep
    out = {t: _summary(per_rep[:, k], boot[:, k], sum(rep[t][0].shape[1] for rep in replicates))
           for k, t in enumerate(tasks)}
    out["average"] = _summary(per_rep.mean(axis=1), boot.mean(axis=1),
                              sum(rep[t][0].shape[1] for rep in replicates for t in tasks))
    return out


def _inner_draw(rep: dict[str, Pair], tasks: list[str], paired: bool, n: int, rng: np.random.Generator
                ) -> np.ndarray:
    """``n`` draws of one replicate's (row − baseline) per task: seeds with replacement (one draw for both sides
    when paired), then questions with replacement (the same for both)."""
    def seed_weights(n_seeds: int) -> np.ndarray:
        picks = rng.integers(0, n_seeds, size=(n, n_seeds))
        return (picks[:, :, None] == np.arange(n_seeds)).sum(axis=1) / n_seeds  # (n, seeds): mean over the draw

    x0, y0 = rep[tasks[0]]
    wx = seed_weights(x0.shape[0])
    wy = wx if paired else seed_weights(y0.shape[0])
    out = np.empty((n, len(tasks)))
    for k, task in enumerate(tasks):
        x, y = rep[task]
        n_q = x.shape[1]
        block = max(1, BLOCK_ELEMENTS // n_q)
        for start in range(0, n, block):
            stop = min(n, start + block)
            per_question = wx[start:stop] @ x - wy[start:stop] @ y  # (block, questions)
            questions = rng.integers(0, n_q, size=(stop - start, n_q))
            out[start:stop, k] = np.take_along_axis(per_question, questions, axis=1).mean(axis=1)
    return out


def bootstrap_mean_differences(diffs: dict[str, np.ndarray], iters: int = BOOTSTRAP_ITERS, seed: int = 0
                               ) -> dict[str, dict[str, float]]:
    """Per-question differences of one run against one run (one replicate, one seed): the nested bootstrap
    reduced to its question level."""
    rep = {t: (np.asarray(d, dtype=np.float64)[None, :], np.zeros((1, len(d)))) for t, d in diffs.items()}
    for t, (x, _) in rep.items():
        if x.size == 0:
            raise ValueError(f"task {t}: no examples to compare")
    return nested_bootstrap([rep], [True], iters, seed)


def _summary(per_replicate: np.ndarray, reps: np.ndarray, n: int) -> dict[str, float]:
    """The mean difference over replicates, its interval and p-value from the bootstrap draws ``reps``, and the
    probability of improvement and sign test over the replicates' own differences."""
    from scipy.stats import binomtest

    lo, hi = np.quantile(reps, [0.025, 0.975])
    p = min(1.0, 2 * min(float(np.mean(reps <= 0)), float(np.mean(reps >= 0))))
    wins, losses = int(np.sum(per_replicate > 0)), int(np.sum(per_replicate < 0))
    p_sign = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return {"diff": float(per_replicate.mean()), "ci_low": float(lo), "ci_high": float(hi), "p_boot": p,
            "n_examples": n, "n_replicates": len(per_replicate),
            "p_improve": (wins + 0.5 * (len(per_replicate) - wins - losses)) / len(per_replicate),
            "p_sign": float(p_sign), "significant": bool(lo > 0 or hi < 0)}


def compare_with_full(eval_files: list[str | os.PathLike], metric: str, iters: int = BOOTSTRAP_ITERS, seed: int = 0,
                      baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One row per (method, ratio, task|average): difference from full SFT (or the row ``baseline``, e.g.
    ``full+warmup``, the fair baseline of the scored rows) with its 95% interval over replicates, seeds and
    questions, and its probability of improvement over replicates. Evaluations belong to the replicate their
    path says (:mod:`tokenclean.replicates`); every row must be in the baseline's replicates."""
    groups = runs_by_replicate(eval_files)
    base_key = next((k for k in groups if k[0] == baseline), None)
    if base_key is None:
        raise ValueError(f"no {baseline}*.json among the evaluations: nothing to compare with")
    if len(groups) == 1:
        raise ValueError(f"only {baseline}'s evaluations were given: nothing to compare with it; add the other rows'")
    for f in eval_files:  # each a finished evaluation that reports the metric (its samples are read below)
        read_eval(f, metric)
    cache: dict[Path, dict[str, dict[Any, float]]] = {}

    def samples(f: Path) -> dict[str, dict[Any, float]]:
        if f not in cache:
            cache[f] = load_samples(f, metric)
        return cache[f]

    def matrix(files: list[Path], task: str, keys: list[Any], reference: Path) -> np.ndarray:
        """(seeds x questions) of ``task`` over ``keys``, each file checked to hold exactly those questions."""
        rows = []
        for f in files:
            s = samples(f)
            if task not in s or s[task].keys() != set(keys):
                raise ArtifactError(f"{samples_path(f)}: task {task} has other examples than "
                                    f"{samples_path(reference)}; compare runs evaluated on the same examples")
            rows.append([s[task][k] for k in keys])
        return np.array(rows, dtype=np.float64)

    base_reps = groups[base_key]
    rows = []
    for (method, ratio), by_rep in groups.items():
        if (method, ratio) == base_key:
            continue
        if set(by_rep) != set(base_reps):
            missing = sorted(set(base_reps) ^ set(by_rep))[0]
            raise ValueError(f"{method}{f' {ratio}' if ratio else ''} and {baseline} were not evaluated in the same "
                             f"replicates (replicate {missing} has only one of them); give every replicate's files")
        replicates, paired = [], []
        for r in sorted(base_reps):
            ours, theirs = sorted(by_rep[r], key=_seed_order), sorted(base_reps[r], key=_seed_order)
            reference = theirs[0][1]
            tasks = samples(reference)
            rep = {}
            for task in tasks:
                keys = sorted(tasks[task], key=str)
                rep[task] = (matrix([f for _, f in ours], task, keys, reference),
                             matrix([f for _, f in theirs], task, keys, reference))
            for f in (f for _, f in ours):
                extra = sorted(set(samples(f)) - set(tasks))
                if extra:
                    raise ArtifactError(f"{samples_path(f)}: task {extra[0]} has other examples than "
                                        f"{samples_path(reference)}; compare runs evaluated on the same examples")
            replicates.append(rep)
            paired.append([s for s, _ in ours] == [s for s, _ in theirs])
        n_seeds = len(by_rep[min(by_rep)])
        for task, stats in nested_bootstrap(replicates, paired, iters, seed).items():
            rows.append({"method": method, "ratio": ratio, "baseline": baseline, "metric": metric, "task": task,
                         "n_seeds": n_seeds, "n_seeds_full": len(base_reps[min(base_reps)]), **stats})
    return rows


def _seed_order(item: tuple[int | None, Path]) -> tuple[int, str]:
    return (-1 if item[0] is None else item[0], str(item[1]))


COLUMNS = ["method", "ratio", "baseline", "metric", "task", "n_examples", "n_replicates", "n_seeds", "n_seeds_full",
           "diff", "ci_low", "ci_high", "p_boot", "significant", "p_improve", "p_sign"]


def write_significance(eval_files: list[str | os.PathLike], metrics: list[str], out_csv: str | os.PathLike,
                       out_md: str | os.PathLike | None = None, iters: int = BOOTSTRAP_ITERS, seed: int = 0,
                       baseline: str | list[str] = BASELINE) -> list[dict[str, Any]]:
    """``significance.csv`` (every baseline, metric, task and the average) and Markdown tables per baseline and
    metric; every row against each of ``baselines`` (full SFT first; column ``n_seeds_full`` counts the
    baseline's seeds per replicate)."""
    baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    rows = [r for b in baselines for m in metrics for r in compare_with_full(eval_files, m, iters, seed, b)]
    n_rep = max(r["n_replicates"] for r in rows)
    levels = ("replicates (independent draws of the world, base and warm-up model), then seeds, then test "
              "questions" if n_rep > 1 else "seeds, then test questions, within ONE draw of the world, base and "
              "warm-up model: it does not cover the draw, which moves a row more than the seeds do; run "
              "`replicates` of 5 or more for a verdict")
    md = [f"Paired bootstrap over {levels} ({iters} resamples, seed {seed}); {n_rep} replicate"
          f"{'s' if n_rep > 1 else ''}. [95% interval]; * = the interval excludes 0"
          + ("; P(better): the share of replicates in which the row is ahead (ties half)." if n_rep > 1 else ".")]
    for b in baselines:
        against = "full-token SFT (method − full)" if b == BASELINE else f"{b} (method − {b})"
        md += ["", f"## Difference from {against}"]
        for m in metrics:
            m_rows = [r for r in rows if r["metric"] == m and r["baseline"] == b]
            tasks = list(dict.fromkeys(r["task"] for r in m_rows))
            better = "lower is better" if m in LOWER_IS_BETTER else "higher is better"
            scale, decimals = metric_format(m)
            extra = " P(better) |" if n_rep > 1 else ""
            md += ["", f"### {m} ({better})", "", f"| method | ratio | {' | '.join(tasks)} |{extra}",
                   "|---" * (len(tasks) + 2 + (n_rep > 1)) + "|"]
            for key in dict.fromkeys((r["method"], r["ratio"]) for r in m_rows):
                cells = []
                for t in tasks:
                    r = next(x for x in m_rows if (x["method"], x["ratio"], x["task"]) == (*key, t))
                    cells.append(f"{r['diff'] * scale:+.{decimals}f} [{r['ci_low'] * scale:+.{decimals}f}, "
                                 f"{r['ci_high'] * scale:+.{decimals}f}]{'*' if r['significant'] else ''}")
                avg = next(x for x in m_rows if (x["method"], x["ratio"], x["task"]) == (*key, "average"))
                p_better = f" {avg['p_improve']:.2f} |" if n_rep > 1 else ""
                md.append(f"| {key[0]} | {key[1] or '–'} | {' | '.join(cells)} |{p_better}")
    write_texts({**({out_md: "\n".join(md) + "\n"} if out_md else {}), out_csv: csv_text(rows, COLUMNS)})
    return rows
