"""Errors are one line, everywhere: every command, given a bad file where it expects one, or an output it cannot
write, exits 2 with exactly one line ``tokenclean <cmd>: error: <file>[:<line>]: <what>`` naming the file, no
traceback, and nothing left where its output belongs (no output, no sidecar, no temporary).

The table below is commands x flags x kinds of bad input, each run in process through ``tokenclean.cli.main``.
The files are tiny hand-made artifacts; no model is loaded (the bad input is found first)."""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.listing import all_files
from tokenclean.artifacts import (
    ArtifactError,
    TokenTable,
    WriteError,
    atomic_files,
    load_array,
    save_array,
    sidecar_path,
    write_texts,
)
from tokenclean.cli import main

ROOT_USER = os.geteuid() == 0


# ---------------------------------------------------------------------------------------------------------
# good inputs, made once
# ---------------------------------------------------------------------------------------------------------
def _table(lengths: list[int], seed: int) -> TokenTable:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    loss_mask = rng.random(offsets[-1]) < 0.7
    loss_mask[offsets[:-1]] = False
    loss_mask[offsets[:-1] + 1] = True  # every sample has a response token
    token_class = np.where(loss_mask, rng.integers(0, 4, offsets[-1]), -1)
    return TokenTable(rng.integers(0, 50, offsets[-1]), offsets, loss_mask, {"token_class": token_class})


def _eval(path: Path, value: float) -> None:
    path.write_text(json.dumps({"metrics": {"add": {"answer_acc": value}}, "average": {"answer_acc": value}}))
    path.with_name(path.stem + ".samples.jsonl").write_text(
        "".join(json.dumps({"family": "add", "doc_id": i, "answer_correct": float(i % 2)}) + "\n" for i in range(4)))


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("good")
    table, other = _table([5, 6, 7, 4], 0), _table([5, 6, 7, 4], 1)
    tmeta = table.save(d / "pool.tokens.npz", {"tokenizer_fingerprint": "x"})
    ometa = other.save(d / "other.tokens.npz", {"tokenizer_fingerprint": "x"})
    rng = np.random.default_rng(2)
    for name in ("base", "ref"):
        loss = np.where(table.loss_mask, rng.random(table.n_tokens), np.nan).astype(np.float32)
        save_array(d / f"{name}.loss.npy", loss, {"kind": "loss", "tokens": "pool.tokens.npz",
                                                  "tokens_fingerprint": tmeta["fingerprint"]})
    save_array(d / "other.loss.npy", np.where(other.loss_mask, 1.0, np.nan).astype(np.float32),
               {"kind": "loss", "tokens": "other.tokens.npz", "tokens_fingerprint": ometa["fingerprint"]})
    save_array(d / "full.mask.npy", table.loss_mask.copy(), {"kind": "mask", "tokens": "pool.tokens.npz",
                                                             "tokens_fingerprint": tmeta["fingerprint"]})
    for name, value in (("full_s0", 0.5), ("rho_r0.5_s0", 0.6), ("warmup", 0.4)):
        _eval(d / f"{name}.json", value)
    (d / "table.csv").write_text("method,ratio,n_seeds,average_mean,average_std\nfull,,1,0.5,0\nrho,0.5,1,0.6,0\n")
    (d / "quality.csv").write_text("mask,kept_informative,kept_garbage\nfull,1.0,1.0\n")
    (d / "rounds.csv").write_text("method,ratio,round,n_seeds,average_mean,average_std\nrho,0.5,0,1,0.4,0\n"
                                  "rho,0.5,1,1,0.6,0\n")
    (d / "data.jsonl").write_text('{"prompt": "hello", "completion": "fine thanks"}\n' * 3)
    from tokenclean.evaluation import write_tasks

    (d / "eval").mkdir()
    (d / "eval" / "add.jsonl").write_text('{"prompt": "1 + 1", "completion": "2", "answer": "2"}\n')
    write_tasks(d / "eval", d / "tasks", ["add"])
    (d / "tokenizer").symlink_to(tiny_tokenizer_dir)
    return {p.name: p for p in d.iterdir()}


