"""`tokenclean compare`: finished experiments side by side, one row per world, method and ratio.

The worlds here are made by the project's own writers (write_table, write_significance, write_quality) from
evaluations and selections written by hand, so every expected value can be worked out on paper.
"""
from __future__ import annotations

import csv
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.listing import all_files
from tests.test_quality import labelled_table, online_record
from tokenclean.artifacts import csv_text, save_array
from tokenclean.cli import build_parser, main
from tokenclean.data import TOKEN_CLASSES
from tokenclean.report.quality import write_quality
from tokenclean.report.significance import write_significance
from tokenclean.report.table import mean_std, write_table

ROOT = Path(__file__).resolve().parents[1]
N = 8  # questions per family
METRICS = ["answer_acc", "response_em", "answer_nll"]
CLASSES = ["informative", "novel", "boilerplate", "corrupted", "garbage"]
DOCUMENTED = (".venv/bin/tokenclean compare --world paper-setting=results/study --world "
              "single-template=results/single-template-study --out-csv results/worlds.csv --out-md "
              "results/worlds.md")


def first(k: int) -> list[int]:
    """Questions 0..k-1 answered right, the rest wrong."""
    return [1] * k + [0] * (N - k)


def evaluation(path: Path, correct: dict[str, list[int]], em_families: tuple[str, ...]) -> Path:
    """An evaluation JSON and its samples.jsonl as `tokenclean evaluate` writes them: response_em equals the
    answer's correctness in ``em_families`` and is 0 elsewhere; answer_nll is 2 - correct."""
    samples, metrics = [], {}
    for family, values in correct.items():
        em = values if family in em_families else [0] * len(values)
        samples += [{"family": family, "doc_id": i, "answer_correct": bool(c), "response_em": bool(e),
                     "answer_nll": 2.0 - c} for i, (c, e) in enumerate(zip(values, em))]
        metrics[family] = {"answer_acc": sum(values) / N, "response_em": sum(em) / N,
                           "answer_nll": 2.0 - sum(values) / N}
    average = {m: sum(v[m] for v in metrics.values()) / len(metrics) for m in METRICS}
    path.write_text(json.dumps({"metrics": metrics, "average": average}))
    path.with_name(path.stem + ".samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


# Per run, questions answered right per family (add, max). Full gets no max question right; random gets the same
# add questions as full and every max one, so its difference from full is +1 on every max question and 0 on
# every add one: +0.5 on average for every bootstrap resample, an interval of exactly [+0.5, +0.5].
RUNS = {
    "base": {"add": first(0), "max": first(0)},
    "full_s1": {"add": first(4), "max": first(0)},
    "full_s2": {"add": first(6), "max": first(0)},
    "random_r0.6_s1": {"add": first(4), "max": first(8)},
    "random_r0.6_s2": {"add": first(6), "max": first(8)},
}
ONLY_A = {"truth_drop_noisy_s1": {"add": first(8), "max": first(4)},
          "truth_drop_noisy_s2": {"add": first(8), "max": first(4)}}
ONLY_B = {"dft_s1": {"add": first(5), "max": first(1)}, "dft_s2": {"add": first(5), "max": first(3)}}


def make_world(results: Path, runs: dict[str, dict[str, list[int]]], selections: dict[str, np.ndarray | float],
               headline: str = "answer_acc", em_families: tuple[str, ...] = ("add", "max"), seed: int = 0) -> Path:
    """A finished experiment's results directory: table.csv (and table_<metric>.csv), significance.csv and
    cleaning_quality.csv, each from its own writer. ``selections``: a mask (bool array) or, for an online run,
    one weight given to every response token."""
    (results / "eval").mkdir(parents=True)
    evals = [evaluation(results / "eval" / f"{run}.json", correct, em_families) for run, correct in runs.items()]
    write_table(evals, results / "table.csv", results / "table.md", metric=headline,
                metrics=[headline] + [m for m in METRICS if m != headline])
    write_significance(evals, METRICS, results / "significance.csv", iters=200)
    table = labelled_table(seed, n_samples=30)
    meta = table.save(results / "tokens" / "pool.tokens.npz", {"tokenizer_fingerprint": "t"})
    paths = []
    for name, sel in selections.items():
        if isinstance(sel, float):
            paths.append(results / "models" / "sft" / name / "weights.npy")
            online_record(paths[-1], table, np.where(table.loss_mask, sel, np.nan), meta["fingerprint"])
        else:
            paths.append(results / "masks" / f"{name}.mask.npy")
            paths[-1].parent.mkdir(parents=True, exist_ok=True)
            save_array(paths[-1], sel & table.loss_mask, {"tokens_fingerprint": meta["fingerprint"]})
    write_quality(results / "tokens" / "pool.tokens.npz", paths, results / "cleaning_quality.csv")
    return results


def masks(seed: int) -> dict[str, np.ndarray]:
    """full, and the two seeds' random masks, over labelled_table(seed, 30)."""
    table = labelled_table(seed, n_samples=30)
    rng = np.random.default_rng(100 + seed)
    return {"full": table.loss_mask.copy(), "random_r0.6_s1": rng.random(table.n_tokens) < 0.6,
            "random_r0.6_s2": rng.random(table.n_tokens) < 0.6}


@pytest.fixture
def worlds(tmp_path) -> tuple[Path, Path]:
    """World a (headline answer_acc) with a ground-truth row; world b (headline response_em, only the add family
    matches whole responses) with an online row, dft, instead."""
    table_a = labelled_table(0, n_samples=30)
    truth = table_a.loss_mask & ~np.isin(table_a.extras["token_class"], [TOKEN_CLASSES.index("corrupted"),
                                                                       TOKEN_CLASSES.index("garbage")])
    a = make_world(tmp_path / "a", {**RUNS, **ONLY_A}, {**masks(0), "truth_drop_noisy": truth})
    b = make_world(tmp_path / "b", {**RUNS, **ONLY_B}, {**masks(1), "dft_s1": 0.5, "dft_s2": 0.25},
                   headline="response_em", em_families=("add",), seed=1)
    return a, b


def run_compare(tmp_path: Path, *worlds: str, extra: tuple[str, ...] = ()) -> int:
    return main(["compare", *[x for w in worlds for x in ("--world", w)], *extra,
                 "--out-csv", str(tmp_path / "out" / "worlds.csv"), "--out-md", str(tmp_path / "out" / "worlds.md")])


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def md_rows(md: str, section: int) -> list[list[str]]:
    """The body rows (cells) of the ``section``-th table of the page."""
    table = [line for line in md.split("### ")[section + 1].splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]


def test_one_row_per_world_method_and_ratio_with_exact_values(worlds, tmp_path):
    a, b = worlds
    assert run_compare(tmp_path, f"paper-setting={a}", f"single-template={b}") == 0
    rows = read_csv(tmp_path / "out" / "worlds.csv")
    by = {(r["world"], r["method"], r["ratio"]): r for r in rows}
    assert [k[1:] for k in by if k[0] == "paper-setting"] == [("base", ""), ("full", ""), ("random", "0.6"),
                                                               ("truth_drop_noisy", "")]
    assert [k[1:] for k in by if k[0] == "single-template"] == [("base", ""), ("full", ""), ("random", "0.6"),
                                                                 ("dft", "")]
    # each world's headline, read from its files (b's table.csv is response_em; answer_acc is table_answer_acc.csv)
    assert {r["metric"] for r in rows if r["world"] == "paper-setting"} == {"answer_acc"}
    assert {r["metric"] for r in rows if r["world"] == "single-template"} == {"response_em"}

    # means and stds over seeds of the average over tasks: full 0.25 and 0.375 (a), the same on b (max is 0 on
    # both metrics); random 0.75 and 0.875 on a, 0.25 and 0.375 on b (max never matches a whole response there)
    spread = f"{mean_std([0.25, 0.375])[1]:.4f}"
    full_a, random_a = by[("paper-setting", "full", "")], by[("paper-setting", "random", "0.6")]
    assert (full_a["mean"], full_a["std"], full_a["n_seeds"]) == ("0.3125", spread, "2")
    assert (random_a["mean"], random_a["std"], random_a["n_seeds"]) == ("0.8125", spread, "2")
    assert by[("single-template", "random", "0.6")]["mean"] == "0.3125"
    assert by[("single-template", "dft", "")]["mean"] == "0.3125"  # add 5 of 8 on both seeds, max never
    base = by[("paper-setting", "base", "")]
    assert (base["mean"], base["std"], base["n_seeds"]) == ("0.0000", "0.0000", "1")

    # the difference from full: full itself 0 with no interval; random's planted +0.5 with an exact interval
    assert (full_a["diff"], full_a["ci_low"], full_a["ci_high"], full_a["significant"]) == ("0.0000", "", "", "")
    assert (random_a["diff"], random_a["ci_low"], random_a["ci_high"]) == ("0.5000", "0.5000", "0.5000")
    assert random_a["significant"] == "True"
    random_b = by[("single-template", "random", "0.6")]  # no whole-response difference on b
    assert (random_b["diff"], random_b["ci_low"], random_b["ci_high"], random_b["significant"]) == (
        "0.0000", "0.0000", "0.0000", "False")
    # every other interval is significance.csv's own (task average, the world's metric)
    for world, results in (("paper-setting", a), ("single-template", b)):
        metric = "answer_acc" if world == "paper-setting" else "response_em"
        for s in read_csv(results / "significance.csv"):
            if s["task"] == "average" and s["metric"] == metric:
                row = by[(world, s["method"], s["ratio"])]
                assert (row["diff"], row["ci_low"], row["ci_high"]) == (s["diff"], s["ci_low"], s["ci_high"])
    assert float(base["diff"]) == pytest.approx(-(4 + 6) / 2 / N / 2)  # base vs full's seed mean on add, 0 on max

    # kept fractions: the mean over the row's seeds' selections, as cleaning_quality.csv holds them
    quality = {r["mask"]: r for r in read_csv(a / "cleaning_quality.csv")}
    for c in CLASSES:
        expected = (float(quality["random_r0.6_s1"][f"kept_{c}"]) + float(quality["random_r0.6_s2"][f"kept_{c}"])) / 2
        assert random_a[f"kept_{c}"] == f"{expected:.4f}"
        assert full_a[f"kept_{c}"] == "1.0000"
    assert random_a["n_selections"] == "2" and full_a["n_selections"] == "1"
    truth = by[("paper-setting", "truth_drop_noisy", "")]
    assert [truth[f"kept_{c}"] for c in CLASSES] == ["1.0000", "1.0000", "1.0000", "0.0000", "0.0000"]
    assert truth["ground_truth"] == "True" and random_a["ground_truth"] == "False"
    dft = by[("single-template", "dft", "")]  # weights 0.5 (seed 1) and 0.25 (seed 2) on every token
    assert [dft[f"kept_{c}"] for c in CLASSES] == ["0.3750"] * 5 and dft["n_selections"] == "2"
    assert all(base[f"kept_{c}"] == "" for c in CLASSES) and base["n_selections"] == ""


def test_the_markdown_sets_the_worlds_side_by_side(worlds, tmp_path):
    a, b = worlds
    assert run_compare(tmp_path, f"paper-setting={a}", f"single-template={b}") == 0
    md = (tmp_path / "out" / "worlds.md").read_text()
    assert "| method | ratio | paper-setting: answer_acc | paper-setting: Δ | single-template: response_em | " \
           "single-template: Δ |" in md
    headline = {(r[0], r[1]): r[2:] for r in md_rows(md, 0)}
    assert list(headline) == [("base", "–"), ("full", "–"), ("random", "0.6"), ("truth_drop_noisy†", "–"),
                              ("dft", "–")]
    spread = f"{mean_std([0.25, 0.375])[1]:.3f}"
    assert headline[("full", "–")] == [f"0.312 ± {spread}", "0", f"0.312 ± {spread}", "0"]
    assert headline[("random", "0.6")][:2] == [f"0.812 ± {spread}", "+0.500 [+0.500, +0.500]*"]
    assert headline[("random", "0.6")][3] == "+0.000 [+0.000, +0.000]"
    assert headline[("truth_drop_noisy†", "–")][2:] == ["–", "–"]  # b has no ground-truth row
    assert headline[("dft", "–")][:2] == ["–", "–"]  # a has no dft row
    assert headline[("base", "–")][0] == "0.000"  # one run: no ± 0
    assert ("Seeds per row: paper-setting one draw, 2 seeds (base: 1); single-template one draw, 2 seeds "
            "(base: 1).") in md
    assert "† reads the ground-truth token classes" in md

    kept = md_rows(md, 1)
    assert [r[:3] for r in kept] == [["full", "–", "paper-setting"], ["", "", "single-template"],
                                     ["random", "0.6", "paper-setting"], ["", "", "single-template"],
                                     ["truth_drop_noisy†", "–", "paper-setting"], ["", "", "single-template"],
                                     ["dft", "–", "paper-setting"], ["", "", "single-template"]]
    assert kept[4][3:] == ["1.000", "1.000", "1.000", "0.000", "0.000"] and kept[5][3:] == ["–"] * 5
    assert kept[6][3:] == ["–"] * 5 and kept[7][3:] == ["0.375"] * 5


def test_another_metric_and_a_class_no_pool_holds(worlds, tmp_path):
    """--metric reads table_<metric>.csv and that metric's significance rows; a class absent from a pool (NaN in
    cleaning_quality.csv) stays NaN in the CSV and reads n/a in the page."""
    a, b = worlds
    path = a / "cleaning_quality.csv"
    quality = read_csv(path)
    quality[-1]["kept_novel"] = "nan"  # truth_drop_noisy: as if the pool held no novel token
    path.write_text(csv_text(quality))
    assert run_compare(tmp_path, f"a={a}", f"b={b}", extra=("--metric", "answer_acc")) == 0
    rows = {(r["world"], r["method"], r["ratio"]): r for r in read_csv(tmp_path / "out" / "worlds.csv")}
    assert rows[("b", "random", "0.6")]["metric"] == "answer_acc"
    assert rows[("b", "random", "0.6")]["mean"] == "0.8125"  # b's table_answer_acc.csv
    assert (rows[("b", "random", "0.6")]["ci_low"], rows[("b", "random", "0.6")]["ci_high"]) == ("0.5000", "0.5000")
    assert rows[("a", "truth_drop_noisy", "")]["kept_novel"] == "nan"
    md = (tmp_path / "out" / "worlds.md").read_text()
    assert "| truth_drop_noisy† | – | a | 1.000 | n/a |" in md
    assert md.startswith("### Answer accuracy (generation), mean ± std over seeds; Δ = row − full-token SFT")


def bad(results: Path, name: str, old: str, new: str, count: int = 1) -> Path:
    path = results / name
    text = path.read_text()
    assert old in text, (name, old)
    path.write_text(text.replace(old, new, count))
    return path


@pytest.mark.parametrize("case", ["missing quality", "missing column", "bad number", "stale significance",
                                  "unknown selection", "no results", "syntax", "twice", "unknown metric"])
def test_bad_input_is_one_line_exit_2_and_no_output(worlds, tmp_path, capsys, case):
    a, b = worlds
    args = [f"a={a}", f"b={b}"]
    extra: tuple[str, ...] = ()
    if case == "missing quality":
        (b / "cleaning_quality.csv").unlink()
        expected = f"{b / 'cleaning_quality.csv'}: file not found"
    elif case == "missing column":
        path = a / "significance.csv"
        cut = path.read_text().splitlines()[0].split(",").index("ci_high")
        path.write_text("\n".join(",".join(line.split(",")[:cut]) for line in path.read_text().splitlines()) + "\n")
        expected = f"{path}: column 'ci_high' missing"
    elif case == "bad number":
        path = a / "table.csv"
        lines = path.read_text().splitlines()
        header = lines[0].split(",")
        cells = lines[2].split(",")  # line 3: the full row
        cells[header.index("average_mean")] = "n/a"
        path.write_text("\n".join(lines[:2] + [",".join(cells)] + lines[3:]) + "\n")
        expected = f"{path}:3: field average_mean: expected a number, got 'n/a'"
    elif case == "stale significance":
        path = bad(b, "significance.csv", "dft,", "eaft,", count=-1)
        expected = f"{path}:"  # eaft's first row (a task's) is skipped; its average row is refused
        expected_tail = "row eaft is not in"
    elif case == "unknown selection":
        path = bad(a, "cleaning_quality.csv", "random_r0.6_s2", "rho_r0.6")
        expected = f"{path}:4: selection 'rho_r0.6' belongs to no row of {a / 'table.csv'}"
    elif case == "no results":
        args = [f"a={a}", f"b={tmp_path / 'nowhere'}"]
        expected = f"{tmp_path / 'nowhere'}: not found, expected the results directory of a finished experiment"
    elif case == "syntax":
        args = [f"a={a}", str(b)]
        expected = f"--world {b}: expected NAME=RESULTS_DIR"
    elif case == "twice":
        args = [f"a={a}", f"a={b}"]
        expected = "--world a: given twice"
    else:
        extra = ("--metric", "accuracy")
        expected = f"{a / 'significance.csv'}: no rows of metric 'accuracy' (it holds answer_acc, response_em, " \
                   "answer_nll)"
    (tmp_path / "out").mkdir()
    before = all_files(tmp_path)
    assert run_compare(tmp_path, *args, extra=extra) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"tokenclean compare: error: {expected}"), err
    if case == "stale significance":
        assert expected_tail in err
    assert all_files(tmp_path) == before  # no output, no temporary


