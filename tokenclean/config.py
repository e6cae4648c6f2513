"""The experiment config as the workflow reads it: checked against schemas/config.schema.yaml (the one place
that says which keys exist), defaults filled in, and the few rules the schema cannot state.

Pure Python (jsonschema and PyYAML, no torch): the Snakefile calls it while planning, before any job runs,
and turns a `ConfigError` into one line naming the file and the key.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match

from tokenclean import lora, online
from tokenclean import methods as registry
from tokenclean.methods import ratio_tag

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config the workflow must not run: the message is one line, ``<file>: <key>: <what>``."""


def _key_path(path: Iterable[Any]) -> str:
    """``sft.train.lr``, ``ratios[1]``: a config location as the user writes it."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _location(error: ValidationError) -> list[Any]:
    """The config keys an error is about (an unknown key: the key itself)."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        path.append(next(k for k in error.instance if k not in error.schema.get("properties", {})))
    return path


def _message(error: ValidationError) -> str:
    """One line for a schema error: where it is and what is wrong, in the config's terms."""
    where = _key_path(_location(error))
    if error.validator == "additionalProperties":
        return f"{where}: unknown key"
    prefix = f"{where}: " if where else ""
    if error.validator == "required":
        return f"{prefix}missing key {error.message.split(' is a required')[0]}"
    if error.validator == "oneOf" and all(set(b) <= {"required", "description"} for b in error.validator_value):
        # alternatives such as world | data: name them instead of dumping the schema
        keys = [k for b in error.validator_value for k in b["required"]]
        present = [k for k in keys if k in error.instance]
        if len(present) > 1:
            return f"{prefix}give only one of {' | '.join(keys)}, not {' and '.join(present)}"
        return f"{prefix}give one of {' | '.join(keys)}"
    about = error.schema.get("description") if isinstance(error.schema, Mapping) else None
    return f"{prefix}{error.message}" + (f" ({about})" if about else "")


def _with_defaults(validator_class):
    """The validator class that also fills each property's schema default (as snakemake's validate does)."""
    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for key, sub in props.items():
                if "default" in sub:
                    instance.setdefault(key, sub["default"])
        yield from check_properties(validator, props, instance, schema)

    return validators.extend(validator_class, {"properties": properties})


def _source(path: Iterable[Any], files: list[str]) -> str:
    """The last config file that sets ``path`` (the one the user must edit), else all of them."""
    path = list(path)
    for name in reversed(files):
        try:
            node = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        for part in path:
            in_mapping = isinstance(node, Mapping) and part in node
            if in_mapping or (isinstance(node, list) and isinstance(part, int) and part < len(node)):
                node = node[part]
            else:
                break
        else:
            return name
    return " + ".join(files) if files else "config"


def _shown(path: Path) -> str:
    """A config file's name as the user likely typed it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# Method names that no longer exist, and what replaced them: said before the schema's bare "not one of".
RENAMED_METHODS = {
    "oracle": "was replaced by two ground-truth rows, truth_drop_noisy (every response token but the corrupted "
              "and garbage ones) and truth_keep_informative (the informative and novel ones only)"}


def _renamed_problem(config: dict) -> tuple[list[Any], str] | None:
    """A method listed under a name it no longer has (key path, what)."""
    methods = config.get("methods")
    for i, method in enumerate(methods if isinstance(methods, list) else []):
        if isinstance(method, str) and method in RENAMED_METHODS:
            return ["methods", i], f"{method} {RENAMED_METHODS[method]}"
    return None


def _unknown_method(name: Any) -> str:
    return (f"unknown method {name!r} (known: {', '.join(registry.METHODS)}; a method of your own: list its file "
            "under plugins)")


def _method_params_problem(config: dict) -> tuple[list[Any], str] | None:
    """A ``method_params`` entry the runs would not use as written (key path, what): a method not in the table,
    one that takes no parameters, a ratio (it comes from ``ratios``), or what :func:`tokenclean.online.resolve`
    refuses (an unknown parameter, a wrong type, a value out of range), named by the config's key."""
    for name, params in config.get("method_params", {}).items():
        where = ["method_params", name]
        if name not in config["methods"]:
            return where, f"{name} is not listed under methods" if name in registry.METHODS else _unknown_method(name)
        method = registry.METHODS[name]
        if method.kind != "online":
            return where, f"{name} takes no parameters (a {method.kind} method; only online methods take method_params)"
        params = dict(params)
        rule = params.pop("loss_normalization", None)  # the trainer's rule for this method's rows
        if rule is not None and rule not in ("step", "micro_batch"):
            return where + ["loss_normalization"], f"{rule!r} is not one of step, micro_batch"
        if "ratio" in params and (method.takes_ratio or "ratio" not in online.ONLINE_METHODS[method.online].defaults):
            return where + ["ratio"], (f"the ratio of {name}'s runs comes from ratios" if method.takes_ratio
                                       else f"{name} takes no ratio")
        try:
            online.resolve(method.online, params)
        except online.ParamError as e:
            return where + ([e.key] if e.key is not None else []), e.what
        except ValueError as e:  # a plug-in naming a weighting tokenclean.online does not have
            return where, str(e)
    return None


