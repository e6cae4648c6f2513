"""The report stage on hand-made inputs: tables (means, stds, best marks, the paper's numbers), the paired
bootstrap, the figures and the token page."""
from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tokenclean.artifacts import TokenTable, save_array
from tokenclean.data import TOKEN_CLASSES
from tokenclean.report.significance import bootstrap_mean_differences, compare_with_full, write_significance
from tokenclean.report.table import PAPER_REFERENCE, load_paper_reference, write_table

FAMILIES = ("add", "max")


def world_eval(path: Path, acc: dict[str, float], nll: dict[str, float], em: float | None = None) -> Path:
    """An evaluation JSON in the shape `tokenclean evaluate` writes for the world's tasks."""
    metrics = {f: {"answer_acc": acc[f], "response_em": acc[f] if em is None else em, "answer_nll": nll[f]}
               for f in acc}
    average = {m: sum(v[m] for v in metrics.values()) / len(metrics) for m in ("answer_acc", "response_em",
                                                                               "answer_nll")}
    path.write_text(json.dumps({"metrics": metrics, "average": average}))
    return path


def bench_eval(path: Path, scores: dict[str, float]) -> Path:
    path.write_text(json.dumps({"metrics": {t: {"score": v, "acc": v} for t, v in scores.items()},
                                "average": {"score": sum(scores.values()) / len(scores)}}))
    return path


def md_row(md: str, section: int, label: str) -> list[str]:
    """Cells of the row ``label`` in the ``section``-th table of table.md."""
    table = md.split("### ")[section + 1]
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label} in table {section}")


@pytest.fixture
def evals(tmp_path) -> list[Path]:
    files = [world_eval(tmp_path / "base.json", {"add": 0.0, "max": 0.1}, {"add": 9.0, "max": 8.0})]
    for seed, (a, m, n) in enumerate([(0.5, 0.4, 2.0), (0.7, 0.4, 3.0), (0.6, 0.7, 1.0)], 1):
        files.append(world_eval(tmp_path / f"full_s{seed}.json", {"add": a, "max": m}, {"add": n, "max": n}))
    for seed, (a, m) in enumerate([(0.9, 0.8), (0.8, 0.6), (1.0, 0.7)], 1):
        files.append(world_eval(tmp_path / f"fixed_r0.6_s{seed}.json", {"add": a, "max": m},
                                {"add": 0.5, "max": 4.0}))
    for seed in (1, 2, 3):  # ground-truth rows that beat every method: shown, never bold
        files.append(world_eval(tmp_path / f"truth_drop_noisy_s{seed}.json", {"add": 1.0, "max": 1.0},
                                {"add": 0.1, "max": 0.1}))
        files.append(world_eval(tmp_path / f"truth_keep_informative_s{seed}.json", {"add": 1.0, "max": 0.9},
                                {"add": 0.1, "max": 0.1}))
    return files


