"""Own data end to end, issue 32's acceptance: each shape and container of the issue's table (an Alpaca JSON array,
ShareGPT JSON lines, Parquet with a `messages` column, a `save_to_disk` folder), given as the pool of a config with
a local model and an lm-eval task, runs to the table and report.html with the documented command, typed in a fresh
copy of the repository (`make run CONFIG=...`, docs/own-data.md), nothing converted by hand; the user's record ids
reach the token table, the export (`tokenclean export`) and the token view. The other containers (CSV, an Arrow
file, a folder of JSON lines shards) are planned and run through the `data` rule; a pool of the wrong shape stops
planning with one line.

The benchmark is lm-eval's stock `arc_easy` as its own YAML defines it (prompt, choices, metrics), over a local
test file instead of the hub's (tests never download): a task YAML that `include`s the stock one, as a user with
their own copy of a task's data would write it.
"""
from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.test_own_data import make_source

ROOT = Path(__file__).resolve().parents[1]
N = 48  # records per shape
WARMUP = 12  # the pool's first records are the warm-up set
TASK = "arc_easy_local"
# The table: each runs the whole workflow. The other containers: planning and the data rule.
WORKFLOW_SHAPES = ["json_array_alpaca", "jsonl_sharegpt", "parquet_messages", "save_to_disk_messages"]
DATA_SHAPES = ["csv_prompt_completion", "arrow_sharegpt", "folder_of_jsonl_sharegpt"]
# What a fresh clone does not have: the environment, results, caches (.gitignore).
NOT_CLONED = (".git", ".venv", ".venv-node", "results", ".snakemake", ".cache", "__pycache__", "*.egg-info",
              ".pytest_cache", ".hypothesis", ".ruff_cache", "build", "wheels", ".node", "shared")
STAMP = ".venv/.installed"  # make never reinstalls the environment here (`-o`), as tests/test_documented_commands.py


def clone(dst: Path) -> Path:
    """The working tree as a fresh clone has it, at ``dst``, with this environment as its `.venv` (`make
    install`'s)."""
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(*NOT_CLONED), symlinks=True)
    (dst / ".venv").symlink_to(sys.prefix)
    assert (dst / ".venv" / "bin" / "snakemake").exists(), "the environment has no snakemake"
    return dst


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return clone(tmp_path_factory.mktemp("clone") / "tokenclean")


@pytest.fixture(scope="module")
def arc_easy_local(tmp_path_factory) -> Path:
    """A task directory: `arc_easy_local`, lm-eval's stock arc_easy.yaml (included as it is) over a local test file
    in the hub data set's record form."""
    from importlib.util import find_spec

    stock = Path(find_spec("lm_eval").origin).parent / "tasks" / "arc" / "arc_easy.yaml"
    assert stock.is_file(), stock
    tasks = tmp_path_factory.mktemp("tasks")
    words = ["fox", "dog", "world", "cat"]
    rows = [{"id": f"q{i}", "question": f"which is the quick brown {words[i % 4]} ?",
             "choices": {"text": [f"the {w}" for w in words], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i in range(8)]
    (tasks / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "include": str(stock), "task": TASK, "tag": [], "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(tasks / "arc_easy_test.jsonl")}},
        "training_split": None, "validation_split": None, "test_split": "test"}, sort_keys=False))
    return tasks


def test_the_documented_config_is_valid_for_every_shape():
    """docs/own-data.md's `my.yaml` passes the config's checks with each `data.pool` of its table of shapes."""
    from tokenclean.config import check_config

    text = (ROOT / "docs" / "own-data.md").read_text()
    (block,) = [b for b in re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M) if b.startswith("# my.yaml")]
    documented = yaml.safe_load(block)
    pools = re.findall(r"^\| [^|]+ \| `(\{(?:path|hub): [^`]+\})`", text, re.M)
    assert len(pools) == 8, pools
    for pool in pools:
        config = yaml.safe_load(block)
        config["data"]["pool"] = yaml.safe_load(pool)
        assert yaml.safe_load(pool).items() <= check_config(config)["data"]["pool"].items()  # (with split's default)
    assert documented["evaluation"]["benchmarks"][0]["task"] == "arc_easy"  # the stock task this file mirrors


