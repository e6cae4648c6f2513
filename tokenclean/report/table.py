"""Aggregating evaluation results into the experiment's tables.

Evaluation files are named by run: ``<method>.json`` (one model, e.g. ``base``, ``warmup``) or
``<method>_r<ratio>_s<seed>.json`` (an SFT row), and belong to the replicate their path says
(:mod:`tokenclean.replicates`). Cells are the mean and (sample) standard deviation over seeds when the files are
one replicate (one draw of the world, base and warm-up model); over several replicates, each replicate's mean over
its seeds is one value, and cells are the mean and the standard deviation of those values (the spread between
draws, which the seeds do not sample).

:func:`write_table` writes ``table.csv`` (the headline metric per task and on average, plus the averages of the
other metrics), ``table_<metric>.csv`` for every other metric, and ``table.md`` / ``table.tex`` with one table
per metric, headline first, the best row of each column in bold. Rows that read the ground-truth token classes
(``truth_drop_noisy``, ``truth_keep_informative``) use what no method can see: they are marked with a dagger and
never bold. Every row shows its passes over its own training data, as its models recorded them
(:func:`row_passes`). For a benchmark suite, the paper's own numbers (``paper_reference.json``) can be shown below
ours.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from tokenclean.artifacts import csv_text, read_json, reading, write_csv, write_texts
from tokenclean.data import is_number, is_whole
from tokenclean.methods import METHODS, ROUND, load_plugins, parse_run
from tokenclean.replicates import of_path as replicate_of

HEADLINE = "answer_acc"
# Shown beside the headline as averages over tasks: whole-response match falls when a method drops template
# tokens and the model stops producing the format; the answer NLL has the lowest variance.
# In a world with multiple-choice tasks the headline is mix_acc, and both of its parts are shown beside it.
SECONDARY = ("mc_acc", "answer_acc", "response_em", "answer_nll")


def parse_run_name(path: str | os.PathLike) -> tuple[str, str, int | None]:
    """(method, ratio tag or "", seed) of an evaluation file or model directory (tokenclean.methods.parse_run)."""
    try:
        method, ratio, seed = parse_run(str(path))
    except ValueError:
        raise ValueError(f"{path}: evaluation file name does not follow <method>[_r<ratio>][_s<seed>].json") from None
    return method, ratio or "", seed


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# Metrics that are fractions (accuracies and rates): a value outside [0, 1] cannot be one of them.
FRACTION_METRICS = ("answer_acc", "mc_acc", "mix_acc", "response_em")


def metric_value(path: str | os.PathLike, field: str, metric: str, value: Any) -> float:
    """One metric of an evaluation file as a float: a finite number, within [0, 1] for a fraction and at least 0
    for a negative log-likelihood; else a one-line error naming the file and the field."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{path}: field {field}: expected a finite number, got {value!r}")
    if (metric in FRACTION_METRICS and not 0 <= value <= 1) or (metric.endswith("_nll") and value < 0):
        raise ValueError(f"{path}: field {field}: {value!r} cannot be a {metric} "
                         f"({'a fraction in [0, 1]' if metric in FRACTION_METRICS else 'a loss, at least 0'})")
    return float(value)


def check_metrics(path: str | os.PathLike, field: str, values: dict[str, Any]) -> None:
    """Every metric of an evaluation's task (or average) a number it can be (:func:`metric_value`); a benchmark's
    ``subtasks`` likewise, and its ``n_examples`` a count."""
    for name, value in values.items():
        if name == "subtasks" and isinstance(value, dict):
            for sub, v in value.items():
                metric_value(path, f"{field}.subtasks.{sub}", "score", v)
        elif name == "n_examples":
            if not is_whole(value) or value < 0:
                raise ValueError(f"{path}: field {field}.n_examples: expected a count, got {value!r}")
        else:
            metric_value(path, f"{field}.{name}", name, value)