def _rule_problem(config: dict) -> tuple[list[Any], str] | None:
    """What the schema cannot state: values that pass it but would change or break the run (key path, what)."""
    by_tag: dict[str, float] = {}
    for i, r in enumerate(config["ratios"]):
        tag = ratio_tag(r)
        if tag in by_tag:
            return ["ratios", i], f"{by_tag[tag]!r} and {r!r} would both be the run name r{tag}"
        if float(tag) != float(r):
            return ["ratios", i], (f"{r!r} would be written as r{tag} in run names and read back as {float(tag)!r};"
                                   " give at most 6 significant digits")
        by_tag[tag] = r
    hardware = config.get("hardware", {})
    sharding = hardware.get("sharding", "none")
    if sharding != "none":  # as tokenclean.launch and tokenclean.distributed.check_sharding refuse at run time
        if hardware.get("gpus", 1) == 1:
            return ["hardware", "sharding"], f"{sharding} needs hardware.gpus > 1 (one process has nothing to shard)"
        for block in ("warmup", "sft"):
            if config.get(block, {}).get("train", {}).get("lora_r", 0) > 0:
                return ["hardware", "sharding"], (f"{sharding} with {block}.train.lora_r > 0 is not supported yet "
                                                  "(LoRA trains few weights: set hardware.sharding: none)")
    for block in ("warmup", "sft"):
        targets = config.get(block, {}).get("train", {}).get("lora_targets")
        if targets is not None and lora.problem(targets):  # whether they match the model: tokenclean/preflight.py
            return [block, "train", "lora_targets"], lora.problem(targets)
    if config.get("replicates", 1) > 1 and "world" not in config:
        return ["replicates"], (f"{config['replicates']} draws need an embedded world (a `world` section): a hub "
                                "model and your own data are the same in every draw; run more seeds instead")
    se = config.get("self_evolving", {})
    rounds = se["rounds"]  # the schema's default is filled in by now
    if se.get("chunks", rounds) < rounds:
        return ["self_evolving", "chunks"], f"{se['chunks']} must be at least self_evolving.rounds ({rounds})"
    for i, path in enumerate(config.get("plugins", [])):
        try:
            registry.load_plugins([path])
        except (OSError, ValueError, SyntaxError, ImportError) as e:
            return ["plugins", i], f"{path}: {' '.join(str(e).split())}"
    for i, method in enumerate(config["methods"]):
        if method not in registry.METHODS:
            return ["methods", i], _unknown_method(method)
        if registry.METHODS[method].ground_truth and "world" not in config:
            return ["methods", i], (f"{method} reads the ground-truth token classes, which only the embedded world "
                                    "has")
    params = _method_params_problem(config)
    if params is not None:
        return params
    if "world" in config and config.get("chat_format") == "template":
        return ["chat_format"], ("the embedded world's tokenizer has no chat template: its data, corpus and tasks "
                                 "are in the tulu format")
    if config["evaluation"].get("apply_chat_template") and not config["evaluation"].get("benchmarks"):
        return ["evaluation", "apply_chat_template"], ("applies to evaluation.benchmarks only (the embedded world's "
                                                       "tasks are in the format its models were trained in)")
    if "world" not in config and not config["evaluation"].get("benchmarks"):
        # evaluation.tasks names the embedded world's task families; any other experiment needs lm-eval tasks
        return ["evaluation"], "set evaluation.benchmarks (the lm-eval tasks) for an experiment with its own data"
    return None


def check_config(config: dict, files: list[str] | None = None, schema: Path = SCHEMA) -> dict:
    """Validate ``config`` (read from ``files``, in order) and fill the schema's defaults in place.

    Raises ConfigError with one line, ``<file>: <key>: <what>``, for the first problem found.
    """
    files = [_shown(Path(f)) for f in files or []]
    spec = yaml.safe_load(Path(schema).read_text())
    validator_class = validators.validator_for(spec, default=Draft202012Validator)
    for _ in _with_defaults(validator_class)(spec).iter_errors(config):  # defaults first: a key with one is optional
        pass
    renamed = _renamed_problem(config)
    if renamed is not None:
        path, what = renamed
        raise ConfigError(f"{_source(path, files)}: {_key_path(path)}: {what}")
    error = best_match(validator_class(spec).iter_errors(config))
    if error is not None:
        raise ConfigError(f"{_source(_location(error), files)}: {_message(error)}")
    problem = _rule_problem(config)
    if problem is not None:
        path, what = problem
        raise ConfigError(f"{_source(path, files)}: {_key_path(path)}: {what}")
    return config
