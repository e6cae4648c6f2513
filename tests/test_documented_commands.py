"""The README's and the docs' commands work as written, typed in the repository root.

Every command of the ```bash blocks and every `.venv/bin/snakemake ...` command of the prose of README.md and
docs/*.md is picked up here, so a newly documented command is checked too:

- a dry run (`snakemake -n ...`, `make dry-run`) and a quick make target (`make lint`) run verbatim;
- a command that would run a workflow is in LONG, with the dry run that stands in for it;
- a `tokenclean` example (placeholder file names) is parsed by the CLI's own parser: the command, its flags
  and their values (JSON included) must be accepted.

Make never reinstalls the environment here (`-o .venv/.installed`). Commands other than these (the benchmark
scripts, wget, mkdir) are not run.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.snakemake_plan import plan

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
STAMP = ".venv/.installed"

# Commands that run a workflow (or the test suite): too long for a test. A make target is checked with
# `make -n` and a dry run of every snakemake command its recipe runs; a snakemake command by itself with `-n`,
# its placeholder files replaced by configs of the repository.
PAPER = "--configfile configs/paper/llama-3.2-3b.yaml configs/hardware/8-gpus.yaml"
LONG = {
    "make run",
    "make test",
    "make test-fast",
    "make run CONFIG=configs/smoke.yaml",
    ".venv/bin/snakemake --cores all --configfile my.yaml",
    "make run CONFIG=my.yaml",
    ".venv/bin/snakemake --cores all --use-conda",
    f".venv/bin/snakemake --profile profiles/workstation {PAPER}",
    f".venv/bin/snakemake --profile profiles/slurm {PAPER}",
    # docs/slurm.md: through the local one-node Slurm (tests/test_slurm.py runs it)
    ".venv/bin/snakemake --profile profiles/slurm --profile profiles/local-slurm --configfile configs/smoke.yaml",
    ".venv/bin/snakemake --cores all --configfile configs/methods.yaml",  # docs/worlds.md
    ".venv/bin/snakemake --cores all --configfile configs/single-template/methods.yaml",  # docs/methods.md, worlds.md
    ".venv/bin/snakemake --cores all --configfile configs/study.yaml",  # docs/worlds.md: the study of world v2
    ".venv/bin/snakemake --cores all --configfile configs/single-template/study.yaml",  # docs/worlds.md: of world v1
    "make compare-worlds",  # docs/worlds.md; tests/test_compare.py checks its command
    "make gpu-check",  # docs/gpu-check.md; tests/test_gpu_check.py runs it
    "make node-wheels",  # docs/gpu-check.md: downloads 25 MiB; `make test-node` runs it
    "make node-check OUT=results/node-h100",  # docs/gpu-check.md: on a GPU node; tests/test_node.py runs its script
    "make test-node",  # docs/gpu-check.md: builds a 5 GB rehearsal environment, then the tiny check and fast tests
}
# Make targets quick enough to run verbatim (besides the dry runs).
QUICK = {"make lint"}
PLACEHOLDERS = {"my.yaml": "configs/smoke.yaml"}


def with_placeholders(command: str) -> str:
    """``command`` with each placeholder file (a word, or a ``NAME=`` value) replaced by a real one."""
    return " ".join(re.sub(r"^(\w+=)?(.+)$", lambda m: (m[1] or "") + PLACEHOLDERS.get(m[2], m[2]), w)
                    for w in command.split())
CHECKED = ("make", ".venv/bin/snakemake", "snakemake", "tokenclean")


def documented_commands(text: str = README) -> list[str]:
    """The commands of the ```bash blocks (continuation lines joined, comments dropped) and of inline
    `.venv/bin/snakemake ...` spans, in README order."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(" ".join(line.split()))
    commands += [" ".join(c.split()) for c in re.findall(r"`(\.venv/bin/snakemake [^`]+)`", text)]
    # `.venv/bin/tokenclean ...` is the same command typed outside the activated environment
    commands = [c.removeprefix(".venv/bin/") if c.startswith(".venv/bin/tokenclean ") else c for c in commands]
    return [c for c in commands if c.split()[0] in CHECKED]


def sh(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ},
                          timeout=600, check=False)


def check_make(command: str, dry: bool) -> None:
    """`make` without reinstalling; with `dry`, `make -n` and a dry run of each snakemake command it prints."""
    args = with_placeholders(command).split()[1:]
    proc = sh(shlex.join(["make", "-o", STAMP, *(["-n"] if dry else []), *args]))
    assert proc.returncode == 0, f"{command}:\n{proc.stderr[-3000:]}{proc.stdout[-3000:]}"
    if not dry:
        return
    recipe = proc.stdout.splitlines()
    assert recipe, command
    for line in recipe:
        if line.startswith(".venv/bin/snakemake") and "--report" not in line:
            check_run(f"{line} -n", command)


def check_run(command: str, documented: str) -> None:
    if "--use-conda" in command and shutil.which("conda") is None:
        return  # nothing to check it with: conda is not installed here
    proc = sh(command)
    assert proc.returncode == 0, f"{documented} (ran: {command}):\n{proc.stderr[-3000:]}{proc.stdout[-3000:]}"


def parse_tokenclean(command: str, previous: dict[str, list[str]]) -> None:
    """Parse a `tokenclean` example with the real parser; `...` continues the last example of that command."""
    from tokenclean.cli import build_parser

    args = shlex.split(re.sub(r"\[(--[^]]+)\]", r"\1", command))[1:]  # `[--flag value]`: an optional flag
    if "..." in args:
        i = args.index("...")
        args = previous[args[0]] + args[i + 1:]
    previous[args[0]] = args
    try:
        build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"documented command does not parse (exit {e.code}): {command}")


