"""The command-line fuzz: every ``tokenclean`` command run on mutations of valid inputs and on the boundaries of its
numeric options (tests/test_fuzz.py runs it; docs/guarantees.md lists the counts).

A case is (command, what is mutated, the mutation). The valid inputs are made once by the commands themselves
(:func:`build_inputs`: a tiny world, its token tables, two models' losses, masks, weights, evaluations, tables), so
every mutation starts from a real artifact. Mutations are generated from a fixed seed: which tokens get a NaN, which
sample's offsets break, ... so a run is reproducible and its cases are always the same ones.

Each case must end in one of two ways (:func:`outcome`):

- **refused**: exit code 2, exactly one line ``tokenclean <command>: error: ...`` that names the mutated file (or
  its sidecar) or the option, no traceback, and the output folder and the inputs unchanged, hidden files included;
- **accepted**: exit code 0 and an output that the command's own check (:data:`COMMANDS`' ``check``) finds right:
  readable by the project's reader of its kind, every number finite, nothing degenerate (a mask that keeps some
  tokens, as many as asked, a table with rows).

A mutation says which of the two it must give (``refuse``: the input cannot be right; ``accept``: it is harmless,
e.g. an extra key; ``either``: a boundary value that a command may take or refuse, and its output is then checked).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import random
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from tests.listing import all_files
from tokenclean.artifacts import (
    NOT_APPLICABLE_COLUMN,
    ArtifactError,
    TokenTable,
    fingerprint_arrays,
    load_array,
    read_sidecar,
    sidecar_path,
    sidecar_text,
)

SEED = 20261205
WORLD = {"seed": 0, "pretrain_docs": 40, "warmup_samples": 12, "pool_samples": 16, "eval_samples": 3,
         "families": ["add", "reverse", "novel_capital"], "phrasings": 4, "multiple_choice": True,
         "entities": 4, "novel_entities": 2}
TINY_TRAIN = ["--steps", "2", "--batch-size", "4", "--device", "cpu", "--log-every", "1"]


def run_cli(argv: list[str]) -> tuple[int | None, str, str | None]:
    """(exit code, stderr, traceback or None) of ``tokenclean <argv>`` run in this process."""
    from tokenclean.cli import main

    err = io.StringIO()
    code: int | None
    tb = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code, tb = None, traceback.format_exc()
    return code, err.getvalue(), tb


def _must(argv: list[str]) -> None:
    code, err, tb = run_cli(argv)
    if code != 0:
        raise RuntimeError(f"building the fuzz inputs: tokenclean {' '.join(argv)} failed:\n{err}\n{tb or ''}")


def build_inputs(d: Path, tokenizer_dir: Path, model_dir: Path) -> dict[str, Path]:
    """Every kind of valid input, made by the commands: a tiny world, its pool and warm-up tables, a base and a
    reference model's losses, masks, an online run's weights, evaluations with their samples, and tables."""
    d.mkdir(parents=True, exist_ok=True)
    g: dict[str, Path] = {"tokenizer": tokenizer_dir, "model": model_dir}
    _must(["world", "--params", json.dumps(WORLD), "--out", str(d / "world")])
    g["world"], g["tasks"] = d / "world", d / "world" / "tasks"
    g["data"], g["corpus"] = d / "world" / "pool.jsonl", d / "world" / "corpus.jsonl"
    for name in ("pool", "warmup"):
        _must(["tokenize", "--data", str(d / "world" / f"{name}.jsonl"), "--tokenizer", str(tokenizer_dir),
               "--max-length", "48", "--out", str(d / f"{name}.tokens.npz")])
    g["tokens"], g["warmup_tokens"] = d / "pool.tokens.npz", d / "warmup.tokens.npz"
    _must(["train", "--model", str(model_dir), "--tokens", str(g["warmup_tokens"]), "--lr", "0.01", *TINY_TRAIN,
           "--out", str(d / "models" / "warmup")])
    g["ref_model"] = d / "models" / "warmup"
    for name, model in (("base", model_dir), ("ref", g["ref_model"])):
        _must(["loss", "--model", str(model), "--tokens", str(g["tokens"]), "--device", "cpu",
               "--out", str(d / f"{name}.loss.npy")])
        g[f"{name}_loss"] = d / f"{name}.loss.npy"
    _must(["select", "--method", "fixed", "--ratio", "0.5", "--tokens", str(g["tokens"]), "--base-loss",
           str(g["base_loss"]), "--ref-loss", str(g["ref_loss"]), "--out", str(d / "fixed_r0.5.mask.npy")])
    g["mask"] = d / "fixed_r0.5.mask.npy"
    _must(["train", "--model", str(model_dir), "--tokens", str(g["tokens"]), "--online", "dft", *TINY_TRAIN,
           "--steps", "4", "--out", str(d / "models" / "dft_s0")])  # 4 x 4 = every pool sample weighed once
    g["weights"] = d / "models" / "dft_s0" / "weights.npy"
    evals = d / "evals"
    _must(["evaluate", "--model", str(model_dir), "--tasks-dir", str(g["tasks"]), "--tasks",
           ",".join(WORLD["families"]), "--device", "cpu", "--limit", "2", "--out", str(evals / "full_s0.json")])
    for name in ("fixed_r0.5_s0", "warmup"):  # the same model's evaluation under other run names
        shutil.copy(evals / "full_s0.json", evals / f"{name}.json")
        shutil.copy(evals / "full_s0.samples.jsonl", evals / f"{name}.samples.jsonl")
    g["eval"], g["eval2"] = evals / "full_s0.json", evals / "fixed_r0.5_s0.json"
    g["eval_warmup"] = evals / "warmup.json"
    results = d / "results"
    _must(["report", str(g["eval"]), str(g["eval2"]), "--metric", "mix_acc", "--out-csv", str(results / "table.csv")])
    _must(["significance", str(g["eval"]), str(g["eval2"]), "--metrics", "mix_acc", "--iters", "20",
           "--out-csv", str(results / "significance.csv")])
    _must(["quality", str(g["mask"]), "--tokens", str(g["tokens"]), "--out", str(results / "cleaning_quality.csv")])
    _must(["rounds", str(g["eval_warmup"]), str(g["eval2"]), "--rounds", "1", "--metric", "mix_acc",
           "--out", str(d / "rounds.csv")])
    g["results"], g["table"], g["quality"], g["rounds_csv"] = (results, results / "table.csv",
                                                               results / "cleaning_quality.csv", d / "rounds.csv")
    # a trained model's directory named as a row the report's evaluations have
    shutil.copytree(d / "models" / "warmup", d / "models" / "fixed_r0.5_s0")
    g["record"] = d / "models" / "fixed_r0.5_s0"
    return g


# ---------------------------------------------------------------------------------------------------------
# mutations: each writes a bad input at `bad` from the good one at `good`
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What a mutation may need: a seeded generator (one per case) and the good pool table."""

    rng: random.Random
    table: TokenTable
    inputs: dict[str, Path]


Mutate = Callable[[Path, Path, Context], None]


@dataclass(frozen=True)
class Mutation:
    name: str
    make: Mutate
    expect: str  # refuse | accept | either


def _copy_sidecar(good: Path, bad: Path) -> None:
    if sidecar_path(good).exists() and good.suffix in (".npy", ".npz"):
        shutil.copy(sidecar_path(good), sidecar_path(bad))


def _copy(good: Path, bad: Path) -> None:
    if good.is_dir():
        shutil.copytree(good, bad, symlinks=True)
    else:
        shutil.copy(good, bad)
        _copy_sidecar(good, bad)


def missing(good: Path, bad: Path, ctx: Context) -> None:
    """Nothing at the path."""


def empty(good: Path, bad: Path, ctx: Context) -> None:
    bad.write_bytes(b"")
    _copy_sidecar(good, bad)