# ---------------------------------------------------------------------------------------------------------
# bad inputs: each maker puts a bad file at `path` (beside it: a copy of a good sidecar where one applies,
# so that the loader reaches the file itself)
# ---------------------------------------------------------------------------------------------------------
def _with_sidecar(good_file: Path, path: Path) -> None:
    if good_file.suffix in (".npy", ".npz") and sidecar_path(good_file).exists():
        shutil.copy(sidecar_path(good_file), sidecar_path(path))


def directory(good_file: Path, path: Path) -> None:
    path.mkdir()


def unreadable(good_file: Path, path: Path) -> None:
    shutil.copy(good_file, path)
    _with_sidecar(good_file, path)
    path.chmod(0)


def truncated(good_file: Path, path: Path) -> None:
    data = good_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _with_sidecar(good_file, path)


def text_file(good_file: Path, path: Path) -> None:
    path.write_text("hello, I am not what my name says\n")
    _with_sidecar(good_file, path)


def foreign_zip(good_file: Path, path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("input_ids", "not an array")
        z.writestr("readme.txt", "a zip, but not a token table")
    _with_sidecar(good_file, path)


def missing_member(good_file: Path, path: Path) -> None:
    with np.load(good_file) as z:
        np.savez(path, **{k: z[k] for k in z.files if k != "loss_mask"})
    _with_sidecar(good_file, path)


def pickled(good_file: Path, path: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, np.array([{"x": 1}, 2], dtype=object), allow_pickle=True)
    _with_sidecar(good_file, path)


def no_sidecar(good_file: Path, path: Path) -> None:
    shutil.copy(good_file, path)


def list_json(good_file: Path, path: Path) -> None:
    path.write_text("[1, 2]\n")


def bad_number(good_file: Path, path: Path) -> None:
    path.write_text(good_file.read_text().replace("0.6", "lots"))


def copy_of(name: str) -> Callable[[dict[str, Path], Path], None]:
    """A good artifact of another kind (or made on another table), with its own sidecar, under the bad name."""
    def make(good_file: Path, path: Path, _name=name) -> None:
        src = good_file.parent / _name
        shutil.copy(src, path)
        shutil.copy(sidecar_path(src), sidecar_path(path))
    make.__name__ = f"copy_of_{name}"
    return make


def wrong_length(good_file: Path, path: Path) -> None:
    array, meta = load_array(good_file)
    save_array(path, array[:-3], {k: v for k, v in meta.items() if k not in ("dtype", "shape", "fingerprint")})


NPZ_BAD = [directory, unreadable, truncated, text_file, foreign_zip, missing_member, pickled, no_sidecar,
           copy_of("base.loss.npy")]
LOSS_BAD = [directory, unreadable, truncated, text_file, pickled, no_sidecar, copy_of("full.mask.npy"),
            copy_of("other.loss.npy"), copy_of("pool.tokens.npz"), wrong_length]
MASK_BAD = [directory, unreadable, truncated, text_file, pickled, no_sidecar, copy_of("base.loss.npy"),
            wrong_length]
JSON_BAD = [directory, unreadable, truncated, list_json]
CSV_BAD = [directory, unreadable, list_json, bad_number]


# ---------------------------------------------------------------------------------------------------------
# commands: valid argv from the good files, one flag replaced by the bad file; the output under `out/`
# ---------------------------------------------------------------------------------------------------------
def argv(command: str, g: dict[str, Path], out_dir: Path, **replace: str) -> list[str]:
    """``replace``: flag name (``tokens``, ``evals``, ...) -> path; list flags get it in place of their first."""
    def f(name: str, default: Path) -> str:
        return str(replace.get(name, default))

    out = out_dir

    tok, base, ref, mask = g["pool.tokens.npz"], g["base.loss.npy"], g["ref.loss.npy"], g["full.mask.npy"]
    evals = [f("evals", g["full_s0.json"]), str(g["rho_r0.5_s0.json"])]
    return {
        "tokenize": ["tokenize", "--data", f("data", g["data.jsonl"]), "--tokenizer", f("tokenizer", g["tokenizer"]),
                     "--max-length", "32", "--out", f("out", out / "data.tokens.npz")],
        "loss": ["loss", "--model", f("model", g["tokenizer"]), "--tokens", f("tokens", tok), "--device", "cpu",
                 "--out", f("out", out / "base.loss.npy")],
        "select": ["select", "--method", "fixed", "--ratio", "0.5", "--tokens", f("tokens", tok),
                   "--base-loss", f("base_loss", base), "--ref-loss", f("ref_loss", ref),
                   "--out", f("out", out / "fixed.mask.npy")],
        "train": ["train", "--model", f("model", g["tokenizer"]), "--tokens", f("tokens", tok), "--mask",
                  f("mask", mask), "--steps", "1", "--device", "cpu", "--out", f("out", out / "model")],
        "concat": ["concat", "--tokens", str(tok), f("tokens", tok), "--out", f("out", out / "all.tokens.npz")],
        "chunk": ["chunk", "--tokens", f("tokens", tok), "--chunks", "2", "--index", "1",
                  "--out", f("out", out / "c1.tokens.npz")],
        "quality": ["quality", f("masks", mask), "--tokens", f("tokens", tok), "--out", f("out", out / "q.csv")],
        "separation": ["separation", "--tokens", f("tokens", tok), "--base-loss", f("base_loss", base),
                       "--ref-loss", f("ref_loss", ref), "--out", f("out", out / "sep.csv")],
        "report": ["report", *evals, "--out-csv", f("out_csv", out / "table.csv"),
                   "--out-md", f("out_md", out / "table.md")],
        "significance": ["significance", *evals, "--iters", "20", "--out-csv", f("out_csv", out / "sig.csv"),
                         "--out-md", f("out_md", out / "sig.md")],
        "rounds": ["rounds", f("evals", g["warmup.json"]), str(g["rho_r0.5_s0.json"]), "--rounds", "1",
                   "--out", f("out", out / "rounds.csv")],
        "figure-ratios": ["figure", "ratios", "--table", f("table", g["table.csv"]), "--out", f("out", out / "r.png")],
        "figure-scores": ["figure", "scores", "--tokens", f("tokens", tok), "--base-loss", f("base_loss", base),
                          "--ref-loss", f("ref_loss", ref), "--out", f("out", out / "s.png")],
        "figure-kept": ["figure", "kept", "--quality", f("quality", g["quality.csv"]),
                        "--out", f("out", out / "k.png")],
        "figure-rounds": ["figure", "rounds", "--rounds-csv", f("rounds_csv", g["rounds.csv"]),
                          "--out", f("out", out / "rr.png")],
        "token-view": ["token-view", "--tokens", f("tokens", tok), "--base-loss", f("base_loss", base),
                       "--ref-loss", f("ref_loss", ref), "--masks", f("masks", mask),
                       "--tokenizer", f("tokenizer", g["tokenizer"]), "--out", f("out", out / "view.html")],
        "evaluate": ["evaluate", "--model", f("model", g["tokenizer"]), "--tasks-dir", f("tasks_dir", g["tasks"]),
                     "--tasks", "add", "--out", f("out", out / "eval.json")],
        "data": ["data", "--spec", json.dumps({"pool": {"path": f("data", g["data.jsonl"])},
                                               "warmup": {"first_of_pool": 1}}), "--out", f("out", out / "data")],
    }[command]


# (command, flag, the file name the bad input gets, bad kinds)
INPUT_CASES = [
    ("tokenize", "data", "data.jsonl", [directory, unreadable]),
    ("tokenize", "tokenizer", "tokenizer", [text_file]),
    ("loss", "tokens", "pool.tokens.npz", NPZ_BAD),
    ("loss", "model", "model", [text_file, directory]),
    ("select", "tokens", "pool.tokens.npz", NPZ_BAD),
    ("select", "base_loss", "base.loss.npy", LOSS_BAD),
    ("select", "ref_loss", "ref.loss.npy", [copy_of("full.mask.npy"), copy_of("other.loss.npy")]),
    ("train", "tokens", "pool.tokens.npz", [truncated, copy_of("full.mask.npy")]),
    ("train", "mask", "full.mask.npy", MASK_BAD),
    ("train", "model", "model", [text_file, directory]),
    ("concat", "tokens", "pool.tokens.npz", NPZ_BAD),
    ("chunk", "tokens", "pool.tokens.npz", NPZ_BAD),
    ("quality", "tokens", "pool.tokens.npz", [truncated, copy_of("full.mask.npy")]),
    ("quality", "masks", "full.mask.npy", MASK_BAD),
    ("separation", "base_loss", "base.loss.npy", LOSS_BAD),
    ("report", "evals", "full_s0.json", JSON_BAD),
    ("significance", "evals", "full_s0.json", [directory, unreadable]),
    ("rounds", "evals", "warmup.json", JSON_BAD),
    ("figure-ratios", "table", "table.csv", CSV_BAD),
    ("figure-scores", "base_loss", "base.loss.npy", [copy_of("full.mask.npy"), wrong_length]),
    ("figure-kept", "quality", "quality.csv", [directory, list_json]),
    ("figure-rounds", "rounds_csv", "rounds.csv", [directory, list_json]),
    ("token-view", "tokens", "pool.tokens.npz", [truncated, foreign_zip]),
    ("token-view", "masks", "full.mask.npy", [copy_of("base.loss.npy"), pickled]),
    ("evaluate", "model", "model", [text_file, directory]),
    ("evaluate", "tasks_dir", "tasks", [text_file]),
    ("data", "data", "data.jsonl", [directory, unreadable]),
]


def what_is_wrong(bad: Callable, name: str) -> str:
    """The words the error must use for ``bad`` (beyond the file's name): the reason, not just any error."""
    if bad.__name__ == "text_file" and "." not in name:
        return "expected a" if name == "tasks" else "is a file"
    if bad.__name__ == "truncated":
        # an array or table whose sidecar records its fingerprint was written whole: cut short, it is damaged
        expected = {".npz": "damaged (no longer reads as the token table",
                    ".npy": "damaged (no longer reads as the plain numpy array", ".json": "invalid JSON"}
        return expected[Path(name).suffix]
    return {"directory": "directory", "unreadable": "cannot be read (permission denied)",
            "text_file": "holds pickled objects or is not a numpy file", "foreign_zip": "not a token table",
            "missing_member": "member 'loss_mask' is missing", "pickled": "pickled", "no_sidecar": "sidecar",
            "list_json": "expected" if name.endswith(".json") else "missing", "bad_number": "expected a number",
            "wrong_length": "expected one entry per token", "copy_of_other.loss.npy": "not on",
            }.get(bad.__name__, "expected a")


def assert_one_line_error(capsys, code: int, command: str, path: Path) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, err
    line = errors[0]
    assert re.match(rf"^tokenclean {command}: error: \S", line), line
    assert str(path) in line, line
    return line


@pytest.fixture
def unreadable_for_root(monkeypatch):
    """Root reads every file whatever its mode: there, a mode-000 file is taken as unreadable by ``os.access``
    as it would be for any other user (where the test is real)."""
    if ROOT_USER:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: (
            False if os.path.exists(p) and not os.path.isdir(p) and os.stat(p).st_mode & 0o777 == 0
            else real(p, mode, *a, **k)))


