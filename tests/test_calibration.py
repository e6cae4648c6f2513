"""The world's calibration harness (scripts/calibrate_world.py, issue 13): its config is the default experiment
without the scored rows and plans no token scoring; its summary of a finished variant (rows, passes, targets)
is right on a hand-written table."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("calibrate_world", ROOT / "scripts" / "calibrate_world.py")
cw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cw)

HEADER = ("method,ratio,n_seeds,add_mean,add_std,average_mean,average_std,average_response_em_mean,"
          "average_response_em_std,average_answer_nll_mean,average_answer_nll_std")


def write_variant(results: Path, rows: list[str], evals: dict[str, float], models: dict[str, tuple]) -> None:
    """A finished variant as the workflow leaves it: table.csv, eval/<run>.json, models/.../tokenclean.json."""
    results.mkdir(parents=True)
    (results / "table.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    (results / "eval").mkdir()
    for run, acc in evals.items():
        (results / "eval" / f"{run}.json").write_text(json.dumps({"metrics": {"add": {"answer_acc": acc}},
                                                                  "average": {"answer_acc": acc}}))
    for path, (steps, batch, used, unused) in models.items():
        (results / "models" / path).mkdir(parents=True)
        (results / "models" / path / "tokenclean.json").write_text(json.dumps(
            {"steps": steps, "samples_used": used, "samples_without_selected_tokens": unused, "seconds": 1.5,
             "train_config": {"batch_size": batch}}))


CONFIG = {"seeds": [1, 2], "ratios": [0.6], "methods": ["full", "random", "full+warmup"],
          "world": {"warmup_samples": 100, "pool_samples": 300}}


def test_summary_rows_passes_and_targets(tmp_path):
    """Targets that hold and that fail side by side; passes from what the models recorded (random's table has
    samples without selected tokens: they still count as the row's own data)."""
    results = tmp_path / "calibration-x"
    write_variant(results, [
        "base,,1,0.0,0.0,0.0200,0.0000,0.0100,0.0,7.0,0.0",
        "warmup,,1,0.5,0.0,0.4800,0.0000,0.4800,0.0,1.0,0.0",   # exactly 0.05 below full: holds
        "full,,2,0.5,0.0,0.5300,0.0200,0.5300,0.0,1.0,0.0",
        "random,0.6,2,0.6,0.0,0.6000,0.0400,0.6000,0.0,1.0,0.0",  # 0.07 above full, std 0.04: both fail
        "full+warmup,,2,0.5,0.0,0.5200,0.0100,0.5200,0.0,1.0,0.0",  # below full: fails
    ], {"base": 0.02, "warmup": 0.48, "full_s1": 0.51, "full_s2": 0.55, "random_r0.6_s1": 0.57,
        "random_r0.6_s2": 0.63, "full+warmup_s1": 0.51, "full+warmup_s2": 0.53},
        {"warmup": (50, 8, 100, 0), "sft/full_s1": (150, 8, 300, 0), "sft/full_s2": (150, 8, 300, 0),
         "sft/random_r0.6_s1": (150, 8, 297, 3), "sft/full+warmup_s1": (150, 8, 400, 0)})
    figures = cw.summarise(results, CONFIG)
    rows = figures["rows"]
    assert list(rows) == ["base", "warmup", "full", "random@0.6", "full+warmup"]
    assert rows["full"] == {"mean": 0.53, "std": 0.02, "n_seeds": 2, "response_em": 0.53, "per_seed": [0.51, 0.55],
                            "families": {"add": 0.5}}
    assert rows["random@0.6"]["per_seed"] == [0.57, 0.63] and rows["base"]["per_seed"] == [0.02]
    assert {row: v["passes"] for row, v in figures["passes"].items()} == \
        {"warmup": 4.0, "full": 4.0, "random": 4.0, "full+warmup": 3.0}
    assert figures["passes"]["random"]["samples"] == 300
    assert figures["targets"] == {"base_far_below": True, "warmup_not_above_full": True,
                                  "warmup_at_most_0.05_below_full": True, "random_within_0.05_of_full": False,
                                  "full+warmup_at_least_full": False, "seed_std_at_most_0.03": False,
                                  "truth_keep_informative_at_least_full-0.02": None,
                                  "truth_drop_noisy_at_least_full": None}


@pytest.mark.parametrize("change, target, expected", [
    ({"warmup": 0.54}, "warmup_not_above_full", False),
    ({"warmup": 0.47}, "warmup_at_most_0.05_below_full", False),
    ({"warmup": 0.47}, "warmup_not_above_full", True),
    ({"base": 0.30}, "base_far_below", True),        # 0.2 below the lowest other row (warmup 0.5): holds
    ({"base": 0.3001}, "base_far_below", False),
    ({"random@0.6": 0.48}, "random_within_0.05_of_full", True),
    ({"random@0.6": 0.4799}, "random_within_0.05_of_full", False),
    ({"full+warmup": 0.53}, "full+warmup_at_least_full", True),
    ({"truth_keep_informative": 0.51}, "truth_keep_informative_at_least_full-0.02", True),  # full 0.53 - 0.02
    ({"truth_keep_informative": 0.5099}, "truth_keep_informative_at_least_full-0.02", False),
    ({"truth_drop_noisy": 0.53}, "truth_drop_noisy_at_least_full", True),
    ({"truth_drop_noisy": 0.5299}, "truth_drop_noisy_at_least_full", False),
])
def test_target_bounds(change, target, expected):
    rows = {"base": 0.0, "warmup": 0.5, "full": 0.53, "random@0.6": 0.53, "full+warmup": 0.6,
            "truth_keep_informative": 0.6, "truth_drop_noisy": 0.6}
    rows.update(change)
    table = {label: {"mean": m, "std": 0.0, "n_seeds": 3 if label not in ("base", "warmup") else 1}
             for label, m in rows.items()}
    assert cw.targets(table)[target] is expected


@pytest.mark.parametrize("base, gap, expected", [(0.45, cw.BASE_GAP_MIX, True), (0.4501, cw.BASE_GAP_MIX, False),
                                                 (0.45, cw.BASE_GAP, False)])
def test_base_gap_of_the_paper_mix(base, gap, expected):
    """On the paper's likelihood-heavy mix the base must be 0.05 below every row (the paper: 4.7-8.6 points of
    100), on answer accuracy 0.2; the headline decides which."""
    table = {"base": {"mean": base, "std": 0.0, "n_seeds": 1}, "warmup": {"mean": 0.5, "std": 0.0, "n_seeds": 1},
             "full": {"mean": 0.53, "std": 0.0, "n_seeds": 3}}
    assert cw.targets(table, gap)["base_far_below"] is expected
    assert cw.headline({"world": {"multiple_choice": True}}) == "mix_acc"
    assert cw.headline({"world": {"families": ["add"]}}) == "answer_acc"


def test_targets_unmeasured_without_rows_or_seeds():
    one_seed = {"base": {"mean": 0.0, "std": 0.0, "n_seeds": 1}, "full": {"mean": 0.5, "std": 0.0, "n_seeds": 1}}
    assert cw.targets(one_seed) == {"base_far_below": True, "warmup_not_above_full": None,
                                    "warmup_at_most_0.05_below_full": None, "random_within_0.05_of_full": None,
                                    "full+warmup_at_least_full": None, "seed_std_at_most_0.03": None,
                                    "truth_keep_informative_at_least_full-0.02": None,
                                    "truth_drop_noisy_at_least_full": None}


def test_variant_overrides_round_trip_and_merge():
    pairs = ["sft.train.steps=0", "sft.train.epochs=8", "world.pool_samples=6000", "seeds=[1,2,3]"]
    overrides = cw.nest(cw.parse_pairs(pairs))
    assert cw.flatten(overrides) == pairs
    base = yaml.safe_load((ROOT / "configs" / "calibration.yaml").read_text())
    config = cw.variant_config(base, "eq8", overrides)
    assert config["experiment"] == "calibration-eq8"
    assert config["sft"]["train"]["epochs"] == 8 and config["sft"]["train"]["lr"] == base["sft"]["train"]["lr"]
    assert config["world"]["pool_samples"] == 6000 and config["world"]["entities"] == base["world"]["entities"]
    assert cw.planned_passes(config)["full"] == {"steps": 1500, "passes": 8.0}


@pytest.mark.parametrize("name, overrides, message", [
    ("a b", {}, "use letters"),
    ("x", {"methods": ["full", "rho"]}, "not overridable"),
    ("x", {"experiment": "embedded"}, "not overridable"),
    ("x", {"sft": {"train": {"steps": 100}}}, "set sft.train.steps=0"),  # epochs 4 (the default) and steps
])
def test_bad_variants_are_refused(name, overrides, message):
    base = yaml.safe_load((ROOT / "configs" / "calibration.yaml").read_text())
    with pytest.raises(cw.CalibrationError, match=message):
        cw.variant_config(base, name, overrides)


def test_bad_variant_is_one_line_exit_2(tmp_path, capsys):
    assert cw.main(["--dry-run", "--record", str(tmp_path / "r.md"), "--variant", "x", "sft.train.steps"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibrate_world: error: override 'sft.train.steps'") and err.count("\n") == 1
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("default_path, calibration_path, name", [
    ("config.yaml", "configs/calibration.yaml", "calibration"),
    ("configs/single-template/default.yaml", "configs/single-template/calibration.yaml", "single-template-calibration"),
])
def test_calibration_config_is_the_default_without_scored_rows(default_path, calibration_path, name):
    """Only the name and the methods differ from the world's default experiment: a variant's overrides are its
    whole difference (for both worlds)."""
    default = yaml.safe_load((ROOT / default_path).read_text())
    calibration = yaml.safe_load((ROOT / calibration_path).read_text())
    assert calibration["experiment"] == name
    assert calibration["methods"] == ["full", "random", "truth_drop_noisy", "truth_keep_informative", "full+warmup"]
    assert set(calibration["methods"]) == cw.UNSCORED
    # the draws differ: the calibration record was made on one draw of three seeds
    draws = ("experiment", "methods", "seeds", "replicates", "serial_threads")  # threads: the same bits
    assert {k: v for k, v in calibration.items() if k not in draws} == \
        {k: v for k, v in default.items() if k not in draws}


@pytest.mark.slow  # plans the calibration workflow with Snakemake
def test_calibration_plans_no_token_scoring():
    """The calibration's plan has every trained row and no token_loss job; the same check sees scoring in a
    config with a scored row (so it can fail)."""
    base = yaml.safe_load((ROOT / "configs" / "calibration.yaml").read_text())
    rules = cw.plan(cw.variant_config(base, "plan-test", {}))
    assert rules["sft"] == 5 * 3 and rules["warmup"] and rules["report"] and "token_loss" not in rules
    scored = copy.deepcopy(base) | {"experiment": "calibration-plan-test", "methods": ["full", "rho"]}
    assert "token_loss" in cw.plan(scored)


def test_a_variant_reuses_the_base_of_an_earlier_one_with_the_same_world(tmp_path, monkeypatch):
    """Same world, base model and length: the world and base are copied (times kept), so the workflow does not
    pretrain again; a different world is never matched."""
    monkeypatch.setattr(cw, "ROOT", tmp_path)
    results = tmp_path / "results"
    earlier = {"experiment": "calibration-a", "world": {"seed": 0}, "base_model": {"pretrain": {}}, "max_length": 128}
    (results / "calibration-a" / "models" / "base").mkdir(parents=True)
    (results / "calibration-a" / "models" / "base" / "config.json").write_text("{}")
    (results / "calibration-a" / "world").mkdir()
    (results / "calibration-a" / "world" / "world.json").write_text("{}")
    (results / "calibration-a.config.yaml").write_text(yaml.safe_dump(earlier))
    same = {**earlier, "experiment": "calibration-b", "sft": {"train": {"epochs": 4}}}
    assert cw.reuse_base(same) == "calibration-a"
    copied = results / "calibration-b" / "models" / "base" / "config.json"
    assert copied.read_text() == "{}"
    assert copied.stat().st_mtime == (results / "calibration-a" / "models" / "base" / "config.json").stat().st_mtime
    assert cw.reuse_base(same) is None  # already there: nothing copied again
    other = {**earlier, "experiment": "calibration-c", "world": {"seed": 1}}
    assert cw.reuse_base(other) is None and not (results / "calibration-c").exists()
