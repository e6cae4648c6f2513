# Wiring helpers only: paths, run names and command lines built from the config. No experiment logic here.
import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

R = f"{config['results_dir']}/{config['experiment']}"
THREADS = config.get("threads", 1)
TASKS = ",".join(config["evaluation"]["tasks"])

# Inside a conda env the env's python runs the package from this checkout; otherwise the python running
# snakemake (the project's venv) does. Either way every rule is one `tokenclean` command.
os.environ["PYTHONPATH"] = workflow.basedir + os.pathsep + os.environ.get("PYTHONPATH", "")
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    TC = "python -m tokenclean.cli"
else:
    TC = f"{shlex.quote(sys.executable)} -m tokenclean.cli"


def ratio_tag(ratio) -> str:
    return f"{float(ratio):g}"


def mask_name(method: str, ratio, seed: int) -> str:
    """Masks depend on the seed only for the random method; scoring-based masks are shared across seeds."""
    if method == "full":
        return "full"
    if method == "random":
        return f"random_r{ratio_tag(ratio)}_s{seed}"
    return f"{method}_r{ratio_tag(ratio)}"


def sft_runs() -> list[str]:
    runs = []
    for method in config["methods"]:
        for seed in config["seeds"]:
            if method == "full":
                runs.append(f"full_s{seed}")
            else:
                runs.extend(f"{method}_r{ratio_tag(r)}_s{seed}" for r in config["ratios"])
    return runs


def parse_run(run: str) -> tuple[str, str | None, int]:
    """Inverse of sft_runs(): (method, ratio, seed)."""
    head, seed = run.rsplit("_s", 1)
    method, _, ratio = head.partition("_r")
    return method, (ratio or None), int(seed)


def mask_for_run(run: str) -> str:
    method, ratio, seed = parse_run(run)
    return f"{R}/masks/{mask_name(method, ratio, seed)}.mask.npy"


def model_dir(run: str) -> str:
    return {"base": f"{R}/models/base", "warmup": f"{R}/models/warmup"}.get(run, f"{R}/models/sft/{run}")


def train_flags(section: dict) -> str:
    """The `train` block of a config section as `tokenclean train` flags."""
    flags = []
    for key, value in section.get("train", {}).items():
        flags += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(flags)


def as_json(obj) -> str:
    return shlex.quote(json.dumps(obj, sort_keys=True))


wildcard_constraints:
    dataset="warmup|pool",
    model="base|warmup",
    run="[A-Za-z0-9_.+-]+",
    mask="[A-Za-z0-9_.+-]+",
