"""Paper-scale configs: planned offline (no model or data is touched), with the job counts the study implies;
and the data rule on small local files in the formats the real data come in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests import snakemake_plan
from tests.listing import all_files
from tokenclean.data import DataError
from tokenclean.sources import prepare_data

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


def plan(workdir: Path, *configs: Path) -> tuple[Counter, list[dict]]:
    """(jobs to run per rule, every job) of the study planned in ``workdir``; no job runs."""
    planned = snakemake_plan.plan(workdir, *configs)
    return snakemake_plan.to_run(planned), planned["jobs"]


def shells(jobs: list[dict], command: str = "") -> list[str]:
    """The shell commands of ``jobs`` that run ``tokenclean.cli COMMAND`` (any, without ``command``)."""
    return [j["shell"] for j in jobs if f"tokenclean.cli {command}" in j["shell"]]


def expected_counts(cfg: dict) -> dict[str, int]:
    seeds, ratios = len(cfg["seeds"]), len(cfg["ratios"])
    rounds = cfg["self_evolving"]["rounds"]
    per_method = {"full": (1, seeds), "random": (ratios * seeds, ratios * seeds), "rho": (ratios, ratios * seeds),
                  "fixed": (ratios, ratios * seeds)}
    methods = [m for m in cfg["methods"] if m != "self_evolving"]
    chains = ratios * seeds
    pool_scored = "self_evolving" in cfg["methods"] and bool({"rho", "fixed"} & set(methods))
    sft = sum(per_method[m][1] for m in methods)
    return {
        "data": 1, "tokenize": 2, "warmup": 1, "chunk_tokens": rounds,
        # base and reference score the pool once; with rho or fixed configured, the chain's base losses on each
        # round's chunk and the warm-up model's on the first are cut from those (chunk_loss), else scored; each
        # later round is scored by its chain's previous model
        "token_loss": 2 + (rounds - 1) * chains + (0 if pool_scored else rounds + 1),
        "chunk_loss": rounds + 1 if pool_scored else 0,
        "select": sum(per_method[m][0] for m in methods), "sft": sft,
        "select_round": rounds * chains, "self_evolve": rounds * chains,
        "evaluate": 2 + sft + chains + (rounds - 1) * chains,  # base, warm-up, every row, every earlier round
        "report": 1, "rounds_report": 1,
    }


@pytest.mark.slow  # plans the paper study with Snakemake
@pytest.mark.parametrize("config", PAPER, ids=[p.stem for p in PAPER])
def test_paper_study_plans_offline_with_the_implied_jobs(config, tmp_path):
    cfg = yaml.safe_load(config.read_text())
    counts, jobs = plan(tmp_path, config)
    for rule, n in expected_counts(cfg).items():
        assert counts[rule] == n, f"{rule}: planned {counts[rule]}, expected {n}"
    assert "world" not in counts and "pretrain_base" not in counts
    out = "\n".join(shells(jobs))
    assert f"--model {cfg['base_model']['name']} " in out  # the hub model is loaded by name, never downloaded here
    assert "--num_fewshot" not in out and '"num_fewshot": 5, "task": "mmlu"' in out


@pytest.mark.slow  # plans the paper study with Snakemake
def test_scoring_does_not_grow_with_ratios_or_seeds(tmp_path):
    config = ROOT / "configs" / "paper" / "llama-3.2-3b.yaml"
    more = tmp_path / "more.yaml"
    more.write_text("seeds: [1, 2, 3, 4, 5]\nratios: [0.6, 0.3]\n")
    _, small = plan(tmp_path / "a", config)
    _, large = plan(tmp_path / "b", config, more)

    def shared_losses(jobs: list[dict]) -> tuple[set[str], set[str]]:
        """(losses scored, losses cut from the pool's) that do not belong to one chain's rounds."""
        def made(rule: str) -> set[str]:
            return {out for j in jobs if j["rule"] == rule for out in j["output"] if "/losses/rounds/" not in out}
        return made("token_loss"), made("chunk_loss")

    scored, cut = shared_losses(small)
    assert shared_losses(large) == (scored, cut)
    # the base and reference models score the pool once; the chain's base losses on its 4 chunks and the
    # reference's on the first are cut from those
    assert len(scored) == 2 and len(cut) == 5


@pytest.mark.slow  # plans the paper study with Snakemake
def test_hardware_file_launches_training_on_every_gpu(tmp_path):
    counts, jobs = plan(tmp_path, ROOT / "configs" / "paper" / "mistral-7b.yaml",
                        ROOT / "configs" / "hardware" / "8-gpus.yaml")
    train = shells(jobs, "train")
    assert len(train) == counts["warmup"] + counts["sft"] + counts["self_evolve"]
    assert all("accelerate.commands.launch --num_processes 8" in line for line in train)


@pytest.mark.slow  # plans the paper study with Snakemake
def test_a_hardware_file_shards_full_fine_tuning_and_keeps_it_out_of_the_recipe(tmp_path):
    """hardware.sharding reaches every training job through its launch command, never as a `train` flag."""
    hardware = tmp_path / "fsdp.yaml"
    hardware.write_text("hardware: {gpus: 8, launcher: accelerate, sharding: fsdp}\n")
    full = tmp_path / "full.yaml"  # full fine-tuning: the paper's recipe without LoRA
    full.write_text("warmup: {train: {lora_r: 0}}\nsft: {train: {lora_r: 0}}\n")
    config = ROOT / "configs" / "paper" / "mistral-7b.yaml"
    counts, jobs = plan(tmp_path / "a", config, full, hardware)
    train = shells(jobs, "train")
    assert len(train) == counts["warmup"] + counts["sft"] + counts["self_evolve"]
    assert all("env TOKENCLEAN_DIST_TIMEOUT_MINUTES=60 TOKENCLEAN_SHARDING=fsdp " in line for line in train)
    _, plain = plan(tmp_path / "b", config, full, ROOT / "configs" / "hardware" / "8-gpus.yaml")
    assert sorted(cmd.replace(" TOKENCLEAN_SHARDING=fsdp", "") for cmd in train) == sorted(shells(plain, "train"))


@pytest.mark.slow  # plans the paper study with Snakemake
@pytest.mark.parametrize("hardware", [None, "8-gpus.yaml"])
def test_slurm_profile_plans_the_paper_study_with_gpus_where_they_are_used(hardware, tmp_path):
    config = ROOT / "configs" / "paper" / "llama-3.1-8b.yaml"
    extra = [ROOT / "configs" / "hardware" / hardware] if hardware else []
    profile = ROOT / "profiles" / "slurm"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
           "--profile", str(profile), "--configfile", str(config), *map(str, extra), "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]  # the profile's own command plans
    jobs = snakemake_plan.plan(tmp_path / "profiled", config, *extra, profile=profile)["jobs"]
    plain, _ = plan(tmp_path / "plain", config, *extra)
    assert len(jobs) == sum(plain.values())  # the whole study, as without a profile
    res: dict[str, list[dict]] = {}  # rule -> the resources of each of its jobs
    for job in jobs:
        res.setdefault(job["rule"], []).append(job["resources"])
    gpus = str(8 if hardware else 1)
    for rule in ("warmup", "sft", "self_evolve"):
        assert all(r.get("gpu") == gpus and "runtime" in r and "mem_mb" in r for r in res[rule]), res[rule]
    for rule in ("token_loss", "evaluate"):
        assert all(r.get("gpu") == "1" for r in res[rule]), res[rule]
    for rule in ("data", "tokenize", "select", "chunk_tokens", "select_round"):
        assert not any("gpu" in r for r in res[rule]), res[rule]
    assert all("slurm_partition" in r for rs in res.values() for r in rs)


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def ds2_like(n: int) -> list[dict]:
    """Rows as the DS2 pool holds them: Tulu-style messages (plus columns the suite does not use)."""
    return [{"id": f"x{i}", "source": "flan", "messages": [{"role": "user", "content": f"q{i}"},
                                                          {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


def test_data_rule_writes_pool_and_warmup_with_checksums(tmp_path):
    pool = write_lines(tmp_path / "pool.jsonl", ds2_like(12))
    warm = write_lines(tmp_path / "warm.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    meta = prepare_data({"pool": {"path": str(pool)}, "warmup": {"path": str(warm)}}, tmp_path / "out")
    lines = (tmp_path / "out" / "pool.jsonl").read_text().splitlines()
    # the fields training reads, the record's id and its other columns
    row0 = ds2_like(1)[0]
    assert len(lines) == 12 and json.loads(lines[0]) == {"id": "x0", "messages": row0["messages"],
                                                         "meta": {"source": "flan"}}
    assert meta["warmup"]["records"] == 3 and json.loads((tmp_path / "out" / "data.json").read_text()) == meta
    import hashlib
    assert meta["pool"]["sha256"] == hashlib.sha256((tmp_path / "out" / "pool.jsonl").read_bytes()).hexdigest()
    first = prepare_data({"pool": {"path": str(pool), "limit": 10}, "warmup": {"first_of_pool": 4}}, tmp_path / "o2")
    assert first["pool"]["records"] == 10 and first["warmup"]["records"] == 4
    assert (tmp_path / "o2" / "warmup.jsonl").read_text().splitlines() == \
        (tmp_path / "o2" / "pool.jsonl").read_text().splitlines()[:4]


def test_bad_data_names_file_line_and_field_and_writes_nothing(tmp_path):
    rows = ds2_like(3)
    rows[1] = {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}
    pool = write_lines(tmp_path / "pool.jsonl", rows)
    with pytest.raises(DataError, match=r"pool\.jsonl:2.*role"):
        prepare_data({"pool": {"path": str(pool)}, "warmup": {"first_of_pool": 1}}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    good = write_lines(tmp_path / "good.jsonl", ds2_like(3))
    with pytest.raises(DataError, match="first_of_pool = 5"):
        prepare_data({"pool": {"path": str(good)}, "warmup": {"first_of_pool": 5}}, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------
# without the hub: one clear line naming the id and the config key of a local copy, nothing written
# ---------------------------------------------------------------------------------------------------------
def run_cli(capsys, *args: str) -> tuple[int, str]:
    from tokenclean.cli import main

    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"tokenclean {command}: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.fixture()
def token_table(tmp_path, tiny_tokenizer_dir) -> Path:
    from tokenclean.tokenization import tokenize_file

    data = write_lines(tmp_path / "d.jsonl", ds2_like(3))
    tokenize_file(data, str(tiny_tokenizer_dir), 64, tmp_path / "d.tokens.npz")
    return tmp_path / "d.tokens.npz"


MISSING_MODEL = "nobody-tokenclean/no-such-model"


@pytest.mark.parametrize("command", ["tokenize", "loss", "train",
                                     pytest.param("evaluate", marks=pytest.mark.slow)])  # lm-eval: ~10 s
def test_unreachable_hub_model_is_one_line_naming_it_and_the_local_config(command, tmp_path, token_table, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    out = tmp_path / "out"
    args = {"tokenize": ["--data", str(write_lines(tmp_path / "x.jsonl", ds2_like(2))), "--tokenizer", MISSING_MODEL,
                         "--max-length", "64", "--out", f"{out}.tokens.npz"],
            "loss": ["--model", MISSING_MODEL, "--tokens", str(token_table), "--out", f"{out}.loss.npy"],
            "train": ["--model", MISSING_MODEL, "--tokens", str(token_table), "--steps", "1", "--out", str(out)],
            "evaluate": ["--model", MISSING_MODEL, "--device", "cpu", "--benchmarks", '[{"task": "boolq"}]',
                         "--out", f"{out}.json"]}[command]
    before = all_files(tmp_path)
    rc, err = run_cli(capsys, command, *args)
    line = error_line(err, command)
    assert rc != 0 and f"'{MISSING_MODEL}'" in line and "hub" in line
    assert line.endswith("point the config at the copy: base_model.name: /path/to/dir")
    assert all_files(tmp_path) == before  # no output, sidecar or temporary


@pytest.mark.parametrize("source", ["pool", "warmup"])
def test_unreachable_hub_data_is_one_line_naming_it_and_the_local_config(source, tmp_path, capsys):
    pool = write_lines(tmp_path / "pool.jsonl", ds2_like(4))
    spec = {"pool": {"path": str(pool)}, "warmup": {"first_of_pool": 2}}
    spec[source] = {"hub": "nobody-tokenclean/no-such-data", "split": "train"}
    rc, err = run_cli(capsys, "data", "--spec", json.dumps(spec), "--out", str(tmp_path / "data"))
    line = error_line(err, "data")
    assert rc != 0 and "'nobody-tokenclean/no-such-data'" in line and "hub" in line
    assert line.endswith(f"point the config at the copy: data.{source}: {{path: /path/to/copy}}")
    assert not (tmp_path / "data").exists() and [p.name for p in tmp_path.iterdir()] == ["pool.jsonl"]


def optional_methods(config: Path) -> list[str]:
    """The rows a paper config lists as optional, in its comment ``# optional_methods: [...]``."""
    line = next(line for line in config.read_text().splitlines() if line.startswith("# optional_methods:"))
    return yaml.safe_load(line.removeprefix("# "))["optional_methods"]


@pytest.mark.slow  # plans the paper study with Snakemake
@pytest.mark.parametrize("config", PAPER, ids=[p.stem for p in PAPER])
def test_paper_configs_list_the_fields_methods_as_optional_rows_that_plan(config, tmp_path):
    from tokenclean import methods as registry

    optional = optional_methods(config)
    assert set(optional) == {n for n, m in registry.METHODS.items() if m.kind == "online"}
    cfg = yaml.safe_load(config.read_text())
    more = {"methods": cfg["methods"] + optional, "method_params": {"eaft": {"loss_normalization": "micro_batch"}}}
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(more))
    counts, jobs = plan(tmp_path, config, tmp_path / "more.yaml")
    seeds, ratios = len(cfg["seeds"]), len(cfg["ratios"])
    assert counts["sft"] == expected_counts(cfg)["sft"] + 2 * ratios * seeds + 2 * seeds  # rho1, sstoken; dft, eaft
    assert counts["token_loss"] == expected_counts(cfg)["token_loss"]  # their losses are the pool's, scored anyway
    train = [cmd for cmd in shells(jobs, "train") if "--online" in cmd]
    assert len(train) == 2 * ratios * seeds + 2 * seeds
    assert all("--ref-loss" in line for line in train if "--online rho1" in line)
    assert all("--base-loss" in line for line in train if "--online sstoken" in line)
    # the paper's rows average per micro-batch (sft.train); an online row by its reference's rule, unless
    # method_params gives one (eaft here)
    assert all("--loss-normalization micro_batch" in cmd for cmd in shells(jobs, "train") if "--online" not in cmd)
    assert all(("--loss-normalization micro_batch" in line) == ("--online eaft" in line) for line in train)
    assert all(line.count("--loss-normalization") == ("--online eaft" in line) for line in train)
