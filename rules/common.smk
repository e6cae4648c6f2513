# Wiring helpers only: paths, run names and command lines built from the config. No experiment logic here.
import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

# The experiment's folder holds what is computed over all its replicates (the table, the significance test, the
# report); R, with the `{rep}` wildcard, the folder of one replicate: the experiment's own for replicate 0, its
# replicates/r<r>/ for the others (tokenclean/replicates.py). A path under R is one replicate's artifact.
EXPERIMENT_DIR = f"{config['results_dir']}/{config['experiment']}"
R = f"{EXPERIMENT_DIR}{{rep}}"
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
# The CPU kernels every job pins (docs/numerics.md): jobs inherit the variable, locally and through Slurm, and
# each `tokenclean` command applies it before torch starts. Said once here if the pin cannot hold on this machine.
from tokenclean import numerics  # noqa: E402  (pure Python: no torch at planning time)

os.environ[numerics.ENV] = numerics.level_of(config)
if _line := numerics.warning(os.environ[numerics.ENV]):
    print(_line, file=sys.stderr)
THREADS = config["threads"]
SERIAL_THREADS = config.get("serial_threads", THREADS)  # pretrain_base: every other job waits for it
# Evaluation tasks: as configured, else every family of the embedded world (tokenclean.config requires one).
TASKS = "" if config["evaluation"].get("benchmarks") else ",".join(
    config["evaluation"].get("tasks") or config["world"]["families"])
# The table's headline: each benchmark's configured metric ("score"); on a world with multiple-choice tasks the
# paper's mix of likelihood and generation (mix_acc), else answer accuracy after generation.
MC_WORLD = EMBEDDED and config["world"].get("multiple_choice", False)
METRIC = "score" if config["evaluation"].get("benchmarks") else "mix_acc" if MC_WORLD else "answer_acc"

# Inside a conda env the env's python runs the package from this checkout; otherwise the python running
# snakemake (the project's venv) does. Either way every rule is one `tokenclean` command. The jobs inherit this
# variable: the workflow sets it for them (after whatever the user's is) and requires nothing of the user, so it
# is no `envvars:` entry.
os.environ.update(PYTHONPATH=workflow.basedir + os.pathsep + os.environ.get("PYTHONPATH", ""))
from tokenclean import methods as registry  # noqa: E402  (pure Python: no torch at planning time)
from tokenclean.methods import mask_name, parse_run, ratio_tag  # noqa: E402,F401
from tokenclean.launch import tokenclean_command  # noqa: E402
from tokenclean import replicates  # noqa: E402

# Replicates: independent draws of the world, the base model and the warm-up model (config `replicates`).
REPS = [replicates.suffix(r) for r in range(config["replicates"])]


def at(wildcards, path: str) -> str:
    """`path` (built on R) in the job's replicate: for params functions, whose values Snakemake does not fill with
    the wildcards as it does the paths of input, output and plain params."""
    return path.replace("{rep}", wildcards.rep)


def in_replicates(paths: list[str]) -> list[str]:
    """`paths` (built on R) in every replicate, replicate by replicate."""
    return [p.replace("{rep}", rep) for rep in REPS for p in paths]

PYTHON = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method else sys.executable
# Training jobs (warm-up, rows, rounds) may run one process per GPU; the recipe does not change with it.
HARDWARE = config.get("hardware", {})
GPUS = HARDWARE.get("gpus", 1)


# Methods of your own (config `plugins`): registered here for planning, and for every job through the environment
# (each `tokenclean` command loads the files TOKENCLEAN_PLUGINS lists; a cluster job re-reads this file).
PLUGINS = [os.path.abspath(p) for p in config["plugins"]]
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
ROUNDS = config["self_evolving"]["rounds"]
# The pool is cut into CHUNKS; the rounds use the last ROUNDS of them (the paper: 5 chunks, the first one is the
# warm-up data, 4 rounds); tokenclean.config refuses fewer chunks than rounds.
CHUNKS = config["self_evolving"].get("chunks", ROUNDS)
DATA_DIR = f"{R}/world" if EMBEDDED else f"{R}/data"
BASE_MODEL = f"{R}/models/base" if EMBEDDED else config["base_model"]["name"]
TRUST = "--trust-remote-code" if config["base_model"].get("trust_remote_code") else ""
# The chat format of the training text (config chat_format; tokenclean/tokenization.py): the flag only when it is not
# the default, so the tokenize jobs of a tulu run keep their params.
CHAT_FLAG = "--chat-format template" if config["chat_format"] == "template" else ""
# GPUs a job asks the scheduler (Slurm, or `--resources gpu=N` locally) for: a training job every configured GPU,
# scoring and evaluation one. The embedded experiment runs on CPU and asks for none unless `hardware.gpus` is set.
GPU_JOBS = "gpus" in HARDWARE or not EMBEDDED
TRAIN_GPUS = GPUS if GPU_JOBS else 0
ONE_GPU = 1 if GPU_JOBS else 0

