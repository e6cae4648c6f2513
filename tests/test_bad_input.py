"""Bad input, end to end through the CLI: exit code 2, one line naming the file, the line or key and what was
expected, and nothing written where the output belongs. Also the edge that is not an error: a sample whose
response truncation cuts away entirely is skipped and counted, and no later step sees NaN because of it."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.snakemake_plan import without_profile_notice
from tokenclean.artifacts import TokenTable, load_array, save_array
from tokenclean.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = '{"prompt": "hello", "completion": "fine thanks"}\n'


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and the error line of an in-process `tokenclean` call."""
    code = main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(err) <= 1
    return code, err[0] if err else ""


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("content,expected", [
    (b"", "no records (the file is empty)"),
    (b"\n  \n", "no records (the file is empty)"),
    (GOOD.encode() + b'{"prompt": "a", "completion": "b"\n', ":2: invalid JSON at column"),
    (GOOD.encode() + b'["prompt", "completion"]\n', ":2: expected a JSON object, got list"),
    (GOOD.encode() + b'{"question": "a", "answer": "b"}\n', ":2: neither 'messages' nor 'prompt'/'completion'"),
    (GOOD.encode() + b'{"text": "plain text is for the pretraining corpus"}\n',
     ":2: neither 'messages' nor 'prompt'/'completion' is present"),
    (GOOD.encode() + b'{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}\n',
     ":2: field 'messages[0].content': expected a string, got list"),
    (GOOD.encode() + b'{"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     ":2: field 'messages[0].role': unknown role 'human' (expected one of system, user, assistant)"),
    (GOOD.encode() + b'{"prompt": "caf\xe9", "completion": "b"}\n', ":2: invalid UTF-8 at byte"),
    (GOOD.encode() + b'{"prompt": "a", "completion": null}\n', ":2: field 'completion': expected a string"),
    (GOOD.encode() + b'{"messages": []}\n', ":2: field 'messages': expected a non-empty list"),
])
def test_tokenize_refuses_bad_data_with_one_line_and_writes_nothing(tmp_path, capsys, tiny_tokenizer_dir,
                                                                    content, expected):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    code, line = run_cli(capsys, "tokenize", "--data", str(data), "--tokenizer", str(tiny_tokenizer_dir),
                         "--max-length", "64", "--out", str(tmp_path / "data.tokens.npz"))
    assert code == 2 and f"{data}" in line and expected in line, line
    assert _files(tmp_path) == ["data.jsonl"]


def test_missing_data_file(tmp_path, capsys, tiny_tokenizer_dir):
    code, line = run_cli(capsys, "tokenize", "--data", str(tmp_path / "nope.jsonl"), "--tokenizer",
                         str(tiny_tokenizer_dir), "--max-length", "64", "--out", str(tmp_path / "x.tokens.npz"))
    assert code == 2 and f"{tmp_path / 'nope.jsonl'}: file not found" in line
    assert _files(tmp_path) == []


def test_a_sample_cut_away_by_truncation_is_skipped_and_counted(tmp_path, capsys, caplog, tiny_tokenizer_dir):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "hello world " * 12, "completion": "fine"}) + "\n" + GOOD)
    out = tmp_path / "data.tokens.npz"
    with caplog.at_level(logging.WARNING):
        assert main(["tokenize", "--data", str(data), "--tokenizer", str(tiny_tokenizer_dir), "--max-length", "12",
                     "--out", str(out)]) == 0
    assert "1 of 2 samples skipped: their response was entirely cut by max_length=12" in caplog.text
    table, meta = TokenTable.load(out)
    assert meta["skipped_no_response_after_truncation"] == 1 and table.n_samples == 1
    assert table.extras["sample_index"].tolist() == [1]  # the kept sample still names its source line
    # every sample cut away: an error naming the file and the setting, and no output
    code, line = run_cli(capsys, "tokenize", "--data", str(data), "--tokenizer", str(tiny_tokenizer_dir),
                         "--max-length", "3", "--out", str(tmp_path / "none.tokens.npz"))
    assert code == 2 and f"{data}: no sample has a response token left" in line and "max_length=3" in line
    assert not (tmp_path / "none.tokens.npz").exists()