def truncated(good: Path, bad: Path, ctx: Context) -> None:
    """Cut short inside a line (a text file cut at a line's end would be a shorter valid file)."""
    data = good.read_bytes()
    cut = ctx.rng.randrange(1, max(2, len(data) - 1))
    while cut > 1 and b"\n" in (data[cut - 1: cut], data[cut: cut + 1]):
        cut -= 1
    bad.write_bytes(data[:cut])
    _copy_sidecar(good, bad)


def other_kind(name: str) -> Mutate:
    """A good input of another kind (with its own sidecar) under this one's name."""
    def make(good: Path, bad: Path, ctx: Context) -> None:
        src = ctx.inputs[name]
        if src.is_dir():
            shutil.copytree(src, bad, symlinks=True)
        else:
            shutil.copy(src, bad)
            if sidecar_path(src).exists() and src.suffix in (".npy", ".npz"):
                shutil.copy(sidecar_path(src), sidecar_path(bad))
    return make


def _write_array(bad: Path, good: Path, array: np.ndarray, **sidecar: Any) -> None:
    """``array`` at ``bad`` with the good sidecar's provenance and a sidecar that describes it (fingerprint, dtype,
    shape): what a tool that writes wrong values correctly would leave."""
    meta = {k: v for k, v in read_sidecar(good).items() if k != "tokenclean_version"}
    meta.update(dtype=str(array.dtype), shape=list(array.shape), fingerprint=fingerprint_arrays(array))
    meta.update(sidecar)
    sidecar_path(bad).write_text(sidecar_text({k: v for k, v in meta.items() if v is not None}))
    with open(bad, "wb") as f:
        np.save(f, array, allow_pickle=False)


def array_values(change: Callable[[np.ndarray, np.ndarray, random.Random], np.ndarray]) -> Mutate:
    """The good array changed by ``change(array, loss_mask, rng)``, with a sidecar that describes the result."""
    def make(good: Path, bad: Path, ctx: Context) -> None:
        array, _ = load_array(good)
        _write_array(bad, good, change(array.copy(), ctx.table.loss_mask, ctx.rng))
    return make


def _at(where: np.ndarray, rng: random.Random) -> int:
    positions = np.flatnonzero(where)
    return int(positions[rng.randrange(len(positions))])


def _set(array: np.ndarray, where: np.ndarray, rng: random.Random, value: Any) -> np.ndarray:
    array[_at(where, rng)] = value
    return array


def sidecar_change(change: Callable[[dict[str, Any]], Any]) -> Mutate:
    """The good array or table with its sidecar changed in place by ``change``."""
    def make(good: Path, bad: Path, ctx: Context) -> None:
        shutil.copy(good, bad)
        meta = json.loads(sidecar_path(good).read_text())
        change(meta)
        sidecar_path(bad).write_text(json.dumps(meta))
    return make


def sidecar_text_of(text: str) -> Mutate:
    """The good array or table with ``text`` as its sidecar."""
    def make(good: Path, bad: Path, ctx: Context) -> None:
        shutil.copy(good, bad)
        sidecar_path(bad).write_text(text)
    return make


def no_sidecar(good: Path, bad: Path, ctx: Context) -> None:
    shutil.copy(good, bad)


SIDECAR = [
    Mutation("sidecar_missing", no_sidecar, "refuse"),
    Mutation("sidecar_invalid_json", sidecar_text_of('{"kind": '), "refuse"),
    Mutation("sidecar_not_an_object", sidecar_text_of("[1, 2]"), "refuse"),
    Mutation("sidecar_other_fingerprint", sidecar_change(lambda m: m.update(fingerprint="0123456789abcdef")),
             "refuse"),
    Mutation("sidecar_extra_key", sidecar_change(lambda m: m.update(comment="added by hand")), "accept"),
]
ARRAY_SIDECAR = SIDECAR + [
    Mutation("sidecar_without_tokens_fingerprint", sidecar_change(lambda m: m.pop("tokens_fingerprint")), "refuse"),
    Mutation("sidecar_without_kind", sidecar_change(lambda m: m.pop("kind")), "accept"),  # older: the dtype says
]
FILE = [Mutation("missing", missing, "refuse"), Mutation("empty", empty, "refuse"),
        Mutation("truncated", truncated, "refuse")]


def _shape(array: np.ndarray, how: str) -> np.ndarray:
    return {"shorter": array[:-1], "longer": np.concatenate([array, array[-1:]]), "two_d": array[None, :],
            "scalar": np.asarray(array[0]), "no_entries": array[:0]}[how]


def shape_mutations() -> list[Mutation]:
    return [Mutation(f"array_{how}", array_values(lambda a, m, r, how=how: _shape(a, how)), "refuse")
            for how in ("shorter", "longer", "two_d", "scalar", "no_entries")]


LOSS = FILE + ARRAY_SIDECAR + shape_mutations() + [
    Mutation("other_kind_mask", other_kind("mask"), "refuse"),
    Mutation("other_kind_tokens", other_kind("tokens"), "refuse"),
    Mutation("nan_in_response", array_values(lambda a, m, r: _set(a, m, r, np.nan)), "refuse"),
    Mutation("inf_in_response", array_values(lambda a, m, r: _set(a, m, r, np.inf)), "refuse"),
    Mutation("negative_in_response", array_values(lambda a, m, r: _set(a, m, r, -1.0)), "refuse"),
    Mutation("finite_outside_response", array_values(lambda a, m, r: _set(a, ~m, r, 1.0)), "refuse"),
    Mutation("int32_values", array_values(lambda a, m, r: np.nan_to_num(a).astype(np.int32)), "refuse"),
    Mutation("float64_values", array_values(lambda a, m, r: a.astype(np.float64)), "accept"),
    Mutation("huge_in_response", array_values(lambda a, m, r: _set(a, m, r, 1e30)), "either"),
]
MASK = FILE + ARRAY_SIDECAR + shape_mutations() + [
    Mutation("other_kind_loss", other_kind("base_loss"), "refuse"),
    Mutation("true_outside_response", array_values(lambda a, m, r: _set(a, ~m, r, True)), "refuse"),
    Mutation("uint8_values", array_values(lambda a, m, r: a.astype(np.uint8)), "refuse"),
    Mutation("keeps_nothing", array_values(lambda a, m, r: np.zeros_like(a)), "either"),
    Mutation("keeps_every_response_token", array_values(lambda a, m, r: m.copy()), "accept"),
]
WEIGHTS = FILE + ARRAY_SIDECAR + shape_mutations() + [
    Mutation("other_kind_mask", other_kind("mask"), "refuse"),
    Mutation("negative_in_response", array_values(lambda a, m, r: _set(a, m, r, -0.5)), "refuse"),
    Mutation("inf_in_response", array_values(lambda a, m, r: _set(a, m, r, np.inf)), "refuse"),
    Mutation("nan_in_response", array_values(lambda a, m, r: _set(a, m, r, np.nan)), "accept"),  # never seen
    Mutation("finite_outside_response", array_values(lambda a, m, r: _set(a, ~m, r, 1.0)), "refuse"),
    # a weight of 2 is a weight (export), but no kept fraction (quality)
    Mutation("above_one", array_values(lambda a, m, r: _set(a, m, r, 2.0)), "either"),
    Mutation("bool_values", array_values(lambda a, m, r: np.nan_to_num(a) > 0.5), "refuse"),
]