# Jobs that other jobs wait for start first among the ready ones (Snakemake's `priority` directive): the warm-up
# model, tokenizing, scoring, selection and each round of a self-evolving chain, whose rounds are the longest path
# of the DAG. Left to the scheduler's choice, the chains of the embedded run started late and their last rounds
# and evaluations ran with one core idle for about 30 s at the end.
UNBLOCKING = 1


# How a job starts `tokenclean` (every rule's `params.tc`). A GPU job starts through tokenclean/gpu_slots.py, which
# gives it GPUs no other job of the machine holds (Snakemake counts GPUs but does not say which): one-GPU jobs
# (scoring, evaluation) run side by side, training takes them all. Both are params functions of the job's
# resources (the GPUs it holds): which python and which GPUs are the machine's, not the recipe's, and Snakemake's
# params trigger skips params derived from resources, so a new venv or GPU count re-runs no finished job.


def launch(wildcards, resources) -> str:
    """One `tokenclean` process, on the job's GPUs (`resources.gpu`; none for a CPU rule)."""
    return tokenclean_command(PYTHON, gpu_slots=getattr(resources, "gpu", 0))


def launch_training(wildcards, resources) -> str:
    """A training job: one process per configured GPU (hardware.gpus) through the configured launcher."""
    return tokenclean_command(PYTHON, GPUS, HARDWARE.get("launcher", "torchrun"),
                              timeout_minutes=HARDWARE.get("timeout_minutes"), gpu_slots=resources.gpu,
                              sharding=HARDWARE.get("sharding", "none"))


# --- models and data -------------------------------------------------------------------------------------------


def model_ref(name: str) -> str:
    """What a command loads for model `name` (base, warmup, rounds/...): a workflow directory or the base's id."""
    return BASE_MODEL if name == "base" else f"{R}/models/{name}"


def revision_flag(name: str = "base") -> str:
    """`--revision R` (base_model.revision) for a command that loads the base model by hub id; else empty."""
    revision = "" if EMBEDDED else config["base_model"].get("revision", "")
    return f"--revision {shlex.quote(str(revision))}" if revision and name == "base" else ""


def model_input(name: str) -> list[str]:
    """Model `name` as a job input: nothing for a base model the workflow does not make."""
    return [model_ref(name)] if EMBEDDED or name != "base" else []


def base_ref(wildcards) -> str:
    """model_ref("base") as a job's param: a function of the wildcards, not of the input, because outside the
    embedded world it is a hub id (or a local directory) that is no input, and Snakemake's params trigger, which
    re-runs the job when the id changes, skips params derived from the input."""
    return at(wildcards, model_ref("base"))


def data_files() -> list[str]:
    """The local files of data.pool / data.warmup: inputs of the data rule, so editing one re-runs it (hub
    sources are params: their id, split and revision)."""
    return [src["path"] for src in (config.get("data", {}).get(k, {}) for k in ("pool", "warmup")) if "path" in src]


# --- runs ------------------------------------------------------------------------------------------------------


def sft_runs() -> list[str]:
    """Every row x seed of the table (tokenclean.methods.runs): `<method>[_r<ratio>]_s<seed>`."""
    return registry.runs(config["methods"], config["ratios"], config["seeds"])


def train_flags(section: dict, leave_out: tuple = ()) -> str:
    """The `train` block of a config section as `tokenclean train` flags, in key order: a job's params (and so
    whether it re-runs) do not depend on the order the config file happens to list its keys in. A list (the
    names of lora_targets) is one comma-separated word."""
    flags = []
    for key, value in sorted(section.get("train", {}).items()):
        if key not in leave_out:
            word = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            flags += [f"--{key.replace('_', '-')}", shlex.quote(word)]
    return " ".join(flags)