def test_samples_without_response_tokens_flow_through_loss_select_and_train(tmp_path, tiny_model_dir):
    """A sample with no loss_mask token (e.g. from a table made elsewhere) costs nothing and breaks nothing."""
    from tokenclean.data import parse_record
    from tokenclean.tokenization import load_tokenizer, tokenize_records, tokenizer_fingerprint

    tok = load_tokenizer(str(tiny_model_dir))
    recs = [parse_record({"prompt": p, "completion": c}, f"x:{i}") for i, (p, c) in
            enumerate([("hello", "fine thanks"), ("how are you ?", "the quick brown fox"), ("x y", "Hope")])]
    table, _ = tokenize_records(recs, tok, 64)
    mask = table.loss_mask.copy()
    mask[table.offsets[1]:table.offsets[2]] = False  # sample 1 keeps its tokens but trains none of them
    zero = TokenTable(table.input_ids, table.offsets, mask, table.extras)
    tokens = tmp_path / "z.tokens.npz"
    zero.save(tokens, {"kind": "tokens", "tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    for name in ("base", "ref"):
        assert main(["loss", "--model", str(tiny_model_dir), "--tokens", str(tokens), "--device", "cpu",
                     "--out", str(tmp_path / f"{name}.loss.npy")]) == 0
    loss, meta = load_array(tmp_path / "base.loss.npy")
    assert np.all(np.isfinite(loss[mask])) and np.all(np.isnan(loss[~mask])) and np.isfinite(meta["mean_response_loss"])
    for method in ("full", "random", "rho", "fixed"):
        assert main(["select", "--method", method, "--ratio", "0.5", "--tokens", str(tokens),
                     "--base-loss", str(tmp_path / "base.loss.npy"), "--ref-loss", str(tmp_path / "ref.loss.npy"),
                     "--out", str(tmp_path / f"{method}.mask.npy")]) == 0
        keep, side = load_array(tmp_path / f"{method}.mask.npy")
        assert not np.any(keep & ~mask) and side["n_samples_without_selected"] >= 1
    assert main(["train", "--model", str(tiny_model_dir), "--tokens", str(tokens), "--mask",
                 str(tmp_path / "rho.mask.npy"), "--steps", "2", "--batch-size", "3", "--device", "cpu",
                 "--out", str(tmp_path / "model")]) == 0
    info = json.loads((tmp_path / "model" / "tokenclean.json").read_text())
    assert np.isfinite(info["final_loss"]) and info["samples_without_selected_tokens"] >= 1


# ---------------------------------------------------------------------------------------------------------
# artifacts that do not belong together, missing models, unknown tasks
# ---------------------------------------------------------------------------------------------------------
def _table(lengths, seed) -> TokenTable:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    loss_mask = rng.random(offsets[-1]) < 0.7
    loss_mask[offsets[:-1]] = False
    return TokenTable(rng.integers(0, 50, offsets[-1]), offsets, loss_mask)


def test_select_and_train_refuse_artifacts_made_from_other_data(tmp_path, capsys, tiny_model_dir):
    a, b = _table([5, 6], 0), _table([5, 6], 1)  # same shape, other tokens: only the fingerprints tell
    a.save(tmp_path / "a.tokens.npz", {"tokenizer_fingerprint": "x"})
    b.save(tmp_path / "b.tokens.npz", {"tokenizer_fingerprint": "x"})
    loss = np.where(a.loss_mask, 1.0, np.nan).astype(np.float32)
    for name in ("base", "ref"):
        save_array(tmp_path / f"{name}.loss.npy", loss,
                   {"tokens": "a.tokens.npz", "tokens_fingerprint": a.fingerprint()})
    before = _files(tmp_path)
    code, line = run_cli(capsys, "select", "--method", "fixed", "--ratio", "0.5",
                         "--tokens", str(tmp_path / "b.tokens.npz"),
                         "--base-loss", str(tmp_path / "base.loss.npy"), "--ref-loss", str(tmp_path / "ref.loss.npy"),
                         "--out", str(tmp_path / "b.mask.npy"))
    assert code == 2 and f"{tmp_path / 'base.loss.npy'}: made on a.tokens.npz" in line and "not on" in line
    assert _files(tmp_path) == before
    save_array(tmp_path / "a.mask.npy", a.loss_mask, {"tokens": "a.tokens.npz", "tokens_fingerprint": a.fingerprint()})
    before = _files(tmp_path)
    code, line = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--tokens", str(tmp_path / "b.tokens.npz"),
                         "--mask", str(tmp_path / "a.mask.npy"), "--steps", "1", "--out", str(tmp_path / "model"))
    assert code == 2 and f"{tmp_path / 'a.mask.npy'}: made on a.tokens.npz" in line
    assert _files(tmp_path) == before  # no mask, no model directory


def test_loss_refuses_a_table_from_another_tokenizer(tmp_path, capsys, tiny_model_dir):
    a = _table([5, 6], 0)
    a.save(tmp_path / "a.tokens.npz", {"tokenizer": "other", "tokenizer_fingerprint": "0123456789abcdef"})
    code, line = run_cli(capsys, "loss", "--model", str(tiny_model_dir), "--tokens", str(tmp_path / "a.tokens.npz"),
                         "--out", str(tmp_path / "a.loss.npy"))
    assert code == 2 and f"{tmp_path / 'a.tokens.npz'}: tokenized with 'other'" in line
    assert not (tmp_path / "a.loss.npy").exists()


@pytest.mark.parametrize("command", ["loss", "train"])
def test_a_missing_model_directory_is_named(tmp_path, capsys, command):
    a = _table([5, 6], 0)
    a.save(tmp_path / "a.tokens.npz", {})
    missing = tmp_path / "models" / "warmup"
    code, line = run_cli(capsys, command, "--model", str(missing), "--tokens", str(tmp_path / "a.tokens.npz"),
                         "--out", str(tmp_path / "out"))
    assert code == 2 and f"{missing}: model directory not found" in line
    assert not (tmp_path / "out").exists()


def test_an_unknown_lm_eval_task_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager
    # lm-eval's full index takes ~15 s to build; a TaskManager over one directory shows the same check
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\ndataset_path: json\noutput_type: loglikelihood\n"
                                     "doc_to_text: x\ndoc_to_target: y\n")
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        lambda include_path=None, include_defaults=True, **kw: real(include_path=include_path,
                                                                                    include_defaults=False, **kw))
    code, line = run_cli(capsys, "evaluate", "--model", str(tmp_path / "no_model"), "--benchmarks",
                         '[{"task": "mine"}, {"task": "hellaswagg", "num_fewshot": 0}]', "--include-path", str(tasks),
                         "--out", str(tmp_path / "eval.json"))
    assert code == 2 and "unknown lm-eval task 'hellaswagg'" in line and "mine" not in line.split(":")[-1].split(";")[0]
    assert not (tmp_path / "eval.json").exists()