def table_change(change: Callable[[dict[str, np.ndarray], random.Random], None], consistent: bool = True) -> Mutate:
    """The good token table's arrays changed by ``change(arrays, rng)`` (in place), saved as an .npz with a
    sidecar whose fingerprint and counts describe the result (``consistent``) or the good one's sidecar."""
    def make(good: Path, bad: Path, ctx: Context) -> None:
        with np.load(good, allow_pickle=False) as z:
            arrays = {k: z[k].copy() for k in z.files}
        change(arrays, ctx.rng)
        with open(bad, "wb") as f:
            np.savez(f, **arrays)
        meta = {k: v for k, v in read_sidecar(good).items() if k != "tokenclean_version"}
        if consistent:
            ids, offsets, loss_mask = (arrays.get(k, np.zeros(0)) for k in ("input_ids", "offsets", "loss_mask"))
            meta.update(fingerprint=fingerprint_arrays(np.asarray(ids, dtype=np.int32),
                                                       np.asarray(offsets, dtype=np.int64),
                                                       np.asarray(loss_mask, dtype=bool)),
                        n_tokens=int(np.size(ids)), n_samples=max(int(np.size(offsets)) - 1, 0),
                        n_response_tokens=int(np.count_nonzero(loss_mask)))
        sidecar_path(bad).write_text(sidecar_text(meta))
    return make


def _first_response(a: dict[str, np.ndarray], r: random.Random) -> int:
    return _at(a["loss_mask"], r)


def _drop_last_sample(a: dict[str, np.ndarray], r: random.Random) -> None:
    a["offsets"] = a["offsets"][:-1].copy()


def _swap_offsets(a: dict[str, np.ndarray], r: random.Random) -> None:
    i = r.randrange(1, len(a["offsets"]) - 2)
    a["offsets"][i], a["offsets"][i + 1] = a["offsets"][i + 1], a["offsets"][i]


def _response_at_start(a: dict[str, np.ndarray], r: random.Random) -> None:
    a["loss_mask"][a["offsets"][r.randrange(len(a["offsets"]) - 1)]] = True


def _no_samples(a: dict[str, np.ndarray], r: random.Random) -> None:
    for k in list(a):
        a[k] = a[k][:0]
    a["offsets"] = np.zeros(1, dtype=np.int64)


def _per_token(key: str, values: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict, random.Random], None]:
    def change(a: dict[str, np.ndarray], r: random.Random) -> None:
        a[key] = values(a[key])
    return change


def _class_out_of_range(a: dict[str, np.ndarray], r: random.Random) -> None:
    a["token_class"][_first_response(a, r)] = 17


TOKENS = FILE + SIDECAR + [
    Mutation("other_kind_loss", other_kind("base_loss"), "refuse"),
    Mutation("other_kind_mask_with_table_sidecar", lambda g, b, c: (shutil.copy(c.inputs["mask"], b),
                                                                     shutil.copy(sidecar_path(g), sidecar_path(b))),
             "refuse"),
    Mutation("negative_token_id", table_change(lambda a, r: a["input_ids"].__setitem__(_first_response(a, r), -3)),
             "refuse"),
    Mutation("token_id_beyond_vocabulary",
             table_change(lambda a, r: a["input_ids"].__setitem__(_first_response(a, r), 10 ** 6)), "either"),
    Mutation("float_token_ids", table_change(_per_token("input_ids", lambda v: v.astype(np.float32) + 0.5)),
             "refuse"),
    Mutation("int_loss_mask", table_change(_per_token("loss_mask", lambda v: v.astype(np.int8) * 2)), "refuse"),
    Mutation("offsets_not_increasing", table_change(_swap_offsets), "refuse"),
    Mutation("offsets_end_early", table_change(_drop_last_sample), "refuse"),
    Mutation("response_at_sample_start", table_change(_response_at_start), "refuse"),
    Mutation("no_samples", table_change(_no_samples), "refuse"),
    Mutation("no_response_tokens", table_change(_per_token("loss_mask", np.zeros_like)), "refuse"),
    Mutation("token_class_out_of_range", table_change(_class_out_of_range), "refuse"),
    Mutation("extra_member_of_other_length", table_change(lambda a, r: a.update(extra=np.arange(3))), "refuse"),
    Mutation("extra_member_per_token", table_change(lambda a, r: a.update(extra=np.zeros_like(a["input_ids"]))),
             "accept"),
    Mutation("member_missing", table_change(lambda a, r: a.pop("loss_mask")), "refuse"),
    Mutation("two_d_token_ids", table_change(_per_token("input_ids", lambda v: v[None, :])), "refuse"),
    Mutation("sidecar_counts_wrong", sidecar_change(lambda m: m.update(n_tokens=m["n_tokens"] + 1)), "refuse"),
    Mutation("sidecar_without_fingerprint", sidecar_change(lambda m: m.pop("fingerprint")), "refuse"),
]


def json_change(change: Callable[[Any, random.Random], Any]) -> Mutate:
    """The good JSON file changed by ``change(obj, rng)`` (in place, or returning a new object / raw text)."""
    def make(good: Path, bad: Path, ctx: Context) -> None:
        obj = json.loads(good.read_text())
        new = change(obj, ctx.rng)
        obj = obj if new is None else new
        bad.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return make


def _one_metric(obj: dict[str, Any], r: random.Random, value: Any) -> None:
    task = r.choice(sorted(obj["metrics"]))
    metric = r.choice(sorted(k for k in obj["metrics"][task] if k.endswith("_acc")))
    obj["metrics"][task][metric] = value


EVAL = FILE + [
    Mutation("other_kind_table", other_kind("table"), "refuse"),
    Mutation("not_an_object", json_change(lambda o, r: [o]), "refuse"),
    Mutation("metrics_missing", json_change(lambda o, r: o.pop("metrics")), "refuse"),
    Mutation("metrics_empty", json_change(lambda o, r: o.update(metrics={})), "refuse"),
    Mutation("average_missing", json_change(lambda o, r: o.pop("average")), "refuse"),
    Mutation("metric_nan", json_change(lambda o, r: _one_metric(o, r, float("nan"))), "refuse"),
    Mutation("metric_infinite", json_change(lambda o, r: _one_metric(o, r, float("inf"))), "refuse"),
    Mutation("accuracy_above_one", json_change(lambda o, r: _one_metric(o, r, 1.5)), "refuse"),
    Mutation("accuracy_negative", json_change(lambda o, r: _one_metric(o, r, -0.25)), "refuse"),
    Mutation("metric_text", json_change(lambda o, r: _one_metric(o, r, "high")), "refuse"),
    Mutation("metric_null", json_change(lambda o, r: _one_metric(o, r, None)), "refuse"),
    Mutation("average_nan", json_change(lambda o, r: o["average"].update({k: float("nan") for k in o["average"]})),
             "refuse"),
    Mutation("extra_key", json_change(lambda o, r: o.update(note="added by hand")), "accept"),
]


def jsonl_change(change: Callable[[list[Any], random.Random], Any]) -> Mutate:
    """The good JSON-lines file's rows changed by ``change(rows, rng)`` (in place, or returning text)."""
    def make(good: Path, bad: Path, ctx: Context) -> None:
        rows = [json.loads(line) for line in good.read_text().splitlines() if line.strip()]
        text = change(rows, ctx.rng)
        bad.write_text(text if isinstance(text, str) else "".join(json.dumps(row) + "\n" for row in rows))
    return make


def _in_one_row(change: Callable[[dict[str, Any], random.Random], None]) -> Callable[[list, random.Random], None]:
    def rows_change(rows: list[dict[str, Any]], r: random.Random) -> None:
        change(rows[r.randrange(len(rows))], r)
    return rows_change