def test_a_row_without_its_significance_row_is_refused(worlds, tmp_path, capsys):
    a, _ = worlds
    path = a / "significance.csv"
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if not line.startswith("random,0.6,full,answer_acc,average,")))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "worlds.md").write_text("an earlier page\n")
    assert run_compare(tmp_path, f"a={a}") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tokenclean compare: error: {path}: no row for random 0.6 (answer_acc, task average), which "
                   f"{a / 'table.csv'} has (files of two different runs?)")
    assert (tmp_path / "out" / "worlds.md").read_text() == "an earlier page\n"
    assert not (tmp_path / "out" / "worlds.csv").exists()


def test_an_output_it_cannot_write_is_refused_before_reading_the_worlds(tmp_path, capsys):
    (tmp_path / "out" / "worlds.csv").mkdir(parents=True)
    assert run_compare(tmp_path, f"a={tmp_path / 'nowhere'}") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tokenclean compare: error: {tmp_path / 'out' / 'worlds.csv'}: is a directory, expected a file "
                   "path to write")
    assert all_files(tmp_path) == ["out", "out/worlds.csv"]


def test_the_documented_command_is_the_make_target_and_parses():
    """docs/results.md shows the command a user types; `make compare-worlds` runs exactly it."""
    assert DOCUMENTED in (ROOT / "docs" / "results.md").read_text().splitlines()
    args = build_parser().parse_args(shlex.split(DOCUMENTED)[1:])
    assert args.world == ["paper-setting=results/study", "single-template=results/single-template-study"]
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "compare-worlds"], cwd=ROOT,
                          capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.splitlines() == [DOCUMENTED], proc.stdout + proc.stderr