def test_table_means_stds_and_best_marks(evals, tmp_path):
    rows = write_table(evals, tmp_path / "table.csv", tmp_path / "table.md", out_tex=tmp_path / "table.tex")
    csv_rows = {r["method"]: r for r in csv.DictReader((tmp_path / "table.csv").read_text().splitlines())}
    assert list(csv_rows) == ["base", "full", "fixed", "truth_drop_noisy", "truth_keep_informative"]
    header = (tmp_path / "table.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["method", "ratio", "n_replicates", "n_seeds", "passes", "add_mean", "add_std"]
    assert csv_rows["full"]["passes"] == ""  # no models given: no passes
    full = csv_rows["full"]
    assert float(full["add_mean"]) == pytest.approx(0.6) and float(full["add_std"]) == pytest.approx(0.1)
    assert float(full["max_mean"]) == pytest.approx(0.5)
    assert float(full["max_std"]) == pytest.approx(np.std([.4, .4, .7], ddof=1), abs=1e-4)
    assert float(csv_rows["fixed"]["average_mean"]) == pytest.approx(np.mean([0.85, 0.7, 0.85]))
    assert float(csv_rows["fixed"]["average_answer_nll_mean"]) == pytest.approx(2.25)
    assert rows[1]["n_seeds"] == 3 and rows[0]["n_seeds"] == 1
    # the other metrics in their own CSV
    nll = {r["method"]: r for r in csv.DictReader((tmp_path / "table_answer_nll.csv").read_text().splitlines())}
    assert float(nll["full"]["add_mean"]) == pytest.approx(2.0) and float(nll["full"]["add_std"]) == pytest.approx(1.0)
    assert (tmp_path / "table_response_em.csv").exists()

    md = (tmp_path / "table.md").read_text()
    assert md.index("answer accuracy") < md.index("well-formed response") < md.index("answer NLL")  # headline first
    # accuracy: fixed is best on add, max and average; the ground-truth rows (higher still) are marked apart, not
    # bold, and nothing calls them a ceiling
    assert md_row(md, 0, "fixed")[4:7] == ["**0.900 ± 0.100**", "**0.700 ± 0.100**", "**0.800 ± 0.087**"]
    assert md_row(md, 0, "truth_drop_noisy†")[4] == "1.000 ± 0.000"
    assert md_row(md, 0, "truth_keep_informative†")[4:6] == ["1.000 ± 0.000", "0.900 ± 0.000"]
    assert "† reads the ground-truth token classes: never in bold." in md and "ceiling" not in md.lower()
    assert md_row(md, 0, "base")[3:5] == ["–", "0.000"]  # no passes; one run: no ± shown
    # answer NLL: lower is better; fixed on add (0.5), full on max (2.0 < 4.0 < 8.0); the ground-truth rows'
    # 0.10 is lower still and not bold
    assert md_row(md, 2, "fixed")[4] == "**0.50 ± 0.00**" and md_row(md, 2, "full")[5] == "**2.00 ± 1.00**"
    assert "**" not in md_row(md, 2, "fixed")[5] and md_row(md, 2, "truth_drop_noisy†")[4] == "0.10 ± 0.00"
    tex = (tmp_path / "table.tex").read_text()
    assert tex.count("\\begin{tabular}") == 3 and "\\textbf{0.900$\\pm$0.100}" in tex
    assert "truth\\_drop\\_noisy$^\\dagger$ & -- & -- & 1.000$\\pm$0.000" in tex
    assert "ground-truth token classes excluded" in tex and "ceiling" not in tex.lower()


def trained(path: Path, steps: int, batch_size: int, used: int, without: int = 0) -> Path:
    """A model directory as `tokenclean train` leaves it, as far as the report reads it (tokenclean.json)."""
    path.mkdir(parents=True)
    (path / "tokenclean.json").write_text(json.dumps({
        "kind": "model", "steps": steps, "train_config": {"batch_size": batch_size, "steps": steps},
        "samples_used": used, "samples_without_selected_tokens": without, "seconds": 1.5}))
    return path


@pytest.fixture
def trained_rows(tmp_path) -> tuple[list[Path], list[Path]]:
    """Evaluations and the models behind them: warm-up, two full seeds, two fixed seeds, one self-evolving chain."""
    acc, nll = {"add": 0.5, "max": 0.5}, {"add": 1.0, "max": 1.0}
    runs = ["base", "warmup", "full_s1", "full_s2", "fixed_r0.6_s1", "fixed_r0.6_s2", "self_evolving_r0.6_s1"]
    evals = [world_eval(tmp_path / f"{run}.json", acc, nll) for run in runs]
    m = tmp_path / "models"
    models = [trained(m / "warmup", 30, 8, 100),                                   # 30 * 8 / 100 = 2.4
              trained(m / "sft" / "full_s1", 10, 8, 40), trained(m / "sft" / "full_s2", 10, 8, 40),  # 2.0
              # a sample whose mask kept no token is still the row's data: 10 * 8 / (35 + 5) = 2.0; 13 * 8 / 40
              trained(m / "sft" / "fixed_r0.6_s1", 10, 8, 35, 5), trained(m / "sft" / "fixed_r0.6_s2", 13, 8, 40),
              # the rounds together: (4 + 3 + 3) * 8 / (14 + 13 + 13) = 2.0 (not a mean of per-round passes)
              trained(m / "rounds" / "self_evolving_r0.6_s1_t1", 4, 8, 14),
              trained(m / "rounds" / "self_evolving_r0.6_s1_t2", 3, 8, 12, 1),
              trained(m / "rounds" / "self_evolving_r0.6_s1_t3", 3, 8, 13)]
    return evals, models


def test_every_row_shows_its_passes_over_its_own_data(trained_rows, tmp_path):
    evals, models = trained_rows
    write_table(evals, tmp_path / "t.csv", tmp_path / "t.md", out_tex=tmp_path / "t.tex", models=models)
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "t.csv").read_text().splitlines())}
    assert {m: r["passes"] for m, r in rows.items()} == {
        "base": "", "warmup": "2.4000", "full": "2.0000", "fixed": "2.3000", "self_evolving": "2.0000"}
    md = (tmp_path / "t.md").read_text()
    for section in range(3):  # every metric's table
        assert md_row(md, section, "base")[3] == "–" and md_row(md, section, "fixed")[3] == "2.30"
    assert "| method | ratio | seeds | passes | add |" in md and "optimizer steps × batch size / samples" in md
    tex = (tmp_path / "t.tex").read_text()
    assert "Method & Ratio & Passes & add" in tex and "warmup & -- & 2.40 & " in tex