@pytest.mark.parametrize("command,flag,name,bad", [
    pytest.param(c, f, n, b, id=f"{c}-{f}-{b.__name__}") for c, f, n, bads in INPUT_CASES for b in bads])
def test_a_bad_input_is_one_line_naming_the_file_and_leaves_no_output(tmp_path, capsys, good, unreadable_for_root,
                                                                       command, flag, name, bad):
    source = good[name] if name in good else good["pool.tokens.npz"]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    path = bad_dir / name
    bad(source, path)
    out = tmp_path / "out"
    out.mkdir()
    code = main(argv(command, good, out, **{flag: str(path)}))
    line = assert_one_line_error(capsys, code, command.split("-")[0] if command.startswith("figure") else command, path)
    assert what_is_wrong(bad, name) in line, line
    assert all_files(out) == []


def _out_flags(command: str) -> list[str]:
    return ["out_csv", "out_md"] if command in ("report", "significance") else ["out"]


DIRECTORY_OUTPUT = {"train", "data"}
COMMANDS = ["tokenize", "select", "train", "concat", "chunk", "quality", "separation", "report", "significance",
            "rounds", "figure-ratios", "figure-scores", "figure-kept", "figure-rounds", "token-view", "evaluate",
            "data", "loss"]


def parent_is_a_file(out: Path, name: str) -> Path:
    (out / "file").write_text("x")
    return out / "file" / name