def read_eval(path: str | os.PathLike, metric: str) -> tuple[dict[str, Any], dict[str, float]]:
    """An evaluation JSON and its ``metric`` per task and on average (key ``average``), checked to hold ``metric``
    for at least one task, every task and on average, each value a number it can be (:func:`metric_value`)."""
    result = read_json(path)
    with reading(path):
        if (not isinstance(result, dict) or not isinstance(result.get("metrics"), dict)
                or not isinstance(result.get("average", {}), dict)):
            raise ValueError(f"{path}: expected an evaluation result with a 'metrics' object")
        if not result["metrics"]:
            raise ValueError(f"{path}: field metrics holds no task (an evaluation of nothing); re-run the evaluation")
        bad = [task for task, m in result["metrics"].items() if not isinstance(m, dict)]
        if bad:
            raise ValueError(f"{path}: field metrics.{bad[0]}: expected an object of metrics")
        for task, values in [*result["metrics"].items(), ("", result.get("average", {}))]:
            check_metrics(path, f"metrics.{task}" if task else "average", values)
        missing = [task for task, m in result["metrics"].items() if metric not in m]
        if missing or metric not in result.get("average", {}):
            field = f"metrics.{missing[0]}.{metric}" if missing else f"average.{metric}"
            raise ValueError(f"{path}: field {field} missing (this evaluation does not report {metric!r})")
        scores = {task: metric_value(path, f"metrics.{task}.{metric}", metric, m[metric])
                  for task, m in result["metrics"].items()}
        scores["average"] = metric_value(path, f"average.{metric}", metric, result["average"][metric])
    return result, scores


def runs_by_replicate(eval_files: list[str | os.PathLike]
                      ) -> dict[tuple[str, str], dict[int, list[tuple[int | None, Path]]]]:
    """Evaluation files by table row (method, ratio), then by the replicate their path says, each as (seed, path),
    rows and files in the order given: the grouping the table and the significance test share."""
    runs: dict[tuple[str, str], dict[int, list[tuple[int | None, Path]]]] = defaultdict(lambda: defaultdict(list))
    for f in eval_files:
        method, ratio, seed = parse_run_name(f)
        runs[(method, ratio)][replicate_of(f)].append((seed, Path(f)))
    return runs


def collect(eval_files: list[str | os.PathLike], metric: str = HEADLINE) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows (method, ratio) with per-task mean/std of ``metric``, in the order first seen: over seeds within one
    replicate, else over replicates of each replicate's seed mean (columns ``n_seeds``: seeds per replicate,
    ``n_replicates``)."""
    groups = runs_by_replicate(eval_files)
    read: dict[Path, dict[str, float]] = {}
    tasks: list[str] = []
    for f in eval_files:
        result, scores = read_eval(f, metric)
        for task in scores:
            if task not in tasks and task != "average":
                tasks.append(task)
        with reading(f):
            for extra in SECONDARY:
                if extra != metric and extra in result["average"]:
                    scores[f"average_{extra}"] = metric_value(f, f"average.{extra}", extra, result["average"][extra])
        read[Path(f)] = scores
    runs = {row: {rep: [read[f] for _, f in files] for rep, files in reps.items()} for row, reps in groups.items()}
    rows = []
    for (method, ratio), by_replicate in runs.items():
        counts = {len(seeds) for seeds in by_replicate.values()}
        if len(counts) > 1:
            raise ValueError(f"{method}{f' {ratio}' if ratio else ''}: replicates with different numbers of seeds "
                             f"({sorted(counts)}); give every replicate's evaluations of the row")
        row: dict[str, Any] = {"method": method, "ratio": ratio, "n_seeds": counts.pop(),
                               "n_replicates": len(by_replicate)}
        for task in tasks + ["average"] + [f"average_{x}" for x in SECONDARY if x != metric]:
            per_rep = [[s[task] for s in seeds if task in s] for _, seeds in sorted(by_replicate.items())]
            # one replicate: a value per seed; several: a value per replicate, its mean over seeds
            values = per_rep[0] if len(by_replicate) == 1 else [sum(v) / len(v) for v in per_rep if v]
            if values:
                row[f"{task}_mean"], row[f"{task}_std"] = mean_std(values)
        rows.append(row)
    replicate_counts = {r["n_replicates"] for r in rows}
    if len(replicate_counts) > 1:
        short = min(rows, key=lambda r: r["n_replicates"])
        raise ValueError(f"{short['method']}: evaluated in {short['n_replicates']} replicates, other rows in "
                         f"{max(replicate_counts)}; give every replicate's evaluations of every row")
    # methods in the order first seen, a method's ratio variants by ratio
    order = list(dict.fromkeys(r["method"] for r in rows))
    rows.sort(key=lambda r: (order.index(r["method"]), float(r["ratio"]) if r["ratio"] else -1.0))
    return tasks, rows


# ---------------------------------------------------------------------------------------------------------
# passes: how many times a row's training went over its own data
# ---------------------------------------------------------------------------------------------------------
ROUND_DIR = ROUND  # models/rounds/<row>_t<t>: round t of a chain


def passes(steps: int, batch_size: int, samples: int) -> float:
    """How many times a run goes over its own data: optimizer steps × batch size / samples."""
    return steps * batch_size / samples


def training_record(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What ``tokenclean train`` recorded next to a model (``tokenclean.json``): its optimizer steps, batch size,
    the samples of the token table it trained on (those whose mask kept no token included: the row's own data),
    its training seconds, and so its passes."""
    path = Path(model_dir) / "tokenclean.json"
    meta = read_json(path, written=True)
    with reading(path):
        record = {"steps": meta["steps"], "batch_size": meta["train_config"]["batch_size"],
                  "samples": meta["samples_used"] + meta["samples_without_selected_tokens"],
                  "seconds": meta["seconds"]}
        for key in ("steps", "batch_size", "samples"):
            if not is_whole(record[key]):
                raise ValueError(f"{path}: field {key}: expected a whole number, got {record[key]!r}")
        if record["samples"] < 1:
            raise ValueError(f"{path}: trained on no samples")
        if record["steps"] < 1 or record["batch_size"] < 1:
            raise ValueError(f"{path}: fields steps and train_config.batch_size must be at least 1, got "
                             f"{record['steps']} and {record['batch_size']}")
        seconds = record["seconds"]
        if not is_number(seconds) or not 0 <= seconds < math.inf:
            raise ValueError(f"{path}: field seconds: expected a number of at least 0, got {seconds!r}")
    return {**record, "passes": passes(record["steps"], record["batch_size"], record["samples"])}


