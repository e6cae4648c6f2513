"""What planning can check cheaply before any job runs, beyond the config's own shape (tokenclean/config.py):
the data files, the benchmarks' metrics and the model's fit to the chat format and the methods.

A problem found here would otherwise surface hours later, after unrelated jobs ran: a bad record at the data
job, a metric lm-eval's task does not report at the end of the whole evaluation. Each check reads little: the
first :data:`SAMPLE_RECORDS` records of each data file (with the project's own parser), the task YAMLs (text, no
lm-eval import) and the base model's JSON files when they are on this machine. No torch, except where the config
trains LoRA adapters or reads attention weights and the base model's config is on this machine: the model is then
built from its config with empty weights (torch's meta device: its layers and shapes, no weight read or
allocated) to resolve ``lora_targets`` (:mod:`tokenclean.lora`) and to see whether it returns attention weights.
The Snakefile calls :func:`check_plan` while planning and turns a :class:`~tokenclean.config.ConfigError` into
one line.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tokenclean import methods as registry
from tokenclean import online
from tokenclean.config import ConfigError, _key_path, _shown, _source
from tokenclean.data import DataError
from tokenclean.sources import load_source

SAMPLE_RECORDS = 100  # records of each data file parsed at planning (the data job validates them all)
PACKAGE_TASKS = Path(__file__).resolve().parent / "tasks"  # as tokenclean.evaluation (which imports lm-eval)


class PlanProblem(Exception):
    """A problem at config key ``path`` (a list, as tokenclean.config locates keys): ``what``."""

    def __init__(self, path: list[Any], what: str) -> None:
        super().__init__(what)
        self.path, self.what = path, what


def check_plan(config: dict[str, Any], files: list[str] | None = None, build_model: bool = True) -> list[str]:
    """Every cheap check; raises ConfigError with one line, ``<config file>: <key>: <what>`` (the data file and
    line in ``what``). Returns the warnings, one line each (``<key>: <what>``), the checks it could not make on
    this machine among them (planning says what it skipped rather than passing it in silence). ``build_model``
    False skips the checks that build the model with empty weights (a cluster job re-reading the Snakefile:
    planning did them)."""
    try:
        check_data(config)
        check_benchmarks(config)
        return check_model(config, build_model) + skipped_checks(config)
    except PlanProblem as e:
        shown = [_shown(Path(f)) for f in files or []]
        raise ConfigError(f"{_source(e.path, shown)}: {_key_path(e.path)}: {e.what}") from None


# --- data ------------------------------------------------------------------------------------------------------


def check_data(config: dict[str, Any], n: int = SAMPLE_RECORDS) -> None:
    """Each local data source exists, and its first ``n`` records read as SFT records in its format, through the
    data job's own loader (tokenclean.sources: file:line or row on the first that does not). Hub sources are
    checked by the data job (planning does not go online)."""
    for key in ("pool", "warmup"):
        source = config.get("data", {}).get(key, {})
        if not isinstance(source, dict) or "path" not in source:
            continue
        path = Path(source["path"])
        if not path.exists():
            raise PlanProblem(["data", key, "path"], f"{path}: data file or folder not found")
        limit = min(n, source.get("limit") or n)
        try:
            rows, _ = load_source({**source, "limit": limit}, f"data.{key}")
        except DataError as e:
            raise PlanProblem(["data", key, "path"], str(e)) from None
        except OSError as e:
            raise PlanProblem(["data", key, "path"], f"{path}: cannot be read ({e.strerror or e})") from None
        if not rows:
            raise PlanProblem(["data", key, "path"], f"{path}: no records (the file is empty)")


# --- benchmarks ------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Task YAMLs as plain data: lm-eval's ``!function`` tags become their text."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _yaml_files(dirs: list[Path]) -> Iterator[Path]:
    for d in dirs:
        if d.is_dir():
            yield from sorted(d.rglob("*.yaml"))


def _lm_eval_tasks() -> Path | None:
    """lm-eval's stock task directory, found without importing lm-eval (which takes seconds)."""
    from importlib.util import find_spec

    spec = find_spec("lm_eval")
    return Path(spec.origin).parent / "tasks" if spec and spec.origin else None