def existing_directory(out: Path, name: str) -> Path:
    (out / name).mkdir()
    (out / name / "keep").write_text("x")
    return out / name


def no_permission(out: Path, name: str) -> Path:
    (out / "locked").mkdir()
    (out / "locked").chmod(0o555)
    return out / "locked" / name


def existing_file(out: Path, name: str) -> Path:
    (out / name).write_text("x")
    return out / name


@pytest.fixture
def unwritable_for_root(monkeypatch):
    if ROOT_USER:  # as unreadable_for_root: a mode-555 directory is not writable for anyone but root
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: (
            False if mode & os.W_OK and os.path.isdir(p) and os.stat(p).st_mode & 0o777 == 0o555
            else real(p, mode, *a, **k)))


@pytest.mark.parametrize("command,flag,bad", [
    pytest.param(c, f, b, id=f"{c}-{f}-{b.__name__}") for c in COMMANDS for f in _out_flags(c)
    for b in [parent_is_a_file, no_permission, existing_file if c in DIRECTORY_OUTPUT else existing_directory]])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, good, unwritable_for_root,
                                                                     command, flag, bad):
    out = tmp_path / "out"
    out.mkdir()
    path = bad(out, "result")
    before = all_files(out)
    code = main(argv(command, good, out, **{flag: str(path)}))
    line = assert_one_line_error(capsys, code, command.split("-")[0] if command.startswith("figure") else command, path)
    assert {"parent_is_a_file": f"{out / 'file'} is not a directory", "no_permission": "no permission to write in",
            "existing_directory": "is a directory, expected a file path",
            "existing_file": "exists and is not a directory"}[bad.__name__] in line, line
    assert all_files(out) == before  # hidden temporaries included


