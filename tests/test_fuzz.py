"""The command-line fuzz (tests/fuzz.py): every command on mutations of valid inputs and at its options'
boundaries ends in a correct output or a one-line error naming the file or option, exit code 2, nothing written."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests import fuzz
from tokenclean.artifacts import TokenTable

CASES = fuzz.cases()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer_dir, tiny_model_dir) -> dict[str, Path]:
    return fuzz.build_inputs(tmp_path_factory.mktemp("fuzz"), tiny_tokenizer_dir, tiny_model_dir)


@pytest.fixture(scope="module")
def pool(inputs) -> TokenTable:
    return TokenTable.load(inputs["tokens"])[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, inputs, pool, tmp_path):
    problem = fuzz.outcome(case, inputs, pool, tmp_path)
    assert problem is None, f"{case.id} ({case.expect}): {problem}"


def test_counts():
    print(Counter(c.command.name for c in CASES), len(CASES))