def _load(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _resolved(path: Path, depth: int = 0) -> dict[str, Any]:
    """A task YAML with its ``include:`` chain merged under it, as lm-eval reads it."""
    data = _load(path)
    include = data.get("include")
    if isinstance(include, str) and depth < 10:
        base = _resolved((path.parent / include), depth + 1) if (path.parent / include).is_file() else {}
        data = {**base, **{k: v for k, v in data.items() if k != "include"}}
    return data


def _find(names: set[str], dirs: list[Path]) -> dict[str, tuple[str, Path]]:
    """name -> ("task" | "group" | "tag", its YAML) for the wanted names."""
    found: dict[str, tuple[str, Path]] = {}
    pattern = re.compile(r"^(task|group|tag):\s*(.+)$", re.M)
    for path in _yaml_files(dirs):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not any(name in text for name in names):
            continue
        for kind, value in pattern.findall(text):
            for name in re.findall(r"[^\s\[\],\"']+", value):
                if name in names and (name not in found or found[name][0] == "tag"):
                    found[name] = (kind, path)
    return found


def _metrics(kind: str, data: dict[str, Any]) -> set[str] | None:
    """The metrics a task or group reports, or None where its YAML does not say (lm-eval's defaults, a tag)."""
    key = "metric_list" if kind == "task" else "aggregate_metric_list"
    listed = data.get(key)
    if not isinstance(listed, list):
        return None
    return {str(m.get("metric")) for m in listed if isinstance(m, dict) and m.get("metric")}


def check_benchmarks(config: dict[str, Any]) -> None:
    """Each configured benchmark is a task, group or tag of lm-eval (stock, the package's or under include_path),
    and its metric is one its YAML reports (where the YAML lists them)."""
    ev = config.get("evaluation", {})
    benchmarks = ev.get("benchmarks") or []
    if not benchmarks:
        return
    include = ev.get("include_path")
    if include and not Path(include).is_dir():
        if "world" in config:
            return  # an embedded world's tasks are written by its world job
        raise PlanProblem(["evaluation", "include_path"], f"{include}: no such directory")
    dirs = ([Path(include)] if include else []) + [PACKAGE_TASKS]
    stock = _lm_eval_tasks()
    names = {b["task"] for b in benchmarks}
    found = _find(names, dirs)
    if names - set(found) and stock is not None:
        found.update(_find(names - set(found), [stock]))
    for i, b in enumerate(benchmarks):
        if b["task"] not in found:
            if stock is None:
                continue  # no lm-eval here: the evaluation job reports it
            raise PlanProblem(["evaluation", "benchmarks", i, "task"],
                              f"unknown lm-eval task {b['task']!r}: neither a stock task"
                              f"{f' nor one under {include}' if include else ''}")
        kind, path = found[b["task"]]
        reported = _metrics(kind, _resolved(path))
        metric = b.get("metric", "acc")
        if reported is not None and metric not in reported:
            raise PlanProblem(["evaluation", "benchmarks", i, "metric"],
                              f"task {b['task']} ({path}) reports no metric {metric!r} "
                              f"(it reports: {', '.join(sorted(reported))})")


# --- the base model --------------------------------------------------------------------------------------------


def _model_file(config: dict[str, Any], name: str) -> Path | None:
    """A file of the base model when it is on this machine (a directory, or the hub cache; never the network)."""
    model = config.get("base_model", {})
    ref = model.get("name")
    if not ref:
        return None
    if Path(ref).is_dir():
        path = Path(ref) / name
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(ref, name, revision=model.get("revision"))
    except Exception:  # an id the hub library refuses: the jobs report it
        return None
    return Path(hit) if isinstance(hit, str) else None


TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # where transformers saves a template apart


def _cache_knows_absent(config: dict[str, Any], name: str) -> bool:
    """Whether the base model has no file ``name``, as far as this machine knows: always for a directory (its
    listing is complete); for a hub model only where its cache recorded the file as absent at its revision (the
    hub library notes a file it looked for and did not find)."""
    model = config.get("base_model", {})
    if Path(model.get("name", "")).is_dir():
        return True
    try:
        from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache
    except ImportError:
        return False
    try:
        return try_to_load_from_cache(model["name"], name, revision=model.get("revision")) is _CACHED_NO_EXIST
    except Exception:  # an id the hub library refuses: the jobs report it
        return False


def _has_chat_template(config: dict[str, Any]) -> bool | None:
    """Whether the base model's tokenizer has a chat template; None when this machine cannot tell: the model is
    neither a directory nor in the hub cache, or the cache lacks a template file it never looked for. Only local
    files are read (a directory, or the hub cache through ``try_to_load_from_cache``): planning never goes online,
    whatever HF_HUB_OFFLINE says."""
    tokenizer_config = _model_file(config, "tokenizer_config.json")
    if tokenizer_config is None:
        return None
    if any(_model_file(config, name) is not None for name in TEMPLATE_FILES):
        return True
    try:
        if json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template"):
            return True
    except (OSError, ValueError, AttributeError):
        return None
    return False if all(_cache_knows_absent(config, name) for name in TEMPLATE_FILES) else None


def _template_uses(config: dict[str, Any]) -> list[list[str]]:
    """The config keys that use the base model's chat template (training's chat_format, the benchmarks' prompts)."""
    return [key for key, on in ((["chat_format"], config.get("chat_format") == "template"),
                                (["evaluation", "apply_chat_template"],
                                 config.get("evaluation", {}).get("apply_chat_template"))) if on]


def skipped_checks(config: dict[str, Any]) -> list[str]:
    """The checks planning could not make on this machine, one warning each: the chat template of a hub model
    that is not in the local cache (the tokenize job, or the evaluation, checks it once the model is there)."""
    uses = _template_uses(config)
    if "world" in config or not uses or _has_chat_template(config) is not None:
        return []
    job = "the tokenize job" if uses[0] == ["chat_format"] else "each evaluation"
    return [f"{_key_path(uses[0])}: chat template check skipped: the tokenizer of {config['base_model']['name']} "
            f"is not in the local Hugging Face cache (planning never downloads); {job} checks it"]


def _lora_blocks(config: dict[str, Any]) -> list[str]:
    """The config sections that train LoRA adapters (warm-up, rows and rounds read ``warmup`` and ``sft``)."""
    return [b for b in ("warmup", "sft") if (config.get(b, {}).get("train", {}).get("lora_r") or 0) > 0]


def _attention_readers(config: dict[str, Any]) -> list[str]:
    """The configured methods that read attention weights (ssToken)."""
    return [m for m in config.get("methods", []) if m in registry.METHODS and registry.METHODS[m].online
            and "prompt_attention" in online.ONLINE_METHODS[registry.METHODS[m].online].inputs]


def empty_model(config: dict[str, Any]) -> Any | None:
    """The base model built from its config with empty weights (meta device), or None where its config is not on
    this machine or does not build here (the jobs then report it). The embedded world's base is the package's
    tiny Llama (its layer names do not depend on its sizes)."""
    if "world" in config:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                num_attention_heads=2, vocab_size=128, tie_word_embeddings=True))
    found = _model_file(config, "config.json")
    if found is None:
        return None
    from tokenclean.models import empty_model as build

    try:
        return build(str(found.parent), bool(config.get("base_model", {}).get("trust_remote_code")))
    except Exception:  # unreadable, an unknown or no causal LM, remote code not trusted: the jobs report it
        return None