# ---------------------------------------------------------------------------------------------------------
# contents errors of evaluation and per-example files name the file (and line)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("samples,expected", [
    ('{"family": "add", "doc_id": 0, "answer_correct": 1}\n[1]\n', ":2: expected a JSON object, got list"),
    ('{"family": "add", "doc_id": 0, "answer_correct": 1}\n{"family": "add"', ":2: invalid JSON"),
    ('{"family": "add", "answer_correct": 1}\n', ":1: field 'doc_id' missing"),
    ('{"family": "add", "doc_id": [0], "answer_correct": 1}\n', ":1: field doc_id: expected a number or text"),
    ('{"family": "add", "doc_id": 0, "answer_correct": "yes"}\n', ":1: field 'answer_acc': expected a finite number"),
    (b'{"family": "add", "doc_id": 0, "answer_correct": 1}\n\xff\n', ":2: invalid UTF-8 at byte 0"),
])
def test_a_bad_per_example_file_names_its_line(tmp_path, capsys, good, samples, expected):
    for name in ("full_s0", "rho_r0.5_s0"):
        shutil.copy(good[f"{name}.json"], tmp_path / f"{name}.json")
        shutil.copy(good[f"{name}.samples.jsonl"], tmp_path / f"{name}.samples.jsonl")
    bad = tmp_path / "rho_r0.5_s0.samples.jsonl"
    bad.write_bytes(samples.encode() if isinstance(samples, str) else samples)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["significance", str(tmp_path / "full_s0.json"), str(tmp_path / "rho_r0.5_s0.json"), "--iters", "5",
                 "--out-csv", str(out / "sig.csv"), "--out-md", str(out / "sig.md")])
    line = assert_one_line_error(capsys, code, "significance", bad)
    assert f"{bad}{expected}" in line, line
    assert all_files(out) == []


