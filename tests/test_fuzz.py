"""The command-line fuzz (tests/fuzz.py): every command on mutations of valid inputs and at its options'
boundaries ends in a correct output or a one-line error naming the file or option, exit code 2, nothing written;
and each check the fuzz relies on is shown to be what catches its class (removed, its cases fail)."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import pytest

from tests import fuzz
from tokenclean.artifacts import TokenTable
from tokenclean.pretrain import DEFAULT_MODEL
from tokenclean.world import DEFAULT_WORLD

CASES = fuzz.cases()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(fuzz_inputs) -> dict[str, Path]:
    return fuzz_inputs


@pytest.fixture(scope="module")
def pool(inputs) -> TokenTable:
    return TokenTable.load(inputs["tokens"])[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, inputs, pool, tmp_path):
    problem = fuzz.outcome(case, inputs, pool, tmp_path)
    assert problem is None, f"{case.id} (must {case.expect}): {problem}"


def test_the_counts_in_the_guarantees_are_the_generated_cases():
    doc = "\n".join(line.strip() for line in (ROOT / "docs" / "guarantees.md").read_text().splitlines())
    assert fuzz.count_table(CASES) in doc


def test_every_command_and_every_input_kind_is_fuzzed():
    from tokenclean.cli import build_parser

    commands = {c.command.argv[0] for c in CASES}
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert commands == set(sub.choices)
    assert {kind for c in fuzz.COMMANDS for kind in c.slots.values()} == set(fuzz.KINDS)


def _no_check(*args, **kwargs):
    return None


# (what is removed, its replacement, a case that must then fail): each check the fuzz's classes rely on
REMOVED = [
    ("tokenclean.artifacts.check_values", _no_check, "select-fixed:base_loss:negative_in_response"),
    ("tokenclean.artifacts.check_values", _no_check, "train:mask:true_outside_response"),
    ("tokenclean.artifacts._table_problem", _no_check, "select-full:tokens:float_token_ids"),
    ("tokenclean.selection.require_some_dropped_and_kept", _no_check, "select-fixed:ratio:smallest_positive"),
    ("tokenclean.report.table.metric_value", lambda path, field, metric, value: float(value),
     "report:eval2:accuracy_above_one"),
    ("tokenclean.artifacts.csv_number", lambda *a, **k: 0.0, "figure-ratios:table:number_nan"),
    ("tokenclean.train_config.TrainConfig.__post_init__", _no_check, "train:lr:negative"),
    ("tokenclean.models.require_finite_weights", _no_check, "loss:model:weight_nan"),
    ("tokenclean.models.require_ids_fit", _no_check, "loss:tokens:token_id_beyond_vocabulary"),
    ("tokenclean.models.loading", lambda name: contextlib.nullcontext(), "loss:model:weights_truncated"),
    ("tokenclean.cli._Parser.error", argparse.ArgumentParser.error, "select-fixed:ratio:nan"),
    ("tokenclean.world._check_params", lambda p: {**DEFAULT_WORLD, **p}, "world:params:pretrain_docs=fraction"),
    ("tokenclean.pretrain.check_model_settings", lambda m: {**DEFAULT_MODEL, **m}, "pretrain:model_params:hidden=nan"),
]


@pytest.mark.parametrize("target,replacement,case_id", REMOVED,
                         ids=[f"{t.rsplit('.', 1)[1]}-{c}" for t, _, c in REMOVED])
def test_a_removed_check_lets_its_cases_fail(monkeypatch, inputs, pool, tmp_path, target, replacement, case_id):
    """The fuzz is no test that cannot fail: with one check removed, a case of its class ends wrongly."""
    (case,) = [c for c in CASES if c.id == case_id]
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    assert fuzz.outcome(case, inputs, pool, tmp_path / "with") is None
    monkeypatch.setattr(target, replacement)
    assert fuzz.outcome(case, inputs, pool, tmp_path / "without") is not None
