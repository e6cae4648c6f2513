"""The workflow's plan as data, through Snakemake's Python API (not its human-readable dry-run text).

Run as a script in a subprocess (planning changes the process's working directory and environment):

    python tests/snakemake_plan.py --directory WORK [--profile DIR] --configfile A.yaml [B.yaml ...]

prints one JSON object: every job of the DAG (rule, wildcards, outputs, logs, params, resources, its shell command
as `--printshellcmds` would print it, whether it must run and why) and the environment the jobs would inherit. With
a profile, its default and per-rule resources apply, read by Snakemake's own command-line parser. `plan()` does that
from a test; `to_run()` counts the jobs per rule that must run (a dry run's "Job stats").
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plan(workdir: Path, *configfiles: Path, env: dict[str, str] | None = None, profile: Path | None = None) -> dict:
    """The plan of ``rule all`` for ``configfiles`` (none: config.yaml) in ``workdir``; no job runs."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--directory", str(workdir),
           *(["--profile", str(profile)] if profile else []), "--configfile", *map(str, configfiles)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env if env is not None else {**os.environ},
                          timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def without_profile_notice(stderr: str) -> str:
    """Snakemake's stderr without the line it prints before anything else on every run, naming the profiles it
    reads (profiles/default, beside the Snakefile, always): what follows is the workflow's own."""
    return re.sub(r"\AUsing (profiles? .+? and )?(workflow specific profile \S+ )?for setting default command "
                  r"line arguments\.\n", "", stderr)


def to_run(planned: dict) -> Counter:
    """rule -> how many of its jobs must run."""
    return Counter(job["rule"] for job in planned["jobs"] if job["needrun"])


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--directory", type=Path, required=True)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--configfile", type=Path, nargs="*", default=[])
    a = parser.parse_args()

    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, Quietness, ResourceSettings

    resources = ResourceSettings(cores=1)
    if a.profile:
        from snakemake.cli import parse_args

        _, cli = parse_args(["--snakefile", str(ROOT / "Snakefile"), "--profile", str(a.profile.resolve())])
        resources = ResourceSettings(cores=1, default_resources=cli.default_resources,
                                     overwrite_resources=cli.set_resources)

    with SnakemakeApi(OutputSettings(dryrun=True, quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(resource_settings=resources,
                                    config_settings=ConfigSettings(configfiles=[p.resolve() for p in a.configfile]),
                                    snakefile=ROOT / "Snakefile", workdir=a.directory.resolve())
        workflow_api.dag(DAGSettings())
        workflow = workflow_api._workflow  # the API has no public accessor for the built DAG's jobs
        workflow._prepare_dag(forceall=False, ignore_incomplete=False, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        dag = workflow.dag
        jobs = [{"rule": job.rule.name, "wildcards": {k: str(v) for k, v in job.wildcards_dict.items()},
                 "output": sorted(map(str, job.output)), "log": sorted(map(str, job.log)),
                 "params": {k: str(v) for k, v in job.params.items()},
                 "resources": {k: str(v) for k, v in job.resources.items() if not k.startswith("_")},
                 "shell": job.shellcmd or "",
                 "needrun": dag.needrun(job), "reason": str(dag.reason(job)) if dag.needrun(job) else ""}
                for job in dag.jobs]
    print(json.dumps({"jobs": sorted(jobs, key=lambda j: j["output"]), "environ": dict(os.environ)}))


if __name__ == "__main__":
    _main()
