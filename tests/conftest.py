"""Shared fixtures: a tiny tokenizer and a tiny random Llama, built in seconds, nothing downloaded."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tokenclean import numerics  # pure Python: no torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HOME", str(Path(__file__).resolve().parents[1] / ".cache" / "huggingface"))
# The tests run at the pinned CPU kernels (docs/numerics.md), set before any test imports torch; run them
# unpinned with TOKENCLEAN_CPU_KERNELS=native.
# avx2 where it holds (an Intel CPU), else portable (AMD), else unpinned: a test never runs at a level whose warning
# line would land in the output it checks (tests/test_numerics.py checks each level where it holds).
if not os.environ.get(numerics.ENV):
    os.environ[numerics.ENV] = next((lv for lv in ("avx2", "portable") if numerics.problem(lv) is None), "native")
numerics.apply_from_env()

TRAIN_TEXT = [
    "Sure ! The answer is 42 . Hope this helps .",
    "Add 3 and 5 . Reverse the letters : c a t . Which is larger : 37 or 52 ?",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
    "hello world , how are you ? fine thanks and you",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenclean.world import build_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(TRAIN_TEXT, d, vocab_size=300)  # the package's builder: tests use the tokenizer the world uses
    return d


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    """The tiny tokenizer, loaded once per test module (a module may change it: each gets its own)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from transformers import AutoTokenizer

    from tokenclean.models import save_model, tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, hidden=32, layers=2,
                       heads=2, intermediate=64, seed=0)
    d = tmp_path_factory.mktemp("model") / "tiny"
    save_model(model, tok, d)
    return d


@pytest.fixture(scope="session")
def fuzz_inputs(tmp_path_factory, tiny_tokenizer_dir, tiny_model_dir) -> dict[str, Path]:
    """Every kind of valid input, made once by the commands (tests/fuzz.py): the fuzz and the write-fault suite
    both start from them."""
    from tests import fuzz

    return fuzz.build_inputs(tmp_path_factory.mktemp("fuzz"), tiny_tokenizer_dir, tiny_model_dir)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """The smoke workflow from scratch, run locally once per session (tests/test_workflow.py checks it; the Slurm
    tests compare theirs with it), with an empty HOME and no HF_HOME: what it writes outside its results (and
    outside the project's own .cache/, where the workflow points library caches) shows up there."""
    from tests.test_workflow import snakemake

    work = tmp_path_factory.mktemp("smoke")
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR")}
    proc = snakemake(work, env={**env, "HOME": str(home)})
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in (work / "results").rglob("*.log"))
        pytest.fail(f"smoke workflow failed:\n{proc.stderr[-4000:]}\n{logs}")
    (work / "home").symlink_to(home)  # for test_nothing_is_written_outside_the_results
    return work / "results" / "smoke"
