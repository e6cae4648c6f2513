# Wiring helpers only: paths, run names and command lines built from the config. No experiment logic here.
import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

R = f"{config['results_dir']}/{config['experiment']}"
# An embedded experiment generates its world and pretrains its base model; any other one brings its data
# (rule `data`) and names its base model (a hub id or a local directory, loaded as it is).
EMBEDDED = "world" in config
# Caches of matplotlib and torch inductor go to the project's own .cache/ unless the environment names another
# place; jobs inherit these. The Hugging Face settings are the user's (HF_HOME holds the login token of gated
# models and the hub cache): an embedded experiment only switches the hub off, as it never needs it; lm-eval's
# request cache is off.
for _var, _sub in (("MPLCONFIGDIR", "matplotlib"), ("TORCHINDUCTOR_CACHE_DIR", "torchinductor")):
    os.environ.setdefault(_var, os.path.join(workflow.basedir, ".cache", _sub))
if EMBEDDED:
    for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(_var, "1")
THREADS = config.get("threads", 1)
SERIAL_THREADS = config.get("serial_threads", THREADS)  # pretrain_base: every other job waits for it
# Evaluation tasks: as configured, else every family of the embedded world (tokenclean.config requires one).
TASKS = "" if config["evaluation"].get("benchmarks") else ",".join(
    config["evaluation"].get("tasks") or config["world"]["families"])
# The table's headline: answer accuracy on the world's tasks, or each benchmark's configured metric ("score").
METRIC = "score" if config["evaluation"].get("benchmarks") else "answer_acc"

# Inside a conda env the env's python runs the package from this checkout; otherwise the python running
# snakemake (the project's venv) does. Either way every rule is one `tokenclean` command.
os.environ["PYTHONPATH"] = workflow.basedir + os.pathsep + os.environ.get("PYTHONPATH", "")
from tokenclean.config import ratio_tag  # noqa: E402  (pure Python: no torch at planning time)
from tokenclean.launch import tokenclean_command  # noqa: E402

PYTHON = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method else sys.executable
TC = tokenclean_command(PYTHON)
# Training jobs (warm-up, rows, rounds) may run one process per GPU; the recipe does not change with it.
HARDWARE = config.get("hardware", {})
GPUS = HARDWARE.get("gpus", 1)
TRAIN = tokenclean_command(PYTHON, GPUS, HARDWARE.get("launcher", "torchrun"),
                           timeout_minutes=HARDWARE.get("timeout_minutes"))


# Methods without a ratio: one mask (and one SFT row per seed). `full+warmup` trains every response token of
# the pool and the warm-up set together (the fair baseline for methods that use the warm-up data through the
# reference); the ground-truth rows (embedded world only) read the token classes: `truth_drop_noisy` drops exactly
# the corrupted and garbage tokens, `truth_keep_informative` keeps exactly the informative and novel ones.
UNRATIOED = ("full", "truth_drop_noisy", "truth_keep_informative", "full+warmup")
# Methods whose mask ranks the whole pool by loss(base) - loss(warm-up model) (rules/selection.smk).
POOL_SCORED = ("rho", "fixed")
# Methods trained as a chain of rounds over chunks of the pool (rules/self_evolving.smk), not by the sft rule.
CHAINED = ("self_evolving",)
ROUNDS = config.get("self_evolving", {}).get("rounds", 3)
# The pool is cut into CHUNKS; the rounds use the last ROUNDS of them (the paper: 5 chunks, the first one is the
# warm-up data, 4 rounds); tokenclean.config refuses fewer chunks than rounds.
CHUNKS = config.get("self_evolving", {}).get("chunks", ROUNDS)
DATA_DIR = f"{R}/world" if EMBEDDED else f"{R}/data"
BASE_MODEL = f"{R}/models/base" if EMBEDDED else config["base_model"]["name"]
TRUST = "--trust-remote-code" if config["base_model"].get("trust_remote_code") else ""
# GPUs a job asks the scheduler (Slurm, or `--resources gpu=N` locally) for: a training job every configured GPU,
# scoring and evaluation one. The embedded experiment runs on CPU and asks for none unless `hardware.gpus` is set.
GPU_JOBS = "gpus" in HARDWARE or not EMBEDDED
TRAIN_GPUS = GPUS if GPU_JOBS else 0
ONE_GPU = 1 if GPU_JOBS else 0

