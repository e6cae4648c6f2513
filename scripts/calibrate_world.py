#!/usr/bin/env python
"""Calibrate the embedded world on the rows that use no token score (issue 13).

Each named variant is a set of config overrides merged into ``configs/calibration.yaml`` (the default experiment
with the rows base, warmup, full, random, full+warmup and the two ground-truth rows) and run as its own experiment,
``calibration-<variant>``, through the workflow (``snakemake --cores N --configfile <merged config> <table.csv>
<significance.csv>``, from the repository root). For every variant it prints each row's average answer accuracy
(mean ± std over seeds), the passes each row and the warm-up model made over its own data (steps × batch / samples,
as the trained models recorded them), and which of issue 13's targets hold; it ends with one JSON line of the
figures and appends a section to the calibration record, ``docs/world-calibration.md``.

    python scripts/calibrate_world.py --variant b8 sft.train.batch_size=8 warmup.train.batch_size=8
    python scripts/calibrate_world.py --variants scripts/calibration-variants.yaml [--only NAME ...] [--dry-run]

A variant's overrides are ``KEY=VALUE`` pairs (dotted keys, YAML values: ``seeds=[1,2,3]``) on the command line,
or a mapping (nested or dotted keys) per variant name in a YAML file. A finished experiment is not re-run (the
workflow is up to date), so running a variant again only summarises it. Why only these rows: the world's free
parameters are chosen before any cleaning method is looked at (issue 13: "do not move the world after seeing the
scored rows"), so the calibration can never score tokens.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tokenclean (pure Python parts)
from tokenclean.report.table import passes, training_record

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "calibration.yaml"
SINGLE_TEMPLATE_CONFIG = ROOT / "configs" / "single-template" / "calibration.yaml"
# Each world's calibration record, by its calibration config (--record for any other config)
RECORDS = {BASE_CONFIG: ROOT / "docs" / "world-calibration-v2.md",
           SINGLE_TEMPLATE_CONFIG: ROOT / "docs" / "world-calibration.md"}
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # an experiment name's characters (the schema's pattern)
PROG = "calibrate_world"

# Issue 13's targets, from the relations of the paper's baseline rows.
BASE_GAP = 0.2          # "base far below the rest": at least this far below every other row's mean
# ... on the paper's likelihood-heavy mix (mix_acc): far below as in the paper, whose base is 4.7 to 8.6 points of
# 100 below its SFT rows (44.2 against 48.9-52.8), neither at the ceiling nor at chance
BASE_GAP_MIX = 0.05
WARMUP_BELOW = 0.05     # the warm-up model not above full and at most this far below it
RANDOM_WITHIN = 0.05    # random within this of full
MAX_SEED_STD = 0.03     # seed std of every row's average
# Issue 23's targets on the ground-truth rows (the paper's premise holds): keeping exactly the informative tokens
# costs at most this much against full SFT, and dropping exactly the noisy ones costs nothing.
KEEP_INFORMATIVE_BELOW = 0.02
# The methods a variant may list: none reads a token score (the ground-truth rows read the world's labels).
UNSCORED = {"full", "random", "full+warmup", "truth_drop_noisy", "truth_keep_informative"}
EPS = 1e-9              # table.csv holds 4 decimals: 0.53 - 0.05 must count as 0.48


class CalibrationError(ValueError):
    """Bad input (a variant, a file): one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------------