DOCS = sorted((ROOT / "docs").glob("*.md"))
COMMANDS = documented_commands() + [c for page in DOCS for c in documented_commands(page.read_text())]


def test_readme_commands_are_found():
    """The parser sees the commands the README is known to show (a guard on the parsing itself)."""
    assert "make run" in COMMANDS and "make dry-run" in COMMANDS
    assert ".venv/bin/snakemake -n --configfile configs/paper/llama-3.2-3b.yaml" in COMMANDS
    assert sum(c.startswith("tokenclean ") for c in COMMANDS) >= 15
    assert not set(LONG) - set(COMMANDS), f"LONG lists commands the docs no longer show: {set(LONG) - set(COMMANDS)}"


@pytest.mark.slow  # dry runs of the documented workflows
@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.startswith("tokenclean ")], ids=str)
def test_documented_command_works_from_the_repository_root(command):
    is_dry = re.search(r"(^| )(-n|--dry-run)( |$)", command) is not None or command == "make dry-run"
    if command.startswith("make "):
        verbatim = is_dry or command in QUICK
        assert verbatim or command in LONG, f"a new make command in the README: add it to LONG or QUICK: {command}"
        check_make(command, dry=not verbatim)
    elif is_dry:
        check_run(command, command)
    else:
        assert command in LONG, f"a new command that would run a workflow: add it to LONG: {command}"
        check_run(with_placeholders(command) + " -n", command)


def test_documented_tokenclean_commands_parse():
    previous: dict[str, list[str]] = {}
    for command in COMMANDS:
        if command.startswith("tokenclean "):
            parse_tokenclean(command, previous)


@pytest.mark.slow  # plans the paper study with Snakemake
def test_documented_job_count_of_the_paper_plan(tmp_path):
    """`.venv/bin/snakemake -n --configfile X` (N jobs): the count the README and the docs give is the plan's."""
    texts = "\n".join([README] + [page.read_text() for page in DOCS])
    counts = re.findall(r"`(\.venv/bin/snakemake -n --configfile [^`]+)` \((\d+) jobs\)", texts)
    assert counts, "no documented job count found"
    for command, jobs in counts:
        configs = [ROOT / c for c in command.split("--configfile")[1].split()]
        assert len(plan(tmp_path, *configs)["jobs"]) == int(jobs), command


