"""The method registry: one home for what each method is and for run names; a plug-in reaches the plan and the table."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tokenclean import methods as registry
from tokenclean.artifacts import TokenTable

ROOT = Path(__file__).resolve().parents[1]

def documented_plugin() -> str:
    """The plug-in of docs/add-a-method.md, as the page shows it."""
    page = (ROOT / "docs" / "add-a-method.md").read_text()
    return page.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("name", sorted(registry.METHODS))
@pytest.mark.parametrize("ratio, seed", [(0.6, 1), (0.25, 12), (1.0, 3)])
def test_run_and_mask_names_read_back_as_written(name, ratio, seed):
    method = registry.METHODS[name]
    run = registry.run_name(name, ratio, seed)
    assert registry.parse_run(run) == (name, registry.ratio_tag(ratio) if method.takes_ratio else None, seed)
    assert registry.parse_run(f"{run}.json") == registry.parse_run(run)
    assert registry.ROUND.match(registry.round_name(run, 2)).group("row", "round") == (run, "2")
    if method.kind == "mask":
        mask = registry.mask_name(name, ratio, seed)
        assert registry.parse_mask(mask) == (name, registry.ratio_tag(ratio) if method.takes_ratio else None,
                                             seed if method.seeded else 0)


@pytest.mark.parametrize("name", ["Rho", "my_r1", "x_s2", "a_t3", "two  words", "_lead"])
def test_names_that_run_names_could_not_read_back_are_refused(name):
    with pytest.raises(ValueError, match="method name"):
        registry.register(registry.Method(name, "data", "x"))
    assert name not in registry.METHODS


def test_a_method_is_registered_once_and_each_kind_is_whole():
    with pytest.raises(ValueError, match="twice"):
        registry.register(registry.Method("full", "data", "again"))
    with pytest.raises(ValueError, match="has a rule"):
        registry.register(registry.Method("no_rule", "mask", "x"))
    with pytest.raises(ValueError, match="needs"):
        registry.register(registry.Method("needs_more", "data", "x", needs=("gold_labels",)))


def test_the_table_of_built_in_methods():
    kinds = {name: m.kind for name, m in registry.METHODS.items() if not name.startswith("every_")}
    assert kinds == {"full": "mask", "random": "mask", "rho": "mask", "fixed": "mask", "truth_drop_noisy": "mask",
                     "truth_keep_informative": "mask", "full+warmup": "data", "self_evolving": "chain",
                     "rho1": "online", "sstoken": "online", "dft": "online", "eaft": "online"}
    from tokenclean.online import ONLINE_METHODS

    for m in registry.METHODS.values():
        if m.kind == "online":
            assert m.online in ONLINE_METHODS
            needs = {"ref_loss" if a == "ref_loss" else "base_loss" for a in ONLINE_METHODS[m.online].arrays}
            assert set(m.needs) == needs, m.name


@pytest.mark.slow  # starts Snakemake (a plan)
def test_a_plugin_method_reaches_select_the_plan_and_the_table(tmp_path):
    plugin = tmp_path / "every_other.py"
    plugin.write_text(documented_plugin())
    env = {**os.environ, registry.PLUGINS_ENV: str(plugin)}
    # tokenclean select, with the plug-in named by the environment (as the workflow's jobs get it)
    table = TokenTable(np.arange(12) % 7, np.array([0, 5, 12]),
                       np.array([False, True, True, True, True, False] + [True] * 6))
    tokens = tmp_path / "pool.tokens.npz"
    table.save(tokens, {})
    out = tmp_path / "every_other.mask.npy"
    proc = subprocess.run([sys.executable, "-m", "tokenclean.cli", "select", "--method", "every_other",
                           "--tokens", str(tokens), "--out", str(out)],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = np.zeros(12, dtype=bool)  # brute force: the 1st, 3rd, ... response token of each sample
    for a, b in ((0, 5), (5, 12)):
        for j, p in enumerate(q for q in range(a, b) if table.loss_mask[q]):
            expected[p] = j % 2 == 0
    assert np.load(out).tolist() == expected.tolist()
    # the plan: a select job for its mask and one SFT row per seed
    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    config.update(plugins=[str(plugin)], methods=["full", "every_other"], seeds=[1, 2])
    (tmp_path / "plugin.yaml").write_text(yaml.safe_dump(config))
    from tests.snakemake_plan import plan

    made = {(j["rule"], out) for j in plan(tmp_path, tmp_path / "plugin.yaml")["jobs"] for out in j["output"]}
    assert ("select", "results/smoke/masks/every_other.mask.npy") in made
    assert {("sft", f"results/smoke/models/sft/every_other_s{s}") for s in (1, 2)} <= made
    # the table: its evaluations become a row of their own
    from tokenclean.report.table import collect

    evals = []
    for run, acc in (("full_s1", 0.5), ("full_s2", 0.7), ("every_other_s1", 0.2), ("every_other_s2", 0.4)):
        path = tmp_path / f"{run}.json"
        path.write_text(json.dumps({"metrics": {"add": {"answer_acc": acc}}, "average": {"answer_acc": acc}}))
        evals.append(path)
    registry.load_plugins([str(plugin)])
    _, rows = collect(evals)
    row = next(r for r in rows if r["method"] == "every_other")
    assert row["n_seeds"] == 2 and row["average_mean"] == pytest.approx(0.3)


def test_an_unknown_method_or_plugin_stops_the_config_with_one_line(tmp_path):
    from tokenclean.config import ConfigError, check_config

    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    with pytest.raises(ConfigError, match=r"methods\[1\]: unknown method 'nope'"):
        check_config({**config, "methods": ["full", "nope"]}, [])
    with pytest.raises(ConfigError, match=r"plugins\[0\]: .*not found"):
        check_config({**config, "plugins": [str(tmp_path / "missing.py")]}, [])


@pytest.mark.parametrize("default_path, methods_path", [
    ("config.yaml", "configs/methods.yaml"),
    ("configs/single-template/default.yaml", "configs/single-template/methods.yaml"),
])
def test_the_comparison_config_is_the_default_experiment_with_every_method_as_a_row(default_path, methods_path):
    """For each world: its default experiment with every method as a row."""
    default = yaml.safe_load((ROOT / default_path).read_text())
    methods = yaml.safe_load((ROOT / methods_path).read_text())
    # the one-draw comparison keeps its three seeds; threads give the same bits at the pin
    draws = ("experiment", "methods", "seeds", "replicates", "serial_threads")
    assert {k: v for k, v in methods.items() if k not in draws} == {k: v for k, v in default.items() if k not in draws}
    assert methods["methods"] == list(registry.METHODS)[:len(methods["methods"])]
    assert set(methods["methods"]) == {n for n in registry.METHODS if not n.startswith("every_")}


@pytest.mark.parametrize("methods_path, study_path", [
    ("configs/methods.yaml", "configs/study.yaml"),
    ("configs/single-template/methods.yaml", "configs/single-template/study.yaml"),
])
def test_each_worlds_study_is_its_comparison_config_drawn_five_times(methods_path, study_path):
    """A study is its world's every-method config unchanged (the pre-registered design), with at least five
    replicates of one seed each: only the draws differ."""
    from tokenclean.config import check_config

    methods = yaml.safe_load((ROOT / methods_path).read_text())
    study = yaml.safe_load((ROOT / study_path).read_text())
    assert {k: v for k, v in study.items() if k not in ("experiment", "replicates", "seeds")} == \
        {k: v for k, v in methods.items() if k not in ("experiment", "seeds")}
    assert study["replicates"] >= 5 and study["seeds"] == [1] and study["experiment"] != methods["experiment"]
    assert check_config(study, [study_path])["replicates"] == study["replicates"]


@pytest.mark.slow  # starts Snakemake (a plan)
def test_online_rows_reach_the_cleaning_quality_table_and_the_token_view_beside_the_masks(tmp_path):
    from tests.snakemake_plan import plan

    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    config.update(methods=["full", "rho1", "dft"], seeds=[0, 1])
    (tmp_path / "online.yaml").write_text(yaml.safe_dump(config))
    jobs = {job["rule"]: job for job in plan(tmp_path, tmp_path / "online.yaml")["jobs"]}
    R = f"{config['results_dir']}/{config['experiment']}"
    expected = [f"{R}/masks/full.mask.npy"] + [f"{R}/models/sft/{run}/weights.npy" for run in
                                                ("rho1_r0.6_s0", "rho1_r0.6_s1", "dft_s0", "dft_s1")]
    assert jobs["cleaning_quality"]["params"]["selections"].split() == expected
    assert jobs["token_view"]["params"]["selections"].split() == expected


@pytest.mark.slow  # starts Snakemake (a plan)
def test_the_documented_method_params_are_a_valid_config_that_reaches_the_training_commands(tmp_path):
    """docs/methods.md's `method_params` example, on the comparison config, passes the check and plans."""
    from tests.snakemake_plan import plan
    from tokenclean.config import check_config

    page = (ROOT / "docs" / "methods.md").read_text()
    example = yaml.safe_load(next(b for b in re.findall(r"^```yaml\n(.*?)^```", page, re.S | re.M)
                                  if "method_params" in b))
    config = {**yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text()), **example}
    check_config(config, [])
    (tmp_path / "example.yaml").write_text(yaml.safe_dump(config))
    jobs = [j for j in plan(tmp_path, tmp_path / "example.yaml")["jobs"] if j["rule"] == "sft"]
    for method, params in example["method_params"].items():
        runs = [j for j in jobs if f"/{method}_" in j["output"][0]]
        assert runs and all(all(f'"{k}": {v}' in j["params"]["online"] for k, v in params.items()) for j in runs)
