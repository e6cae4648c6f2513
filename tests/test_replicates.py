"""Replicates: the layout of independent draws, the table over them, and the nested bootstrap that compares rows
over replicates, then seeds, then questions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tokenclean import replicates
from tokenclean.config import ConfigError, check_config
from tokenclean.report.significance import compare_with_full, nested_bootstrap, write_significance
from tokenclean.report.table import write_table

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# layout and seeds
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1, 2, 10, 123])
def test_a_replicate_suffix_reads_back_as_its_index(index):
    import re

    rep = replicates.suffix(index)
    assert replicates.index(rep) == index and re.fullmatch(replicates.WILDCARD, rep)
    assert replicates.of_path(f"results/x{rep}/eval/full_s1.json") == index
    assert replicates.of_path(Path(f"/abs/results/x{rep}/models/sft/full_s1")) == index


def test_paths_outside_a_replicate_folder_are_replicate_0_and_bad_suffixes_are_refused():
    assert replicates.of_path("results/x/eval/full_s1.json") == 0
    assert replicates.of_path("results/replicates/eval/full_s1.json") == 0  # a folder merely named so
    assert replicates.of_path("results/x/replicates/r0/eval/a.json") == 0  # r0 is never a folder
    for bad in ("/replicates/r0", "/replicates/r01", "replicates/r1", "/replicates/x"):
        with pytest.raises(ValueError):
            replicates.index(bad)
    with pytest.raises(ValueError):
        replicates.suffix(-1)


def test_replicate_r_moves_each_seed_by_r_and_replicate_0_changes_nothing():
    world = {"seed": 3, "pool_samples": 10}
    assert replicates.seeded(world, 0) is world
    assert replicates.seeded(world, 2) == {"seed": 5, "pool_samples": 10} and world["seed"] == 3
    assert replicates.seeded({}, 4) == {"seed": 4}  # a missing seed is the default 0
    recipe = {"train": {"seed": 7, "lr": 0.1}}
    assert replicates.seeded_train(recipe, 0) is recipe
    assert replicates.seeded_train(recipe, 1) == {"train": {"seed": 8, "lr": 0.1}}


def test_replicates_need_an_embedded_world():
    import yaml

    paper = yaml.safe_load((ROOT / "configs" / "paper" / "llama-3.2-3b.yaml").read_text())
    paper["replicates"] = 3
    with pytest.raises(ConfigError, match="replicates: 3 draws need an embedded world"):
        check_config(paper, ["paper.yaml"])
    smoke = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    assert check_config(smoke)["replicates"] == 1  # the schema's default: one draw, the layout of before
    smoke["replicates"] = 0
    with pytest.raises(ConfigError, match="replicates"):
        check_config(smoke)


# ---------------------------------------------------------------------------------------------------------
# the nested bootstrap
# ---------------------------------------------------------------------------------------------------------
def constant_replicates(diffs: list[float], n_q: int = 20, n_seeds: int = 1) -> list[dict]:
    """Replicates whose seeds and questions all carry the same difference: only the replicate level varies."""
    return [{"t": (np.full((n_seeds, n_q), 0.5 + d), np.full((n_seeds, n_q), 0.5))} for d in diffs]


def test_with_no_variance_inside_replicates_the_interval_is_scipys_bootstrap_over_replicates():
    from scipy.stats import bootstrap

    diffs = [0.08, -0.02, 0.05, 0.11, 0.01, 0.04, -0.03]
    ours = nested_bootstrap(constant_replicates(diffs), iters=20000, seed=0)["t"]
    theirs = bootstrap((np.array(diffs),), np.mean, n_resamples=20000, method="percentile",
                       random_state=np.random.default_rng(1)).confidence_interval
    assert ours["diff"] == pytest.approx(np.mean(diffs))
    assert ours["ci_low"] == pytest.approx(theirs.low, abs=0.004)
    assert ours["ci_high"] == pytest.approx(theirs.high, abs=0.004)


def test_one_replicate_carrying_the_whole_effect_is_not_significant():
    """Over questions and seeds alone +0.3 in one draw would be certain; over five draws it is one in five."""
    out = nested_bootstrap(constant_replicates([0.3, 0.0, 0.0, 0.0, 0.0]), iters=2000, seed=0)["t"]
    assert out["diff"] == pytest.approx(0.06) and out["ci_low"] == 0.0 and not out["significant"]
    assert out["p_improve"] == pytest.approx((1 + 0.5 * 4) / 5) and out["p_sign"] == 1.0
    single = nested_bootstrap(constant_replicates([0.3]), iters=2000, seed=0)["t"]
    assert single["significant"] and single["n_replicates"] == 1  # one draw: certain, and labelled as one draw


def test_a_consistent_effect_over_replicates_is_significant_with_every_replicate_ahead():
    rng = np.random.default_rng(0)
    reps = []
    for _ in range(6):
        base = (rng.random((2, 200)) < 0.5).astype(float)
        row = np.maximum(base, (rng.random((2, 200)) < 0.3).astype(float))  # about +0.15 in every seed
        reps.append({"a": (row, base), "b": (base.copy(), base)})
    out = nested_bootstrap(reps, iters=1000, seed=0)
    assert out["a"]["significant"] and out["a"]["ci_low"] > 0.08 and out["a"]["p_improve"] == 1.0
    assert out["a"]["p_sign"] == pytest.approx(2 / 64)  # six of six: the sign test's two-sided p
    assert out["b"]["diff"] == 0.0 and not out["b"]["significant"]
    assert out["average"]["diff"] == pytest.approx(out["a"]["diff"] / 2)
    assert nested_bootstrap(reps, iters=1000, seed=0) == out  # seeded: identical


def test_seeds_are_resampled_so_one_lucky_seed_is_not_a_verdict():
    lucky = {"t": (np.array([[1.0] * 50, [0.0] * 50]), np.array([[0.0] * 50, [0.0] * 50]))}
    out = nested_bootstrap([lucky], iters=2000, seed=0)["t"]
    assert out["diff"] == pytest.approx(0.5) and out["ci_low"] == 0.0 and not out["significant"]


def test_an_unpaired_baseline_with_other_seeds_is_compared_by_its_own_draw():
    """The base model (one run, no seed) against full (three seeds): the seeds are drawn on full's side only."""
    rep = {"t": (np.full((1, 30), 0.2), np.array([[0.6] * 30, [0.7] * 30, [0.8] * 30]))}
    out = nested_bootstrap([rep], iters=2000, seed=0)["t"]
    assert out["diff"] == pytest.approx(-0.5) and out["significant"]
    assert -0.6 - 1e-9 <= out["ci_low"] < out["ci_high"] <= -0.4 + 1e-9