# Jobs that other jobs wait for start first among the ready ones (Snakemake's rule `priority`): the warm-up
# model, tokenizing, scoring, selection and each round of a self-evolving chain, whose rounds are the longest path
# of the DAG. Left to the scheduler's choice, the chains of the embedded run started late and their last rounds
# and evaluations ran with one core idle for about 30 s at the end.
UNBLOCKING = 1


def model_ref(name: str) -> str:
    """What a command loads for model `name` (base, warmup, rounds/...): a workflow directory or the base's id."""
    return BASE_MODEL if name == "base" else f"{R}/models/{name}"


def revision_flag(name: str = "base") -> str:
    """`--revision R` (base_model.revision) for a command that loads the base model by hub id; else empty."""
    revision = "" if EMBEDDED else config["base_model"].get("revision", "")
    return f"--revision {shlex.quote(str(revision))}" if revision and name == "base" else ""


def model_input(name: str) -> list[str]:
    """Model `name` as a rule input: nothing for a base model the workflow does not make."""
    return [model_ref(name)] if EMBEDDED or name != "base" else []


def mask_name(method: str, ratio, seed: int) -> str:
    """Masks depend on the seed only for the random method; scoring-based masks are shared across seeds."""
    if method in UNRATIOED:
        return method
    if method == "random":
        return f"random_r{ratio_tag(ratio)}_s{seed}"
    return f"{method}_r{ratio_tag(ratio)}"


def sft_runs() -> list[str]:
    runs = []
    for method in config["methods"]:
        for seed in config["seeds"]:
            if method in UNRATIOED:
                runs.append(f"{method}_s{seed}")
            else:
                runs.extend(f"{method}_r{ratio_tag(r)}_s{seed}" for r in config["ratios"])
    return runs


def parse_run(run: str) -> tuple[str, str | None, int]:
    """Inverse of sft_runs(): (method, ratio, seed)."""
    head, seed = run.rsplit("_s", 1)
    method, _, ratio = head.partition("_r")
    return method, (ratio or None), int(seed)


def sft_inputs(wildcards) -> dict[str, str]:
    """The token table an SFT row trains on and, except for full+warmup (every token), its mask."""
    method, ratio, seed = parse_run(wildcards.run)
    if method == "full+warmup":
        return {"tokens": f"{R}/tokens/pool+warmup.tokens.npz"}
    return {"tokens": f"{R}/tokens/pool.tokens.npz", "mask": f"{R}/masks/{mask_name(method, ratio, seed)}.mask.npy"}


def pool_masks() -> list[str]:
    """Every mask over the pool that the configured rows use (for the cleaning-quality table)."""
    names = []
    for run in sft_runs():
        method, ratio, seed = parse_run(run)
        if method != "full+warmup" and method not in CHAINED and mask_name(method, ratio, seed) not in names:
            names.append(mask_name(method, ratio, seed))
    return [f"{R}/masks/{name}.mask.npy" for name in names]


def chain_runs() -> list[str]:
    """The configured runs trained as a chain of rounds (rules/self_evolving.smk)."""
    return [run for run in sft_runs() if parse_run(run)[0] in CHAINED]


def round_models(run: str) -> list[str]:
    """Every round's model of a chain, round 1 to the last (the row's own model)."""
    return [f"{R}/models/rounds/{run}_t{t}" for t in range(1, ROUNDS + 1)]


def model_dir(run: str) -> str:
    """The model a run's evaluation reads: a self-evolving row is the last model of its chain."""
    if run in ("base", "warmup"):
        return model_ref(run)
    if run.startswith("rounds/"):
        return f"{R}/models/{run}"
    if parse_run(run)[0] in CHAINED:
        return round_models(run)[-1]
    return f"{R}/models/sft/{run}"


def train_flags(section: dict) -> str:
    """The `train` block of a config section as `tokenclean train` flags, in key order: a job's params (and so
    whether it re-runs) do not depend on the order the config file happens to list its keys in."""
    flags = []
    for key, value in sorted(section.get("train", {}).items()):
        flags += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(flags)


def as_json(obj) -> str:
    return shlex.quote(json.dumps(obj, sort_keys=True))


wildcard_constraints:
    dataset="warmup|pool|pool\.c[0-9]+of[0-9]+",
    model="base|warmup|rounds/[A-Za-z0-9_.+-]+",
    run="(rounds/)?[A-Za-z0-9_.+-]+",
    mask="[A-Za-z0-9_.+-]+",
