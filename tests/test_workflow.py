"""The whole DAG, end to end, on the tiny smoke experiment (the same experiment as config.yaml, made tiny)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str, overrides: Path | None = None) -> subprocess.CompletedProcess:
    configs = [str(ROOT / "configs" / "smoke.yaml")] + ([str(overrides)] if overrides else [])
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", *configs, "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=900)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("smoke")
    proc = snakemake(work)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in (work / "results").rglob("*.log"))
        pytest.fail(f"smoke workflow failed:\n{proc.stderr[-4000:]}\n{logs}")
    return work / "results" / "smoke"


def test_smoke_workflow_writes_the_table(smoke_run):
    with open(smoke_run / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["base", "warmup", "full", "random", "rho", "fixed", "oracle", "full+warmup",
                                         "self_evolving"]
    for r in rows:
        for task in ("add", "reverse", "max", "sort", "average", "average_response_em"):
            assert 0.0 <= float(r[f"{task}_mean"]) <= 1.0
        assert float(r["average_answer_nll_mean"]) > 0.0
    assert (smoke_run / "table.md").read_text().count("\n|") >= 9


def test_cleaning_quality_reports_every_pool_mask(smoke_run):
    with open(smoke_run / "cleaning_quality.csv") as f:
        rows = {r["mask"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"full", "random_r0.6_s1", "rho_r0.6", "fixed_r0.6", "oracle"}
    assert float(rows["full"]["kept_garbage"]) == 1.0 and float(rows["oracle"]["kept_garbage"]) == 0.0
    with open(smoke_run / "score_separation.csv") as f:
        classes = [r["class"] for r in csv.DictReader(f)]
    assert classes == ["informative", "boilerplate", "corrupted", "garbage"]


def test_every_rule_logged_and_every_model_records_its_provenance(smoke_run):
    logs = {p.relative_to(smoke_run / "logs").as_posix() for p in (smoke_run / "logs").rglob("*.log")}
    for expected in ("world.log", "pretrain_base.log", "warmup.log", "report.log"):
        assert expected in logs
    info = json.loads((smoke_run / "models" / "sft" / "fixed_r0.6_s1" / "tokenclean.json").read_text())
    assert info["mask"].endswith("masks/fixed_r0.6.mask.npy")


def test_self_evolving_chain_starts_from_the_warmup_model_and_evaluates_every_round(smoke_run):
    with open(smoke_run / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]  # configs/smoke.yaml: 2 rounds
    steps = []
    for t, parent in ((1, "models/warmup"), (2, "models/rounds/self_evolving_r0.6_s1_t1")):
        info = json.loads((smoke_run / "models" / "rounds" / f"self_evolving_r0.6_s1_t{t}" / "tokenclean.json").read_text())
        assert info["base_model"].endswith(parent)
        assert info["tokens"].endswith(f"tokens/pool.c{t}of2.tokens.npz")
        steps.append(info["steps"])
    assert sum(steps) == 5  # the rounds share the sft step budget of configs/smoke.yaml
    chunk_sizes = [json.loads((smoke_run / "tokens" / f"pool.c{t}of2.tokens.json").read_text())["n_samples"]
                   for t in (1, 2)]
    assert sum(chunk_sizes) == 80


def test_a_finished_workflow_has_nothing_left_to_do(smoke_run):
    proc = snakemake(smoke_run.parents[1], "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr


def planned(work: Path, override: str, tmp_path: Path) -> tuple[set[str], list[str]]:
    """The rules a dry run with ``override`` would run, and the models whose losses it would compute."""
    (tmp_path / "more.yaml").write_text(override)
    proc = snakemake(work, "--dry-run", overrides=tmp_path / "more.yaml")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    stats = out[out.index("Job stats"):]
    jobs = {line.split()[0] for line in stats.splitlines()[3:] if len(line.split()) == 2 and line.split()[1].isdigit()}
    scored = [line.split("model=")[1].split(",")[0] for line in out.splitlines() if "wildcards: model=" in line]
    return jobs, scored


@pytest.mark.parametrize("override, new_rows", [("ratios: [0.6, 0.3]\n", "_r0.3_"), ("seeds: [1, 2]\n", "_s2_")])
def test_a_new_ratio_or_seed_reruns_only_what_depends_on_it(smoke_run, tmp_path, override, new_rows):
    jobs, scored = planned(smoke_run.parents[1], override, tmp_path)
    assert {"sft", "evaluate", "report"} <= jobs
    assert not jobs & {"world", "pretrain_base", "tokenize", "warmup"}
    # the base and reference losses are reused; the only new losses are those of the new row's self-evolving
    # round models, which are themselves trained with that ratio or seed
    assert scored and all(m.startswith("rounds/self_evolving") and new_rows in m for m in scored)


def test_a_new_ratio_and_seed_schedule_no_scoring_without_self_evolving(smoke_run, tmp_path):
    """Scores depend only on (model, data, tokenizer): fixed-model rows at a new ratio and seed re-select only."""
    jobs, scored = planned(smoke_run.parents[1], "methods: [full, random, rho, fixed, oracle, full+warmup]\n"
                           "ratios: [0.6, 0.3]\nseeds: [1, 2]\n", tmp_path)
    assert {"select", "sft", "evaluate", "report"} <= jobs
    assert "token_loss" not in jobs and not scored
    assert not jobs & {"world", "pretrain_base", "tokenize", "warmup", "self_evolve"}


def test_per_token_artifacts_take_at_most_4_bytes_per_token_per_array(smoke_run):
    """Token tables, losses and masks are flat and ragged: no padding, no 8-byte per-token arrays."""
    import numpy as np

    with np.load(smoke_run / "tokens" / "pool.tokens.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    n, samples = len(arrays["input_ids"]), len(arrays["offsets"]) - 1
    per_token = {k: a for k, a in arrays.items() if len(a) == n}
    assert {"input_ids", "loss_mask"} <= set(per_token) and n > samples
    assert all(a.itemsize <= 4 for a in per_token.values()), {k: a.dtype for k, a in per_token.items()}
    assert all(len(a) in (samples, samples + 1) for k, a in arrays.items() if k not in per_token)
    for path in (smoke_run / "losses" / "base" / "pool.loss.npy", smoke_run / "masks" / "fixed_r0.6.mask.npy"):
        array = np.load(path, allow_pickle=False)
        assert array.shape == (n,) and array.itemsize <= 4
        assert path.stat().st_size <= 4 * n + 1024  # the .npy header aside, nothing but the array


def test_multi_gpu_hardware_launches_every_training_job_once_per_gpu(tmp_path):
    hardware = tmp_path / "hardware.yaml"
    hardware.write_text("hardware: {gpus: 2, launcher: torchrun}\n")
    proc = snakemake(tmp_path, "--dry-run", "--printshellcmds", overrides=hardware)
    assert proc.returncode == 0, proc.stderr[-2000:]
    train_lines = [line for line in proc.stdout.splitlines() if "tokenclean.cli train" in line]
    assert train_lines and all("torch.distributed.run --standalone --nproc_per_node 2" in line for line in train_lines)
    assert "tokenclean.cli evaluate" in proc.stdout and "nproc_per_node 2 -m tokenclean.cli evaluate" not in proc.stdout


def test_smoke_workflow_runs_with_every_job_submitted_separately(tmp_path):
    """The DAG through `--executor cluster-generic`: each job is a separately submitted process (as on Slurm)."""
    submit = ROOT / "tests" / "cluster" / "submit.sh"
    proc = snakemake(tmp_path, "--executor", "cluster-generic", "--cluster-generic-submit-cmd", str(submit),
                     "--jobs", "2", "--latency-wait", "10", "--seconds-between-status-checks", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "results" / "smoke" / "table.csv")))
    assert len(rows) == 9 and (tmp_path / "results" / "smoke" / "rounds.csv").exists()