def sft_train_flags(wildcards) -> str:
    """An SFT row's `train_flags(config["sft"])`. An online row leaves out sft.train.loss_normalization (the
    mask rows' rule, e.g. the paper's micro_batch): it averages as its method's reference does
    (tokenclean/online.py), unless method_params.<method>.loss_normalization says otherwise (online_flags)."""
    if KIND[parse_run(wildcards.run)[0]] != "online":
        return train_flags(config["sft"])
    return train_flags(config["sft"], leave_out=("loss_normalization",))


def as_json(obj) -> str:
    """`obj` as one shell word of canonical JSON (sorted keys: a job's params do not depend on key order)."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


# --- scoring and selection -------------------------------------------------------------------------------------


# The pool's token table: what every selection, score and SFT row over the pool is made on.
POOL_TOKENS = f"{R}/tokens/pool.tokens.npz"


def pool_loss(model: str) -> str:
    """Model `model`'s per-token losses on the whole pool."""
    return f"{R}/losses/{model}/pool.loss.npy"


def pool_scores(wildcards=None) -> dict[str, str]:
    """The pool's token table and the base and reference (warm-up) models' losses on it: what a token's score,
    loss(base) - loss(reference), is computed from (a rule takes them as `unpack(pool_scores)`)."""
    return {"tokens": POOL_TOKENS, "base_loss": pool_loss("base"), "ref_loss": pool_loss("warmup")}


def select_inputs(wildcards) -> dict[str, str]:
    """A mask's inputs: the pool's tokens, and the losses if its method scores tokens."""
    needs = registry.get(registry.parse_mask(wildcards.mask)[0]).needs
    if "base_loss" in needs or "ref_loss" in needs:
        return pool_scores()
    return {"tokens": POOL_TOKENS}


def select_args(wildcards, input) -> str:
    """`tokenclean select` flags of a mask: method, ratio (1.0 for a method without one), seed and losses."""
    method, ratio, seed = registry.parse_mask(wildcards.mask)
    args = f"--method {method} --ratio {ratio or 1.0} --seed {seed}"
    if "base_loss" in input.keys():
        args += f" --base-loss {input.base_loss} --ref-loss {input.ref_loss}"
    return args


# --- training --------------------------------------------------------------------------------------------------


def sft_inputs(wildcards) -> dict[str, str]:
    """The token table an SFT row trains on; a mask method's mask; the loss arrays an online method reads."""
    method, ratio, seed = parse_run(wildcards.run)
    m = registry.get(method)
    if m.kind == "data":
        return {"tokens": f"{R}/tokens/pool+warmup.tokens.npz"}
    inputs = {"tokens": POOL_TOKENS}
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
    params = dict(config["method_params"].get(method, {}))
    normalization = params.pop("loss_normalization", None)  # the trainer's setting, not the weighting's
    if m.takes_ratio:
        params["ratio"] = float(ratio)
    if params:
        flags += f" --online-params {as_json(params)}"
    if normalization:
        flags += f" --loss-normalization {normalization}"
    for need in ("ref_loss", "base_loss"):
        if need in input.keys():
            flags += f" --{need.replace('_', '-')} {input[need]}"
    return flags


# --- the self-evolving chain (rules/self_evolving.smk) ---------------------------------------------------------


def chain_runs() -> list[str]:
    """The configured runs trained as a chain of rounds (rules/self_evolving.smk)."""
    return [run for run in sft_runs() if KIND[parse_run(run)[0]] == "chain"]


def round_models(run: str) -> list[str]:
    """Every round's model of a chain, round 1 to the last (the row's own model)."""
    return [f"{R}/models/rounds/{registry.round_name(run, t)}" for t in range(1, ROUNDS + 1)]


def chunk_name(t) -> str:
    """The pool chunk of round t: the rounds use the last ROUNDS of CHUNKS chunks."""
    return f"pool.c{CHUNKS - ROUNDS + int(t)}of{CHUNKS}"


def chunk_tokens_path(t) -> str:
    """The token table of round t's chunk."""
    return f"{R}/tokens/{chunk_name(t)}.tokens.npz"


def previous_model(row: str, t) -> str:
    """Model t-1 of the chain, relative to models/: the warm-up model starts every chain."""
    return "warmup" if int(t) == 1 else f"rounds/{row}_t{int(t) - 1}"