def test_malformed_replicates_are_refused():
    with pytest.raises(ValueError, match="no replicate"):
        nested_bootstrap([])
    with pytest.raises(ValueError, match="tasks"):
        nested_bootstrap([{"a": (np.ones((1, 3)), np.ones((1, 3)))}, {"b": (np.ones((1, 3)), np.ones((1, 3)))}])
    with pytest.raises(ValueError, match="same questions"):
        nested_bootstrap([{"a": (np.ones((1, 3)), np.ones((1, 4)))}])


# ---------------------------------------------------------------------------------------------------------
# evaluations laid out in replicates: the table and significance
# ---------------------------------------------------------------------------------------------------------
def write_eval(path: Path, values: list[float]) -> Path:
    """An evaluation of one task `add` (answer accuracy) and its per-question file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    acc = float(np.mean(values))
    path.write_text(json.dumps({"metrics": {"add": {"answer_acc": acc}}, "average": {"answer_acc": acc}}))
    with open(path.with_name(path.name.removesuffix(".json") + ".samples.jsonl"), "w") as fh:
        for i, v in enumerate(values):
            fh.write(json.dumps({"family": "add", "doc_id": i, "answer_correct": bool(v), "response_em": bool(v),
                                 "answer_nll": 1.0}) + "\n")
    return path


def replicate_evals(tmp_path: Path, accuracy: dict[str, list[list[float]]]) -> list[Path]:
    """``accuracy[run][replicate][seed]``: evaluations of 20 questions in the experiment's replicate layout."""
    files = []
    for method, per_rep in accuracy.items():
        for r, per_seed in enumerate(per_rep):
            for s, acc in enumerate(per_seed, 1):
                name = f"{method}.json" if method in ("base", "warmup") else f"{method}_s{s}.json"
                values = [1.0 if i < round(acc * 20) else 0.0 for i in range(20)]
                files.append(write_eval(tmp_path / f"exp{replicates.suffix(r)}" / "eval" / name, values))
    return files