# variants and configs
# ---------------------------------------------------------------------------------------------------------
def nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides with dotted keys (``sft.train.steps``) as nested mappings; nested input passes through."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, last = str(key).split(".")
        nested: Any = {last: nest(value) if isinstance(value, dict) else value}
        for part in reversed(parents):
            nested = {part: nested}
        out = merge(out, nested)
    return out


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: mappings key by key, anything else (lists too) replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def flatten(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested overrides as ``KEY=VALUE`` arguments (the inverse of parsing them): how to rerun a variant."""
    pairs = []
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            pairs += flatten(value, f"{prefix}{key}.")
        else:
            pairs.append(f"{prefix}{key}={json.dumps(value, separators=(',', ':'))}")
    return pairs


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` arguments (VALUE read as YAML) as a dotted-key mapping."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CalibrationError(f"override {pair!r}: expected KEY=VALUE (e.g. sft.train.steps=500)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise CalibrationError(f"override {pair!r}: value is not YAML ({str(e).splitlines()[0]})") from None
    return out


def load_variants(path: Path) -> dict[str, dict[str, Any]]:
    """A YAML file mapping each variant name to its overrides (an empty mapping: the calibration config as is)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise CalibrationError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise CalibrationError(f"{path}: expected a mapping of variant names to overrides")
    variants = {}
    for name, overrides in data.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise CalibrationError(f"{path}: {name}: expected a mapping of overrides")
        variants[str(name)] = nest(overrides or {})
    return variants


def variant_config(base: dict[str, Any], name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The experiment a variant runs: the calibration config, the overrides, ``experiment: calibration-<name>``."""
    if not NAME.match(name):
        raise CalibrationError(f"variant {name!r}: use letters, digits, _ . - (it names the experiment)")
    if "experiment" in overrides or ("methods" in overrides and not set(overrides["methods"]) <= UNSCORED):
        raise CalibrationError(f"variant {name}: the experiment's name and scored methods are not overridable")
    config = merge(base, overrides)
    config["experiment"] = f"calibration-{name}"
    for section in ("warmup", "sft"):
        train = config.get(section, {}).get("train", {})
        if train.get("epochs") and train.get("steps", 0) > 0:
            raise CalibrationError(f"variant {name}: {section}.train sets epochs but steps is {train['steps']} "
                                   f"(steps win); set {section}.train.steps=0 to train by epochs")
    return config


# ---------------------------------------------------------------------------------------------------------
# passes and rows
# ---------------------------------------------------------------------------------------------------------
def planned_steps(train: dict[str, Any], samples: int) -> int:
    """The optimizer steps of a training block (epoch mode when steps is 0: tokenclean.training's rule)."""
    if train.get("steps", 100):
        return int(train.get("steps", 100))
    return math.ceil(float(train["epochs"]) * samples / int(train.get("batch_size", 32)))


def row_samples(config: dict[str, Any]) -> dict[str, int]:
    """Each trained row's own data, in samples: the warm-up set, the pool, or both (full+warmup)."""
    world = config["world"]
    pool = world["pool_samples"]
    return {"warmup": world["warmup_samples"], "full": pool, "random": pool, "truth_drop_noisy": pool,
            "truth_keep_informative": pool, "full+warmup": pool + world["warmup_samples"]}


def planned_passes(config: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Steps and passes each trained row will make, from the config (the dry run's figures)."""
    out = {}
    for row, samples in row_samples(config).items():
        if row != "warmup" and row not in config["methods"]:
            continue
        train = config["warmup" if row == "warmup" else "sft"]["train"]
        steps = planned_steps(train, samples)
        out[row] = {"steps": steps, "passes": round(passes(steps, int(train.get("batch_size", 32)), samples), 3)}
    return out


RUN = re.compile(r"^(?P<method>[a-z0-9_+-]+?)(?:_r[0-9.]+)?_s(?P<seed>\d+)$")  # the workflow's SFT run names


def measured_passes(results: Path, config: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Steps and passes each trained row made, as its model recorded them (``tokenclean.json``: steps,
    batch size, the samples of its table), plus its training seconds (the first seed's model of an SFT row)."""
    models = {"warmup": results / "models" / "warmup"}
    for model in sorted((results / "models" / "sft").iterdir()):
        m = RUN.match(model.name)
        if m and int(m["seed"]) == config["seeds"][0]:
            models.setdefault(m["method"], model)  # the first ratio of random
    out = {}
    for row in row_samples(config):
        if row in models:
            record = training_record(models[row])
            out[row] = {"steps": record["steps"], "samples": record["samples"], "seconds": record["seconds"],
                        "passes": round(record["passes"], 3)}
    return out


def read_rows(table_csv: Path) -> dict[str, dict[str, Any]]:
    """table.csv's rows by label (``method`` or ``method@ratio``): mean, std and seeds of the average answer
    accuracy, and the average whole-response match where the table has it."""
    try:
        with table_csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise CalibrationError(f"{table_csv}: cannot read ({e.strerror})") from None
    need = {"method", "ratio", "n_seeds", "average_mean", "average_std"}
    if not rows or not need <= set(rows[0]):
        raise CalibrationError(f"{table_csv}: expected the columns {sorted(need)} (a table.csv of tokenclean report)")
    out = {}
    for line, row in enumerate(rows, start=2):
        label = row["method"] + (f"@{row['ratio']}" if row["ratio"] else "")
        try:
            out[label] = {"mean": float(row["average_mean"]), "std": float(row["average_std"]),
                          "n_seeds": int(row["n_seeds"])}
            for extra in ("response_em", "mc_acc", "answer_acc"):
                if row.get(f"average_{extra}_mean"):
                    out[label][extra] = float(row[f"average_{extra}_mean"])
            out[label]["families"] = {k[: -len("_mean")]: float(v) for k, v in row.items()
                                      if k.endswith("_mean") and not k.startswith("average") and v}
        except ValueError:
            raise CalibrationError(f"{table_csv}:{line}: a number is not a number") from None
    return out


def headline(config: dict[str, Any]) -> str:
    """The table's headline metric (rules/common.smk: METRIC): the paper's mix where the world has
    multiple-choice tasks, else answer accuracy."""
    return "mix_acc" if config["world"].get("multiple_choice") else "answer_acc"


def per_seed(results: Path, label: str, seeds: list[int], metric: str = "answer_acc") -> list[float]:
    """A row's average headline ``metric`` for each seed (its evaluation files); one value for base and warmup."""
    method, _, ratio = label.partition("@")
    if method in ("base", "warmup"):
        names = [method]
    else:
        names = [f"{method}{f'_r{ratio}' if ratio else ''}_s{seed}" for seed in seeds]
    values = []
    for name in names:
        path = results / "eval" / f"{name}.json"
        if path.exists():
            values.append(round(float(json.loads(path.read_text())["average"][metric]), 4))
    return values


def targets(rows: dict[str, dict[str, Any]], base_gap: float = BASE_GAP) -> dict[str, bool | None]:
    """Issue 13's targets on the rows that use no token score and issue 23's on the ground-truth rows; None where
    a row it needs is missing or the figure is not measured (a seed std needs two seeds). Bounds are inclusive (up
    to float rounding). ``base_gap``: how far below every other row the base must be."""
    mean = {label: row["mean"] for label, row in rows.items()}
    full, warmup, base = mean.get("full"), mean.get("warmup"), mean.get("base")
    randoms = [m for label, m in mean.items() if label.split("@")[0] == "random"]
    others = [m for label, m in mean.items() if label != "base"]
    stds = [row["std"] for row in rows.values() if row["n_seeds"] >= 2]

    def at_most(a: float, b: float) -> bool:
        return a <= b + EPS

    return {
        "base_far_below": None if base is None or not others else all(at_most(base, m - base_gap) for m in others),
        "warmup_not_above_full": None if full is None or warmup is None else at_most(warmup, full),
        "warmup_at_most_0.05_below_full": None if full is None or warmup is None
        else at_most(full - WARMUP_BELOW, warmup) and at_most(warmup, full),
        "random_within_0.05_of_full": None if full is None or not randoms
        else all(at_most(abs(m - full), RANDOM_WITHIN) for m in randoms),
        "full+warmup_at_least_full": None if full is None or "full+warmup" not in mean
        else at_most(full, mean["full+warmup"]),
        "seed_std_at_most_0.03": None if not stds else all(at_most(s, MAX_SEED_STD) for s in stds),
        "truth_keep_informative_at_least_full-0.02": None if full is None or "truth_keep_informative" not in mean
        else at_most(full - KEEP_INFORMATIVE_BELOW, mean["truth_keep_informative"]),
        "truth_drop_noisy_at_least_full": None if full is None or "truth_drop_noisy" not in mean
        else at_most(full, mean["truth_drop_noisy"]),
    }


def summarise(results: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A finished variant's figures: rows (mean, std, seeds, per-seed values), passes and targets."""
    rows = read_rows(results / "table.csv")
    for label, row in rows.items():
        row["per_seed"] = per_seed(results, label, config["seeds"], headline(config))
    gap = BASE_GAP_MIX if headline(config) == "mix_acc" else BASE_GAP
    return {"rows": rows, "passes": measured_passes(results, config), "targets": targets(rows, gap)}


# ---------------------------------------------------------------------------------------------------------
# the workflow
# ---------------------------------------------------------------------------------------------------------
def workflow_targets(config: dict[str, Any]) -> list[str]:
    results = f"{config.get('results_dir', 'results')}/{config['experiment']}"
    return [f"{results}/table.csv", f"{results}/significance.csv"]


def snakemake_command(config_path: Path, config: dict[str, Any], cores: int, dry_run: bool) -> list[str]:
    """The workflow call for one variant (dry run: the plan as a TSV summary of every output file)."""
    snakemake = Path(sys.executable).with_name("snakemake")
    # --rerun-incomplete: a variant interrupted mid-job is finished by the next call, not refused
    cmd = [str(snakemake) if snakemake.exists() else "snakemake", "--cores", str(cores), "--rerun-incomplete"]
    cmd += ["--dry-run", "--summary"] if dry_run else []
    return cmd + ["--configfile", str(config_path), "--", *workflow_targets(config)]


def planned_rules(summary_tsv: str) -> dict[str, int]:
    """Output files per rule that a dry run's ``--summary`` says are still to be made."""
    counts: dict[str, int] = {}
    lines = [line for line in summary_tsv.splitlines() if "\t" in line]
    if not lines or not lines[0].startswith("output_file\t"):
        raise CalibrationError("snakemake --summary: no table in its output")
    header = lines[0].split("\t")
    for line in lines[1:]:
        fields = dict(zip(header, line.split("\t")))
        if fields.get("plan") != "no update":
            counts[fields["rule"]] = counts.get(fields["rule"], 0) + 1
    return counts


def plan(config: dict[str, Any], cores: int = 2) -> dict[str, int]:
    """Dry run of a variant's experiment: output files per rule still to be made (validates the config)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="calibration-") as f:
        yaml.safe_dump(config, f, sort_keys=False)
        f.flush()
        proc = subprocess.run(snakemake_command(Path(f.name), config, cores, dry_run=True), cwd=ROOT,
                              capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CalibrationError(f"variant {config['experiment']}: the workflow refused it: "
                               f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return planned_rules(proc.stdout)


def run(config: dict[str, Any], cores: int) -> tuple[int, float, str]:
    """Run a variant's experiment; (exit code, wall seconds, the merged config's path under results/)."""
    results_dir = ROOT / config.get("results_dir", "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    config_path = results_dir / f"{config['experiment']}.config.yaml"  # beside, not inside, its outputs
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.monotonic()
    proc = subprocess.run(snakemake_command(config_path, config, cores, dry_run=False), cwd=ROOT, check=False)
    return proc.returncode, time.monotonic() - started, str(config_path)


# What the base model depends on: two variants equal in these share their world and pretrained base.
BASE_KEYS = ("world", "base_model", "max_length")
# A base's outputs and their log and benchmark records (relative to the experiment's directory).
BASE_OUTPUTS = ("world", "models/base", "logs/world.log", "logs/pretrain_base.log", "benchmarks/world.tsv",
                "benchmarks/pretrain_base.tsv")


def reuse_base(config: dict[str, Any]) -> str | None:
    """Copy the world and pretrained base of an earlier calibration experiment with the same world, base model and
    length (``BASE_KEYS``) into this variant's directory, times preserved, so that the workflow does not pretrain
    again (3 minutes per variant); returns that experiment's name. Pretraining on CPU is deterministic (tested), so
    the copy is what this variant would have made; ``--no-reuse`` makes it anyway."""
    results_dir = ROOT / config.get("results_dir", "results")
    target = results_dir / config["experiment"]
    if (target / "models" / "base").exists():
        return None
    wanted = {k: config.get(k) for k in BASE_KEYS}
    for other in sorted(results_dir.glob("calibration-*.config.yaml")):
        source = results_dir / other.name[: -len(".config.yaml")]
        if source == target or not (source / "models" / "base" / "config.json").is_file():
            continue
        earlier = yaml.safe_load(other.read_text()) or {}
        if {k: earlier.get(k) for k in BASE_KEYS} != wanted:
            continue
        for rel in BASE_OUTPUTS:
            src, dst = source / rel, target / rel
            if not src.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=shutil.copy2)
            else:
                shutil.copy2(src, dst)
        return source.name
    return None


def job_seconds(results: Path) -> float:
    """CPU-side cost of a variant: the seconds of every job the workflow benchmarked (also when it was cached)."""
    total = 0.0
    for tsv in results.glob("benchmarks/**/*.tsv"):
        with tsv.open(newline="") as f:
            total += sum(float(row["s"]) for row in csv.DictReader(f, delimiter="\t"))
    return total


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------
def show(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def variant_markdown(name: str, overrides: dict[str, Any], figures: dict[str, Any], cores: int,
                     config: Path = BASE_CONFIG) -> str:
    """A variant's section of the calibration record: command, passes, rows and targets."""
    where = "" if config.resolve() == BASE_CONFIG else f"--config {shlex.quote(str(config))} "
    command = f".venv/bin/python scripts/calibrate_world.py --cores {cores} {where}--variant {name} " + \
        " ".join(shlex.quote(p) for p in flatten(overrides))
    out = [f"### {name}", "", f"`{command.strip()}`", ""]
    if "error" in figures:
        return "\n".join(out + [f"Failed: {figures['error']}", ""])
    p = figures["passes"]
    out.append("Passes over own data (steps): " + ", ".join(
        f"{row} {v['passes']:.2f} ({v['steps']})" for row, v in p.items()) + ".")
    out.append(f"Time: {figures['wall_seconds'] / 60:.1f} min wall on {cores} cores this call, "
               f"{figures['job_seconds'] / 60:.1f} min of jobs in all.")
    if figures.get("base_from"):
        out.append(f"World and base copied from `{figures['base_from']}` (same {', '.join(BASE_KEYS)}).")
    families = sorted({f for row in figures["rows"].values() for f in row.get("families", {})})
    mixed = any("mc_acc" in row for row in figures["rows"].values())
    parts = ["mc_acc", "answer_acc"] if mixed else []
    out += ["", f"| row | passes | average {'mix_acc' if mixed else 'answer acc'} | per seed | "
            + "".join(f"{p} | " for p in parts) + "response match | "
            + " | ".join(families) + " |", "|---|---|---|---|" + "---|" * (len(parts) + 1) + "---|" * len(families)]
    for label, row in figures["rows"].items():
        passes_cell = f"{p[label.split('@')[0]]['passes']:.2f}" if label.split("@")[0] in p else "–"
        cell = f"{row['mean']:.3f}" + (f" ± {row['std']:.3f}" if row["n_seeds"] >= 2 else "")
        seeds = " / ".join(f"{v:.3f}" for v in row["per_seed"])
        em = f"{row['response_em']:.3f}" if "response_em" in row else "–"
        fam = " | ".join(f"{row.get('families', {}).get(f, float('nan')):.2f}" for f in families)
        extra = "".join(f"{row[p]:.3f} | " if p in row else "– | " for p in parts)
        out.append(f"| {label} | {passes_cell} | {cell} | {seeds} | {extra}{em} | {fam} |")
    out += ["", "Targets: " + ", ".join(f"{k} {show(v)}" for k, v in figures["targets"].items()) + ".", ""]
    return "\n".join(out)


def append_record(record: Path, argv: list[str], sections: list[str]) -> None:
    """Append this call's variants to the calibration record (created with its header when missing)."""
    if not record.exists():
        record.write_text("# Calibration record of the embedded world\n\n"
                          "Every setting tried on the rows that use no token score (issue 13), appended by\n"
                          "`scripts/calibrate_world.py`; each variant's overrides are merged into\n"
                          "`configs/calibration.yaml` (the default experiment's config with only the rows base,\n"
                          "warmup, full, random 0.6, full+warmup). Passes: steps × batch / samples of the row's own\n"
                          "data. Targets: base at least 0.2 below every row; warm-up not above full and at most\n"
                          "0.05 below it; random within 0.05 of full; full+warmup at least full; seed std of every\n"
                          "row's average at most 0.03 (base and warmup are one model each: no seed std).\n")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(shlex.quote(a) for a in ["scripts/calibrate_world.py", *argv])
    with record.open("a") as f:
        f.write(f"\n## {stamp}: `{command}`\n\n" + "\n".join(sections))


def print_variant(name: str, figures: dict[str, Any]) -> None:
    print(f"\n== {name}")
    if "error" in figures:
        print(f"   failed: {figures['error']}")
        return
    for row, v in figures["passes"].items():
        print(f"   {row:12s} {v['steps']:6d} steps  {v['passes']:6.2f} passes over {v['samples']} samples")
    for label, row in figures["rows"].items():
        std = f" ± {row['std']:.3f}" if row["n_seeds"] >= 2 else "        "
        print(f"   {label:12s} {row['mean']:.3f}{std}  seeds {row['per_seed']}")
    for target, ok in figures["targets"].items():
        print(f"   {target:32s} {show(ok)}")


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a variant: its name, then its overrides (dotted keys, YAML values)")
    parser.add_argument("--variants", type=Path, help="YAML file: variant name -> overrides")
    parser.add_argument("--only", nargs="+", default=[], help="run only these variants of --variants")
    parser.add_argument("--seeds", help="comma-separated seeds for every variant (e.g. 1 for a scouting pass)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--record", type=Path, help="the calibration record to append to (default: the world's own, "
                        "docs/world-calibration-v2.md or, for the single-template world, docs/world-calibration.md)")
    parser.add_argument("--config", type=Path, default=BASE_CONFIG,
                        help="the calibration config the variants modify (default: the default world's, "
                             "configs/calibration.yaml; the single-template world's: "
                             "configs/single-template/calibration.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="plan only: passes and jobs, nothing runs")
    parser.add_argument("--no-reuse", action="store_true",
                        help="pretrain every variant's base, even where an earlier variant made the same one")
    return parser.parse_args(argv)


def chosen_variants(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    variants = load_variants(a.variants) if a.variants else {}
    if a.only:
        missing = [n for n in a.only if n not in variants]
        if missing:
            raise CalibrationError(f"{a.variants}: no variant {missing[0]!r}")
        variants = {n: variants[n] for n in a.only}
    for name, *pairs in a.variant:
        variants[name] = nest(parse_pairs(pairs))
    if not variants:
        raise CalibrationError("no variant: give --variant NAME [KEY=VALUE ...] or --variants FILE")
    if a.seeds:
        try:
            seeds = [int(s) for s in a.seeds.split(",")]
        except ValueError:
            raise CalibrationError(f"--seeds {a.seeds}: expected comma-separated integers") from None
        variants = {n: merge(o, {"seeds": seeds}) for n, o in variants.items()}
    return variants


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    try:
        variants = chosen_variants(a)
        if a.record is None:
            a.record = RECORDS.get(a.config.resolve())
            if a.record is None:
                raise CalibrationError(f"--config {a.config}: give --record FILE (the calibration record to append to)")
        try:
            base = yaml.safe_load(a.config.read_text())
        except OSError as e:
            raise CalibrationError(f"{a.config}: cannot read ({e.strerror})") from None
        configs = {name: variant_config(base, name, o) for name, o in variants.items()}
        if a.dry_run:
            for name, config in configs.items():
                rules = plan(config, a.cores)
                print(f"\n== {name}: {json.dumps(variants[name])}")
                for row, v in planned_passes(config).items():
                    print(f"   {row:12s} {v['steps']:6d} steps  {v['passes']:6.2f} passes")
                print("   to make (files per rule): " + ", ".join(f"{r} {n}" for r, n in sorted(rules.items())))
                if "token_loss" in rules:
                    raise CalibrationError(f"variant {name}: the plan scores tokens (token_loss)")
            return 0
    except CalibrationError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    figures, sections, failed = {}, [], False
    for name, config in configs.items():
        reused = None if a.no_reuse else reuse_base(config)
        if reused:
            print(f"{PROG}: {name}: world and base copied from {reused} (same {', '.join(BASE_KEYS)})")
        code, seconds, config_path = run(config, a.cores)
        results = ROOT / config.get("results_dir", "results") / config["experiment"]
        try:
            if code != 0:
                raise CalibrationError(f"snakemake exited with {code} (logs under {results.relative_to(ROOT)}/logs)")
            figures[name] = summarise(results, config)
        except (CalibrationError, OSError, KeyError, ValueError) as e:
            failed = True
            figures[name] = {"error": str(e)}
        figures[name].update(overrides=variants[name], config=config_path, base_from=reused,
                             wall_seconds=round(seconds, 1), job_seconds=round(job_seconds(results), 1))
        print_variant(name, figures[name])
        sections.append(variant_markdown(name, variants[name], figures[name], a.cores, a.config))
    append_record(a.record, argv, sections)
    print(json.dumps({"variants": figures}, sort_keys=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
