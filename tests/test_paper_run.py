"""The paper's path end to end: configs/paper/llama-3.2-3b.yaml as it is, changed only where it must be for a CPU
and a tiny size (a tiny local Llama, local JSON-lines data in the open-instruct `messages` form, the packaged
tc_logiqa and tc_tydiqa_goldp tasks over small files in their release formats), run by Snakemake from scratch.

Every recipe key of the paper config is kept (LoRA r/alpha/dropout, per-micro-batch loss, 1 epoch with steps 0,
file order, linear schedule, no clipping, float32 merge, 5 chunks / 4 rounds, ratio 0.6, the five methods, the
paper reference, 99% limit, the per-task model_args); only sizes, paths, seeds (two), devices and threads change.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_tydiqa import LANGS, squad_file

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper" / "llama-3.2-3b.yaml"
POOL_SIZE, CHUNKS, ROUNDS = 60, 5, 4


def pool_records(n: int) -> list[dict]:
    """Open-instruct `messages` records with every format case the DS2 pool has: single and multi-turn, a system
    turn, an empty and a whitespace-only message, contents with surrounding whitespace."""
    words = ["the quick brown fox", "hello world", "add 3 and 5", "which is larger : 37 or 52 ?"]
    rows = []
    for i in range(n):
        q, a = words[i % 4], f"Sure ! The answer is {i % 10} . Hope this helps ."
        kind = i % 6
        if kind == 0:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        elif kind == 1:  # multi-turn
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                    {"role": "user", "content": "and you ?"}, {"role": "assistant", "content": "fine thanks"}]
        elif kind == 2:  # a system turn
            msgs = [{"role": "system", "content": "you are a fox"}, {"role": "user", "content": q},
                    {"role": "assistant", "content": a}]
        elif kind == 3:  # an empty assistant turn, then a real one
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": ""},
                    {"role": "user", "content": "again"}, {"role": "assistant", "content": a}]
        elif kind == 4:  # a whitespace-only user turn
            msgs = [{"role": "user", "content": "  \n "}, {"role": "assistant", "content": a}]
        else:  # surrounding whitespace
            msgs = [{"role": "user", "content": f"  {q}\n\n"}, {"role": "assistant", "content": f"\n {a}  \n"}]
        rows.append({"id": f"ds2-{i}", "source": "flan", "messages": msgs})
    return rows


def logiqa_files(d: Path) -> Path:
    """Train / Eval / Test in the LogiQA release format (answer letter, passage, question, four options)."""
    d.mkdir()
    def rec(i: int) -> str:
        return (f"{'abcd'[i % 4]}\nAll cats sleep.Tom is a cat {i}.\nWhich one follows {i}?\n"
                f"A.tom sleeps.\nB.tom runs {i}\nC.no cat.sleeps\nD.none of the above\n")
    for name, n in (("Train.txt", 2), ("Eval.txt", 2), ("Test.txt", 4)):
        (d / name).write_text("\n".join(rec(i) for i in range(n)), encoding="utf-8")
    return d


def tydiqa_files(d: Path) -> tuple[Path, Path]:
    """SQuAD-format dev and train files: 2 dev questions and 1 training question per language."""
    d.mkdir()
    dev = [{"id": f"{lang}-{700 + i}-0", "context": f"the fox {i} jumps over the lazy dog",
            "question": f"which fox {i} ?", "answers": [f"fox {i}"]} for lang in LANGS for i in range(2)]
    train = [{"id": f"{lang}-900-0", "context": "hello world how are you", "question": "who ?",
              "answers": ["world"]} for lang in LANGS]
    return squad_file(d / "dev.json", dev), squad_file(d / "train.json", train)


def paper_config(tmp: Path, model_dir: Path) -> dict:
    """configs/paper/llama-3.2-3b.yaml with only what a CPU and a tiny size need changed."""
    cfg = yaml.safe_load(PAPER.read_text())
    pool = tmp / "ds2.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in pool_records(POOL_SIZE)))
    dev, train = tydiqa_files(tmp / "tydiqa")
    cfg.update(threads=1, max_length=128, seeds=[41, 42])
    cfg["base_model"] = {"name": str(model_dir)}
    cfg["data"] = {"pool": {"path": str(pool)}, "warmup": {"first_of_pool": POOL_SIZE // CHUNKS}}
    cfg["scoring"].update(token_budget=2048)
    for section in ("warmup", "sft"):
        cfg[section]["train"].update(batch_size=4, micro_batch_size=2)
    kept = {"tc_logiqa", "tc_tydiqa_goldp"}
    benchmarks = [b for b in cfg["evaluation"]["benchmarks"] if b["task"] in kept]
    assert {b["task"] for b in benchmarks} == kept
    for b in benchmarks:
        if b["task"] == "tc_logiqa":
            b["metadata"]["logiqa_dir"] = str(logiqa_files(tmp / "logiqa"))
        else:
            b["metadata"].update(tydiqa_dev=str(dev), tydiqa_train=str(train))  # 100 per language: all 2 kept
    cfg["evaluation"]["benchmarks"] = benchmarks
    return cfg


def snakemake(work: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
           "--configfile", str(config), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=1200, check=False)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict, Path]:
    tmp = tmp_path_factory.mktemp("paper")
    cfg = paper_config(tmp, tiny_model_dir)
    config = tmp / "paper.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    work = tmp / "work"
    proc = snakemake(work, config)
    results = work / "results" / cfg["experiment"]
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2500:]}" for p in sorted(results.rglob("*.log")))
        pytest.fail(f"paper workflow failed:\n{proc.stderr[-5000:]}\n{logs}")
    return results, cfg, config


@pytest.mark.slow
def test_paper_config_runs_end_to_end_on_cpu(paper_run, tiny_model_dir):
    results, cfg, config = paper_run
    # the recipe is the paper's, untouched
    paper = yaml.safe_load(PAPER.read_text())
    for key in ("lora_r", "lora_alpha", "lora_dropout", "loss_normalization", "epochs", "steps", "shuffle",
                "schedule", "max_grad_norm", "lr", "warmup_ratio"):
        assert cfg["sft"]["train"][key] == paper["sft"]["train"][key] == cfg["warmup"]["train"][key]
    assert cfg["self_evolving"] == {"chunks": CHUNKS, "rounds": ROUNDS} and cfg["methods"] == paper["methods"]

    # every row, with the benchmarks' scores, and the paper's reference rows below ours
    with open(results / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["base", "warmup", "full", "random", "rho", "fixed", "self_evolving"]
    for r in rows:
        for task in ("tc_logiqa", "tc_tydiqa_goldp"):
            assert 0.0 <= float(r[f"{task}_mean"]) <= 1.0, (r["method"], task)
    metrics = json.loads((results / "eval" / "base.json").read_text())["metrics"]
    # TyDiQA: every dev question of the 9 languages (no limit); LogiQA: 99% of the test split, rounded up
    assert metrics["tc_tydiqa_goldp"]["n_examples"] == 2 * len(LANGS) and metrics["tc_logiqa"]["n_examples"] == 4
    table = (results / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method |")).split(" | ")
    at = [i for i, name in enumerate(header) if name in ("tc_logiqa", "tc_tydiqa_goldp")]
    assert len(at) == 2, header
    reference = [[line.split(" | ")[i] for i in at] for line in table.splitlines() if line.startswith("| *paper ")]
    assert len(reference) == 13  # seed 42: the 7 methods; 41-43: the 6 with three seeds
    assert all("–" not in cells for cells in reference), reference  # each benchmark has the paper's number

    with open(results / "rounds.csv") as f:
        assert sorted({int(r["round"]) for r in csv.DictReader(f)}) == list(range(ROUNDS + 1))

    prov = json.loads((results / "provenance.json").read_text())
    for name in ("pool", "warmup"):
        data = (results / "data" / f"{name}.jsonl").read_bytes()
        assert prov["data"][name]["sha256"] == hashlib.sha256(data).hexdigest()
    assert prov["data"]["pool"]["records"] == POOL_SIZE and prov["data"]["warmup"]["records"] == POOL_SIZE // CHUNKS
    assert prov["base_model"]["name"] == str(tiny_model_dir)

    # LoRA merged, saved in float32 (merge_dtype's default)
    from safetensors import safe_open

    for model in ("warmup", "sft/full_s41", f"rounds/self_evolving_r0.6_s42_t{ROUNDS}"):
        files = list((results / "models" / model).glob("*.safetensors"))
        assert files, model
        with safe_open(str(files[0]), "pt") as st:
            names = list(st.keys())  # a safetensors file handle is not iterable: its keys() is
            dtypes = {str(st.get_slice(k).get_dtype()) for k in names}
            assert not any("lora" in k for k in names)
        assert dtypes == {"F32"}, (model, dtypes)

    # every job wrote its log; nothing is left to do
    from tests.snakemake_plan import plan

    jobs = plan(results.parents[1], config)["jobs"]
    assert len(jobs) == 76 and not [j["output"] for j in jobs if j["needrun"]]
    assert all(j["log"] for j in jobs if j["rule"] != "all")
    assert not [log for j in jobs for log in j["log"] if not (results.parents[1] / log).is_file()]