def test_passes_need_every_round_of_a_chain_and_an_evaluated_row(trained_rows, tmp_path):
    from tokenclean.report.table import row_passes

    evals, models = trained_rows
    rounds = [m for m in models if m.parent.name == "rounds"]
    with pytest.raises(ValueError, match=r"self_evolving_r0\.6_s1_t1: round 2 of the chain self_evolving_r0\.6_s1 "
                                         "is missing"):
        write_table(evals, tmp_path / "t.csv", models=[rounds[0], rounds[2]])
    assert row_passes(rounds[:2])[("self_evolving", "0.6")][0] == pytest.approx((4 + 3) * 8 / (14 + 13))
    extra = trained(tmp_path / "models" / "sft" / "rho_r0.6_s1", 10, 8, 40)
    with pytest.raises(ValueError, match=r"rho_r0\.6_s1: no evaluation of this model's row"):
        write_table(evals, tmp_path / "t.csv", models=models + [extra])
    with pytest.raises(ValueError, match="a second model of run full_s1"):
        write_table(evals, tmp_path / "t.csv", models=models + [trained(tmp_path / "again" / "full_s1", 1, 1, 1)])
    assert not (tmp_path / "t.csv").exists()


def test_table_errors_leave_nothing_behind(evals, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(Exception, match=r"broken\.json"):
        write_table(evals + [bad], tmp_path / "t.csv", tmp_path / "t.md", out_tex=tmp_path / "t.tex")
    assert not any((tmp_path / n).exists() for n in ("t.csv", "t.md", "t.tex", "t_answer_nll.csv"))
    with pytest.raises(ValueError, match=r"base\.json: field metrics\.add\.score missing"):
        write_table(evals, tmp_path / "t.csv", metric="score")
    assert not (tmp_path / "t.csv").exists()


def test_paper_numbers_beside_ours(tmp_path):
    files = []
    for seed in (41, 42, 43):
        files.append(bench_eval(tmp_path / f"full_s{seed}.json", {"truthfulqa_mc2": 0.44, "mmlu": 0.57}))
        files.append(bench_eval(tmp_path / f"fixed_r0.6_s{seed}.json", {"truthfulqa_mc2": 0.48, "mmlu": 0.56}))
    write_table(files, tmp_path / "table.csv", tmp_path / "table.md", metric="score",
                out_tex=tmp_path / "table.tex", paper_reference="llama-3.2-3b")
    md = (tmp_path / "table.md").read_text()
    assert md_row(md, 0, "full")[4:7] == ["44.00 ± 0.00", "**57.00 ± 0.00**", "50.50 ± 0.00"]  # percent, as the paper
    # the paper's seed-42 and 3-seed rows for the methods we ran, in the same columns
    assert md_row(md, 0, "*paper Full tokens*")[3:6] == ["–", "43.32", "56.87"]
    seed_rows = [line for line in md.splitlines() if line.startswith("| *paper Fixed-Model*")]
    assert len(seed_rows) == 2 and "48.24 ± 0.61" in seed_rows[1]
    # our table has 2 of the paper's 7 tasks: its average is re-taken over them and starred
    assert md_row(md, 0, "*paper Fixed-Model*")[6] == f"{(48.95 + 57.09) / 2:.2f}*"
    assert "Self-Evolving" not in md  # not run here
    assert "csv_results/Llama-3.2-3B" in md and "paper Full tokens (seed 42)" in (tmp_path / "table.tex").read_text()
    with open(tmp_path / "table.csv") as f:  # the CSV holds our numbers only
        assert [r["method"] for r in csv.DictReader(f)] == ["full", "fixed"]
    with pytest.raises(ValueError, match="no paper numbers for 'gpt-2'"):
        load_paper_reference("gpt-2")


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_benchmark_of_a_paper_config_is_matched_to_the_papers_task(config):
    """Each configured lm-eval task (tc_logiqa and tc_tydiqa_goldp included) finds the paper's column, and together
    they cover the paper's 7 tasks, so the reference rows are complete and their average is the paper's own."""
    import yaml

    from tokenclean.report.table import paper_task

    cfg = yaml.safe_load(config.read_text())
    reference = load_paper_reference(cfg["paper_reference"])
    mapped = {b["task"]: paper_task(b["task"], reference) for b in cfg["evaluation"]["benchmarks"]}
    assert None not in mapped.values(), mapped
    assert sorted(mapped.values()) == sorted(reference["tasks"])


def test_paper_reference_rows_average_to_the_reported_average():
    """A typo in the shipped numbers shows as a row whose tasks do not average to the paper's own average."""
    data = json.loads(PAPER_REFERENCE.read_text())
    tasks = list(data["tasks"])
    for model, ref in data["models"].items():
        assert ref["source"]
        for method, row in ref["seed42"].items():
            assert method in data["methods"]
            assert sum(row[t] for t in tasks) / len(tasks) == pytest.approx(row["average"], abs=0.06), (model, method)
        for method, row in ref["mean_std"].items():
            if all(t in row for t in tasks):
                mean = sum(row[t][0] for t in tasks) / len(tasks)
                assert mean == pytest.approx(row["average"][0], abs=0.06), (model, method)


# ---------------------------------------------------------------------------------------------------------
# significance
# ---------------------------------------------------------------------------------------------------------
def test_bootstrap_recovers_a_planted_difference_and_none_where_there_is_none():
    rng = np.random.default_rng(1)
    n = 400
    base = rng.random((2, n)) < 0.5
    better = base | (rng.random((2, n)) < 0.3)  # planted: about +0.15 on each task
    same = rng.random((2, n)) < 0.5  # independent, same rate
    planted = {"a": better[0].astype(float) - base[0], "b": better[1].astype(float) - base[1]}
    out = bootstrap_mean_differences(planted, iters=1000, seed=0)
    for task in ("a", "b", "average"):
        assert out[task]["significant"] and out[task]["ci_low"] > 0.08 and out[task]["ci_low"] <= out[task]["diff"]
        assert out[task]["diff"] <= out[task]["ci_high"] < 0.25
    assert out["average"]["diff"] == pytest.approx((planted["a"].mean() + planted["b"].mean()) / 2)
    null = bootstrap_mean_differences({"a": same[0].astype(float) - base[0], "b": same[1].astype(float) - base[1]},
                                      iters=1000, seed=0)
    for task in ("a", "b", "average"):
        assert not null[task]["significant"] and null[task]["ci_low"] < 0 < null[task]["ci_high"]
        assert null[task]["p_boot"] > 0.05
    assert bootstrap_mean_differences(planted, iters=1000, seed=0) == out  # seeded: identical
    assert bootstrap_mean_differences(planted, iters=1000, seed=1)["a"]["ci_low"] != out["a"]["ci_low"]


def write_world_samples(path: Path, per_family: dict[str, list[float]], nll: float = 1.0) -> Path:
    """An evaluation JSON (the per-family means) and its per-example file, as the evaluation writes them."""
    metrics = {f: {"answer_acc": float(np.mean(v)), "response_em": float(np.mean(v)),
                   "answer_nll": nll + float(np.mean(v))} for f, v in per_family.items()}
    path.write_text(json.dumps({"metrics": metrics, "average": {
        m: float(np.mean([x[m] for x in metrics.values()])) for m in ("answer_acc", "response_em", "answer_nll")}}))
    with open(path.with_name(path.name.removesuffix(".json") + ".samples.jsonl"), "w") as fh:
        for f, values in per_family.items():
            for i, v in enumerate(values):
                fh.write(json.dumps({"family": f, "doc_id": i, "answer_correct": bool(v), "response_em": bool(v),
                                     "answer_nll": nll + v}) + "\n")
    return path


def test_significance_pairs_examples_and_averages_seeds(tmp_path):
    n = 60
    full = [write_world_samples(tmp_path / f"full_s{s}.json", {"add": [i % 2 for i in range(n)],
                                                                  "max": [0] * n}) for s in (1, 2)]
    # seed 1 gets every add question right, seed 2 three in four: +0.375 on add after averaging the seeds
    rho = [write_world_samples(tmp_path / "rho_r0.6_s1.json", {"add": [1] * n, "max": [0] * n}, nll=0.5),
           write_world_samples(tmp_path / "rho_r0.6_s2.json", {"add": [int(i % 4 > 0) for i in range(n)],
                                                                "max": [0] * n}, nll=0.5)]
    rows = compare_with_full(full + rho, "answer_acc", iters=500)
    by_task = {r["task"]: r for r in rows}
    assert by_task["add"]["diff"] == pytest.approx(0.375) and by_task["add"]["significant"]
    assert by_task["max"]["diff"] == 0.0 and not by_task["max"]["significant"]
    assert by_task["average"]["diff"] == pytest.approx(0.1875)
    assert by_task["add"]["n_seeds"] == 2 and by_task["add"]["n_seeds_full"] == 2
    out = write_significance(full + rho, ["answer_acc", "answer_nll"], tmp_path / "s.csv", tmp_path / "s.md",
                             iters=500)
    nll = next(r for r in out if r["metric"] == "answer_nll" and r["task"] == "max")
    assert nll["diff"] == pytest.approx(-0.5) and nll["significant"]
    md = (tmp_path / "s.md").read_text()
    assert "### answer_nll (lower is better)" in md and re.search(r"\| rho \| 0\.6 \| \+0\.375 \[.*\]\* \|", md)
    # runs evaluated on other examples are refused, naming the file
    write_world_samples(tmp_path / "fixed_r0.6_s1.json", {"add": [1] * (n - 1), "max": [0] * n})
    with pytest.raises(Exception, match=r"fixed_r0\.6_s1\.samples\.jsonl: task add has other examples"):
        compare_with_full(full + [tmp_path / "fixed_r0.6_s1.json"], "answer_acc", iters=100)


def test_significance_against_another_baseline(tmp_path, capsys):
    """--baseline full+warmup: every row minus that row (full itself included), the same pairing; a baseline that
    is not among the evaluations is one line, exit 2."""
    from tokenclean.cli import main

    n = 40
    full = write_world_samples(tmp_path / "full_s1.json", {"add": [0] * n})
    fw = write_world_samples(tmp_path / "full+warmup_s1.json", {"add": [i % 2 for i in range(n)]})
    rho = write_world_samples(tmp_path / "rho_r0.6_s1.json", {"add": [1] * n})
    rows = {r["method"]: r for r in compare_with_full([full, fw, rho], "answer_acc", iters=200, baseline="full+warmup")
            if r["task"] == "average"}
    assert set(rows) == {"full", "rho"}
    assert rows["rho"]["diff"] == pytest.approx(0.5) and rows["full"]["diff"] == pytest.approx(-0.5)
    out = tmp_path / "vs.csv"
    assert main(["significance", str(full), str(rho), "--baseline", "full+warmup", "--out-csv", str(out)]) == 2
    assert "no full+warmup*.json among the evaluations" in capsys.readouterr().err and not out.exists()
    assert main(["significance", str(full), str(fw), str(rho), "--baseline", "full+warmup", "--iters", "100",
                 "--out-csv", str(out), "--out-md", str(tmp_path / "vs.md")]) == 0
    assert "Difference from full+warmup (method − full+warmup)" in (tmp_path / "vs.md").read_text()


def test_significance_of_benchmark_groups_pools_subtasks(tmp_path):
    def bench(name: str, values: dict[str, list[float]]) -> Path:
        path = tmp_path / name
        score = float(np.mean([v for vals in values.values() for v in vals]))
        path.write_text(json.dumps({"metrics": {"mmlu": {"score": score}}, "average": {"score": score}}))
        with open(path.with_name(path.stem + ".samples.jsonl"), "w") as fh:
            for sub, vals in values.items():
                for i, v in enumerate(vals):
                    fh.write(json.dumps({"task": "mmlu", "subtask": sub, "doc_id": i, "score": v}) + "\n")
        return path

    full = bench("full_s42.json", {"mmlu_a": [0.0] * 30, "mmlu_b": [0.0] * 10})
    fixed = bench("fixed_r0.6_s42.json", {"mmlu_a": [1.0] * 30, "mmlu_b": [0.0] * 10})
    (row,) = [r for r in compare_with_full([full, fixed], "score", iters=200) if r["task"] == "mmlu"]
    assert row["diff"] == pytest.approx(0.75) and row["n_examples"] == 40  # size-weighted over subtasks


# ---------------------------------------------------------------------------------------------------------
# figures and the token page
# ---------------------------------------------------------------------------------------------------------
def labelled_pool(tmp_path: Path, tok) -> tuple[Path, Path, Path, list[Path], TokenTable]:
    """A small pool with classes, losses and two masks, written as the workflow would."""
    from tokenclean.data import Message, Record
    from tokenclean.tokenization import tokenize_records

    records = [Record((Message("user", f"Add {i} and {i + 1} ."),
                       Message("assistant", f"Sure ! The answer is {2 * i + 1} . Hope this helps & <ok> .")))
               for i in range(8)]
    table, _ = tokenize_records(records, tok, 128)
    rng = np.random.default_rng(0)
    cls = np.where(table.loss_mask, rng.integers(0, len(TOKEN_CLASSES), table.n_tokens), -1).astype(np.int8)
    table = TokenTable(table.input_ids, table.offsets, table.loss_mask, {"token_class": cls})
    meta = table.save(tmp_path / "pool.tokens.npz", {"tokenizer_fingerprint": "t"})
    base = np.where(table.loss_mask, rng.random(table.n_tokens) * 5, np.nan).astype(np.float32)
    ref = np.where(table.loss_mask, rng.random(table.n_tokens) * 5, np.nan).astype(np.float32)
    fp = {"tokens_fingerprint": meta["fingerprint"]}
    save_array(tmp_path / "base.loss.npy", base, fp)
    save_array(tmp_path / "ref.loss.npy", ref, fp)
    masks = []
    for name, keep in (("full", table.loss_mask.copy()), ("fixed_r0.6", table.loss_mask & (base - ref > 0))):
        save_array(tmp_path / f"{name}.mask.npy", keep, fp)
        masks.append(tmp_path / f"{name}.mask.npy")
    return tmp_path / "pool.tokens.npz", tmp_path / "base.loss.npy", tmp_path / "ref.loss.npy", masks, table


class TokenCounter(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tokens: list[dict[str, str]] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in ("input", "meta", "br"):
            self.stack.append(tag)
        a = dict(attrs)
        if tag == "span" and "tok" in a.get("class", "").split():
            self.tokens.append(a)
            self.text.append("")
        if tag in ("script", "link", "img"):
            self.errors.append(f"external or scripted element <{tag}>")

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "span" and self.tokens and len(self.text) == len(self.tokens):
            self.text[-1] += data


def test_token_page_is_valid_html_with_one_element_per_token(tmp_path, tiny_tokenizer_dir):
    from tokenclean.report.token_view import write_token_view
    from tokenclean.tokenization import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    tokens, base, ref, masks, table = labelled_pool(tmp_path, tok)
    shown = write_token_view(tokens, base, ref, masks, str(tiny_tokenizer_dir), tmp_path / "view.html", n_samples=3)
    assert len(shown) == 3
    page = (tmp_path / "view.html").read_text()
    parser = TokenCounter()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack, parser.errors
    expected = sum(int(table.loss_mask[table.offsets[i]:table.offsets[i + 1]].sum()) for i in shown)
    assert len(parser.tokens) == expected
    # each token element: its class, and kept by full (k0) always, by fixed (k1) exactly where the mask says
    kept_fixed = np.load(masks[1])
    positions = [p for i in shown for p in range(table.offsets[i], table.offsets[i + 1]) if table.loss_mask[p]]
    for attrs, p in zip(parser.tokens, positions):
        classes = attrs["class"].split()
        assert f"c-{TOKEN_CLASSES[table.extras['token_class'][p]]}" in classes and "k0" in classes
        assert ("k1" in classes) == bool(kept_fixed[p])
    # the text is escaped: the response's "& <ok>" survives as text, not markup
    assert "<ok>" not in page and "& <ok>" in "".join(parser.text)
    # every class, novel included, has its underline colour and its place in the legend
    for name in TOKEN_CLASSES:
        assert f".c-{name}{{border-bottom-color:" in page and f"<span class=\"c-{name}\"" in page


def test_token_page_shows_a_sample_with_novel_tokens():
    from tokenclean.report.token_view import pick_samples

    kinds = ["informative", "informative", "corrupted", "garbage", "novel"]  # one kind of token per sample
    # each sample: a prompt token (class -1, outside loss_mask) and two response tokens of its kind
    token_class = np.array([c for k in kinds for c in (-1, TOKEN_CLASSES.index(k), TOKEN_CLASSES.index(k))],
                           dtype=np.int8)
    table = TokenTable(np.zeros(15, dtype=np.int32), np.arange(0, 16, 3), token_class >= 0,
                       {"token_class": token_class})
    assert pick_samples(table, 4) == [0, 2, 3, 4]  # corrupted, garbage, novel, then the first clean one
    assert pick_samples(table, 5) == [0, 1, 2, 3, 4]


def test_every_token_class_has_a_colour():
    from tokenclean.report.figures import CLASS_COLORS

    assert set(CLASS_COLORS) == set(TOKEN_CLASSES) and len(set(CLASS_COLORS.values())) == len(CLASS_COLORS)


def test_score_figure_from_the_pool(tmp_path, tiny_tokenizer_dir):
    from tokenclean.report import figures
    from tokenclean.tokenization import load_tokenizer

    tokens, base, ref, _, _ = labelled_pool(tmp_path, load_tokenizer(str(tiny_tokenizer_dir)))
    figures.plot_scores(tokens, base, ref, tmp_path / "scores.png", ratios=[0.6, 0.3])
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_written(tmp_path):
    from tokenclean.report import figures

    (tmp_path / "table.csv").write_text(
        "method,ratio,n_seeds,average_mean,average_std\nfull,,3,0.48,0.05\nfixed,0.3,3,0.5,0.1\n"
        "fixed,0.6,3,0.6,0.2\nrho,0.3,3,0.7,0.02\nrho,0.6,3,0.88,0.01\n")
    (tmp_path / "q.csv").write_text("mask,kept_informative,kept_boilerplate,kept_corrupted,kept_garbage,kept_novel\n"
                                    "full,1,1,1,1,1\nfixed_r0.6,0.85,0.67,0.15,0.05,0.3\n")
    (tmp_path / "rounds.csv").write_text(
        "method,ratio,round,n_seeds,add_mean,add_std,average_mean,average_std\n"
        "self_evolving,0.6,0,3,0.97,0,0.93,0\nself_evolving,0.6,1,3,0.8,0.1,0.81,0.09\n")
    figures.plot_ratios(tmp_path / "table.csv", tmp_path / "ratios.png")
    figures.plot_kept(tmp_path / "q.csv", tmp_path / "kept.png")
    figures.plot_rounds(tmp_path / "rounds.csv", tmp_path / "rounds.png")
    for name in ("ratios", "kept", "rounds"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratio_variants_sit_together_in_ratio_order(tmp_path):
    acc, nll = {"add": 0.5, "max": 0.5}, {"add": 1.0, "max": 1.0}
    files = [world_eval(tmp_path / name, acc, nll) for name in
             ("base.json", "fixed_r0.6_s1.json", "fixed_r0.3_s1.json", "full_s1.json", "fixed_r0.6_s2.json")]
    rows = write_table(files, tmp_path / "t.csv", tmp_path / "t.md")
    assert [(r["method"], r["ratio"], r["n_seeds"]) for r in rows] == [
        ("base", "", 1), ("fixed", "0.3", 1), ("fixed", "0.6", 2), ("full", "", 1)]
    assert "**" not in (tmp_path / "t.md").read_text()  # every row reads the same: nothing stands out


def test_token_page_shows_an_online_runs_record_beside_the_masks(tmp_path, tiny_tokenizer_dir):
    from tokenclean.report.token_view import write_token_view
    from tokenclean.tokenization import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    tokens, base, ref, masks, table = labelled_pool(tmp_path, tok)
    fingerprint = TokenTable.load(tokens)[1]["fingerprint"]
    rng = np.random.default_rng(2)
    weights = np.where(table.loss_mask, rng.integers(0, 5, table.n_tokens) / 4, np.nan).astype(np.float32)
    record = tmp_path / "models" / "sft" / "rho1_r0.6_s0" / "weights.npy"
    record.parent.mkdir(parents=True)
    save_array(record, weights, {"kind": "weights", "tokens_fingerprint": fingerprint})
    shown = write_token_view(tokens, base, ref, [*masks, record], str(tiny_tokenizer_dir), tmp_path / "view.html",
                             n_samples=3)
    page = (tmp_path / "view.html").read_text()
    parser = TokenCounter()
    parser.feed(page)
    assert ">rho1_r0.6_s0</label>" in page
    positions = [p for i in shown for p in range(table.offsets[i], table.offsets[i + 1]) if table.loss_mask[p]]
    for attrs, p in zip(parser.tokens, positions):  # kept: weighted at least 0.5 on average over the passes
        assert ("k2" in attrs["class"].split()) == bool(weights[p] >= 0.5)
        assert f"rho1_r0.6_s0 ({weights[p]:.2f})" in attrs["title"]
