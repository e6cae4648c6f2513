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
from tokenclean import methods as registry  # noqa: E402  (pure Python: no torch at planning time)
from tokenclean.methods import mask_name, parse_run, ratio_tag  # noqa: E402,F401
from tokenclean.launch import tokenclean_command  # noqa: E402

PYTHON = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method else sys.executable
TC = tokenclean_command(PYTHON)
# Training jobs (warm-up, rows, rounds) may run one process per GPU; the recipe does not change with it.
HARDWARE = config.get("hardware", {})
GPUS = HARDWARE.get("gpus", 1)


# Methods of your own (config `plugins`): registered here for planning, and for every job through the environment
# (each `tokenclean` command loads the files TOKENCLEAN_PLUGINS lists; a cluster job re-reads this file).
PLUGINS = [os.path.abspath(p) for p in config.get("plugins", [])]
registry.load_plugins(PLUGINS)
os.environ[registry.PLUGINS_ENV] = os.pathsep.join(PLUGINS)
# What the configured rows are (tokenclean/methods.py): mask methods get a `select` job, online ones train with
# weights, `data` ones on other data, chains in rounds (rules/self_evolving.smk).
KIND = {name: registry.get(name).kind for name in config["methods"]}
CHAINED = tuple(name for name, kind in KIND.items() if kind == "chain")
# The models whose losses on the whole pool the configured rows read: rho and fixed both, rho1 the warm-up
# model's (its reference), sstoken the base model's (its history).
POOL_LOSSES = sorted({"base" if need == "base_loss" else "warmup" for name in config["methods"]
                      for need in registry.get(name).needs if need in ("base_loss", "ref_loss")})
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
# A GPU job starts through tokenclean/gpu_slots.py, which gives it GPUs no other job of the machine holds (Snakemake
# counts GPUs but does not say which): one-GPU jobs (scoring, evaluation) run side by side, training takes them all.
TRAIN = tokenclean_command(PYTHON, GPUS, HARDWARE.get("launcher", "torchrun"),
                           timeout_minutes=HARDWARE.get("timeout_minutes"), gpu_slots=TRAIN_GPUS,
                           sharding=HARDWARE.get("sharding", "none"))
GPU_TC = tokenclean_command(PYTHON, gpu_slots=ONE_GPU)

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


def sft_runs() -> list[str]:
    return registry.runs(config["methods"], config["ratios"], config["seeds"])


def method_of(run: str) -> registry.Method:
    return registry.get(parse_run(run)[0])


def pool_loss(model: str) -> str:
    return f"{R}/losses/{model}/pool.loss.npy"


def sft_inputs(wildcards) -> dict[str, str]:
    """The token table an SFT row trains on; a mask method's mask; the loss arrays an online method reads."""
    method, ratio, seed = parse_run(wildcards.run)
    m = registry.get(method)
    if m.kind == "data":
        return {"tokens": f"{R}/tokens/pool+warmup.tokens.npz"}
    inputs = {"tokens": f"{R}/tokens/pool.tokens.npz"}
    if m.kind == "mask":
        inputs["mask"] = f"{R}/masks/{mask_name(method, ratio, seed)}.mask.npy"
    if m.kind == "online":
        inputs.update({need: pool_loss("warmup" if need == "ref_loss" else "base")
                       for need in m.needs if need in ("ref_loss", "base_loss")})
    return inputs


def online_flags(wildcards, input) -> str:
    """`--online NAME` with its parameters (config method_params, and the run's ratio for a method that takes
    one) and loss arrays, for an online row; else empty. A job's params hold them, so changing one re-runs it."""
    method, ratio, _ = parse_run(wildcards.run)
    m = registry.get(method)
    if m.kind != "online":
        return ""
    flags = f"--online {m.online}"
    params = dict(config.get("method_params", {}).get(method, {}))
    if m.takes_ratio:
        params["ratio"] = float(ratio)
    if params:
        flags += f" --online-params {as_json(params)}"
    for need in ("ref_loss", "base_loss"):
        if need in input.keys():
            flags += f" --{need.replace('_', '-')} {input[need]}"
    return flags


def pool_masks() -> list[str]:
    """Every mask over the pool that the configured rows use (for the cleaning-quality table)."""
    names = []
    for run in sft_runs():
        method, ratio, seed = parse_run(run)
        if KIND[method] == "mask" and mask_name(method, ratio, seed) not in names:
            names.append(mask_name(method, ratio, seed))
    return [f"{R}/masks/{name}.mask.npy" for name in names]


def online_models() -> list[str]:
    """The model directories of the configured online rows: each holds its run's record of what it kept
    (weights.npy), which the cleaning-quality table and the token view read beside the masks."""
    return [f"{R}/models/sft/{run}" for run in sft_runs() if KIND[parse_run(run)[0]] == "online"]


def selection_args(wildcards, input) -> str:
    """The command-line list of every selection over the pool: the masks, then the online runs' records."""
    return " ".join(list(input.masks) + [f"{model}/weights.npy" for model in input.online])


def chain_runs() -> list[str]:
    """The configured runs trained as a chain of rounds (rules/self_evolving.smk)."""
    return [run for run in sft_runs() if KIND[parse_run(run)[0]] == "chain"]


def round_models(run: str) -> list[str]:
    """Every round's model of a chain, round 1 to the last (the row's own model)."""
    return [f"{R}/models/rounds/{registry.round_name(run, t)}" for t in range(1, ROUNDS + 1)]


def model_dir(run: str) -> str:
    """The model a run's evaluation reads: a self-evolving row is the last model of its chain."""
    if run in ("base", "warmup"):
        return model_ref(run)
    if run.startswith("rounds/"):
        return f"{R}/models/{run}"
    if KIND.get(parse_run(run)[0]) == "chain":
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
