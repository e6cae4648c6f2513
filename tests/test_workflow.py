"""The whole DAG, end to end, on the tiny smoke experiment (the same experiment as config.yaml, made tiny)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.snakemake_plan import plan, to_run

# Every test here runs or plans the smoke workflow through a Snakemake process: minutes in all.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def snakemake_cmd(workdir: Path, *args: str, overrides: Path | None = None) -> list[str]:
    configs = [str(SMOKE)] + ([str(overrides)] if overrides else [])
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", *configs, "--cores", "2", *args]


def snakemake(workdir: Path, *args: str, overrides: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_cmd(workdir, *args, overrides=overrides), capture_output=True, text=True,
                          env=env or {**os.environ}, timeout=900, check=False)


def test_nothing_is_written_outside_the_results(smoke_run):
    work = smoke_run.parents[1]
    assert sorted(p.name for p in work.iterdir()) == [".snakemake", "home", "results"]
    assert sorted(p.name for p in (work / "results").iterdir()) == ["smoke"]
    # the only thing in HOME is snakemake's own copy of the workflow's sources
    written = [p for p in (work / "home").resolve().rglob("*") if p.is_file()]
    assert all(p.relative_to((work / "home").resolve()).parts[:2] == (".cache", "snakemake") for p in written), written


def test_smoke_workflow_writes_the_table(smoke_run):
    with open(smoke_run / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["base", "warmup", "full", "random", "rho", "fixed", "truth_drop_noisy",
                                         "truth_keep_informative", "full+warmup", "self_evolving"]
    for r in rows:
        for task in ("add", "reverse", "max", "sort", "novel_capital", "average", "average_response_em"):
            assert 0.0 <= float(r[f"{task}_mean"]) <= 1.0
        assert float(r["average_answer_nll_mean"]) > 0.0
    assert (smoke_run / "table.md").read_text().count("\n|") >= 10


def test_cleaning_quality_reports_every_pool_mask(smoke_run):
    with open(smoke_run / "cleaning_quality.csv") as f:
        rows = {r["mask"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"full", "random_r0.6_s1", "rho_r0.6", "fixed_r0.6", "truth_drop_noisy",
                         "truth_keep_informative"}
    assert float(rows["full"]["kept_garbage"]) == 1.0 and float(rows["truth_drop_noisy"]["kept_garbage"]) == 0.0
    assert float(rows["truth_keep_informative"]["kept_boilerplate"]) == 0.0
    assert float(rows["truth_keep_informative"]["kept_novel"]) == float(rows["truth_drop_noisy"]["kept_novel"]) == 1.0
    with open(smoke_run / "score_separation.csv") as f:
        classes = [r["class"] for r in csv.DictReader(f)]
    assert classes == ["informative", "boilerplate", "corrupted", "garbage", "novel"]


def test_every_rule_logged_and_every_model_records_its_provenance(smoke_run):
    logs = {p.relative_to(smoke_run / "logs").as_posix() for p in (smoke_run / "logs").rglob("*.log")}
    for expected in ("world.log", "pretrain_base.log", "warmup.log", "report.log", "significance.log",
                     "token_view.log", "figures/rounds.log"):
        assert expected in logs
    info = json.loads((smoke_run / "models" / "sft" / "fixed_r0.6_s1" / "tokenclean.json").read_text())
    assert info["mask"].endswith("masks/fixed_r0.6.mask.npy")


def test_self_evolving_chain_starts_from_the_warmup_model_and_evaluates_every_round(smoke_run):
    with open(smoke_run / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]  # configs/smoke.yaml: 2 rounds
    steps = []
    for t, parent in ((1, "models/warmup"), (2, "models/rounds/self_evolving_r0.6_s1_t1")):
        model = smoke_run / "models" / "rounds" / f"self_evolving_r0.6_s1_t{t}"
        info = json.loads((model / "tokenclean.json").read_text())
        assert info["base_model"].endswith(parent)
        assert info["tokens"].endswith(f"tokens/pool.c{t}of2.tokens.npz")
        steps.append(info["steps"])
    assert sum(steps) == 5  # the rounds share the sft step budget of configs/smoke.yaml
    chunk_sizes = [json.loads((smoke_run / "tokens" / f"pool.c{t}of2.tokens.json").read_text())["n_samples"]
                   for t in (1, 2)]
    assert sum(chunk_sizes) == 80


def test_the_smoke_table_is_the_documented_one_to_the_last_digit(smoke_run):
    """docs/numerics.md records the sha256 of the smoke run's table.csv at the avx2 pin: an Intel CPU of any vector
    width computes those bytes (elsewhere the pin cannot hold, and the test says so)."""
    import hashlib
    import re

    from tokenclean import numerics

    why = numerics.problem("avx2")
    if why is not None:
        pytest.skip(f"the avx2 pin cannot hold here: {why}")
    recorded = re.search(r"smoke `table\.csv`: `([0-9a-f]{64})`", (ROOT / "docs" / "numerics.md").read_text())
    assert recorded, "docs/numerics.md records no sha256 of the smoke table"
    got = hashlib.sha256((smoke_run / "table.csv").read_bytes()).hexdigest()
    assert got == recorded[1], (f"the smoke table.csv here has sha256 {got}, docs/numerics.md records {recorded[1]}: "
                                "the pin does not hold on this CPU, or the commit changed the table (re-record it)")


def test_a_finished_workflow_has_nothing_left_to_do(smoke_run):
    jobs = plan(smoke_run.parents[1], SMOKE)["jobs"]
    assert len(jobs) > 40 and not [(j["rule"], j["reason"]) for j in jobs if j["needrun"]]


@pytest.mark.parametrize("reverse", [False, True], ids=["sorted", "reversed"])
def test_the_same_config_with_its_keys_in_another_order_reruns_nothing(smoke_run, tmp_path, reverse):
    """Job parameters are canonical: saving the config with its keys in another order re-plans no job."""
    import yaml

    from tests.test_config import reorder

    moved = tmp_path / "smoke.yaml"
    config = yaml.safe_load(SMOKE.read_text())
    moved.write_text(yaml.safe_dump(reorder(config, reverse), sort_keys=False))
    jobs = plan(smoke_run.parents[1], moved)["jobs"]
    assert len(jobs) > 40 and not [(j["rule"], j["reason"]) for j in jobs if j["needrun"]]


def planned(work: Path, override: str, tmp_path: Path) -> tuple[set[str], list[str]]:
    """The rules that would run with ``override``, and the models whose losses they would compute."""
    (tmp_path / "more.yaml").write_text(override)
    jobs = plan(work, SMOKE, tmp_path / "more.yaml")["jobs"]
    scored = [j["wildcards"]["model"] for j in jobs if j["needrun"] and "model" in j["wildcards"]]
    return {j["rule"] for j in jobs if j["needrun"]}, scored


@pytest.mark.parametrize("override, new_rows", [("ratios: [0.6, 0.3]\n", "_r0.3_"), ("seeds: [1, 2]\n", "_s2_")])
def test_a_new_ratio_or_seed_reruns_only_what_depends_on_it(smoke_run, tmp_path, override, new_rows):
    jobs, scored = planned(smoke_run.parents[1], override, tmp_path)
    assert {"sft", "evaluate", "report", "significance"} <= jobs
    if "ratios" in override:
        assert "figure_ratios" in jobs  # a second ratio: the score-vs-ratio figure joins the report
    assert not jobs & {"world", "pretrain_base", "tokenize", "warmup"}
    # the base and reference losses are reused; the only new losses are those of the new row's self-evolving
    # round models, which are themselves trained with that ratio or seed
    assert scored and all(m.startswith("rounds/self_evolving") and new_rows in m for m in scored)


def test_a_new_replicate_runs_only_its_own_draw_and_the_tables(smoke_run, tmp_path):
    """`replicates: 2`: replicate 1 is a new draw in replicates/r1/ (world, base and warm-up seeds plus 1); in
    replicate 0's folder nothing re-runs but the tables over both replicates."""
    (tmp_path / "more.yaml").write_text("replicates: 2\n")
    jobs = plan(smoke_run.parents[1], SMOKE, tmp_path / "more.yaml")["jobs"]
    to_do = [j for j in jobs if j["needrun"]]
    new = [j for j in to_do if j["wildcards"].get("rep") == "/replicates/r1"]
    again = {j["rule"] for j in to_do if j not in new}
    assert again <= {"report", "significance", "all"}, again
    assert {"world", "pretrain_base", "warmup", "sft", "evaluate"} <= {j["rule"] for j in new}
    world = next(j for j in new if j["rule"] == "world")
    assert world["output"] == ["results/smoke/replicates/r1/world"] and '"seed": 1' in world["shell"]
    for rule in ("pretrain_base", "warmup"):
        assert "--seed 1 " in next(j for j in new if j["rule"] == rule)["shell"], rule


