"""Command line: ``tokenclean <command> --help``. Every workflow rule is one of these commands."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from tokenclean import __version__
from tokenclean.export import FORMATS as EXPORT_FORMATS

log = logging.getLogger(__name__)


def _json_of(kind: type, what: str) -> Callable[[str], Any]:
    """An argparse type: the argument as JSON that must be a ``kind`` (a JSON ``what``)."""
    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {what}")
        return value
    return parse


_json_arg = _json_of(dict, "object")
_json_list_arg = _json_of(list, "list")


def _limit_arg(text: str) -> int | float:
    """An argparse type: examples per task (an integer of at least 1; more than a task has = all of them) or a
    fraction of each task below 1."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0) or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"must be a whole number of examples or a fraction below 1, got {text!r}")
    return min(int(value), sys.maxsize) if value >= 1 else value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _ratio_arg(text: str) -> float:
    """An argparse type: a keep ratio in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def _int_at_most(high: int, parse: Callable[[str], int]) -> Callable[[str], int]:
    def check(text: str) -> int:
        value = parse(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value
    return check


_positive = _int_at_least(1)
_seed = _int_at_least(0)
_numpy_seed = _int_at_most(2**32 - 1, _seed)  # lm-eval seeds numpy's legacy generator


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from tokenclean.train_config import TrainConfig

    g = p.add_argument_group("training hyperparameters")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            g.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default,
                           metavar="BOOL", help=f"default {f.default}")
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            g.add_argument(flag, type=kind, default=f.default, help=f.metadata.get("help", f"default {f.default}"))


def _add_revision_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of a hub model (ignored when empty; refused for a directory); the "
                        "commit it resolves to is loaded and recorded")


def _train_config(args: argparse.Namespace):
    from tokenclean.train_config import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def cmd_world(a: argparse.Namespace) -> None:
    from tokenclean.artifacts import atomic_dir
    from tokenclean.evaluation import write_tasks
    from tokenclean.world import generate_world

    with atomic_dir(a.out) as tmp:  # the world and its tasks, both or neither
        stats = generate_world(a.params, tmp)
        families = stats.get("families") or a.params.get("families")
        write_tasks(tmp / "eval", tmp / "tasks", families)


def cmd_pretrain(a: argparse.Namespace) -> None:
    from tokenclean.pretrain import pretrain_base

    pretrain_base(a.corpus, a.out, a.model_params, _train_config(a))


def cmd_tokenize(a: argparse.Namespace) -> None:
    from tokenclean.tokenization import tokenize_file

    meta = tokenize_file(a.data, a.tokenizer, a.max_length, a.out, a.trust_remote_code, a.revision, a.chat_format)
    log.info("%s: %d samples, %d tokens, %d response tokens", a.out, meta["n_samples"], meta["n_tokens"],
                 meta["n_response_tokens"])


def cmd_loss(a: argparse.Namespace) -> None:
    from tokenclean.loss import TOKEN_BUDGET, loss_file

    budget = TOKEN_BUDGET if a.token_budget is None else a.token_budget
    meta = loss_file(a.model, a.tokens, a.out, budget, a.device, a.dtype, a.trust_remote_code, a.revision)
    log.info("%s: mean response-token loss %.4f", a.out, meta["mean_response_loss"])


def cmd_concat(a: argparse.Namespace) -> None:
    from tokenclean.tokenization import concat_files

    meta = concat_files(a.tokens, a.out)
    log.info("%s: %d samples, %d tokens", a.out, meta["n_samples"], meta["n_tokens"])


def cmd_quality(a: argparse.Namespace) -> None:
    from tokenclean.report.quality import write_quality

    write_quality(a.tokens, a.masks, a.out)


def cmd_separation(a: argparse.Namespace) -> None:
    from tokenclean.artifacts import write_csv
    from tokenclean.report.quality import separation_table

    write_csv(a.out, separation_table(a.tokens, a.base_loss, a.ref_loss))


def cmd_chunk(a: argparse.Namespace) -> None:
    from tokenclean.tokenization import chunk_file

    meta = chunk_file(a.tokens, a.chunks, a.index, a.out, a.loss)
    log.info("%s: chunk %d of %d, %d samples", a.out, a.index, a.chunks, meta["n_samples"])


def cmd_select(a: argparse.Namespace) -> None:
    from tokenclean.selection import select_file

    meta = select_file(a.method, a.tokens, a.out, a.ratio, a.seed, a.base_loss, a.ref_loss)
    log.info("%s: kept %d of %d response tokens; %d samples keep none", a.out, meta["n_selected"],
                 meta["n_response_tokens"], meta["n_samples_without_selected"])


def cmd_export(a: argparse.Namespace) -> None:
    from tokenclean.export import export_file

    meta = export_file(a.tokens, a.out, a.mask, a.weights, a.format, a.keep_empty)
    log.info("%s: %d samples (%d without a trained token dropped), %d tokens, %d trained", a.out,
                 meta["n_samples"], meta["n_samples_dropped"], meta["n_tokens"], meta["n_trained_tokens"])


def cmd_train(a: argparse.Namespace) -> None:
    from tokenclean.training import round_config, train_file

    cfg = _train_config(a)
    if a.rounds:
        cfg = round_config(cfg, a.rounds, a.round)
    arrays = {"ref_loss": a.ref_loss, "base_loss": a.base_loss}
    if a.online:  # parameters and needed flags are checked before anything is loaded
        from tokenclean.online import require_arrays, resolve

        resolve(a.online, a.online_params)
        require_arrays(a.online, arrays)
    elif a.online_params:
        raise ValueError("--online-params: given without --online")
    summary = train_file(a.model, a.tokens, a.out, cfg, a.mask, a.trust_remote_code, a.revision,
                         online=a.online, online_params=a.online_params, arrays=arrays)
    log.info("%s: %s", a.out, summary)


def cmd_evaluate(a: argparse.Namespace) -> None:
    from tokenclean.evaluation import evaluate, evaluate_benchmarks

    if a.benchmarks is not None:
        evaluate_benchmarks(a.model, a.benchmarks, a.out, device=a.device, limit=a.limit, seed=a.seed,
                            batch_size=int(a.batch_size) if str(a.batch_size).isdigit() else a.batch_size,
                            include_path=a.include_path,
                            trust_remote_code=a.trust_remote_code, model_args=a.model_args, revision=a.revision,
                            apply_chat_template=a.apply_chat_template)
    elif a.tasks_dir and a.tasks:
        evaluate(a.model, a.tasks_dir, a.tasks.split(","), a.out, device=a.device, limit=a.limit, seed=a.seed)
    else:
        raise ValueError("give --tasks-dir and --tasks (the world's families) or --benchmarks (lm-eval tasks)")


def cmd_data(a: argparse.Namespace) -> None:
    from tokenclean.sources import prepare_data

    meta = prepare_data(a.spec, a.out)
    log.info("%s: pool %d records, warm-up %d records", a.out, meta["pool"]["records"], meta["warmup"]["records"])


def cmd_report(a: argparse.Namespace) -> None:
    from tokenclean.report.table import write_table

    write_table(a.evals, a.out_csv, a.out_md, metric=a.metric, out_tex=a.out_tex,
                metrics=a.metrics.split(",") if a.metrics else None, paper_reference=a.paper_reference,
                models=a.models)


def cmd_significance(a: argparse.Namespace) -> None:
    from tokenclean.report.significance import BOOTSTRAP_ITERS, write_significance

    iters = BOOTSTRAP_ITERS if a.iters is None else a.iters
    write_significance(a.evals, a.metrics.split(","), a.out_csv, a.out_md, iters=iters, seed=a.seed,
                       baseline=[b for b in a.baseline.split(",") if b])


def cmd_compare(a: argparse.Namespace) -> None:
    from tokenclean.report.compare import write_compare

    write_compare(a.world, a.out_csv, a.out_md, metric=a.metric)


def cmd_figure(a: argparse.Namespace) -> None:
    from tokenclean.report import figures

    need = {"ratios": ["table"], "scores": ["tokens", "base_loss", "ref_loss"], "kept": ["quality"],
            "rounds": ["rounds_csv"]}[a.kind]
    missing = [f"--{n.replace('_', '-')}" for n in need if not getattr(a, n)]
    if missing:
        raise ValueError(f"figure {a.kind} needs {', '.join(missing)}")
    if a.kind == "ratios":
        figures.plot_ratios(a.table, a.out, a.metric)
    elif a.kind == "scores":
        figures.plot_scores(a.tokens, a.base_loss, a.ref_loss, a.out, a.ratios)
    elif a.kind == "kept":
        figures.plot_kept(a.quality, a.out)
    else:
        figures.plot_rounds(a.rounds_csv, a.out, a.metric)


def cmd_token_view(a: argparse.Namespace) -> None:
    from tokenclean.report.token_view import write_token_view

    write_token_view(a.tokens, a.base_loss, a.ref_loss, a.masks, a.tokenizer, a.out, n_samples=a.samples,
                     trust_remote_code=a.trust_remote_code, revision=a.revision)


def cmd_provenance(a: argparse.Namespace) -> None:
    from tokenclean.provenance import write_provenance

    record = write_provenance(a.data_dir, a.tokens, a.losses, a.base_model, a.out_json, a.out_md, a.revision)
    for warning in record["warnings"]:
        log.warning("%s", warning)


def cmd_rounds(a: argparse.Namespace) -> None:
    from tokenclean.report.table import write_rounds

    write_rounds(a.evals, a.rounds, a.out, metric=a.metric, models=a.models)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokenclean", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tokenclean {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[argparse.Namespace], None]] = {}

    def add(name: str, fn: Callable[[argparse.Namespace], None], help_text: str) -> argparse.ArgumentParser:
        # argparse %-formats help strings (not descriptions): a literal % must be doubled there only
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        p.add_argument("--threads", type=_positive, default=None,
                       help="torch threads (the workflow passes the rule's threads)")
        p.set_defaults(func=fn)
        commands[name] = fn
        return p

    p = add("world", cmd_world, "Generate the synthetic world (corpus, warm-up set, pool, eval sets, lm-eval tasks).")
    p.add_argument("--params", type=_json_arg, default={}, help="world settings as a JSON object")
    p.add_argument("--out", required=True, help="output directory")

    p = add("pretrain", cmd_pretrain, "Train a tokenizer and pretrain the tiny base model on a text corpus.")
    p.add_argument("--corpus", required=True, help="JSON lines of {\"text\": ...}")
    p.add_argument("--model-params", type=_json_arg, default={}, help="model size settings as a JSON object")
    p.add_argument("--out", required=True, help="output model directory")
    _add_train_flags(p)

    p = add("tokenize", cmd_tokenize, "Tokenize JSON-lines SFT data into a flat token table with loss_mask.")
    p.add_argument("--data", required=True, help="JSON lines with 'messages' or 'prompt'/'completion'")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id")
    p.add_argument("--max-length", type=_int_at_least(2), required=True, help="truncate samples to this many tokens")
    p.add_argument("--out", required=True, help="output X.tokens.npz")
    p.add_argument("--trust-remote-code", action="store_true")
    # the choices are tokenization.CHAT_FORMATS (not imported here: the module loads numpy and transformers)
    p.add_argument("--chat-format", choices=("tulu", "template"), default="tulu",
                   help="tulu: the paper's <|user|> / <|assistant|> format (default); template: the tokenizer's own "
                        "chat template")
    _add_revision_flag(p)

    p = add("loss", cmd_loss, "Per-token losses of a model on a token table (NaN outside loss_mask).")
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--tokens", required=True, help="X.tokens.npz")
    p.add_argument("--out", required=True, help="output X.loss.npy")
    # the default lives in tokenclean.loss (imported by the command, not here: torch is slow to import)
    p.add_argument("--token-budget", type=_positive, help="max padded tokens per batch (default: loss.TOKEN_BUDGET)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--trust-remote-code", action="store_true")
    _add_revision_flag(p)

    p = add("concat", cmd_concat, "Concatenate token tables made with one tokenizer (e.g. pool + warm-up set).")
    p.add_argument("--tokens", nargs="+", required=True, help="X.tokens.npz files, in order")
    p.add_argument("--out", required=True, help="output X.tokens.npz")

    p = add("chunk", cmd_chunk, "One of N contiguous, near-equal chunks of a token table, or of a loss array made "
                               "on it (self-evolving rounds).")
    p.add_argument("--tokens", required=True, help="X.tokens.npz")
    p.add_argument("--chunks", type=_positive, required=True, help="how many chunks the table is cut into")
    p.add_argument("--index", type=_positive, required=True, help="which chunk, 1-based")
    p.add_argument("--loss", default=None, help="a loss array made on --tokens: write the chunk's rows of it "
                                                "(X.loss.npy) instead of the chunk's token table")
    p.add_argument("--out", required=True, help="output X.tokens.npz (X.loss.npy with --loss)")

    p = add("select", cmd_select, "Select tokens to train on: full, random, rho (per sample), fixed (global), or "
                                  "by ground truth (embedded world only): truth_drop_noisy (every token but the "
                                  "corrupted and garbage ones), truth_keep_informative (the informative and novel "
                                  "ones only).")
    p.add_argument("--method", required=True, help="a mask method of tokenclean.methods (full, random, rho, fixed, "
                                                   "truth_drop_noisy, truth_keep_informative) or of a plug-in "
                                                   "(TOKENCLEAN_PLUGINS)")
    p.add_argument("--ratio", type=_ratio_arg, default=1.0, help="fraction of response tokens to keep, in (0, 1]")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random method")
    p.add_argument("--tokens", required=True, help="X.tokens.npz")
    p.add_argument("--base-loss", help="loss file of the base model (rho, fixed)")
    p.add_argument("--ref-loss", help="loss file of the reference model (rho, fixed)")
    p.add_argument("--out", required=True, help="output X.mask.npy")

    p = add("train", cmd_train, "Fine-tune a model on the selected tokens and save a Hugging Face directory.")
    p.add_argument("--model", required=True, help="model directory or hub id to start from")
    p.add_argument("--tokens", required=True, help="X.tokens.npz")
    p.add_argument("--mask", help="X.mask.npy (default: every response token)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--round", type=_positive, default=1, help="self-evolving round (1-based) of --rounds")
    p.add_argument("--rounds", type=_int_at_least(0), default=0, help="> 0: train round --round's share of --steps")
    p.add_argument("--online", default=None, metavar="METHOD",
                   help="weight the selected tokens during training by an online method: rho1, sstoken, dft, eaft "
                        "(tokenclean/online.py); its per-token record is saved as <out>/weights.npy")
    p.add_argument("--online-params", type=_json_arg, default=None, metavar="JSON",
                   help='the online method\'s parameters, e.g. \'{"ratio": 0.6}\' (default: the method\'s own)')
    p.add_argument("--ref-loss", help="loss file of the reference model (online rho1)")
    p.add_argument("--base-loss", help="loss file of the base model (online sstoken: the history losses)")
    _add_revision_flag(p)
    _add_train_flags(p)

    p = add("export", cmd_export, "Write a token table with its selection for other trainers: a datasets directory "
                                  "(datasets.load_from_disk) or JSON lines, with input_ids, labels (-100 where a "
                                  "token is not trained; not shifted), attention_mask and optionally weights.")
    p.add_argument("--tokens", required=True, help="X.tokens.npz")
    p.add_argument("--mask", help="X.mask.npy made on --tokens (default: every response token)")
    p.add_argument("--weights", help="per-token weights made on --tokens (e.g. an online method's): a weights "
                                     "column, 0 where not trained")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="hf",
                   help="hf: a datasets directory (save_to_disk); jsonl: <out>/data.jsonl")
    p.add_argument("--keep-empty", action="store_true",
                   help="keep samples with no trained token (default: drop them, as tokenclean train does)")
    p.add_argument("--out", required=True, help="output directory (with export.json, the provenance)")

    p = add("evaluate", cmd_evaluate, "Evaluate a model on lm-eval tasks; write a results JSON.")
    p.add_argument("--model", required=True, help="model directory (or, with --benchmarks, a hub id)")
    p.add_argument("--tasks-dir", help="the world's lm-eval task directory (embedded experiments)")
    p.add_argument("--tasks", help="comma-separated world families")
    p.add_argument("--benchmarks", type=_json_list_arg, default=None,
                   help='JSON list of {"task", "num_fewshot", "metric"[, "limit", "metadata"]}: stock lm-eval tasks, '
                        "tasks under --include-path, or the packaged tc_tydiqa_goldp (TyDiQA GoldP as the paper ran "
                        "it; its metadata names the data files). A task's own limit (null: all) replaces --limit; "
                        "metadata reaches lm-eval's tasks as `lm_eval --metadata` would")
    p.add_argument("--include-path", default=None, help="extra lm-eval task directory for --benchmarks")
    p.add_argument("--model-args", type=_json_arg, default=None,
                   help="JSON object of extra lm-eval HFLM arguments (e.g. add_bos_token, dtype), plus tokenclean's "
                        "generation_batch_size (generation's batch size under --batch-size auto, default 5) and "
                        "newline_stop (text: lm-eval's cut at any newline; token: the TyDiQA script's stop at the "
                        "newline token); a benchmark's own model_args override these for its run")
    p.add_argument("--batch-size", default=None, help="lm-eval batch size for --benchmarks (an integer or 'auto'; "
                   "under 'auto' generation uses generation_batch_size: lm-eval's probe would run at the model's "
                   "maximum length)")
    p.add_argument("--revision", default=None,
                   help="hub revision (branch, tag or commit) of --model when it is a hub id (with --benchmarks); "
                        "ignored for a model directory")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="--benchmarks: prompts (few-shot examples as turns) in the model's chat template, as lm-eval's "
                        "--apply_chat_template --fewshot_as_multiturn; default: lm-eval's plain prompts")
    p.add_argument("--out", required=True, help="output results JSON")
    p.add_argument("--device", default=None)
    p.add_argument("--limit", type=_limit_arg, default=None,
                   help="examples per task (an integer), or a fraction of each task below 1 (the paper: 0.99)")
    p.add_argument("--seed", type=_numpy_seed, default=0)

    p = add("data", cmd_data, "Bring SFT data into an experiment: pool and warm-up set as validated JSON lines, "
            "each record with its id and other columns (docs/own-data.md).")
    p.add_argument("--spec", type=_json_arg, required=True,
                   help='JSON: {"pool": {"path"|"hub": ...}, "warmup": {"path"|"hub"|"first_of_pool": ...}}; a path '
                        "is JSON lines, a JSON array, Parquet, CSV, Arrow, a save_to_disk folder or a folder of such "
                        "files; a source may add format, columns, roles, split, limit")
    p.add_argument("--out", required=True, help="output directory (pool.jsonl, warmup.jsonl, data.json)")

    p = add("quality", cmd_quality, "Kept fraction per ground-truth token class for each selection: a mask or an "
            "online run's weights (embedded world).")
    p.add_argument("masks", nargs="+", metavar="SELECTION",
                   help="X.mask.npy files and online runs' <model>/weights.npy files made on --tokens")
    p.add_argument("--tokens", required=True, help="X.tokens.npz with ground-truth token classes")
    p.add_argument("--out", required=True, help="output CSV")

    p = add("separation", cmd_separation, "How the scores fall by ground-truth token class (embedded world).")
    p.add_argument("--tokens", required=True, help="X.tokens.npz with ground-truth token classes")
    p.add_argument("--base-loss", required=True, help="loss file of the base model")
    p.add_argument("--ref-loss", required=True, help="loss file of the reference model")
    p.add_argument("--out", required=True, help="output CSV")

    p = add("report", cmd_report, "Aggregate evaluation JSONs into tables: CSV (headline; other metrics in "
                                  "<csv stem>_<metric>.csv), Markdown and LaTeX with the best row in bold.")
    p.add_argument("evals", nargs="+", help="<method>[_r<ratio>][_s<seed>].json files; a file under replicates/r<r>/ "
                                            "belongs to replicate r (several replicates: mean ± std over them)")
    p.add_argument("--out-csv", required=True, help="headline table (other metrics beside it, one CSV each)")
    p.add_argument("--out-md", default=None, help="Markdown: one table per metric, headline first")
    p.add_argument("--out-tex", default=None, help="LaTeX (booktabs): one table per metric")
    p.add_argument("--metric", default="answer_acc", help="headline metric (benchmark suites: score)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metrics to tabulate (default: the headline and the other world metrics "
                        "every file reports)")
    p.add_argument("--paper-reference", default=None,
                   help="show the paper's numbers for this model below ours (a key of paper_reference.json, "
                        "e.g. llama-3.2-3b; benchmark suites only)")
    p.add_argument("--models", nargs="*", default=[],
                   help="the trained models' directories, named by run (warmup, full_s1, rho_r0.6_s1; a chain's "
                        "rounds <row>_t<t>): each row's passes over its own data, from their tokenclean.json")

    p = add("significance", cmd_significance,
            "Paired bootstrap over replicates, then seeds, then test questions: each method minus full-token SFT "
            "(and other baselines), per task and on average, with a 95% interval and the share of replicates in "
            "which the method is ahead (reads the <eval>.samples.jsonl beside each evaluation JSON).")
    p.add_argument("evals", nargs="+", help="<method>[_r<ratio>][_s<seed>].json files, full_s<seed>.json among them; "
                                            "a file under replicates/r<r>/ belongs to replicate r")
    p.add_argument("--metrics", default="answer_acc", help="comma-separated metrics (benchmark suites: score)")
    p.add_argument("--iters", type=_positive, help="bootstrap resamples (default: significance.BOOTSTRAP_ITERS)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the resampling")
    p.add_argument("--baseline", default="full",
                   help="the row every other is compared with, or several, comma-separated (default full; "
                        "full+warmup: the fair baseline of the rows whose reference saw the warm-up set)")
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-md", default=None)

    p = add("compare", cmd_compare, "Worlds x methods: finished experiments side by side, one row per world, method "
                                    "and ratio: the headline metric (mean ± std over seeds), the difference from "
                                    "full-token SFT with its 95% paired interval, and the kept fraction of each "
                                    "ground-truth token class (from each results directory's table.csv, "
                                    "significance.csv and cleaning_quality.csv).")
    p.add_argument("--world", action="append", required=True, metavar="NAME=RESULTS_DIR",
                   help="an experiment's name in the table and its results directory (e.g. "
                        "paper-setting=results/methods); repeat it, in the order of the table's columns")
    p.add_argument("--metric", default=None, help="the metric to compare (default: each world's headline, the "
                                                  "metric of its table.csv)")
    p.add_argument("--out-csv", required=True, help="one row per world, method and ratio")
    p.add_argument("--out-md", required=True, help="Markdown: the worlds side by side")

    p = add("figure", cmd_figure, "Draw one of the experiment's figures as a PNG: ratios (average score against "
                                  "the keep ratio, from table.csv), scores (score histogram per ground-truth class), "
                                  "kept (kept fraction per class and mask, from cleaning_quality.csv), rounds (the "
                                  "self-evolving chain per task, from rounds.csv).")
    p.add_argument("kind", choices=["ratios", "scores", "kept", "rounds"])
    p.add_argument("--table", help="table.csv (ratios)")
    p.add_argument("--tokens", help="pool token table (scores)")
    p.add_argument("--base-loss", help="base model's pool losses (scores)")
    p.add_argument("--ref-loss", help="reference model's pool losses (scores)")
    p.add_argument("--ratios", type=_ratio_arg, nargs="*", default=[], help="draw the global cut of these keep ratios")
    p.add_argument("--quality", help="cleaning_quality.csv (kept)")
    p.add_argument("--rounds-csv", help="rounds.csv (rounds)")
    p.add_argument("--metric", default="answer_acc", help="the metric of table.csv / rounds.csv (axis label)")
    p.add_argument("--out", required=True, help="output PNG")

    p = add("token-view", cmd_token_view,
            "A self-contained HTML page: response tokens of a few pool samples coloured by score, with what each "
            "mask or online run kept or dropped and, in the embedded world, each token's ground-truth class.")
    p.add_argument("--tokens", required=True, help="pool token table")
    p.add_argument("--base-loss", required=True)
    p.add_argument("--ref-loss", required=True)
    p.add_argument("--masks", nargs="*", default=[], help="<name>.mask.npy files and online runs' "
                   "<model>/weights.npy files made on --tokens (a weight of at least 0.5 counts as kept)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id (to show the tokens' text)")
    p.add_argument("--samples", type=_positive, default=12, help="how many samples to show")
    p.add_argument("--trust-remote-code", action="store_true")
    _add_revision_flag(p)
    p.add_argument("--out", required=True, help="output HTML")

    p = add("provenance", cmd_provenance,
            "What made the results: the data's sha256, the token tables' tokenizer and data fingerprints, the base "
            "model's id, revision and the commit loaded, and package versions (provenance.json and .md).")
    p.add_argument("--data-dir", required=True, help="the experiment's data (or world) directory: pool.jsonl, "
                                                     "warmup.jsonl[, data.json]")
    p.add_argument("--tokens", nargs="+", required=True, help="X.tokens.npz files (their sidecars are read)")
    p.add_argument("--losses", nargs="*", default=[], help="the base model's X.loss.npy files (their sidecars)")
    p.add_argument("--base-model", required=True, help="the base model's hub id or directory")
    _add_revision_flag(p)
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-md", required=True)

    p = add("rounds", cmd_rounds, "The self-evolving curve: average score per round, mean and std over seeds.")
    p.add_argument("evals", nargs="+", help="warmup.json (round 0), <row>_t<t>.json and <row>.json (last round)")
    p.add_argument("--rounds", type=_positive, required=True, help="number of rounds (a row's own file is the last)")
    p.add_argument("--metric", default="answer_acc", help="headline metric (benchmark suites: score)")
    p.add_argument("--models", nargs="*", default=[],
                   help="the warm-up model and the rounds' directories (<row>_t<t>): each round's passes over its "
                        "own data, from their tokenclean.json")
    p.add_argument("--out", required=True, help="output CSV")
    return parser


# Flags that name files or directories, checked before a command starts (so that hours of scoring or training
# never end in an unreadable input or an unwritable output). Any command's flag of these names is checked.
INPUT_FILES = ("data", "corpus", "tokens", "mask", "masks", "base_loss", "ref_loss", "evals", "table", "quality",
               "rounds_csv", "weights")
INPUT_DIRS = ("tasks_dir", "include_path")
MODEL_DIRS = ("model", "tokenizer")  # a directory or a hub id: a file is refused here, the rest by the loaders
OUTPUTS = ("out", "out_csv", "out_md", "out_tex")
DIRECTORY_OUTPUTS = ("world", "pretrain", "train", "data", "export")  # commands whose --out is a directory


def _paths(value: Any) -> list[str]:
    return [] if value is None else [str(v) for v in value] if isinstance(value, list) else [str(value)]


def check_paths(args: argparse.Namespace) -> None:
    """Refuse, in one line, a file flag that names a directory or an unreadable file, a directory flag that
    names a file, and an output that could not be written."""
    from tokenclean.artifacts import ArtifactError, require_file, require_writable

    spec = getattr(args, "spec", None) or {}  # the data command's sources: {"pool": {"path": ...}, ...}
    for path in [s["path"] for s in spec.values() if isinstance(s, dict) and isinstance(s.get("path"), str)]:
        if Path(path).is_file():  # a missing one: prepare_data says which config key to fix; a folder is a source
            require_file(path)
    for name in INPUT_FILES:
        for path in _paths(getattr(args, name, None)):
            require_file(path)
    for name in INPUT_DIRS:
        for path in _paths(getattr(args, name, None)):
            if not Path(path).is_dir():
                raise ArtifactError(f"{path}: {'is not a directory' if Path(path).exists() else 'not found'}, "
                                    "expected a directory")
    for name in MODEL_DIRS:
        for path in _paths(getattr(args, name, None)):
            if Path(path).exists():  # a missing one is the loader's to report (after cheaper checks)
                from tokenclean.models import require_model_dir  # only where a model is named: it starts torch

                require_model_dir(path)
    for name in OUTPUTS:
        for path in _paths(getattr(args, name, None)):
            require_writable(path, directory=args.command in DIRECTORY_OUTPUTS and name == "out")


def error_line(error: BaseException) -> str:
    """The one line printed for an input or file-system error: ``<file>[:<line>]: <what>`` where the file is
    known (our own errors name it first; an OSError carries it)."""
    from tokenclean.artifacts import ONLY_WRITES, write_fault

    if isinstance(error, OSError) and error.filename is not None and error.errno in ONLY_WRITES:
        text = str(write_fault(error, error.filename))  # a write outside the atomic helpers: the same words
    elif isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    elif isinstance(error, UnicodeDecodeError):
        text = f"invalid UTF-8 at byte {error.start} ({error.reason})"
    else:
        text = str(error) or type(error).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def limit_threads(threads: int | None) -> None:
    """Honour the workflow rule's ``threads`` (torch would otherwise use every core of the machine) without
    importing torch: torch takes its thread count from OMP_NUM_THREADS when it starts, so a command that never
    needs it (select, report, ...) starts in a fraction of a second instead of about two."""
    if threads:
        if threads > (os.cpu_count() or 1):  # more would only oversubscribe (e.g. snakemake --cores above the CPUs)
            log.warning("--threads %d: this machine has %d CPUs; using %d", threads, os.cpu_count(), os.cpu_count())
            threads = os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:  # already started (a test, or a caller that imported it)
            sys.modules["torch"].set_num_threads(threads)


def pin_kernels() -> None:
    """Apply the CPU-kernel level the environment names (tokenclean.numerics.ENV, set by the workflow from the
    config's cpu_kernels) before anything imports torch, and say in one line when it cannot hold here."""
    from tokenclean import numerics

    line = numerics.warning(numerics.apply_from_env())
    if line:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input and file-system errors end in one line and exit code 2: our own errors
    (ArtifactError, DataError), ValueError (a value the command cannot use, UnicodeDecodeError included),
    FloatingPointError (non-finite losses) and OSError (unreadable, missing or unwritable paths). Anything else
    (KeyError, TypeError, AttributeError, ...) is a bug and keeps its traceback; readers that interpret a file's
    contents turn such errors into one-line errors naming the file themselves (``artifacts.reading``)."""
    if os.environ.get("TOKENCLEAN_WARM_SOCKET"):  # a local workflow run's job: a fork of its warm server runs it
        from tokenclean import warm

        code = warm.hand_off(sys.argv[1:] if argv is None else argv)
        if code is not None:
            return code
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from tokenclean.artifacts import ArtifactError
    from tokenclean.data import DataError

    try:
        pin_kernels()
        limit_threads(args.threads)
        check_paths(args)
        args.func(args)
    except (DataError, ArtifactError, ValueError, OSError, FloatingPointError) as e:
        # the log may sit on the disk that is full: then the exit code alone says why the command stopped
        with contextlib.suppress(OSError):
            print(f"tokenclean {args.command}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