def test_the_table_over_replicates_is_the_mean_and_spread_of_each_replicates_seed_mean(tmp_path):
    files = replicate_evals(tmp_path, {"base": [[0.5], [0.3], [0.4]],
                                       "full": [[0.6, 0.8], [0.5, 0.5], [0.7, 0.9]]})
    rows = {r["method"]: r for r in write_table(files, tmp_path / "t.csv", tmp_path / "t.md", metric="answer_acc")}
    assert rows["full"]["n_replicates"] == 3 and rows["full"]["n_seeds"] == 2
    assert rows["full"]["average_mean"] == pytest.approx(np.mean([0.7, 0.5, 0.8]))
    assert rows["full"]["average_std"] == pytest.approx(np.std([0.7, 0.5, 0.8], ddof=1))
    assert rows["base"]["average_std"] == pytest.approx(np.std([0.5, 0.3, 0.4], ddof=1))
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("3 draws (replicates) of the world, base and warm-up model, 2 SFT seeds each.")
    assert "mean ± std over 3 replicates" in md
    header = (tmp_path / "t.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["method", "ratio", "n_replicates", "n_seeds"]


def test_one_replicate_is_labelled_as_one_draw(tmp_path):
    files = replicate_evals(tmp_path, {"full": [[0.6, 0.8]], "rho": [[0.7, 0.9]]})
    write_table(files, tmp_path / "t.csv", tmp_path / "t.md", metric="answer_acc")
    assert (tmp_path / "t.md").read_text().startswith("One draw (one replicate)")


def test_a_row_missing_from_a_replicate_is_refused_naming_it(tmp_path):
    files = replicate_evals(tmp_path, {"full": [[0.6], [0.5]], "rho": [[0.7]]})
    with pytest.raises(ValueError, match="rho: evaluated in 1 replicates, other rows in 2"):
        write_table(files, tmp_path / "t.csv", metric="answer_acc")
    with pytest.raises(ValueError, match="rho and full were not evaluated in the same replicates"):
        compare_with_full(files, "answer_acc", iters=100)
    assert not (tmp_path / "t.csv").exists()


def test_significance_over_replicates_against_both_baselines(tmp_path):
    files = replicate_evals(tmp_path, {"full": [[0.5], [0.6], [0.4], [0.5], [0.55]],
                                       "full+warmup": [[0.6], [0.65], [0.5], [0.6], [0.6]],
                                       "fixed": [[0.65], [0.7], [0.55], [0.6], [0.7]]})
    rows = write_significance(files, ["answer_acc"], tmp_path / "s.csv", tmp_path / "s.md", iters=500,
                              baseline=["full", "full+warmup"])
    got = {(r["method"], r["baseline"]): r for r in rows if r["task"] == "average"}
    assert got[("fixed", "full")]["n_replicates"] == 5 and got[("fixed", "full")]["p_improve"] == 1.0
    assert got[("fixed", "full")]["diff"] == pytest.approx(0.13) and got[("fixed", "full")]["significant"]
    assert got[("fixed", "full+warmup")]["diff"] == pytest.approx(0.05)
    assert got[("fixed", "full+warmup")]["p_improve"] == pytest.approx((4 + 0.5 * 1) / 5)
    md = (tmp_path / "s.md").read_text()
    assert "over replicates (independent draws" in md and "## Difference from full+warmup" in md
    assert "P(better)" in md
    header = (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    assert {"baseline", "n_replicates", "p_improve", "p_sign"} <= set(header)