def row_passes(model_dirs: list[str | os.PathLike]) -> dict[tuple[str, str], tuple[float, Path]]:
    """Passes per table row (method, ratio): the mean over its seeds' models, and one of its model directories
    (for messages).

    A model directory is named by its run (``warmup``, ``full_s1``, ``rho_r0.6_s1``); a chained row's rounds are
    ``<row>_t<t>`` (``self_evolving_r0.6_s1_t2``) and count together: the samples all its rounds drew over the
    samples of the chunks they trained on (the pool when every chunk has a round), sum of steps × batch size
    over sum of chunk sizes. Every round from 1 to the last given must be there.
    """
    per_run: dict[tuple[int, str], dict[int, tuple[Path, dict[str, Any]]]] = defaultdict(dict)
    for d in map(Path, model_dirs):
        m = ROUND_DIR.match(d.name)
        run, round_ = (m["row"], int(m["round"])) if m else (d.name, 0)
        key = (replicate_of(d), run)  # each replicate trains every run once
        if round_ in per_run[key] or (per_run[key] and (round_ == 0) != (0 in per_run[key])):
            raise ValueError(f"{d}: a second model of run {run}" + (f" (round {round_})" if round_ else ""))
        per_run[key][round_] = (d, training_record(d))
    runs: dict[tuple[str, str], list[tuple[float, Path]]] = defaultdict(list)
    for (_, run), records in per_run.items():
        first = records[min(records)][0]
        try:
            method, ratio, _ = parse_run_name(run)
        except ValueError:
            raise ValueError(f"{first}: a model directory is named by its run (<method>[_r<ratio>][_s<seed>], a "
                             "chain's rounds <run>_t<t>)") from None
        missing = sorted(set(range(1, max(records) + 1)) - set(records)) if 0 not in records else []
        if missing:
            raise ValueError(f"{first}: round {missing[0]} of the chain {run} is missing (its rounds' passes add up)")
        drawn = sum(r["steps"] * r["batch_size"] for _, r in records.values())
        runs[(method, ratio)].append((drawn / sum(r["samples"] for _, r in records.values()), first))
    return {row: (sum(p for p, _ in values) / len(values), values[0][1]) for row, values in runs.items()}