def test_changing_only_report_settings_reruns_only_the_report_stage(smoke_run, tmp_path):
    jobs, scored = planned(smoke_run.parents[1], "report: {bootstrap_iters: 500, token_view_samples: 4}\n", tmp_path)
    assert {"significance", "token_view"} <= jobs and not scored
    report_stage = {"report", "significance", "token_view", "rounds_report", "all"} | {j for j in jobs
                                                                                       if j.startswith("figure_")}
    assert jobs <= report_stage, jobs - report_stage


def test_a_new_ratio_and_seed_schedule_no_scoring_without_self_evolving(smoke_run, tmp_path):
    """Scores depend only on (model, data, tokenizer): fixed-model rows at a new ratio and seed re-select only."""
    jobs, scored = planned(smoke_run.parents[1], "methods: [full, random, rho, fixed, truth_drop_noisy, full+warmup]\n"
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
    shells = [j["shell"] for j in plan(tmp_path, SMOKE, hardware)["jobs"]]
    train = [cmd for cmd in shells if "tokenclean.cli train" in cmd]
    assert train and all("torch.distributed.run --standalone --nproc_per_node 2" in cmd for cmd in train)
    evaluate = [cmd for cmd in shells if "tokenclean.cli evaluate" in cmd]
    assert evaluate and not any("nproc_per_node 2 -m tokenclean.cli evaluate" in cmd for cmd in evaluate)


def test_smoke_workflow_runs_with_every_job_submitted_separately_and_gives_identical_results(smoke_run, tmp_path):
    """Every rule of the DAG through `--executor cluster-generic`: each job is a separately submitted process
    (as on Slurm) that re-reads the workflow and finds its inputs only on disk; the reports run locally.

    One row per kind of training (fixed, full+warmup, a two-round self-evolving chain) instead of all seven
    methods: every rule still runs, and each submitted job costs a whole Snakemake start (about 3 s of imports
    and parsing before its command), which made the full smoke DAG take 2.5 times as long as a local run.

    It is also a second run from scratch of the same experiment, so it checks determinism: every per-job output
    it shares with the first run (token tables, losses, masks, per-example scores, metrics) is identical (CPU;
    timings aside)."""
    submit = ROOT / "tests" / "cluster" / "submit.sh"
    fewer = tmp_path / "rows.yaml"
    fewer.write_text("methods: [fixed, full+warmup, self_evolving]\n")
    submitted = tmp_path / "submitted.txt"
    work = tmp_path / "work"
    planned = to_run(plan(tmp_path / "plan", SMOKE, fewer))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
           "--configfile", str(SMOKE), str(fewer), "--executor", "cluster-generic",
           "--cluster-generic-submit-cmd", str(submit), "--jobs", "2", "--latency-wait", "10",
           "--seconds-between-status-checks", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TOKENCLEAN_SUBMIT_LOG": str(submitted)}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = {}
    for name in submitted.read_text().split():  # snakejob.<rule>.<jobid>.sh
        ran[name.split(".")[1]] = ran.get(name.split(".")[1], 0) + 1
    local = {"all", "report", "rounds_report", "provenance"}  # localrules
    assert ran == {rule: n for rule, n in planned.items() if rule not in local}
    assert {"world", "pretrain_base", "concat_tokens", "token_loss", "select", "sft", "chunk_tokens", "select_round",
            "self_evolve", "evaluate", "cleaning_quality", "score_separation"} <= set(ran)
    rows = list(csv.DictReader((work / "results" / "smoke" / "table.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == ["base", "warmup", "fixed", "full+warmup", "self_evolving"]
    assert (work / "results" / "smoke" / "rounds.csv").exists()
    again = work / "results" / "smoke"
    compared = 0
    for pattern in ("masks/**/*.mask.npy", "losses/**/*.loss.npy", "tokens/*.tokens.npz", "eval/**/*.samples.jsonl",
                    "eval/**/*.generations.jsonl", "score_separation.csv"):
        for path in sorted(again.glob(pattern)):
            rel = path.relative_to(again)
            assert (smoke_run / rel).read_bytes() == path.read_bytes(), f"{rel} differs between two runs"
            compared += 1
    for path in again.glob("eval/**/*.json"):
        a, b = json.loads(path.read_text()), json.loads((smoke_run / path.relative_to(again)).read_text())
        assert {k: v for k, v in a.items() if k not in ("seconds", "model")} == \
            {k: v for k, v in b.items() if k not in ("seconds", "model")}, path
        compared += 1
    assert compared > 25


def test_a_workflow_killed_during_training_resumes_to_the_uninterrupted_weights(smoke_run, tmp_path):
    """SIGKILL the whole snakemake process group while a job trains; unlock, re-run with --rerun-incomplete: it
    resumes from the job's checkpoint and saves exactly the weights of an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    target = "results/smoke/models/sft/full_s1"
    longer = tmp_path / "longer.yaml"  # one SFT job long enough to be interrupted, with checkpoints
    longer.write_text("sft:\n  train: {steps: 120, batch_size: 8, lr: 0.001, checkpoint_every: 20}\n")

    def with_inputs(name: str) -> Path:
        """A workdir holding the job's inputs, copied from the smoke run (mtimes kept: they count as done)."""
        work = tmp_path / name
        for rel in ("world", "models/base", "tokens/pool.tokens.npz", "tokens/pool.tokens.json", "masks/full.mask.npy",
                    "masks/full.mask.json"):
            dst = work / "results" / "smoke" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (smoke_run / rel).is_dir() else shutil.copy2)(smoke_run / rel, dst)
        return work

    straight = with_inputs("straight")
    proc = snakemake(straight, target, overrides=longer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 of 1 steps" in proc.stderr  # only the sft job ran

    killed = with_inputs("killed")
    job = subprocess.Popen(snakemake_cmd(killed, target, overrides=longer), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    state = killed / f"{target}.resume" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # snakemake and its job, at once
    job.wait()
    if not state.exists():
        pytest.fail("the job ended (or never started) before its first checkpoint; raise the steps in this test")
    assert not (killed / target).exists()  # nothing at the output path: no rule can take it for finished
    proc = snakemake(killed, "--unlock")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = snakemake(killed, target, "--rerun-incomplete", overrides=longer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in (killed / "results" / "smoke" / "logs" / "sft" / "full_s1.log").read_text()
    assert not (killed / f"{target}.resume").exists()
    assert [p.name for p in (killed / target).parent.iterdir()] == ["full_s1"]  # the killed run's temporary: gone
    a = load_file(str(straight / target / "model.safetensors"))
    b = load_file(str(killed / target / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (killed / target / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 120


def test_smoke_workflow_leaves_every_report_output(smoke_run):
    """Tables per metric, significance, figures, the token page; and `snakemake --report` builds offline."""
    for name in ("table.csv", "table.md", "table.tex", "table_response_em.csv", "table_answer_nll.csv",
                 "significance.csv", "significance.md", "token_view.html"):
        assert (smoke_run / name).stat().st_size > 0, name
    for name in ("score_distributions", "kept_by_class", "rounds"):  # one ratio: no score-vs-ratio figure
        assert (smoke_run / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (smoke_run / "figures" / "score_vs_ratio.png").exists()
    md = (smoke_run / "table.md").read_text()
    assert md.count("### ") == 3 and "truth_drop_noisy†" in md and "truth_keep_informative†" in md
    assert "\\toprule" in (smoke_run / "table.tex").read_text()
    with open(smoke_run / "significance.csv") as f:
        sig = list(csv.DictReader(f))
    rows = {"base", "warmup", "random", "rho", "fixed", "truth_drop_noisy", "truth_keep_informative", "self_evolving"}
    assert {r["method"] for r in sig if r["baseline"] == "full"} == rows | {"full+warmup"}
    assert {r["method"] for r in sig if r["baseline"] == "full+warmup"} == rows | {"full"}  # the fair baseline too
    assert {r["metric"] for r in sig} == {"answer_acc", "response_em", "answer_nll"}
    assert all(float(r["ci_low"]) <= float(r["diff"]) <= float(r["ci_high"]) for r in sig)
    page = (smoke_run / "token_view.html").read_text()
    assert page.count('<span class="tok') > 12 and "<script" not in page
    out = smoke_run / "report.html"
    proc = snakemake(smoke_run.parents[1], "--report", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for name in ("table.csv", "significance.csv", "kept_by_class.png", "rounds.png", "token_view.html"):
        assert name in text, name


# Each result's caption (report/<name>.rst), as the report of the smoke run should show it.
REPORT_CAPTIONS = {"table.csv": "table", "table_response_em.csv": "table_metric",
                   "table_answer_nll.csv": "table_metric", "significance.csv": "significance",
                   "score_distributions.png": "score_distributions",
                   "kept_by_class.png": "kept_by_class", "rounds.png": "rounds", "token_view.html": "token_view",
                   "provenance.md": "provenance"}

# What a reader does in the report: open each category of results from the menu, then each result's details.
BROWSE_THE_REPORT = """
const tick = () => new Promise(r => setTimeout(r, 100));
const links = () => [...document.querySelectorAll('#app a')].filter(a => !a.closest('.vega-embed'));  // not a graph's
const link = t => links().find(a => a.textContent.trim() === t)
  || {click() { throw new Error(`no link "${t}" in: ${document.querySelector('#app').innerText}`); }};
link('Workflow').click(); await tick();  // the rule graph (Vega)
const out = {menu: links().map(a => a.textContent.trim()).filter(Boolean),  // icons: no text
             graph: document.querySelectorAll('#app canvas, #app svg.marks').length, shown: {}};
for (const category of out.menu.slice(out.menu.indexOf('About') + 1)) {
  link(category).click(); await tick();
  const n = document.querySelectorAll('#app a[iconname="information-circle"]').length;
  for (let i = 0; i < n; i++) {
    document.querySelectorAll('#app a[iconname="information-circle"]')[i].click(); await tick();
    const path = links().map(a => a.textContent.trim()).find(t => t.startsWith('results/'));
    out.shown[path] = {category, details: document.querySelector('#app').innerText};
    link(category).click(); await tick();
  }
  if (category === 'Token view') {  // the page itself, inside the report
    document.querySelector('#app a[iconname="eye"]').click(); await tick();
    out.frames = [...document.querySelectorAll('iframe')].map(f => f.src.split(';')[0]);
  }
  link('Results').click(); await tick();
}
return out;
"""


def test_the_report_renders_offline_in_a_browser(smoke_run, tmp_path):
    """`snakemake --report`'s page in headless Chromium: the app mounts, the workflow graph draws, every result
    is in its category with our caption, the token view opens inside it, and nothing loads from outside the file."""
    from tests.browser import chromium_or_skip, open_page

    chromium_or_skip()
    out = smoke_run / "report.html"
    if not out.exists():  # test_smoke_workflow_leaves_every_report_output builds it
        assert snakemake(smoke_run.parents[1], "--report", str(out)).returncode == 0
    seen = open_page(out, BROWSE_THE_REPORT, tmp_path)
    assert seen["loaded"] == [] and seen["failed"] == [] and seen["external"] == []
    report = seen["result"]
    assert report["menu"][:3] == ["Workflow", "Statistics", "About"] and report["graph"] >= 1
    assert {p.removeprefix("results/smoke/").removeprefix("figures/") for p in report["shown"]} == set(REPORT_CAPTIONS)
    for path, shown in report["shown"].items():
        rst = (ROOT / "report" / f"{REPORT_CAPTIONS[Path(path).name]}.rst").read_text()
        first_line = " ".join(rst.splitlines()[0].replace("``", "").split())
        assert first_line in " ".join(shown["details"].split()), (path, shown)
    assert report["shown"]["results/smoke/token_view.html"]["category"] == "Token view"
    assert report["frames"] == ["data:text/html"]  # embedded in the report, not a link to a file