def own_config(shape: str, source: dict, model: Path, tasks: Path) -> dict:
    """A config for one's own data: the pool as the user holds it, the first records as the warm-up set, a local
    model and an lm-eval task; tiny training, one seed, the full and fixed-model rows."""
    return {
        "experiment": shape, "results_dir": "results", "threads": 1, "max_length": 128,
        "base_model": {"name": str(model)},
        "data": {"pool": source, "warmup": {"first_of_pool": WARMUP}},
        "scoring": {"token_budget": 4096},
        "warmup": {"train": {"steps": 2, "batch_size": 4, "lr": 0.001, "seed": 0}},
        "sft": {"train": {"steps": 2, "batch_size": 4, "lr": 0.001}},
        "methods": ["full", "fixed"], "ratios": [0.6], "seeds": [1],
        "evaluation": {"benchmarks": [{"task": TASK, "num_fewshot": 0, "metric": "acc"}],
                       "include_path": str(tasks), "device": "cpu", "batch_size": 8},
    }


def write_case(checkout: Path, shape: str, model: Path, tasks: Path) -> tuple[str, list[str]]:
    """The shape's data under `mine/<shape>/` of the checkout (named by a relative path, as a user would) and its
    config `<shape>.yaml`; returns the config's name and the ids the records must keep."""
    folder = checkout / "mine" / shape
    folder.mkdir(parents=True)
    spec, ids = make_source(folder, shape, N)
    spec["path"] = os.path.relpath(spec["path"], checkout)
    (checkout / f"{shape}.yaml").write_text(yaml.safe_dump(own_config(shape, spec, model, tasks), sort_keys=False))
    return f"{shape}.yaml", ids


