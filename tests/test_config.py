"""Configs as users write them: `--configfile X` is exactly X (plus the schema's defaults) from any directory, a
config's key order changes no job, a problem is one line naming the file and the key, the user's Hugging Face
settings are left alone, and the data rule re-runs when its local files change."""
from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.snakemake_plan import plan, without_profile_notice
from tokenclean.config import ConfigError, check_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
PAPER = ROOT / "configs" / "paper" / "llama-3.2-3b.yaml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def snakemake(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ}, timeout=300, check=False)


def job_params(p: dict) -> dict[str, dict[str, str]]:
    """Each job's params, by its first output (the rule `all` has none and no params)."""
    return {(j["output"] or [j["rule"]])[0]: j["params"] for j in p["jobs"]}


# ---------------------------------------------------------------------------------------------------------
# --configfile X is X
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # starts Snakemake
def test_paper_config_plans_from_the_repository_root():
    """The README's command, as a user types it: config.yaml (embedded) must not be merged into it."""
    proc = snakemake(ROOT, "-n", "--quiet", "--configfile", "configs/paper/llama-3.2-3b.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # starts Snakemake
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_configfile_is_exactly_that_file(where, tmp_path):
    """config.yaml's settings (e.g. world.entities, serial_threads) must not leak into a run of smoke.yaml."""
    work = ROOT if where == "root" else tmp_path
    p = plan(work, SMOKE)
    params = job_params(p)
    world = json.loads(shlex.split(params["results/smoke/world"]["world"])[0])
    assert world == load(SMOKE)["world"]
    assert not {o for o in params if o.startswith("results/embedded")}


@pytest.mark.slow  # starts Snakemake
def test_without_a_configfile_config_yaml_runs(tmp_path):
    params = job_params(plan(tmp_path))
    assert json.loads(shlex.split(params["results/embedded/world"]["world"])[0]) == load(ROOT / "config.yaml")["world"]


def test_schema_defaults_are_filled():
    cfg = load(SMOKE)
    del cfg["results_dir"]
    cfg["report"] = {}
    check_config(cfg)
    assert cfg["results_dir"] == "results" and cfg["report"] == {"bootstrap_iters": 2000, "token_view_samples": 12}
    assert cfg["base_model"]["trust_remote_code"] is False


# ---------------------------------------------------------------------------------------------------------
# key order changes nothing
# ---------------------------------------------------------------------------------------------------------
def reorder(node, reverse: bool):
    """The same config with every mapping's keys sorted (or reversed); lists keep their order."""
    if isinstance(node, dict):
        keys = sorted(node) if not reverse else list(reversed(node))
        return {k: reorder(node[k], reverse) for k in keys}
    if isinstance(node, list):
        return [reorder(v, reverse) for v in node]
    return node


@pytest.mark.slow  # starts Snakemake
@pytest.mark.parametrize("config", [SMOKE, PAPER], ids=["smoke", "paper"])
@pytest.mark.parametrize("reverse", [False, True], ids=["sorted", "reversed"])
def test_key_order_of_the_config_changes_no_job_parameter(config, reverse, tmp_path):
    moved = tmp_path / "moved.yaml"
    moved.write_text(yaml.safe_dump(reorder(load(config), reverse), sort_keys=False))
    assert list(load(moved)) != list(load(config))
    before, after = job_params(plan(tmp_path / "a", config)), job_params(plan(tmp_path / "b", moved))
    assert before.keys() == after.keys()
    changed = {out: (before[out], after[out]) for out in before if before[out] != after[out]}
    assert not changed, next(iter(changed.items()))


# ---------------------------------------------------------------------------------------------------------
# one-line errors
# ---------------------------------------------------------------------------------------------------------
def smoke_with(**changes) -> dict:
    cfg = copy.deepcopy(load(SMOKE))
    cfg.update(changes)
    return cfg


BAD = {
    "unknown key": (smoke_with(sft={"train": {"steps": 5, "lrr": 0.1}}), "sft.train.lrr: unknown key"),
    "unknown top key": (smoke_with(ratio=[0.6]), "ratio: unknown key"),
    "wrong type": (smoke_with(sft={"train": {"lr": "fast"}}), "sft.train.lr: 'fast' is not of type 'number'"),
    "ratio out of range": (smoke_with(ratios=[0.6, 2]), "ratios[1]: 2 is greater than the maximum of 1"),
    "two ratios, one run name": (smoke_with(ratios=[0.6, 0.6000001]),
                                 "ratios[1]: 0.6 and 0.6000001 would both be the run name r0.6"),
    "inexact ratio": (smoke_with(ratios=[0.1234567]), "ratios[0]: 0.1234567 would be written as r0.123457"),
    "experiment ..": (smoke_with(experiment=".."), "experiment: '..' does not match"),
    "experiment .": (smoke_with(experiment="."), "experiment: '.' does not match"),
    "hidden experiment": (smoke_with(experiment=".x"), "experiment: '.x' does not match"),
    "experiment with a slash": (smoke_with(experiment="a/b"), "experiment: 'a/b' does not match"),
    "world and data": (smoke_with(data={"pool": {"path": "p.jsonl"}, "warmup": {"first_of_pool": 1}}),
                       "give only one of world | data, not world and data"),
    "missing key": ({k: v for k, v in load(SMOKE).items() if k != "sft"}, "missing key 'sft'"),
    "sharding without GPUs to shard across": (smoke_with(hardware={"sharding": "fsdp"}),
                                               "hardware.sharding: fsdp needs hardware.gpus > 1"),
    "sharding a LoRA run": (smoke_with(hardware={"gpus": 2, "sharding": "fsdp"},
                                       sft={"train": {"steps": 5, "lora_r": 8}}),
                            "hardware.sharding: fsdp with sft.train.lora_r > 0 is not supported yet"),
    "an unknown sharding": (smoke_with(hardware={"gpus": 2, "sharding": "zero3"}),
                            "hardware.sharding: 'zero3' is not one of"),
    "fewer chunks than rounds": (smoke_with(self_evolving={"rounds": 3, "chunks": 2}),
                                 "self_evolving.chunks: 2 must be at least self_evolving.rounds (3)"),
    "the old oracle method": (smoke_with(methods=["full", "oracle"]),
                              "methods[1]: oracle was replaced by two ground-truth rows, truth_drop_noisy (every "
                              "response token but the corrupted and garbage ones) and truth_keep_informative"),
    "an unknown method": (smoke_with(methods=["full", "orcale"]),
                          "methods[1]: unknown method 'orcale' (known: full, random, rho"),
}
# method_params: checked before any job, named by the config's key (not the trainer's --online-params)
METHOD_PARAMS_BAD = {
    "params of an unknown method": (smoke_with(method_params={"eatf": {"alpha": 0.5}}),
                                    "method_params.eatf: unknown method 'eatf' (known: full, random, rho"),
    "params of a method not in the table": (smoke_with(method_params={"eaft": {"alpha": 0.5}}),
                                            "method_params.eaft: eaft is not listed under methods"),
    "params of a mask method": (smoke_with(method_params={"rho": {"ratio": 0.5}}),
                                "method_params.rho: rho takes no parameters"),
    "a ratio for a method without one": (smoke_with(methods=["full", "dft"], method_params={"dft": {"ratio": 0.5}}),
                                         "method_params.dft.ratio: dft takes no ratio"),
    "a ratio for a method with ratios": (smoke_with(methods=["full", "rho1"], method_params={"rho1": {"ratio": 0.5}}),
                                         "method_params.rho1.ratio: the ratio of rho1's runs comes from ratios"),
    "an unknown parameter": (smoke_with(methods=["full", "eaft"], method_params={"eaft": {"beta": 1}}),
                             "method_params.eaft.beta: unknown parameter of online method eaft "
                             "(known: alpha, top_k, scale)"),
    "a parameter out of range": (smoke_with(methods=["full", "sstoken"], method_params={"sstoken": {"gamma": 1.5}}),
                                 "method_params.sstoken.gamma: gamma must be in [0, 1], got 1.5"),
    "a parameter of the wrong type": (smoke_with(methods=["full", "eaft"], method_params={"eaft": {"top_k": 2.5}}),
                                      "method_params.eaft.top_k: must be a int, got 2.5"),
    "parameters that are not a mapping": (smoke_with(methods=["full", "eaft"], method_params={"eaft": 0.5}),
                                          "method_params.eaft: 0.5 is not of type 'object'"),
}
BAD.update(METHOD_PARAMS_BAD)


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_config_is_refused_with_one_line_naming_the_key(case, tmp_path, monkeypatch):
    cfg, expected = BAD[case]
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        check_config(copy.deepcopy(cfg), [path])
    assert str(e.value).startswith(f"x.yaml: {expected}") and "\n" not in str(e.value), str(e.value)


def test_sharded_full_fine_tuning_passes_the_check_and_sharding_defaults_to_none():
    cfg = check_config(smoke_with(hardware={"gpus": 2}))
    assert cfg["hardware"]["sharding"] == "none"
    assert check_config(smoke_with(hardware={"gpus": 2, "sharding": "fsdp"}))["hardware"]["sharding"] == "fsdp"


def test_non_embedded_experiment_needs_benchmarks():
    cfg = load(PAPER)
    del cfg["evaluation"]["benchmarks"]
    with pytest.raises(ConfigError, match=r"^config: evaluation: set evaluation.benchmarks"):
        check_config(cfg)


@pytest.mark.parametrize("method", ["truth_drop_noisy", "truth_keep_informative"])
def test_ground_truth_methods_need_the_embedded_world(method):
    cfg = load(PAPER)
    cfg["methods"] = ["full", method]
    with pytest.raises(ConfigError, match=rf"^config: methods\[1\]: {method} reads the ground-truth token classes, "
                                          "which only the embedded world has$"):
        check_config(cfg)


def test_the_smoke_config_runs_both_ground_truth_methods():
    methods = check_config(load(SMOKE))["methods"]
    assert "truth_drop_noisy" in methods and "truth_keep_informative" in methods and "oracle" not in methods


def test_error_names_the_file_that_sets_the_key(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("sft: {train: {lrr: 1}}\n")
    cfg = copy.deepcopy(load(SMOKE))
    cfg["sft"]["train"]["lrr"] = 1
    with pytest.raises(ConfigError, match=r"extra\.yaml: sft\.train\.lrr: unknown key$"):
        check_config(cfg, [SMOKE, extra])


@pytest.mark.slow  # starts Snakemake
@pytest.mark.parametrize("case", ["unknown key", "two ratios, one run name", "experiment ..", "the old oracle method"])
def test_snakemake_prints_the_config_error_in_one_line_before_any_job(case, tmp_path):
    cfg, expected = BAD[case]
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-s", str(ROOT / "Snakefile"), "--cores", "1", "--configfile", "x.yaml")
    err = without_profile_notice(proc.stderr)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [err.strip()], proc.stderr[-3000:]
    assert err.startswith(f"config error: x.yaml: {expected}"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and not (tmp_path / "results").exists()


@pytest.mark.slow  # starts Snakemake
@pytest.mark.parametrize("case", METHOD_PARAMS_BAD, ids=list(METHOD_PARAMS_BAD))
def test_a_bad_method_parameter_stops_the_dry_run_in_one_line(case, tmp_path):
    """`snakemake -n` refuses it while planning, naming the file and the config key, before any job."""
    cfg, expected = METHOD_PARAMS_BAD[case]
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-s", str(ROOT / "Snakefile"), "-n", "--cores", "1", "--configfile", "x.yaml")
    err = without_profile_notice(proc.stderr)
    assert proc.returncode == 2 and err.strip().splitlines() == [err.strip()], proc.stderr[-3000:]
    assert err.startswith(f"config error: x.yaml: {expected}"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and not (tmp_path / "results").exists()


def test_method_params_default_to_none_and_valid_ones_pass():
    cfg = smoke_with(methods=["full", "rho1", "sstoken", "dft", "eaft"])
    assert check_config(copy.deepcopy(cfg))["method_params"] == {}
    cfg["method_params"] = {"eaft": {"alpha": 0.5, "top_k": 10}, "sstoken": {"gamma": 0.3, "attention_only": 0},
                            "dft": {}}
    assert check_config(copy.deepcopy(cfg))["method_params"] == cfg["method_params"]


@pytest.mark.slow  # starts Snakemake
def test_method_params_reach_the_training_command_of_each_run_of_the_method(tmp_path):
    """The plan's sft jobs: the configured parameters, and the run's ratio for a method that takes one, become
    `--online-params`; a method without any gets none (so its job, and whether it re-runs, is as before)."""
    cfg = smoke_with(methods=["full", "rho1", "sstoken", "dft", "eaft"], ratios=[0.5], seeds=[1, 2],
                     method_params={"eaft": {"alpha": 0.5}, "sstoken": {"gamma": 0.3}})
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    params = job_params(plan(tmp_path, tmp_path / "x.yaml"))

    def online(run: str) -> list[str]:
        return shlex.split(params[f"results/smoke/models/sft/{run}"]["online"])

    for seed in (1, 2):
        flags = online(f"eaft_s{seed}")
        assert flags[:2] == ["--online", "eaft"] and json.loads(flags[flags.index("--online-params") + 1]) == \
            {"alpha": 0.5}
        flags = online(f"sstoken_r0.5_s{seed}")
        assert json.loads(flags[flags.index("--online-params") + 1]) == {"gamma": 0.3, "ratio": 0.5}
        flags = online(f"rho1_r0.5_s{seed}")
        assert json.loads(flags[flags.index("--online-params") + 1]) == {"ratio": 0.5}
        assert online(f"dft_s{seed}") == ["--online", "dft"]


# ---------------------------------------------------------------------------------------------------------
# the user's Hugging Face settings
# ---------------------------------------------------------------------------------------------------------
HF_VARS = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.mark.slow  # starts Snakemake
def test_planning_a_hub_experiment_leaves_hf_settings_alone(tmp_path):
    """HF_HOME holds `huggingface-cli login`'s token: pointing it elsewhere makes gated models fail with 401."""
    env = {k: v for k, v in os.environ.items() if k not in HF_VARS}
    environ = plan(tmp_path, PAPER, env=env)["environ"]
    assert not {k: environ[k] for k in HF_VARS if k in environ}
    home = str(tmp_path / "my-hf-home")
    assert plan(tmp_path, PAPER, env={**env, "HF_HOME": home})["environ"]["HF_HOME"] == home


@pytest.mark.slow  # starts Snakemake
def test_the_embedded_experiment_is_offline_by_construction(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in HF_VARS}
    environ = plan(tmp_path, SMOKE, env=env)["environ"]
    assert [environ.get(k) for k in HF_VARS[1:]] == ["1", "1", "1"] and "HF_HOME" not in environ


# ---------------------------------------------------------------------------------------------------------
# the data rule's local files are its inputs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # starts Snakemake
def test_editing_a_local_data_file_reruns_the_data_rule(tmp_path, tiny_model_dir):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    cfg = {"experiment": "local", "max_length": 64, "base_model": {"name": str(tiny_model_dir)},
           "data": {"pool": {"path": "pool.jsonl"}, "warmup": {"first_of_pool": 2}},
           "sft": {"train": {"steps": 1}}, "methods": ["full"], "ratios": [0.6], "seeds": [1],
           "evaluation": {"benchmarks": [{"task": "boolq"}]}}
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-s", str(ROOT / "Snakefile"), "--cores", "1", "results/local/data",
                     "--configfile", "local.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]

    def data_job() -> dict:
        return next(j for j in plan(tmp_path, tmp_path / "local.yaml")["jobs"] if j["rule"] == "data")

    assert not data_job()["needrun"]
    time.sleep(1.1)  # a later modification time than the output's, on any file system
    with pool.open("a") as f:
        f.write(json.dumps({"prompt": "q9", "completion": "a9"}) + "\n")
    job = data_job()
    assert job["needrun"] and "pool.jsonl" in job["reason"], job


def test_the_workflows_defaults_are_the_commands_defaults():
    """A value with a default in both the schema (the workflow) and the Python API (`tokenclean` used by hand) is
    the same number in both: scoring's token budget and the bootstrap's resamples."""
    from tokenclean.loss import TOKEN_BUDGET
    from tokenclean.report.significance import BOOTSTRAP_ITERS

    schema = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())["properties"]
    assert schema["scoring"]["properties"]["token_budget"]["default"] == TOKEN_BUDGET
    assert schema["report"]["properties"]["bootstrap_iters"]["default"] == BOOTSTRAP_ITERS