def _lines(rows: list[Any]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


SAMPLES = [
    Mutation("samples_missing", missing, "refuse"),
    Mutation("samples_empty", empty, "refuse"),
    Mutation("samples_truncated", truncated, "refuse"),
    Mutation("line_not_an_object", jsonl_change(lambda rows, r: _lines(rows) + "[1, 2]\n"), "refuse"),
    Mutation("line_invalid_json", jsonl_change(lambda rows, r: _lines(rows) + '{"family": \n'), "refuse"),
    Mutation("example_twice", jsonl_change(lambda rows, r: rows.append(dict(rows[0]))), "refuse"),
    Mutation("other_examples", jsonl_change(lambda rows, r: [row.update(doc_id=row["doc_id"] + 1000) for row in rows]),
             "refuse"),
    Mutation("value_nan", jsonl_change(_in_one_row(lambda row, r: row.update(mix_score=float("nan")))), "refuse"),
    Mutation("value_text", jsonl_change(_in_one_row(lambda row, r: row.update(mix_score="yes"))), "refuse"),
    Mutation("value_missing", jsonl_change(_in_one_row(lambda row, r: row.pop("mix_score"))), "refuse"),
    Mutation("doc_id_missing", jsonl_change(_in_one_row(lambda row, r: row.pop("doc_id"))), "refuse"),
    Mutation("extra_field", jsonl_change(_in_one_row(lambda row, r: row.update(note="x"))), "accept"),
    Mutation("blank_line", jsonl_change(lambda rows, r: _lines(rows) + "\n"), "accept"),
]


def _message(row: dict[str, Any], r: random.Random) -> dict[str, Any]:
    return row["messages"][r.randrange(len(row["messages"]))]


DATA = FILE + [
    Mutation("other_kind_tokens", other_kind("tokens"), "refuse"),
    Mutation("line_invalid_json", jsonl_change(lambda rows, r: _lines(rows) + '{"messages": [\n'), "refuse"),
    Mutation("line_not_an_object", jsonl_change(lambda rows, r: _lines(rows) + "null\n"), "refuse"),
    Mutation("invalid_utf8", lambda g, b, c: b.write_bytes(g.read_bytes() + b'{"prompt": "\xff"}\n'), "refuse"),
    Mutation("messages_missing", jsonl_change(_in_one_row(lambda row, r: row.pop("messages"))), "refuse"),
    Mutation("messages_not_a_list", jsonl_change(_in_one_row(lambda row, r: row.update(messages="hi"))), "refuse"),
    Mutation("no_assistant_turn", jsonl_change(_in_one_row(lambda row, r: row.update(messages=row["messages"][:1]))),
             "refuse"),
    Mutation("content_not_text", jsonl_change(_in_one_row(lambda row, r: _message(row, r).update(content=7))),
             "refuse"),
    # empty turns are data (the official runs kept them); the world's class spans then lie outside the response
    Mutation("content_empty", jsonl_change(_in_one_row(lambda row, r: _message(row, r).update(content=""))),
             "either"),
    Mutation("unknown_role", jsonl_change(_in_one_row(lambda row, r: _message(row, r).update(role="robot"))),
             "refuse"),
    Mutation("extra_key", jsonl_change(_in_one_row(lambda row, r: row.update(note="x"))), "accept"),
    Mutation("blank_lines", jsonl_change(lambda rows, r: "\n" + _lines(rows) + "\n\n"), "accept"),
    Mutation("prompt_completion_form", jsonl_change(
        lambda rows, r: _lines([{"prompt": row["messages"][0]["content"], "completion": row["messages"][1]["content"]}
                                for row in rows])), "accept"),
]
CORPUS = FILE + [
    Mutation("line_invalid_json", jsonl_change(lambda rows, r: _lines(rows) + '{"text": \n'), "refuse"),
    Mutation("text_missing", jsonl_change(_in_one_row(lambda row, r: row.pop("text"))), "refuse"),
    Mutation("text_not_text", jsonl_change(_in_one_row(lambda row, r: row.update(text=[1]))), "refuse"),
    Mutation("text_empty", jsonl_change(_in_one_row(lambda row, r: row.update(text=""))), "either"),
    Mutation("extra_key", jsonl_change(_in_one_row(lambda row, r: row.update(note="x"))), "accept"),
]


def csv_change(change: Callable[[list[list[str]], random.Random], Any]) -> Mutate:
    """The good CSV's rows (header first) changed by ``change(rows, rng)`` (in place, or returning text)."""
    def make(good: Path, bad: Path, ctx: Context) -> None:
        rows = [line.split(",") for line in good.read_text().splitlines()]
        text = change(rows, ctx.rng)
        bad.write_text(text if isinstance(text, str) else "".join(",".join(row) + "\n" for row in rows))
    return make


def _numeric_cell(rows: list[list[str]], r: random.Random, value: str) -> None:
    """A number cell of a row set to ``value`` (NaN: only where a measure cannot be "not applicable")."""
    cells = [(i, j) for i, row in enumerate(rows[1:], 1) for j, cell in enumerate(row)
             if cell and rows[0][j] not in ("ratio", "round", "n_seeds", "n_seeds_full", "n_examples", "n_replicates",
                                            "p_improve", "p_sign")  # shown, not read by compare
             and cell.replace(".", "", 1).replace("-", "", 1).isdigit()
             and not (value == "nan" and NOT_APPLICABLE_COLUMN.match(rows[0][j]))]
    i, j = cells[r.randrange(len(cells))]
    rows[i][j] = value


def _drop_column(rows: list[list[str]], r: random.Random, needed: tuple[str, ...]) -> None:
    j = rows[0].index(r.choice([c for c in needed if c in rows[0]]))
    for row in rows:
        del row[j]


def csv_mutations(needed: tuple[str, ...]) -> list[Mutation]:
    return FILE + [
        Mutation("header_only", csv_change(lambda rows, r: ",".join(rows[0]) + "\n"), "refuse"),
        Mutation("column_missing", csv_change(lambda rows, r: _drop_column(rows, r, needed)), "refuse"),
        Mutation("number_not_a_number", csv_change(lambda rows, r: _numeric_cell(rows, r, "lots")), "refuse"),
        Mutation("number_nan", csv_change(lambda rows, r: _numeric_cell(rows, r, "nan")), "refuse"),
        Mutation("number_infinite", csv_change(lambda rows, r: _numeric_cell(rows, r, "inf")), "refuse"),
        Mutation("row_too_long", csv_change(lambda rows, r: rows[1].append("surplus")), "refuse"),
        Mutation("extra_column", csv_change(lambda rows, r: [row.append("x" if i else "note")
                                                             for i, row in enumerate(rows)]), "accept"),
    ]


def dir_file_change(name: str, change: Callable[[Path, random.Random], None]) -> Mutate:
    """A copy of the good directory with its file ``name`` changed by ``change(path, rng)``."""
    def make(good: Path, bad: Path, ctx: Context) -> None:
        shutil.copytree(good, bad, symlinks=False)
        change(bad / name, ctx.rng)
    return make


def _remove(path: Path, r: random.Random) -> None:
    path.unlink()


def _cut(path: Path, r: random.Random) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: r.randrange(1, len(data) - 1)])