def env(checkout: Path) -> dict[str, str]:
    """The user's environment, offline, with the Hugging Face caches inside the checkout."""
    return {**os.environ, "HF_HOME": str(checkout / ".cache" / "huggingface"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(checkout: Path, *command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=checkout, env=env(checkout), capture_output=True, text=True,
                          timeout=timeout, check=False)


def failure(proc: subprocess.CompletedProcess, results: Path) -> str:
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(results.rglob("*.log")))
    return f"exit {proc.returncode}\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}\n{logs}"


def data_ids(results: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (results / "data" / "pool.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workflow_runs(tmp_path_factory, arc_easy_local, tiny_model_dir) -> dict[str, tuple[Path, list[str]]]:
    """`make run CONFIG=<shape>.yaml` for each shape of the issue's table, each in its own clone, the four at once
    (one core each: a run alone leaves a core idle most of the time); shape -> (its results, the ids to keep)."""
    started = {}
    try:
        for shape in WORKFLOW_SHAPES:
            checkout = clone(tmp_path_factory.mktemp("clone") / "tokenclean")
            config, ids = write_case(checkout, shape, tiny_model_dir, arc_easy_local)
            with open(checkout / "make.out", "w") as out, open(checkout / "make.err", "w") as err:
                proc = subprocess.Popen(["make", "-o", STAMP, "run", f"CONFIG={config}", "CORES=1"], cwd=checkout,
                                        env=env(checkout), stdout=out, stderr=err, start_new_session=True)
            started[shape] = (checkout, ids, proc)
        codes = {shape: proc.wait(timeout=1200) for shape, (_, _, proc) in started.items()}
    finally:
        for _, _, proc in started.values():
            if proc.poll() is None:  # a run past the timeout: it and its jobs
                os.killpg(proc.pid, signal.SIGTERM)
    runs = {}
    for shape, (checkout, ids, _) in started.items():
        results = checkout / "results" / shape
        if codes[shape] != 0:
            logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(results.rglob("*.log")))
            pytest.fail(f"{shape}: make run exited {codes[shape]}\n{(checkout / 'make.err').read_text()[-4000:]}"
                        f"\n{logs}")
        runs[shape] = (results, ids)
    return runs


@pytest.mark.slow  # the whole workflow for each shape (the four at once: about 3 min on 2 cores)
@pytest.mark.parametrize("shape", WORKFLOW_SHAPES)
def test_own_data_runs_to_the_table_and_report_with_its_ids(shape, workflow_runs, tmp_path):
    from tokenclean.artifacts import TokenTable

    results, ids = workflow_runs[shape]
    checkout = results.parents[1]
    with open(results / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["base", "warmup", "full", "fixed"]
    assert all(0.0 <= float(r[f"{TASK}_mean"]) <= 1.0 for r in rows), rows
    evaluation = json.loads((results / "eval" / "full_s1.json").read_text())
    assert evaluation["metrics"][TASK]["n_examples"] == 8  # every question of the local file
    report = results / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000

    # the records' ids, unchanged, in the data, the token table, the export and the token view
    assert data_ids(results) == ids
    table, _ = TokenTable.load(results / "tokens" / "pool.tokens.npz")
    assert table.extras["record_id"].tolist() == ids
    (mask,) = (results / "masks").glob("fixed_*.mask.npy")
    export = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "tokenclean.cli", "export", "--tokens",
                           str(results / "tokens" / "pool.tokens.npz"), "--mask", str(mask), "--format", "jsonl",
                           "--out", str(export)], cwd=checkout, env={**env(checkout), "PYTHONPATH": str(checkout)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = np.add.reduceat(np.load(mask).astype(int), table.offsets[:-1])
    exported = [json.loads(line)["id"] for line in (export / "data.jsonl").read_text().splitlines()]
    assert exported and exported == [i for i, k in zip(ids, kept) if k > 0]
    view = html.unescape((results / "token_view.html").read_text())
    shown = re.findall(r"sample (\d+) \(id ([^)]+)\)", view)
    assert shown and all(ids[int(i)] == record_id for i, record_id in shown), shown


@pytest.mark.slow  # plans the workflow, then runs its data rule
@pytest.mark.parametrize("shape", DATA_SHAPES)
def test_other_containers_plan_and_pass_the_data_rule(shape, checkout, arc_easy_local, tiny_model_dir):
    config, ids = write_case(checkout, shape, tiny_model_dir, arc_easy_local)
    proc = run(checkout, "make", "-o", STAMP, "dry-run", f"CONFIG={config}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^total\s+\d+", proc.stdout + proc.stderr, re.M), proc.stderr[-2000:]  # the job count
    results = checkout / "results" / shape
    proc = run(checkout, ".venv/bin/snakemake", f"results/{shape}/data", "--cores", "2", "--configfile", config)
    assert proc.returncode == 0, failure(proc, results)
    assert data_ids(results) == ids


@pytest.mark.slow  # plans the workflow
def test_a_pool_of_the_wrong_shape_stops_planning_in_one_line(checkout, arc_easy_local, tiny_model_dir):
    """Plain text records (a pretraining corpus, not SFT data) in an otherwise valid config: `make dry-run` stops
    before any job with the config file, the key, the data file, the line and what is missing."""
    folder = checkout / "mine" / "wrong"
    folder.mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    cfg = own_config("wrong", {"path": "mine/wrong/corpus.jsonl"}, tiny_model_dir, arc_easy_local)
    (checkout / "wrong.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run(checkout, "make", "-o", STAMP, "dry-run", "CONFIG=wrong.yaml")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.fullmatch(r"config error: wrong\.yaml: data\.pool\.path: \S*corpus\.jsonl:1: neither 'messages' "
                        r"nor 'prompt'/'completion' is present .*", errors[0]), errors
    assert not (checkout / "results" / "wrong").exists()