def round_flags(wildcards) -> str:
    """The row's sft flags; `tokenclean train --round t --rounds R` gives round t its share of the steps."""
    seed = parse_run(wildcards.row)[2]
    return f"{train_flags(config['sft'])} --seed {seed} --round {wildcards.t} --rounds {ROUNDS} {TRUST}"


def chain_evals() -> list[str]:
    """Every round's evaluation (the last round is the row's own evaluation) and the warm-up model's (round 0)."""
    rows = chain_runs()
    rounds = [f"{R}/eval/rounds/{row}_t{t}.json" for row in rows for t in range(1, ROUNDS)]
    return [f"{R}/eval/warmup.json"] + rounds + [f"{R}/eval/{row}.json" for row in rows]


def chain_models() -> list[str]:
    """The warm-up model (round 0) and every round's model: each round's passes over its own data."""
    return [model_dir("warmup")] + [model for row in chain_runs() for model in round_models(row)]


# --- evaluation ------------------------------------------------------------------------------------------------


def model_dir(run: str) -> str:
    """The model a run's evaluation reads: a self-evolving row is the last model of its chain."""
    if run in ("base", "warmup"):
        return model_ref(run)
    if run.startswith("rounds/"):
        return f"{R}/models/{run}"
    if KIND.get(parse_run(run)[0]) == "chain":
        return round_models(run)[-1]
    return f"{R}/models/sft/{run}"


def eval_inputs(wildcards) -> dict:
    """The evaluated model (unless it is a base model the workflow does not make) and, embedded, the world."""
    inputs = {"model": [] if wildcards.run == "base" and not EMBEDDED else model_dir(wildcards.run)}
    if EMBEDDED:
        inputs["world"] = f"{R}/world"
    return inputs


def eval_args() -> str:
    """The world's task families (embedded), or the configured lm-eval benchmarks with their shots and metrics."""
    ev = config["evaluation"]
    if EMBEDDED and not ev.get("benchmarks"):
        return f"--tasks-dir {R}/world/tasks --tasks {TASKS}"
    args = f"--benchmarks {as_json(ev['benchmarks'])}"
    if ev.get("model_args"):
        args += f" --model-args {as_json(ev['model_args'])}"
    if ev.get("include_path"):
        args += f" --include-path {shlex.quote(ev['include_path'])}"
    if ev.get("batch_size"):
        args += f" --batch-size {ev['batch_size']}"
    if ev.get("apply_chat_template"):
        args += " --apply-chat-template"
    return args + f" {TRUST}"


# --- report ----------------------------------------------------------------------------------------------------


RUNS = ["base", "warmup"] + sft_runs()
# The embedded world reports three metrics, five with multiple-choice tasks (headline first); a benchmark suite one
# score per task.
TABLE_METRICS = ([METRIC] if config["evaluation"].get("benchmarks") else
                 ["mix_acc", "mc_acc", "answer_acc", "response_em", "answer_nll"] if MC_WORLD else
                 ["answer_acc", "response_em", "answer_nll"])
PAPER_REFERENCE = config.get("paper_reference")
FIGURES = f"{R}/figures"


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


# What significance compares every row with: full SFT, and full+warmup (the fair baseline of the scored rows, which
# see the warm-up set through their reference) when it is a row; full first, as significance.md shows them.
BASELINES = [b for b in ("full", "full+warmup") if b in config["methods"]] if "full" in config["methods"] else []


def report_outputs() -> list[str]:
    """Everything the report stage leaves in results/<experiment>/, as `all` asks for it. The table and the
    significance test over all replicates, and each replicate's own figures, token view and records."""
    top = [f"{EXPERIMENT_DIR}/{name}" for name in ("table.csv", "table.md", "table.tex")]
    top += [f"{EXPERIMENT_DIR}/table_{m}.csv" for m in TABLE_METRICS[1:]]
    if BASELINES:
        top += [f"{EXPERIMENT_DIR}/significance.csv", f"{EXPERIMENT_DIR}/significance.md"]
    if len(config["ratios"]) > 1:
        top.append(f"{EXPERIMENT_DIR}/figures/score_vs_ratio.png")
    return top + in_replicates(replicate_outputs())