@pytest.mark.parametrize("content,expected", [
    ('{"metrics": {"add": {"answer_acc": 0.5}}}', "field average.answer_acc missing"),
    ('{"metrics": [1], "average": {"answer_acc": 0.5}}', "expected an evaluation result with a 'metrics' object"),
    ('{"metrics": {"add": {"answer_acc": "high"}}, "average": {"answer_acc": 0.5}}',
     "field metrics.add.answer_acc: expected a finite number, got 'high'"),
    ('{"metrics": {"add": 3}, "average": {"answer_acc": 0.5}}', "field metrics.add: expected an object of metrics"),
    ('{"metrics": {},\n "average": {"answer_acc": 0.5\n', ":3: invalid JSON"),
])
@pytest.mark.parametrize("command", ["report", "rounds"])
def test_a_bad_evaluation_json_names_the_file(tmp_path, capsys, good, command, content, expected):
    bad = tmp_path / "rho_r0.5_s0.json"
    bad.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    args = ([str(good["full_s0.json"]), str(bad), "--out-csv", str(out / "t.csv"), "--out-md", str(out / "t.md")]
            if command == "report"
            else [str(good["warmup.json"]), str(bad), "--rounds", "1", "--out", str(out / "r.csv")])
    line = assert_one_line_error(capsys, main([command, *args]), command, bad)
    assert f"{bad}{expected}" in line if expected.startswith(":") else f"{bad}: " in line and expected in line, line
    assert all_files(out) == []


@pytest.mark.parametrize("content,expected", [
    (None, "tokenclean.json: file not found"),
    ('{"steps": 10, "train_config": {"batch_size": 8}, "samples_used": 40}',
     "tokenclean.json: field 'samples_without_selected_tokens' missing"),
    ('{"steps": "ten", "train_config": {"batch_size": 8}, "samples_used": 40, "samples_without_selected_tokens": 0,'
     ' "seconds": 1}', "tokenclean.json: field steps: expected a whole number, got 'ten'"),
    ('{"steps": 10, "train_config": {"batch_size": 8}, "samples_used": 0, "samples_without_selected_tokens": 0,'
     ' "seconds": 1}', "tokenclean.json: trained on no samples"),
])
def test_a_bad_training_record_names_the_file(tmp_path, capsys, good, content, expected):
    """The report reads each row's passes from what training recorded next to its model."""
    model = tmp_path / "models" / "full_s0"
    model.mkdir(parents=True)
    if content is not None:
        (model / "tokenclean.json").write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    args = ["report", str(good["full_s0.json"]), "--models", str(model), "--out-csv", str(out / "t.csv"),
            "--out-md", str(out / "t.md")]
    line = assert_one_line_error(capsys, main(args), "report", model)
    assert expected in line, line
    assert all_files(out) == []