@pytest.mark.slow  # a smoke workflow (four methods) through Snakemake: about two minutes
def test_compare_on_a_real_smoke_run(tmp_path):
    from tests.test_workflow import snakemake

    (tmp_path / "methods.yaml").write_text("methods: [full, random, truth_drop_noisy, dft]\n")
    work = tmp_path / "work"
    proc = snakemake(work, overrides=tmp_path / "methods.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = work / "results" / "smoke"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tokenclean.cli", "compare",
                           "--world", f"one={results}", "--world", f"two={results}",
                           "--out-csv", str(out / "worlds.csv"), "--out-md", str(out / "worlds.md")],
                          capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(out / "worlds.csv")
    table = read_csv(results / "table.csv")
    assert len(rows) == 2 * len(table) == 2 * 6  # base, warmup, full, random_r0.6, truth_drop_noisy, dft
    by = {(r["world"], r["method"], r["ratio"]): r for r in rows}
    for t in table:
        row = by[("one", t["method"], t["ratio"])]
        assert (row["metric"], row["mean"], row["std"]) == ("answer_acc", t["average_mean"], t["average_std"])
    assert by[("two", "full", "")]["diff"] == "0.0000" and by[("two", "full", "")]["ci_low"] == ""
    truth = by[("one", "truth_drop_noisy", "")]
    assert truth["kept_corrupted"] == truth["kept_garbage"] == "0.0000" and truth["ground_truth"] == "True"
    assert by[("one", "dft", "")]["n_selections"] == "1" and float(by[("one", "dft", "")]["kept_informative"]) > 0
    assert all(by[("one", m, "")]["kept_informative"] == "" for m in ("base", "warmup"))
    assert not math.isnan(float(by[("one", "random", "0.6")]["ci_low"]))
    md = (out / "worlds.md").read_text()
    assert "| method | ratio | one: answer_acc | one: Δ | two: answer_acc | two: Δ |" in md