# ---------------------------------------------------------------------------------------------------------
# formatting: which direction is better, how many digits, which rows compete for "best"
# ---------------------------------------------------------------------------------------------------------
LOWER_IS_BETTER = frozenset({"answer_nll"})
# Rows that read the ground-truth token classes, which the methods cannot see: shown, marked apart, never "best"
# (whether they beat every method is the table's to show, not an assumption).
def ground_truth_row(method: str) -> bool:
    """A row that reads the ground-truth token classes (tokenclean.methods; a plug-in's rows too)."""
    load_plugins()
    return method in METHODS and METHODS[method].ground_truth
METRIC_LABELS = {"mix_acc": "accuracy, the paper's mix (6 likelihood : 1 generation)",
                 "mc_acc": "multiple-choice accuracy (log-likelihood, plain prompt)",
                 "answer_acc": "answer accuracy (generation)",
                 "response_em": "well-formed response with the right answer",
                 "answer_nll": "answer NLL (nats, lower is better)", "score": "score (each task's metric, x 100)"}
PAPER_REFERENCE = Path(__file__).resolve().parent / "paper_reference.json"


def metric_format(metric: str) -> tuple[float, int]:
    """(scale, decimals) of a metric in md/tex: benchmark scores in percent with 2 decimals, as the paper."""
    return {"score": (100.0, 2), "answer_nll": (1.0, 2)}.get(metric, (1.0, 3))


def best_rows(rows: list[dict[str, Any]], column: str, metric: str) -> set[int]:
    """Indices of the rows with the best mean in ``column`` among competing rows (every tie is best; none when
    all competing rows read the same)."""
    values = {i: r[f"{column}_mean"] for i, r in enumerate(rows)
              if not ground_truth_row(r["method"]) and f"{column}_mean" in r}
    if not values:
        return set()
    scale, decimals = metric_format(metric)
    # compare at the shown precision, so two cells that read the same are both bold
    shown = {i: round(v * scale, decimals) for i, v in values.items()}
    target = (min if metric in LOWER_IS_BETTER else max)(shown.values())
    best = {i for i, v in shown.items() if v == target}
    return best if len(best) < len(values) else set()  # all equal: nothing stands out


def _cell(row: dict[str, Any], column: str, metric: str, pm: str) -> str:
    if f"{column}_mean" not in row:
        return "–"
    scale, decimals = metric_format(metric)
    text = f"{row[f'{column}_mean'] * scale:.{decimals}f}"
    if row["n_seeds"] > 1 or row.get("n_replicates", 1) > 1:
        text += f"{pm}{row[f'{column}_std'] * scale:.{decimals}f}"
    return text


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("$", r"\$")):
        text = text.replace(a, b)
    return text


def _row_label(row: dict[str, Any]) -> str:
    return row["method"] + ("†" if ground_truth_row(row["method"]) else "")


def _passes_cell(row: dict[str, Any], none: str = "–") -> str:
    """A row's passes over its own data, 2 decimals; ``none`` where no model recorded them (base, the paper)."""
    return f"{row['passes']:.2f}" if row.get("passes") is not None else none


# ---------------------------------------------------------------------------------------------------------
# the paper's numbers
# ---------------------------------------------------------------------------------------------------------
def load_paper_reference(model: str, path: str | os.PathLike = PAPER_REFERENCE) -> dict[str, Any]:
    """The paper's reported numbers for ``model`` (a key of ``paper_reference.json``), with the shared task map."""
    data = read_json(path)
    if model not in data["models"]:
        raise ValueError(f"{path}: no paper numbers for {model!r} (it has: {', '.join(sorted(data['models']))})")
    return {"tasks": data["tasks"], "methods": data["methods"], **data["models"][model], "name": model}


def paper_task(ours: str, reference: dict[str, Any]) -> str | None:
    """The paper's task key for one of our lm-eval task names (``truthfulqa_mc2`` -> ``truthfulqa``)."""
    for key, info in reference["tasks"].items():
        if ours in info["lm_eval"] or ours == key:
            return key
    return None