def replicate_outputs() -> list[str]:
    """What the report stage leaves in one replicate's folder (paths on R)."""
    out = [f"{FIGURES}/score_distributions.png", f"{R}/token_view.html", f"{R}/provenance.json",
           f"{R}/provenance.md"]
    if EMBEDDED:  # ground-truth token classes exist only in the embedded world
        out.append(f"{R}/score_separation.csv")
        if pool_masks() or online_models():  # a chain alone selects nothing over the whole pool
            out += [f"{R}/cleaning_quality.csv", f"{FIGURES}/kept_by_class.png"]
    if set(CHAINED) & set(config["methods"]):
        out += [f"{R}/rounds.csv", f"{FIGURES}/rounds.png"]
    return out


def trained_models() -> list[str]:
    """Every model the table's rows trained in every replicate (the warm-up model, each SFT row, each round of a
    chain): the report reads each one's passes over its own data from what training recorded next to it."""
    models = [model_dir("warmup")]
    for run in sft_runs():
        models += round_models(run) if KIND[parse_run(run)[0]] == "chain" else [model_dir(run)]
    return in_replicates(models)


def all_evals(suffix: str = ".json") -> list[str]:
    """Every row's evaluation (`.json`) or its per-example file (`.samples.jsonl`) in every replicate."""
    return in_replicates([f"{R}/eval/{run}{suffix}" for run in RUNS])


wildcard_constraints:
    dataset="warmup|pool|pool\.c[0-9]+of[0-9]+",
    model="base|warmup|rounds/[A-Za-z0-9_.+-]+",
    run="(rounds/)?[A-Za-z0-9_.+-]+",
    mask="[A-Za-z0-9_.+-]+",
    rep=replicates.WILDCARD,


# Under `--executor slurm`, before the first sbatch: every job of the plan against the cluster's partitions
# (tokenclean/slurm.py). A job Slurm would refuse only when submitted, or accept and queue forever, stops the run
# here with one line per problem (exit 2) and nothing submitted. Then, for the whole run, a watch on the run's
# queued jobs: one Slurm holds (a failed launch, `scontrol hold`) or one on a partition with no node up would wait
# forever, as the executor plugin waits for any PENDING job; the watch cancels it with one line, and Snakemake
# takes it as a failed job.
# Warm start (config `warm_start`, tokenclean/warm.py): where the jobs run on this machine, one process imports
# torch, transformers and lm-eval once and each `tokenclean` job is a fork of it (same bits, ~5 s less per job).
# The jobs find it through the environment they inherit; it ends with the run.
def start_warm_server() -> None:
    if not config.get("warm_start", True) or os.environ.get("TOKENCLEAN_WARM_SOCKET"):
        return
    if getattr(getattr(workflow.executor_plugin, "common_settings", None), "non_local_exec", False):
        return  # jobs on other machines cannot reach it
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return  # the jobs' Python is the conda environment's, not this one
    from tokenclean import warm

    try:
        os.environ[warm.ENV] = warm.start(os.getcwd(), PYTHON, os.path.join(".snakemake", "tokenclean-warm.log"))
    except OSError as e:
        print(f"tokenclean: warm start off for this run ({e.strerror or e}): every job starts a fresh Python",
              file=sys.stderr)


def stop_warm_server() -> None:
    path = os.environ.pop("TOKENCLEAN_WARM_SOCKET", None)
    if path:
        from tokenclean import warm

        warm.stop(path)


onsuccess:
    stop_warm_server()


onerror:
    stop_warm_server()


onstart:
    start_warm_server()
    if workflow.executor_plugin is not None and workflow.executor_plugin.cli_prefix == "slurm":
        from tokenclean.slurm import JobWatch, SlurmPlanError, check_plan

        try:
            check_plan((j.rule.name, j.resources, j.threads) for j in workflow.dag.needrun_jobs() if not j.is_local)
        except SlurmPlanError as e:
            print("\n".join(f"slurm error: {line}" for line in str(e).splitlines()), file=sys.stderr)
            sys.exit(2)
        # the plugin names every job of a run by the run's id (its executor, made before onstart, holds it)
        run_id = getattr(getattr(workflow.scheduler, "_executor", None), "run_uuid", None)
        if run_id:
            JobWatch(run_id).start()
        else:
            print("slurm warning: the executor plugin's run id was not found: jobs Slurm holds are not watched "
                  "(tokenclean/slurm.py)", file=sys.stderr)