# ---------------------------------------------------------------------------------------------------------
# the config: checked against the schema before any job runs
# ---------------------------------------------------------------------------------------------------------
def dry_run(workdir: Path, override: str) -> subprocess.CompletedProcess:
    (workdir / "override.yaml").write_text(override)
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"),
                           "--directory", str(workdir), "--configfile", str(ROOT / "configs" / "smoke.yaml"),
                           str(workdir / "override.yaml"), "--cores", "1"],
                          capture_output=True, text=True, env={**os.environ}, timeout=300, check=False)


@pytest.mark.slow  # starts Snakemake (a dry run per case)
@pytest.mark.parametrize("override,key", [
    ("ratios: [0]\n", "ratios[0]"),
    ("methods: [full, cleverest]\n", "methods[1]"),
    ("self_evolving: {rounds: 0}\n", "self_evolving.rounds"),
    ("world: {pool_samples: -5}\n", "world.pool_samples"),
    ("self_evolving: {rounds: 3, chunks: 2}\n", "self_evolving.chunks"),
])
def test_a_bad_config_stops_the_workflow_before_any_job(tmp_path, override, key):
    proc = dry_run(tmp_path, override)
    assert proc.returncode != 0
    err = without_profile_notice(proc.stderr)
    assert err.startswith(f"config error: override.yaml: {key}: ") and err.count("\n") == 1, proc.stderr[-2000:]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("section,value", [
    ({"max_length": 1}, "max_length"), ({"scoring": {"token_budget": 0}}, "token_budget"),
    ({"sft": {"train": {"steps": -1}}}, "steps"), ({"sft": {"train": {"lr": 0}}}, "lr"),
    ({"warmup": {"train": {"batch_size": 0}}}, "batch_size"), ({"seeds": [-1]}, "seeds"),
    ({"world": {"eval_samples": 0, "families": ["add"]}}, "eval_samples"),
    ({"sft": {"train": {"schedule": "cos"}}}, "schedule"),
    ({"evaluation": {"limit": -3}}, "limit"), ({"sft": {"train": {"stepz": 3}}}, "stepz"),
])
def test_the_schema_refuses_values_out_of_range(section, value):
    """The same schema snakemake validates with, checked in-process over more keys."""
    import yaml
    from snakemake.utils import validate

    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))  # the smoke config itself passes
    for k, v in section.items():
        config[k] = {**config[k], **v} if isinstance(v, dict) and isinstance(config.get(k), dict) else v
    with pytest.raises(Exception) as e:
        validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    assert value in str(e.value)


def test_hub_ids_are_not_taken_for_missing_directories(tmp_path):
    from tokenclean.models import require_model_dir

    for hub_id in ("gpt2", "meta-llama/Llama-3.2-3B", "mistralai/Mistral-7B-v0.3"):
        require_model_dir(hub_id)  # left to the hub loader (offline: its own clear error)
    for local in ("results/smoke/models/warmup", "./base", str(tmp_path / "nope"), "~/nope-tokenclean"):
        with pytest.raises(FileNotFoundError, match=": model directory not found"):
            require_model_dir(local)
    require_model_dir(str(tmp_path))