def paper_rows(tasks: list[str], methods: list[str], reference: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in the shape of :func:`collect`'s (values as fractions, like ours) for the paper's seed-42 and
    mean ± std numbers of ``methods``. The average column is the paper's reported one when our tasks cover all
    of the paper's, else the mean of its values over our tasks (``average_partial``)."""
    mapped = {t: paper_task(t, reference) for t in tasks}
    covered = set(mapped.values()) >= set(reference["tasks"])
    rows = []
    for kind, n_seeds in (("seed42", 1), ("mean_std", 3)):
        for method in methods:
            values = reference.get(kind, {}).get(method)
            if not values:
                continue
            row: dict[str, Any] = {"method": f"paper {reference['methods'].get(method, method)}",
                                   "ratio": "" if method in ("base", "warmup", "full") else "0.6",
                                   "n_seeds": n_seeds, "kind": kind, "average_partial": not covered}
            for t, key in mapped.items():
                v = values.get(key) if key else None
                if v is not None:
                    mean, std = (v if isinstance(v, list) else (v, 0.0))
                    row[f"{t}_mean"], row[f"{t}_std"] = mean / 100, std / 100
            if covered and "average" in values:
                v = values["average"]
                mean, std = (v if isinstance(v, list) else (v, 0.0))
                row["average_mean"], row["average_std"] = mean / 100, std / 100
            elif all(f"{t}_mean" in row for t in tasks):
                row["average_mean"] = sum(row[f"{t}_mean"] for t in tasks) / len(tasks)
                row["average_std"] = 0.0
                row["n_seeds_average"] = 1  # a mean over tasks of seed means: no seed std to show
            if any(k.endswith("_mean") for k in row):
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------------------
def _md_table(tasks: list[str], rows: list[dict[str, Any]], metric: str, extras: list[str] = (),
              paper: list[dict[str, Any]] = ()) -> list[str]:
    columns = tasks + ["average"] + list(extras)
    headers = tasks + ["average"] + [e.replace("average_", "avg ") for e in extras]
    best = {c: best_rows(rows, c, metric if c in tasks + ["average"] else c.removeprefix("average_"))
            for c in columns}
    lines = [f"| method | ratio | seeds | passes | {' | '.join(headers)} |", "|---" * (len(headers) + 4) + "|"]
    for i, row in enumerate(rows):
        cells = []
        for c in columns:
            m = metric if c in tasks + ["average"] else c.removeprefix("average_")
            text = _cell(row, c, m, " ± ")
            cells.append(f"**{text}**" if i in best[c] else text)
        lines.append(f"| {_row_label(row)} | {row['ratio'] or '–'} | {row['n_seeds']} | {_passes_cell(row)} | "
                     f"{' | '.join(cells)} |")
    for row in paper:
        cells = []
        for c in columns:
            shown = dict(row, n_seeds=1) if c == "average" and row.get("n_seeds_average") else row
            text = _cell(shown, c, metric, " ± ")
            cells.append(text + ("*" if c == "average" and row.get("average_partial") and text != "–" else ""))
        seeds = "42" if row["kind"] == "seed42" else "41–43"
        lines.append(f"| *{row['method']}* | {row['ratio'] or '–'} | {seeds} | – | {' | '.join(cells)} |")
    return lines


def _tex_table(tasks: list[str], rows: list[dict[str, Any]], metric: str, caption: str,
               paper: list[dict[str, Any]] = ()) -> str:
    columns = tasks + ["average"]
    best = {c: best_rows(rows, c, metric) for c in columns}
    out = ["\\begin{table}[t]", "\\centering", "\\small",
           "\\caption{" + _tex_escape(caption).replace("±", "$\\pm$") + "}",
           "\\begin{tabular}{llc" + "c" * len(columns) + "}", "\\toprule",
           "Method & Ratio & Passes & "
           + " & ".join(_tex_escape(c.capitalize() if c == "average" else c) for c in columns) + " \\\\",
           "\\midrule"]
    for i, row in enumerate(rows):
        cells = []
        for c in columns:
            text = _cell(row, c, metric, "$\\pm$")
            cells.append(f"\\textbf{{{text}}}" if i in best[c] else text)
        label = _tex_escape(row["method"]) + ("$^\\dagger$" if ground_truth_row(row["method"]) else "")
        out.append(f"{label} & {row['ratio'] or '--'} & {_passes_cell(row, '--')} & "
                   + " & ".join(cells).replace("–", "--") + " \\\\")
    if paper:
        out.append("\\midrule")
        for row in paper:
            cells = []
            for c in columns:
                shown = dict(row, n_seeds=1) if c == "average" and row.get("n_seeds_average") else row
                text = _cell(shown, c, metric, "$\\pm$").replace("–", "--")
                cells.append(text + ("$^*$" if c == "average" and row.get("average_partial") and text != "--" else ""))
            seeds = "seed 42" if row["kind"] == "seed42" else "3 seeds"
            out.append(f"\\textit{{{_tex_escape(row['method'])} ({seeds})}} & {row['ratio'] or '--'} & -- & "
                       + " & ".join(cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(out)


def write_table(eval_files: list[str | os.PathLike], out_csv: str | os.PathLike,
                out_md: str | os.PathLike | None = None, metric: str = HEADLINE,
                out_tex: str | os.PathLike | None = None, metrics: list[str] | None = None,
                paper_reference: str | None = None, models: list[str | os.PathLike] = ()) -> list[dict[str, Any]]:
    """Write the experiment's tables; returns the headline rows.

    ``metrics`` (default: the headline and those of ``SECONDARY`` every file reports) get one table each in
    ``table.md`` / ``table.tex`` and, except the headline, ``<out_csv stem>_<metric>.csv``. ``table.csv`` keeps
    its columns: the row's labels, its passes, the headline per task and on average, then the averages of the
    other metrics. ``models``: the trained models' directories, named by run (:func:`row_passes`); a row without
    one (the base model) has no passes.
    """
    tasks, rows = collect(eval_files, metric)
    passes_by_row = row_passes(list(models))
    unknown = sorted(set(passes_by_row) - {(r["method"], r["ratio"]) for r in rows})
    if unknown:
        raise ValueError(f"{passes_by_row[unknown[0]][1]}: no evaluation of this model's row was given")
    extras = [f"average_{x}" for x in SECONDARY if x != metric and all(f"average_{x}_mean" in r for r in rows)]
    columns = ["method", "ratio", "n_replicates", "n_seeds", "passes"] + [
        f"{t}_{s}" for t in tasks + ["average"] + extras for s in ("mean", "std")]
    if metrics is None:
        metrics = [metric] + [e.removeprefix("average_") for e in extras]
    if metrics[0] != metric:
        metrics = [metric] + [m for m in metrics if m != metric]
    reference = load_paper_reference(paper_reference) if paper_reference else None
    if reference and metric != "score":
        raise ValueError(f"the paper's numbers are benchmark scores; the headline metric here is {metric!r}")
    per_metric = {metric: (tasks, rows)}
    for m in metrics[1:]:
        per_metric[m] = collect(eval_files, m)
    for _, m_rows in per_metric.values():
        for row in m_rows:
            row["passes"] = passes_by_row.get((row["method"], row["ratio"]), (None,))[0]
    # all outputs are built before any is written, so a bad file leaves none behind
    md_parts, tex_parts = [], []
    for m, (m_tasks, m_rows) in per_metric.items():
        paper = paper_rows(m_tasks, list(dict.fromkeys(r["method"] for r in m_rows)), reference) if reference else []
        title = f"{METRIC_LABELS.get(m, m)}, {spread_label(m_rows)}"
        md = [f"### {title}", ""] + _md_table(m_tasks, m_rows, m, extras if m == metric else (), paper)
        notes = []
        if any(ground_truth_row(r["method"]) for r in m_rows):
            notes.append("† reads the ground-truth token classes: never in bold.")
        if paper:
            notes.append(f"Rows in italics: the paper's numbers for {reference['name']} ({reference['source']}); "
                         f"{reference.get('note', '')}")
            if any(r.get("average_partial") for r in paper):
                notes.append("* the paper's values averaged over the tasks of this table only (the paper's own "
                             "average is over its 7 tasks).")
        md_parts.append("\n".join(md + ([""] + notes if notes else [])))
        tex_parts.append(_tex_table(m_tasks, m_rows, m, f"{title}; bold: best row (rows reading the ground-truth "
                                    "token classes excluded); passes: optimizer steps x batch size / samples of "
                                    "the row's own training data", paper))
    outputs: dict[str | os.PathLike, str] = {}
    for m, (m_tasks, m_rows) in per_metric.items():
        if m != metric:
            m_cols = ["method", "ratio", "n_replicates", "n_seeds"] + [f"{t}_{s}" for t in m_tasks + ["average"]
                                                       for s in ("mean", "std")]
            outputs[metric_csv(out_csv, m)] = csv_text(m_rows, m_cols)
    if out_md:
        outputs[out_md] = (f"{draws_label(rows)} Best row of each column in bold. Cells: {spread_label(rows)} "
                           "(a single value: one run). "
                           "Passes: optimizer steps × batch size / samples of the row's own training data, as its "
                           "models recorded them (a self-evolving row: its rounds together over their chunks)."
                           "\n\n" + "\n\n".join(md_parts) + "\n")
    if out_tex:
        outputs[out_tex] = "% tokenclean report: needs \\usepackage{booktabs}\n" + "\n\n".join(tex_parts) + "\n"
    outputs[out_csv] = csv_text(rows, columns)  # the rule's first output last: all appear, or none
    write_texts(outputs)
    return rows


def draws_label(rows: list[dict[str, Any]]) -> str:
    """What the table holds, in words: how many independent draws of the world, base and warm-up model, and how
    many SFT seeds each (a claim that one row beats another needs several draws: docs/results.md)."""
    n_rep = max((r.get("n_replicates", 1) for r in rows), default=1)
    seeds = max((r["n_seeds"] for r in rows), default=1)
    if n_rep == 1:
        return (f"One draw (one replicate) of the world, base and warm-up model, {seeds} SFT seed"
                f"{'s' if seeds > 1 else ''}: what one draw gives, not a verdict.")
    return (f"{n_rep} draws (replicates) of the world, base and warm-up model, {seeds} SFT seed"
            f"{'s' if seeds > 1 else ''} each.")


def spread_label(rows: list[dict[str, Any]]) -> str:
    """The cells' statistic: mean ± std over seeds (one replicate) or over replicates."""
    n_rep = max((r.get("n_replicates", 1) for r in rows), default=1)
    return "mean ± std over seeds" if n_rep == 1 else f"mean ± std over {n_rep} replicates (each its seeds' mean)"


def metric_csv(out_csv: str | os.PathLike, metric: str) -> Path:
    """``table.csv`` -> ``table_<metric>.csv``: the per-task table of a non-headline metric."""
    p = Path(out_csv)
    return p.with_name(f"{p.stem}_{metric}{p.suffix}")


def write_rounds(eval_files: list[str | os.PathLike], rounds: int, out_csv: str | os.PathLike,
                 metric: str = HEADLINE, models: list[str | os.PathLike] | None = None) -> list[dict[str, Any]]:
    """The self-evolving curve: per (method, ratio, round), the mean and std over seeds of ``metric``.

    Round 0 is ``warmup.json`` (the first reference, where every chain starts); ``<row>_t<t>.json`` is round t of
    the chain ``<row>`` (e.g. ``self_evolving_r0.6_s1_t1``); a row's own file (``self_evolving_r0.6_s1.json``)
    is its last round, ``rounds``. ``models`` (the warm-up model and the rounds' directories ``<row>_t<t>``) fill
    the ``passes`` column: how many times each round went over its own data (round 0: the warm-up set; round t:
    its chunk), the mean over seeds, as training recorded it; blank without them.
    """
    passes_by_round: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for d in map(Path, models or []):
        m = ROUND_DIR.match(d.name)
        if d.name == "warmup" or m:
            key = ("", "", 0) if not m else (*parse_run_name(m["row"])[:2], int(m["round"]))
            passes_by_round[key].append(training_record(d)["passes"])
    start: list[dict[str, float]] = []
    per_round: dict[tuple[str, str, int], list[dict[str, float]]] = defaultdict(list)
    tasks: list[str] = []
    for f in eval_files:
        _, scores = read_eval(f, metric)
        tasks += [t for t in scores if t not in tasks and t != "average"]
        name = Path(f).name.removesuffix(".json")
        if name == "warmup":
            start.append(scores)
            continue
        m = ROUND_DIR.match(name)
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
            done = passes_by_round.get(("", "", 0) if round_ == 0 else (method, ratio, round_), [])
            row: dict[str, Any] = {"method": method, "ratio": ratio, "round": round_, "n_seeds": len(seeds),
                                   "passes": sum(done) / len(done) if done else ""}
            for task in tasks + ["average"]:
                row[f"{task}_mean"], row[f"{task}_std"] = mean_std([s[task] for s in seeds if task in s])
            rows.append(row)
    columns = ["method", "ratio", "round", "n_seeds", "passes"] + [f"{t}_{s}" for t in tasks + ["average"]
                                                         for s in ("mean", "std")]
    write_csv(out_csv, rows, columns)
    return rows