def check_model(config: dict[str, Any], build_model: bool = True) -> list[str]:
    """The base model has a chat template where the config uses it, returns the attention weights a method that
    reads them needs, and has a layer for every LoRA target (:func:`tokenclean.lora.plan`, on the model built
    with empty weights). Returns the warnings (an explicit LoRA list that leaves linear layers out)."""
    embedded = "world" in config  # the workflow makes the base model: its tokenizer and layout are the package's
    uses = _template_uses(config)
    if not embedded and uses and _has_chat_template(config) is False:
        raise PlanProblem(uses[0], f"the tokenizer of {config['base_model']['name']} has no chat template; use "
                          f"{'chat_format: tulu' if uses[0] == ['chat_format'] else 'apply_chat_template: false'}")
    readers = [] if embedded else _attention_readers(config)
    blocks = _lora_blocks(config)
    if not build_model or not (readers or blocks):
        return []
    model = empty_model(config)
    if model is None:
        return []
    from tokenclean import lora
    from tokenclean.loss import attention_problem

    name = "the embedded base model" if embedded else config["base_model"]["name"]
    kind = getattr(model.config, "model_type", type(model).__name__)
    problem = attention_problem(model) if readers else None
    if problem:
        raise PlanProblem(["methods", config["methods"].index(readers[0])],
                          f"{readers[0]} reads the last layer's attention weights, but a {kind} model ({name}): "
                          f"{problem}; drop the method or use a model that returns them")
    warnings = []
    for block in blocks:
        train = config[block]["train"]
        try:
            plan = lora.plan(model, train.get("lora_targets"), train["lora_r"])
        except ValueError as e:
            raise PlanProblem([block, "train", "lora_targets"], str(e).removeprefix("lora_targets: ")) from None
        if plan.warning():
            warnings.append(f"{block}.train.lora_targets: {plan.warning().removeprefix('lora_targets ')}")
    return warnings