def _safetensors_nan(path: Path, r: random.Random) -> None:
    """One weight of the model set to NaN, the file otherwise valid."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    name = sorted(tensors)[r.randrange(len(tensors))]
    tensors[name] = tensors[name].copy()
    tensors[name].reshape(-1)[0] = np.nan
    save_file(tensors, path, metadata={"format": "pt"})


def _json_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path, random.Random], None]:
    def edit(path: Path, r: random.Random) -> None:
        obj = json.loads(path.read_text())
        change(obj)
        path.write_text(json.dumps(obj))
    return edit


MODEL = [
    Mutation("missing", missing, "refuse"),
    Mutation("a_file", lambda g, b, c: b.write_text("not a model\n"), "refuse"),
    Mutation("empty_directory", lambda g, b, c: b.mkdir(), "refuse"),
    Mutation("tokenizer_only", other_kind("tokenizer"), "refuse"),
    Mutation("config_missing", dir_file_change("config.json", _remove), "refuse"),
    Mutation("config_truncated", dir_file_change("config.json", _cut), "refuse"),
    Mutation("weights_missing", dir_file_change("model.safetensors", _remove), "refuse"),
    Mutation("weights_truncated", dir_file_change("model.safetensors", _cut), "refuse"),
    Mutation("weight_nan", dir_file_change("model.safetensors", _safetensors_nan), "refuse"),
    Mutation("tokenizer_missing", dir_file_change("tokenizer.json", _remove), "refuse"),
    Mutation("vocabulary_smaller_than_the_table",
             dir_file_change("config.json", _json_edit(lambda c: c.update(vocab_size=8))), "refuse"),
]
TOKENIZER = [
    Mutation("missing", missing, "refuse"),
    Mutation("a_file", lambda g, b, c: b.write_text("not a tokenizer\n"), "refuse"),
    Mutation("empty_directory", lambda g, b, c: b.mkdir(), "refuse"),
    Mutation("tokenizer_truncated", dir_file_change("tokenizer.json", _cut), "refuse"),
]
TASKS = [
    Mutation("missing", missing, "refuse"),
    Mutation("a_file", lambda g, b, c: b.write_text("not a directory\n"), "refuse"),
    Mutation("empty_directory", lambda g, b, c: b.mkdir(), "refuse"),
]
RECORD = [
    Mutation("record_missing", dir_file_change("tokenclean.json", _remove), "refuse"),
    Mutation("record_truncated", dir_file_change("tokenclean.json", _cut), "refuse"),
    Mutation("steps_negative", dir_file_change("tokenclean.json", _json_edit(lambda m: m.update(steps=-2))),
             "refuse"),
    Mutation("steps_nan", dir_file_change("tokenclean.json", _json_edit(lambda m: m.update(steps=float("nan")))),
             "refuse"),
    Mutation("no_samples", dir_file_change("tokenclean.json", _json_edit(lambda m: m.update(samples_used=0))),
             "refuse"),
    Mutation("seconds_text", dir_file_change("tokenclean.json", _json_edit(lambda m: m.update(seconds="fast"))),
             "refuse"),
]
RESULTS = [
    Mutation("missing", missing, "refuse"),
    Mutation("empty_directory", lambda g, b, c: b.mkdir(), "refuse"),
    Mutation("table_missing", dir_file_change("table.csv", _remove), "refuse"),
    Mutation("significance_missing", dir_file_change("significance.csv", _remove), "either"),
    Mutation("quality_missing", dir_file_change("cleaning_quality.csv", _remove), "either"),
    *[Mutation(f"table_{m.name}", dir_file_change("table.csv", lambda p, r, m=m: _mutate_in_place(m, p, r)), m.expect)
      for m in csv_mutations(("method", "ratio", "average_mean", "average_std"))[1:]],
    *[Mutation(f"significance_{m.name}",
               dir_file_change("significance.csv", lambda p, r, m=m: _mutate_in_place(m, p, r)), m.expect)
      for m in csv_mutations(("method", "ratio", "diff", "ci_low", "ci_high"))[2:]],
]


def _mutate_in_place(mutation: Mutation, path: Path, r: random.Random) -> None:
    good = path.with_name(path.name + ".good")
    path.rename(good)
    mutation.make(good, path, Context(r, None, {}))  # type: ignore[arg-type]
    good.unlink()


# ---------------------------------------------------------------------------------------------------------
# options: the boundaries of every numeric option, and mutations of JSON-object options
# ---------------------------------------------------------------------------------------------------------
FLOAT_BOUNDARIES = {"zero": "0", "smallest_positive": "5e-324", "one": "1", "above_one": "1.5", "negative": "-1",
                    "nan": "nan", "infinite": "inf", "huge": "1e308"}
INT_BOUNDARIES = {"zero": "0", "one": "1", "two": "2", "negative": "-1", "nan": "nan", "fraction": "1.5",
                  "huge": "1000000000000"}


Domain = Callable[[Any], bool]


def at_least(low: float) -> Domain:
    return lambda v: v >= low


def in_range(low: float, high: float, closed_high: bool = True, closed_low: bool = True) -> Domain:
    return lambda v: (low <= v if closed_low else low < v) and (v <= high if closed_high else v < high)


def finite_at_least(low: float, strict: bool = False) -> Domain:
    return lambda v: math.isfinite(v) and (v > low if strict else v >= low)


@dataclass(frozen=True)
class Option:
    """A numeric option (``int`` or ``float``) or a JSON-object option (``json``) of a command, with the value the
    other cases use and its domain: a value outside it must be refused (an int option's value must also be an
    integer); one inside may be taken or refused, and what is taken is checked. ``long_when_huge``: its huge value
    is a legitimate request for a very long run (steps, resamples), so that one value is not run."""

    name: str
    kind: str
    default: str
    domain: Domain = lambda v: True
    long_when_huge: bool = False


def option_values(option: Option) -> dict[str, tuple[str, str]]:
    """The values a case gives ``option``, each with what it must give (``refuse`` or ``either``): its boundaries;
    for a JSON object, also bad JSON, no object, an unknown key, and each numeric key of its default at the
    boundaries (checked against :data:`JSON_DOMAINS`) and as text."""
    def expect(value: Any, integer: bool, domain: Domain) -> str:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or isinstance(value, int))
        return "either" if ok and domain(value) else "refuse"

    if option.kind in ("int", "float"):
        bounds = INT_BOUNDARIES if option.kind == "int" else FLOAT_BOUNDARIES
        return {name: (text, expect(_number(text), option.kind == "int", option.domain))
                for name, text in bounds.items() if not (name == "huge" and option.long_when_huge)}
    good = json.loads(option.default)
    values = {"invalid_json": (option.default[:-1], "refuse"), "not_an_object": (json.dumps([good]), "refuse"),
              "unknown_key": (json.dumps({**good, "no_such_setting": 1}), "refuse")}
    for key, value in good.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bounds = INT_BOUNDARIES if isinstance(value, int) else FLOAT_BOUNDARIES
        for name, text in bounds.items():
            if name == "huge" and key in LONG_WHEN_HUGE:
                continue
            number = _number(text)
            values[f"{key}={name}"] = (json.dumps({**good, key: number}),
                                       expect(number, isinstance(value, int), JSON_DOMAINS[key]))
        values[f"{key}=text"] = (json.dumps({**good, key: "many"}), "refuse")
    return values


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


# JSON keys whose huge value asks for a huge world or model (not run)
LONG_WHEN_HUGE = {"pretrain_docs", "warmup_samples", "pool_samples", "eval_samples", "entities", "novel_entities",
                  "junk_vocab", "hidden", "layers", "heads", "intermediate", "max_positions", "vocab_size",
                  "max_length", "first_of_pool"}
# The domains of the JSON options' numeric keys (world settings, model settings, data spec, online parameters)
JSON_DOMAINS: dict[str, Domain] = {
    "seed": at_least(0), "pretrain_docs": at_least(1), "warmup_samples": at_least(1), "pool_samples": at_least(1),
    "eval_samples": at_least(1), "corrupt_rate": in_range(0, 1), "garbage_rate": in_range(0, 1),
    "junk_vocab": at_least(1), "entities": at_least(2), "novel_entities": at_least(2), "phrasings": in_range(1, 512),
    "hidden": at_least(1), "layers": at_least(1), "heads": at_least(1), "intermediate": at_least(1),
    "vocab_size": at_least(1), "max_length": at_least(2), "first_of_pool": at_least(1),
    "ratio": in_range(0, 1, closed_low=False),
}


# ---------------------------------------------------------------------------------------------------------
# checks of an accepted output: independent of the code under test where it matters (counts by brute force)
# ---------------------------------------------------------------------------------------------------------
class Wrong(AssertionError):
    """An accepted output that is not right."""


def require(ok: bool, what: str) -> None:
    if not ok:
        raise Wrong(what)


def _raw_table(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def check_table(path: Path) -> None:
    a = _raw_table(path)
    ids, offsets, loss_mask = a["input_ids"], a["offsets"], a["loss_mask"]
    require(ids.dtype.kind == "i" and ids.ndim == 1 and np.all(ids >= 0), "token ids")
    require(offsets[0] == 0 and offsets[-1] == len(ids) and np.all(np.diff(offsets) > 0), "offsets")
    require(loss_mask.dtype == np.bool_ and loss_mask.shape == ids.shape and loss_mask.any(), "loss_mask")
    require(not loss_mask[offsets[:-1]].any(), "a response at a sample's start")
    TokenTable.load(path)


def check_loss(path: Path, loss_mask: np.ndarray) -> None:
    loss = np.load(path, allow_pickle=False)
    require(loss.shape == loss_mask.shape and loss.dtype.kind == "f", "loss shape or dtype")
    require(np.all(np.isfinite(loss[loss_mask]) & (loss[loss_mask] >= 0)), "a response token's loss")
    require(np.all(np.isnan(loss[~loss_mask])), "a loss outside the response")


def expected_count(method: str, ratio: str, loss_mask: np.ndarray, offsets: np.ndarray) -> int | None:
    """How many tokens a selection must keep, by brute force over the samples (None: not a counted method)."""
    if method == "full":
        return int(loss_mask.sum())
    r = Fraction(repr(float(ratio)))
    require(0 < r <= 1, f"a mask made at ratio {ratio}")
    if method in ("fixed", "random"):
        return math.floor(r * int(loss_mask.sum()))
    if method == "rho":
        return sum(math.floor(r * int(loss_mask[s:e].sum())) for s, e in itertools.pairwise(offsets))
    return None


def check_mask(path: Path, table_path: Path, method: str | None = None, ratio: str = "1") -> None:
    a = _raw_table(table_path)
    mask = np.load(path, allow_pickle=False)
    require(mask.dtype == np.bool_ and mask.shape == a["loss_mask"].shape, "mask dtype or shape")
    require(not np.any(mask & ~a["loss_mask"]), "a kept token outside the response")
    require(mask.any(), "a mask that keeps nothing")
    want = expected_count(method, ratio, a["loss_mask"], a["offsets"]) if method else None
    require(want is None or int(mask.sum()) == want, f"kept {int(mask.sum())} tokens, the rule keeps {want}")


def _finite_numbers(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return True


def check_model(path: Path) -> None:
    from safetensors.numpy import load_file

    require((path / "config.json").is_file() and (path / "model.safetensors").is_file(), "a model directory")
    tensors = load_file(path / "model.safetensors")
    require(all(np.all(np.isfinite(t)) for t in tensors.values()), "a non-finite weight")
    record = json.loads((path / "tokenclean.json").read_text())
    require(record["steps"] >= 1 and math.isfinite(record["final_loss"]), "the training record")
    require(record.get("selected_tokens_trained", 1) >= 1, "a model trained on no token")


def check_csv(path: Path, not_applicable: bool = False) -> None:
    """Rows, and every number finite (``not_applicable``: "nan" allowed, as the cleaning-quality and separation
    tables write it for a class the pool lacks or a measure that does not apply)."""
    rows = path.read_text().splitlines()
    require(len(rows) >= 2, "a table without rows")
    cells = {c.strip().lower() for row in rows[1:] for c in row.split(",")}
    require(not ({"inf", "-inf", "infinity"} | (set() if not_applicable else {"nan"})) & cells,
            "a non-finite number in a table")


def check_eval(path: Path) -> None:
    result = json.loads(path.read_text())
    require(bool(result["metrics"]) and _finite_numbers(result), "an evaluation with no or non-finite metrics")


def check_png(path: Path) -> None:
    require(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "a PNG")


def check_html(path: Path) -> None:
    require("</html>" in path.read_text(), "an HTML page")


def check_world(path: Path) -> None:
    require(all((path / f).is_file() for f in ("pool.jsonl", "warmup.jsonl", "corpus.jsonl")), "a world")
    require((path / "pool.jsonl").stat().st_size > 0 and any((path / "tasks").iterdir()), "a world's pool and tasks")


def check_data(path: Path) -> None:
    require((path / "pool.jsonl").stat().st_size > 0 and (path / "warmup.jsonl").stat().st_size > 0, "the data")


def check_json(path: Path) -> None:
    require(_finite_numbers(json.loads(path.read_text())), "a non-finite number")


def check_export(path: Path) -> None:
    record = json.loads((path / "export.json").read_text())
    require(record["n_samples"] >= 1 and record["n_trained_tokens"] >= 1, "an export without trained tokens")
    require((path / "data.jsonl").stat().st_size > 0, "exported rows")


# ---------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------
Check = Callable[[Path, dict[str, str]], None]


@dataclass(frozen=True)
class Command:
    """A command run on good inputs: ``argv`` with ``{name}`` for an input (a key of :func:`build_inputs`), an
    option's value, or ``{out}`` (the output folder); ``slots``: which inputs are mutated, as what kind;
    ``check(out, values)``: what an accepted output must be; ``overrides``: where this command reads a mutation
    otherwise than most."""

    name: str
    argv: tuple[str, ...]
    slots: dict[str, str]
    options: tuple[Option, ...] = ()
    check: Check = lambda out, v: None
    overrides: dict[str, str] = field(default_factory=dict)  # "<input>:<mutation>" -> what it must give here


def _select(method: str, **extra_slots: str) -> Command:
    scored = method in ("fixed", "rho")
    losses = ("--base-loss", "{base_loss}", "--ref-loss", "{ref_loss}") if scored else ()
    return Command(
        f"select-{method}", ("select", "--method", method, "--ratio", "{ratio}", "--seed", "{seed}", "--tokens",
                             "{tokens}", *losses, "--out", "{out}/x.mask.npy"),
        {"tokens": "tokens", **({"base_loss": "loss", "ref_loss": "loss"} if scored else {})},
        (Option("ratio", "float", "0.5", in_range(0, 1, closed_low=False)), Option("seed", "int", "3", at_least(0))),
        lambda out, v, m=method: check_mask(out / "x.mask.npy", Path(v["tokens"]),
                                            None if m.startswith("truth") else m, v["ratio"] if m != "full" else "1"))


TRAIN_OPTIONS = (Option("steps", "int", "2", at_least(0), long_when_huge=True),
                 Option("batch_size", "int", "4", at_least(1), long_when_huge=True),  # a batch cycles the data
                 Option("lr", "float", "0.001", finite_at_least(0, strict=True)),
                 Option("warmup_ratio", "float", "0.03", in_range(0, 1, closed_high=False)),
                 Option("weight_decay", "float", "0", finite_at_least(0)),
                 Option("max_grad_norm", "float", "1", finite_at_least(0)),
                 Option("adam_beta1", "float", "0.9", in_range(0, 1, closed_high=False)),
                 Option("adam_beta2", "float", "0.999", in_range(0, 1, closed_high=False)),
                 Option("adam_epsilon", "float", "1e-8", finite_at_least(0, strict=True)),
                 Option("micro_batch_size", "int", "0", at_least(0)), Option("pack_length", "int", "0", at_least(0)),
                 Option("checkpoint_every", "int", "0", at_least(0)),
                 Option("lora_r", "int", "0", at_least(0), long_when_huge=True),  # a huge adapter: a huge run
                 Option("log_every", "int", "1", at_least(1)), Option("seed", "int", "0", at_least(0)),
                 Option("threads", "int", "1", at_least(1)))


def _flags(options: tuple[Option, ...]) -> tuple[str, ...]:
    return tuple(x for o in options for x in ("--" + o.name.replace("_", "-"), "{" + o.name + "}"))


def _chunk_check(out: Path, v: dict[str, str], loss: bool = False) -> None:
    a = _raw_table(Path(v["tokens"]))
    samples = len(a["offsets"]) - 1
    chunks, index = int(v["chunks"]), int(v["index"])
    first, last = (index - 1) * samples // chunks, index * samples // chunks
    require(last > first, "an empty chunk")
    if loss:
        check_loss(out / "c.loss.npy", a["loss_mask"][a["offsets"][first]:a["offsets"][last]])
    else:
        check_table(out / "c.tokens.npz")
        require(len(_raw_table(out / "c.tokens.npz")["offsets"]) - 1 == last - first, "the chunk's samples")


MODEL_PARAMS = '{"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "vocab_size": 300, "max_length": 64}'
SPEC = '{"pool": {"path": "{data}"}, "warmup": {"first_of_pool": 4}}'
COMMANDS: list[Command] = [
    Command("world", ("world", "--params", "{params}", "--out", "{out}/world"), {},
            (Option("params", "json", json.dumps({k: v for k, v in WORLD.items() if k != "families"})),),
            lambda out, v: check_world(out / "world")),
    Command("pretrain", ("pretrain", "--corpus", "{corpus}", "--model-params", "{model_params}", "--device", "cpu",
                         *_flags(TRAIN_OPTIONS[:3]), "--out", "{out}/base"), {"corpus": "corpus"},
            (Option("model_params", "json", MODEL_PARAMS), *TRAIN_OPTIONS[:3]),
            lambda out, v: check_model(out / "base")),
    Command("tokenize", ("tokenize", "--data", "{data}", "--tokenizer", "{tokenizer}", "--max-length",
                         "{max_length}", "--out", "{out}/x.tokens.npz"),
            {"data": "data", "tokenizer": "tokenizer"}, (Option("max_length", "int", "48", at_least(2)),),
            lambda out, v: check_table(out / "x.tokens.npz")),
    Command("loss", ("loss", "--model", "{model}", "--tokens", "{tokens}", "--device", "cpu", "--token-budget",
                     "{token_budget}", "--out", "{out}/x.loss.npy"),
            {"model": "model", "tokens": "tokens"}, (Option("token_budget", "int", "512", at_least(1)),),
            lambda out, v: check_loss(out / "x.loss.npy", _raw_table(Path(v["tokens"]))["loss_mask"])),
    Command("concat", ("concat", "--tokens", "{warmup_tokens}", "{tokens}", "--out", "{out}/x.tokens.npz"),
            {"tokens": "tokens"}, (), lambda out, v: check_table(out / "x.tokens.npz")),
    Command("chunk", ("chunk", "--tokens", "{tokens}", "--chunks", "{chunks}", "--index", "{index}",
                      "--out", "{out}/c.tokens.npz"),
            {"tokens": "tokens"}, (Option("chunks", "int", "2", at_least(1)), Option("index", "int", "1", at_least(1))),
            _chunk_check),
    Command("chunk-loss", ("chunk", "--tokens", "{tokens}", "--chunks", "{chunks}", "--index", "{index}",
                           "--loss", "{base_loss}", "--out", "{out}/c.loss.npy"),
            {"tokens": "tokens", "base_loss": "loss"},
            (Option("chunks", "int", "2", at_least(1)), Option("index", "int", "2", at_least(1))),
            lambda out, v: _chunk_check(out, v, loss=True)),
    _select("fixed"), _select("rho"), _select("random"), _select("full"), _select("truth_drop_noisy"),
    Command("export", ("export", "--tokens", "{tokens}", "--mask", "{mask}", "--weights", "{weights}", "--format",
                       "jsonl", "--out", "{out}/export"),
            {"tokens": "tokens", "mask": "mask", "weights": "weights"}, (),
            lambda out, v: check_export(out / "export")),
    Command("train", ("train", "--model", "{model}", "--tokens", "{tokens}", "--mask", "{mask}", "--device", "cpu",
                      *_flags(TRAIN_OPTIONS), "--out", "{out}/model"),
            {"model": "model", "tokens": "tokens", "mask": "mask"}, TRAIN_OPTIONS,
            lambda out, v: check_model(out / "model")),
    Command("train-online", ("train", "--model", "{model}", "--tokens", "{tokens}", "--online", "rho1",
                             "--online-params", "{online_params}", "--ref-loss", "{ref_loss}", "--device", "cpu",
                             "--steps", "1", "--batch-size", "4", "--out", "{out}/model"),
            {"ref_loss": "loss"}, (Option("online_params", "json", '{"ratio": 0.6}'),),
            lambda out, v: check_model(out / "model")),
    Command("evaluate", ("evaluate", "--model", "{model}", "--tasks-dir", "{tasks}", "--tasks", "add,reverse",
                         "--device", "cpu", "--limit", "{limit}", "--seed", "{seed}", "--out", "{out}/e.json"),
            {"model": "model", "tasks": "tasks"}, (Option("limit", "float", "1", finite_at_least(0, strict=True)),
                                               Option("seed", "int", "0", at_least(0))),
            lambda out, v: check_eval(out / "e.json")),
    Command("data", ("data", "--spec", "{spec}", "--out", "{out}/data"), {"data": "data"},
            (Option("spec", "json", SPEC),), lambda out, v: check_data(out / "data")),
    Command("quality", ("quality", "{mask}", "{weights}", "--tokens", "{tokens}", "--out", "{out}/q.csv"),
            {"mask": "mask", "weights": "weights", "tokens": "tokens"}, (),
            lambda out, v: check_csv(out / "q.csv", not_applicable=True),
            {"weights:other_kind_mask": "accept"}),  # a selection is a mask or an online run's weights
    Command("separation", ("separation", "--tokens", "{tokens}", "--base-loss", "{base_loss}", "--ref-loss",
                           "{ref_loss}", "--out", "{out}/s.csv"),
            {"tokens": "tokens", "base_loss": "loss", "ref_loss": "loss"}, (),
            lambda out, v: check_csv(out / "s.csv", not_applicable=True)),
    Command("report", ("report", "{eval}", "{eval2}", "--metric", "mix_acc", "--models", "{record}",
                       "--out-csv", "{out}/t.csv", "--out-md", "{out}/t.md"),
            {"eval2": "eval", "record": "record"}, (), lambda out, v: check_csv(out / "t.csv")),
    Command("significance", ("significance", "{eval}", "{eval2}", "--metrics", "mix_acc", "--iters", "{iters}",
                             "--seed", "{seed}", "--out-csv", "{out}/s.csv", "--out-md", "{out}/s.md"),
            {"eval2": "samples", "eval": "eval"},
            (Option("iters", "int", "20", at_least(1), long_when_huge=True), Option("seed", "int", "0", at_least(0))),
            lambda out, v: check_csv(out / "s.csv")),
    Command("compare", ("compare", "--world", "a={results}", "--world", "b={results}", "--out-csv", "{out}/c.csv",
                        "--out-md", "{out}/c.md"),
            {"results": "results"}, (), lambda out, v: check_csv(out / "c.csv")),
    Command("figure-ratios", ("figure", "ratios", "--table", "{table}", "--metric", "mix_acc", "--out", "{out}/f.png"),
            {"table": "table_csv"}, (), lambda out, v: check_png(out / "f.png")),
    Command("figure-scores", ("figure", "scores", "--tokens", "{tokens}", "--base-loss", "{base_loss}", "--ref-loss",
                              "{ref_loss}", "--ratios", "{ratios}", "--out", "{out}/f.png"),
            {"tokens": "tokens", "base_loss": "loss", "ref_loss": "loss"},
            (Option("ratios", "float", "0.5", in_range(0, 1, closed_low=False)),),
            lambda out, v: check_png(out / "f.png")),
    Command("figure-kept", ("figure", "kept", "--quality", "{quality}", "--out", "{out}/f.png"),
            {"quality": "quality_csv"}, (), lambda out, v: check_png(out / "f.png")),
    Command("figure-rounds", ("figure", "rounds", "--rounds-csv", "{rounds_csv}", "--metric", "mix_acc",
                              "--out", "{out}/f.png"),
            {"rounds_csv": "rounds_csv"}, (), lambda out, v: check_png(out / "f.png")),
    Command("token-view", ("token-view", "--tokens", "{tokens}", "--base-loss", "{base_loss}", "--ref-loss",
                           "{ref_loss}", "--masks", "{mask}", "{weights}", "--tokenizer", "{tokenizer}", "--samples",
                           "{samples}", "--out", "{out}/v.html"),
            {"tokens": "tokens", "base_loss": "loss", "mask": "mask", "weights": "weights", "tokenizer": "tokenizer"},
            (Option("samples", "int", "3", at_least(1)),), lambda out, v: check_html(out / "v.html"),
            {"weights:other_kind_mask": "accept"}),
    Command("provenance", ("provenance", "--data-dir", "{world}", "--tokens", "{tokens}", "--losses", "{base_loss}",
                           "--base-model", "{model}", "--out-json", "{out}/p.json", "--out-md", "{out}/p.md"),
            {"tokens": "tokens", "base_loss": "loss"}, (), lambda out, v: check_json(out / "p.json")),
    Command("rounds", ("rounds", "{eval_warmup}", "{eval2}", "--rounds", "{rounds}", "--metric", "mix_acc",
                       "--out", "{out}/r.csv"),
            {"eval_warmup": "eval", "eval2": "eval"}, (Option("rounds", "int", "1", at_least(1)),),
            lambda out, v: check_csv(out / "r.csv")),
]
KINDS: dict[str, list[Mutation]] = {
    "tokens": TOKENS, "loss": LOSS, "mask": MASK, "weights": WEIGHTS, "eval": EVAL, "samples": SAMPLES,
    "data": DATA, "corpus": CORPUS, "model": MODEL, "tokenizer": TOKENIZER, "tasks": TASKS, "record": RECORD,
    "results": RESULTS,
    "table_csv": csv_mutations(("method", "ratio", "average_mean", "average_std")),
    "quality_csv": csv_mutations(("mask",)),
    "rounds_csv": csv_mutations(("method", "ratio", "round", "average_mean", "average_std")),
}


# ---------------------------------------------------------------------------------------------------------
# cases and their outcome
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """``target``: the input (a key of :func:`build_inputs`) or the option changed, or "" for the good run."""

    command: Command
    target: str
    mutation: str
    expect: str
    value: str = ""          # an option's value
    is_option: bool = False

    @property
    def id(self) -> str:
        return f"{self.command.name}:{self.target or 'good'}:{self.mutation}"


def cases(commands: list[Command] = COMMANDS) -> list[Case]:
    out = []
    for c in commands:
        out.append(Case(c, "", "none", "accept"))
        for slot, kind in c.slots.items():
            out.extend(Case(c, slot, m.name, c.overrides.get(f"{slot}:{m.name}", m.expect)) for m in KINDS[kind])
        for option in c.options:
            out.extend(Case(c, option.name, name, expect, text, True)
                       for name, (text, expect) in option_values(option).items())
    return out


def _fill(arg: str, values: dict[str, str]) -> str:
    import re

    return re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], m[0]), arg)


def _listing(directory: Path) -> list[tuple[str, int]]:
    return [(name, (directory / name).stat().st_size if (directory / name).is_file() else -1)
            for name in all_files(directory)]


def _mutation(case: Case) -> Mutation:
    return next(m for m in KINDS[case.command.slots[case.target]] if m.name == case.mutation)


def prepare(case: Case, inputs: dict[str, Path], table: TokenTable, tmp: Path
            ) -> tuple[list[str], list[str], dict[str, str]]:
    """Write the case's bad input under ``tmp/in``; its argv, the names the error may name, and the values filled
    in (inputs and options by name)."""
    values = {k: str(v) for k, v in inputs.items()} | {o.name: o.default for o in case.command.options}
    values["out"] = str(tmp / "out")
    (tmp / "in").mkdir()
    names: list[str] = []
    if case.is_option:
        values[case.target] = case.value
        key = case.mutation.split("=")[0] if "=" in case.mutation else None
        names = ["--" + case.target.replace("_", "-"), case.target, case.target.replace("_", "-")]
        names += [key, f"'{key}'"] if key else ["no_such_setting"] if case.mutation == "unknown_key" else []
    elif case.target:
        good = inputs[case.target]
        bad = tmp / "in" / good.name
        kind = case.command.slots[case.target]
        ctx = Context(random.Random(f"{SEED}:{case.id}"), table, inputs)
        if kind == "samples":  # the evaluation JSON is good, its per-example file is not
            shutil.copy(good, bad)
            samples = good.with_name(good.stem + ".samples.jsonl")
            _mutation(case).make(samples, bad.with_name(samples.name), ctx)
            names = [str(bad.with_name(samples.name))]
        else:
            if kind == "eval" and good.with_name(good.stem + ".samples.jsonl").exists():
                shutil.copy(good.with_name(good.stem + ".samples.jsonl"), tmp / "in" / (good.stem + ".samples.jsonl"))
            _mutation(case).make(good, bad, ctx)
            names = [str(bad), str(sidecar_path(bad))]
        values[case.target] = str(bad)
    return [_fill(_fill(a, values), values) for a in case.command.argv], names, values


def outcome(case: Case, inputs: dict[str, Path], table: TokenTable, tmp: Path) -> str | None:
    """None when the case ended as it must; otherwise what went wrong, in a line or two."""
    argv, names, values = prepare(case, inputs, table, tmp)
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    (out / "earlier.txt").write_text("a result computed before\n")
    before_out, before_in = _listing(out), _listing(tmp / "in")
    code, err, tb = run_cli(argv)
    errors = [line for line in err.splitlines() if ": error: " in line]
    if tb is not None:
        return f"escaped with a traceback:\n{tb.strip().splitlines()[-1]}"
    if _listing(tmp / "in") != before_in:
        return "changed its inputs"
    if code == 2:
        if case.expect == "accept":
            return f"refused a harmless input: {errors}"
        if len(errors) != 1 or "Traceback" in err or any(line.startswith("usage:") for line in err.splitlines()):
            return f"not one error line: {err.strip()[-600:]}"
        line = errors[0]
        command = argv[0]
        if not line.startswith(f"tokenclean {command}: error: "):
            return f"error line not '<tokenclean {command}: error: ...>': {line}"
        if names and not any(n in line for n in names):
            return f"error does not name {names[0]}: {line}"
        if _listing(out) != before_out:
            return f"refused, but left {sorted(set(_listing(out)) - set(before_out))} in the output folder"
        return None
    if code != 0:
        return f"exit code {code}: {err.strip()[-400:]}"
    if case.expect == "refuse":
        return "accepted an input that cannot be right"
    if not (out / "earlier.txt").exists():
        return "removed an earlier result"
    try:
        case.command.check(out, values)
    except (Wrong, ArtifactError, KeyError, ValueError, OSError) as e:
        return f"accepted, but the output is wrong: {type(e).__name__}: {e}"
    return None


def count_table(all_cases: list[Case]) -> str:
    """The Markdown table of generated cases per command that docs/guarantees.md shows (a test keeps them equal)."""
    rows = ["| command | cases | inputs mutated | option values | must refuse | must accept | either |",
            "|---|---|---|---|---|---|---|"]
    for c in COMMANDS:
        mine = [x for x in all_cases if x.command is c]
        inputs = sum(1 for x in mine if x.target and not x.is_option)
        options = sum(1 for x in mine if x.is_option)
        expect = {e: sum(1 for x in mine if x.expect == e) for e in ("refuse", "accept", "either")}
        rows.append(f"| {c.name} | {len(mine)} | {inputs} | {options} | {expect['refuse']} | {expect['accept']} "
                    f"| {expect['either']} |")
    total = {e: sum(1 for x in all_cases if x.expect == e) for e in ("refuse", "accept", "either")}
    rows.append(f"| **all** | **{len(all_cases)}** | {sum(1 for x in all_cases if x.target and not x.is_option)} "
                f"| {sum(1 for x in all_cases if x.is_option)} | {total['refuse']} | {total['accept']} "
                f"| {total['either']} |")
    return "\n".join(rows)