# ---------------------------------------------------------------------------------------------------------
# writes: an array and its sidecar (and a report's several files) appear together or not at all
# ---------------------------------------------------------------------------------------------------------
def _failing_on_call(n: int):
    """os.replace that fails on its n-th call (1-based): the n-th file of a set cannot be put in place."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == n:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)
    return replace


@pytest.mark.parametrize("writer", ["save_array", "table", "texts"])
@pytest.mark.parametrize("failing", [1, 2])
def test_a_set_of_files_is_written_whole_or_not_at_all(tmp_path, monkeypatch, writer, failing):
    table = _table([4, 5], 0)
    write: Callable[[], None] = {
        "save_array": lambda: save_array(tmp_path / "x.loss.npy", np.ones(9, np.float32), {"kind": "loss"}),
        "table": lambda: table.save(tmp_path / "x.tokens.npz", {}),
        "texts": lambda: write_texts({tmp_path / "t.md": "md\n", tmp_path / "t.csv": "a\n1\n"}),
    }[writer]
    monkeypatch.setattr(os, "replace", _failing_on_call(failing))
    with pytest.raises(WriteError, match="cannot be written: no space left on the device"):
        write()
    assert list(tmp_path.iterdir()) == []  # neither file, no temporary
    monkeypatch.undo()
    write()  # and it works when nothing fails
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("writer", ["save_array", "table"])
def test_a_failing_array_write_leaves_no_sidecar(tmp_path, monkeypatch, writer):
    """Today's order wrote the sidecar first and for good: a failing array write left it behind."""
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if writer == "save_array":
        monkeypatch.setattr(np, "save", full_disk)
        with pytest.raises(WriteError):
            save_array(tmp_path / "x.mask.npy", np.ones(3, bool), {"kind": "mask"})
    else:
        monkeypatch.setattr(np, "savez", full_disk)
        with pytest.raises(WriteError):
            _table([4, 5], 0).save(tmp_path / "x.tokens.npz", {})
    assert list(tmp_path.iterdir()) == []


def test_atomic_files_renames_the_last_target_last(tmp_path, monkeypatch):
    order = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: (order.append(Path(d).name), real(s, d)))
    save_array(tmp_path / "x.loss.npy", np.ones(2, np.float32), {"kind": "loss"})
    _table([4, 5], 0).save(tmp_path / "x.tokens.npz", {})
    assert order == ["x.loss.json", "x.loss.npy", "x.tokens.json", "x.tokens.npz"]
    with pytest.raises(RuntimeError), atomic_files(tmp_path / "a", tmp_path / "b") as (a, _):
        a.write_text("1")
        raise RuntimeError("killed before b was complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.loss.json", "x.loss.npy", "x.tokens.json",
                                                          "x.tokens.npz"]


# ---------------------------------------------------------------------------------------------------------
# the boundary: input errors are one line; a bug keeps its traceback
# ---------------------------------------------------------------------------------------------------------
def test_a_programming_error_is_not_swallowed(tmp_path, good, monkeypatch):
    import tokenclean.selection

    def buggy(*args, **kwargs):
        return {}["n_selected"]  # a KeyError that no input caused

    monkeypatch.setattr(tokenclean.selection, "select_file", buggy)
    with pytest.raises(KeyError):
        main(["select", "--method", "full", "--tokens", str(good["pool.tokens.npz"]), "--out", str(tmp_path / "m.npy")])


def test_kinds_are_recorded_and_checked_by_the_one_loader(tmp_path, good):
    _, meta = TokenTable.load(good["pool.tokens.npz"])
    assert meta["kind"] == "tokens"  # every table records its kind, whatever its caller passed
    with pytest.raises(ArtifactError,
                       match=r"full\.mask\.npy: is a selection mask \(X\.mask\.npy\), expected a loss array"):
        load_array(good["full.mask.npy"], "loss")
    with pytest.raises(ArtifactError,
                       match=r"base\.loss\.npy: is a loss array \(X\.loss\.npy\), expected a token table"):
        TokenTable.load(good["base.loss.npy"])
    # a sidecar without a kind (older artifacts): the dtype decides
    save_array(tmp_path / "m.npy", np.ones(3, bool), {})
    with pytest.raises(ArtifactError, match=r"m\.npy: holds bool values, expected a loss array"):
        load_array(tmp_path / "m.npy", "loss")