def test_every_command_has_help(capsys):
    """`tokenclean <command> --help` (the README's pointer to every flag) exits 0 for every command."""
    from tokenclean.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for args in [[]] + [[c] for c in commands]:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*args, "--help"])
        assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: tokenclean"), args


def calibration_commands(path: Path) -> list[str]:
    """The indented `.venv/bin/python scripts/calibrate_world.py ...` lines of a docs page (without placeholders)."""
    return [line.strip() for line in path.read_text().splitlines()
            if line.startswith("    .venv/bin/python scripts/calibrate_world.py") and "[" not in line]


@pytest.mark.slow  # plans the calibration workflow
@pytest.mark.parametrize("command", calibration_commands(ROOT / "docs" / "embedded-world.md"))
def test_the_documented_calibration_runs_as_written(command):
    """docs/embedded-world.md's calibration command, typed in the repository root, plans its variant (with
    --dry-run: the run itself takes minutes) and scores no token."""
    proc = subprocess.run(shlex.split(command) + ["--dry-run"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final-w1000-e30-n200-eq4" in proc.stdout and "token_loss" not in proc.stdout


def test_the_documented_calibration_is_the_single_template_world():
    """The variant docs/embedded-world.md names as the single-template world's is its config's world, base model and
    recipes."""
    spec = importlib.util.spec_from_file_location("calibrate_world", ROOT / "scripts" / "calibrate_world.py")
    cw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cw)
    variants = cw.load_variants(ROOT / "scripts" / "calibration-variants.yaml")
    base = yaml.safe_load((ROOT / "configs" / "single-template" / "calibration.yaml").read_text())
    chosen = cw.variant_config(base, "final-w1000-e30-n200-eq4", variants["final-w1000-e30-n200-eq4"])
    default = yaml.safe_load((ROOT / "configs" / "single-template" / "default.yaml").read_text())
    for key in ("world", "base_model", "warmup", "sft", "max_length", "self_evolving"):  # the design, not its draws
        assert chosen[key] == default[key], key


def test_the_default_world_is_its_chosen_calibration_variant_and_the_record_reruns_each_variant():
    """docs/worlds.md names v2-cap0-lr1e-3-pre3000 as the default world: config.yaml's world, base model and
    recipes. Every section of the v2 record shows the command that reruns what ran: the variant's overrides as
    scripts/calibration-variants-v2.yaml holds them."""
    spec = importlib.util.spec_from_file_location("calibrate_world", ROOT / "scripts" / "calibrate_world.py")
    cw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cw)
    variants = cw.load_variants(ROOT / "scripts" / "calibration-variants-v2.yaml")
    base = yaml.safe_load((ROOT / "configs" / "calibration.yaml").read_text())
    chosen = cw.variant_config(base, "v2-cap0-lr1e-3-pre3000", variants["v2-cap0-lr1e-3-pre3000"])
    default = yaml.safe_load((ROOT / "config.yaml").read_text())
    for key in ("world", "base_model", "warmup", "sft", "max_length", "self_evolving"):  # the design, not its draws
        assert chosen[key] == default[key], key
    assert "v2-cap0-lr1e-3-pre3000" in (ROOT / "docs" / "worlds.md").read_text()
    record = (ROOT / "docs" / "world-calibration-v2.md").read_text()
    sections = re.findall(r"^### (\S+)\n\n(?:\(.*?\)\n\n)?`(\.venv/bin/python scripts/calibrate_world\.py [^`]*)`",
                          record, re.M | re.S)
    assert {name for name, _ in sections} == set(variants)
    for name, command in sections:
        args = shlex.split(command)
        assert args[args.index("--variant") + 1] == name
        assert cw.nest(cw.parse_pairs(args[args.index("--variant") + 2:])) == variants[name], name
