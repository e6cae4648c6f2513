"""Model provenance: a hub model is loaded at a pinned revision and the commit loaded is recorded (offline: a
hub cache laid out on disk, no network)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.listing import all_files
from tokenclean.artifacts import TokenTable, save_array
from tokenclean.cli import main

MAIN = "1" * 40  # the commit the default branch points to
V1 = "2" * 40    # the commit of tag v1: other weights, same tokenizer
TEXTS = [("Add 3 and 5 .", "Sure ! The answer is 8 ."), ("hello", "fine thanks and you"),
         ("how are you ?", "the quick brown fox")]


@pytest.fixture()
def hub(tmp_path, tiny_model_dir, tiny_tokenizer_dir, monkeypatch):
    """``org/tiny`` in a local hub cache: main -> MAIN (the tiny model), v1 -> V1 (other weights)."""
    import huggingface_hub.constants
    from transformers import AutoTokenizer

    from tokenclean.models import save_model, tiny_llama

    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / MAIN)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    other = tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, hidden=32, layers=2,
                       heads=2, intermediate=64, seed=1)
    save_model(other, tok, repo / "snapshots" / V1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo / "snapshots"


@pytest.fixture()
def tokens(tmp_path, hub):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TEXTS))
    out = tmp_path / "d.tokens.npz"
    assert main(["tokenize", "--data", str(data), "--tokenizer", "org/tiny", "--revision", "v1", "--max-length", "64",
                 "--out", str(out)]) == 0
    return out


def test_tokenize_records_the_tokenizers_revision_and_commit(tokens):
    meta = json.loads(tokens.with_suffix(".json").read_text())
    assert meta["tokenizer"] == "org/tiny" and meta["tokenizer_revision"] == "v1" and meta["tokenizer_commit"] == V1


def test_loss_loads_the_pinned_commit_and_records_it(tmp_path, hub, tokens):
    from tokenclean.artifacts import load_array

    for revision, commit in (("v1", V1), (None, MAIN)):
        out = tmp_path / f"{revision}.loss.npy"
        pinned = ["--revision", revision] if revision else []
        assert main(["loss", "--model", "org/tiny", *pinned, "--tokens", str(tokens), "--out", str(out)]) == 0
        direct = tmp_path / f"{revision}.direct.loss.npy"  # the same snapshot loaded as a directory
        assert main(["loss", "--model", str(hub / commit), "--tokens", str(tokens), "--out", str(direct)]) == 0
        losses, meta = load_array(out)
        assert np.array_equal(losses, load_array(direct)[0], equal_nan=True)
        assert meta["model_fingerprint"] == f"hub:org/tiny@{commit}" and meta["model_commit"] == commit
        assert meta["model_revision"] == revision
    assert not np.allclose(load_array(tmp_path / "v1.loss.npy")[0], load_array(tmp_path / "None.loss.npy")[0],
                           equal_nan=True)


def test_train_records_the_base_models_revision_and_commit(tmp_path, hub, tokens):
    out = tmp_path / "model"
    assert main(["train", "--model", "org/tiny", "--revision", "v1", "--tokens", str(tokens), "--out", str(out),
                 "--steps", "1", "--batch-size", "2"]) == 0
    meta = json.loads((out / "tokenclean.json").read_text())
    assert meta["base_model_revision"] == "v1" and meta["base_model_commit"] == V1
    assert meta["base_model_fingerprint"] == f"hub:org/tiny@{V1}"


def test_a_revision_for_a_local_directory_or_an_unknown_one_is_a_one_line_error(tmp_path, tiny_model_dir, tokens,
                                                                               capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["loss", "--model", str(tiny_model_dir), "--revision", "v1", "--tokens", str(tokens),
                 "--out", str(out / "x.loss.npy")]) == 2
    assert main(["loss", "--model", "org/tiny", "--revision", "v9", "--tokens", str(tokens),
                 "--out", str(out / "y.loss.npy")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenclean loss: error:")]
    assert len(errors) == 2 and "local directory" in errors[0] and "org/tiny" in errors[1]
    assert all_files(out) == []  # no loss, sidecar or temporary of either


def experiment_files(tmp_path, tokenizer_commit=MAIN, model_commit=MAIN):
    """A data directory as the data rule writes it and the sidecars the tokenize and loss jobs write."""
    import hashlib

    data = tmp_path / "data"
    data.mkdir()
    described = {}
    for name, rows in (("pool", 3), ("warmup", 2)):
        text = "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(rows))
        (data / f"{name}.jsonl").write_text(text)
        described[name] = {"source": {"hub": "org/data", "revision": "r1"}, "records": rows,
                           "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (data / "data.json").write_text(json.dumps(described))
    tokens, metas = [], {}
    for name, rows in (("pool", 3), ("warmup", 2)):
        table = TokenTable(np.arange(4 * rows) % 7, np.arange(0, 4 * rows + 1, 4), np.tile([0, 1, 1, 0], rows) > 0)
        tokens.append(tmp_path / f"{name}.tokens.npz")
        metas[name] = table.save(tokens[-1], {
            "data": str(data / f"{name}.jsonl"), "data_fingerprint": described[name]["sha256"][:16],
            "tokenizer": "org/tiny", "tokenizer_revision": "v1", "tokenizer_commit": tokenizer_commit,
            "tokenizer_fingerprint": "abc"})
        if name == "pool":
            losses = np.where(table.loss_mask, 1.5, np.nan).astype(np.float32)
    save_array(tmp_path / "pool.loss.npy", losses, {
        "kind": "loss", "model": "org/tiny", "model_revision": "v1", "model_commit": model_commit,
        "model_fingerprint": f"hub:org/tiny@{model_commit}", "tokens": str(tokens[0]),
        "tokens_fingerprint": metas["pool"]["fingerprint"]})
    return data, tokens, [tmp_path / "pool.loss.npy"], described


def test_provenance_gathers_data_hashes_model_commit_and_package_versions(tmp_path):
    from importlib.metadata import version

    out_json, out_md = tmp_path / "provenance.json", tmp_path / "provenance.md"
    data, tokens, losses, described = experiment_files(tmp_path)
    assert main(["provenance", "--data-dir", str(data), "--tokens", *map(str, tokens), "--losses", *map(str, losses),
                 "--base-model", "org/tiny", "--revision", "v1", "--out-json", str(out_json),
                 "--out-md", str(out_md)]) == 0
    record = json.loads(out_json.read_text())
    assert record["data"]["pool"]["sha256"] == described["pool"]["sha256"]  # the full sha256 of the file
    assert record["data"]["warmup"]["records"] == 2 and record["data"]["pool"]["source"]["revision"] == "r1"
    assert record["base_model"] == {"name": "org/tiny", "revision": "v1", "commits": [MAIN],
                                    "fingerprints": [f"hub:org/tiny@{MAIN}"]}
    assert record["token_tables"][str(tokens[0])]["tokenizer_fingerprint"] == "abc"
    assert record["packages"]["torch"] == version("torch") and record["packages"]["peft"] == version("peft")
    assert record["packages"]["lm_eval"] == version("lm_eval") and record["packages"]["tokenclean"]
    assert record["warnings"] == []
    md = out_md.read_text()
    assert MAIN in md and described["pool"]["sha256"] in md and version("transformers") in md


def test_provenance_warns_of_moved_commits_and_refuses_changed_data(tmp_path, capsys):
    from tokenclean.provenance import gather

    data, tokens, losses, _ = experiment_files(tmp_path, tokenizer_commit=MAIN, model_commit=V1)
    record = gather(data, tokens, losses, "org/tiny")
    assert record["base_model"]["commits"] == [MAIN, V1] and "pin base_model.revision" in record["warnings"][0]
    (data / "pool.jsonl").write_text("{}\n")  # the file no longer is what data.json describes
    out = tmp_path / "out" / "provenance.json"
    assert main(["provenance", "--data-dir", str(data), "--tokens", *map(str, tokens), "--base-model", "org/tiny",
                 "--out-json", str(out), "--out-md", str(out.with_suffix(".md"))]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_evaluate_passes_the_revision_to_lm_eval(tmp_path, monkeypatch):
    import tokenclean.evaluation as evaluation

    seen = {}
    monkeypatch.setattr(evaluation, "evaluate_benchmarks", lambda model, benchmarks, out, **kw: seen.update(kw))
    assert main(["evaluate", "--model", "org/tiny", "--revision", "v1", "--benchmarks", '[{"task": "boolq"}]',
                 "--model-args", '{"add_bos_token": true}', "--out", str(tmp_path / "e.json")]) == 0
    assert seen["revision"] == "v1" and seen["model_args"] == {"add_bos_token": True}


def test_package_versions_name_tokenclean_run_from_a_checkout(monkeypatch):
    """On an offline node the package runs from the checkout (PYTHONPATH), not installed: its version is still
    recorded, a missing other package is None."""
    from importlib.metadata import PackageNotFoundError

    import tokenclean
    import tokenclean.provenance as provenance

    def version(name):
        if name in ("tokenclean", "peft"):
            raise PackageNotFoundError(name)
        return "9.9"

    monkeypatch.setattr(provenance, "version", version)
    versions = provenance.package_versions()
    assert versions["tokenclean"] == tokenclean.__version__ and versions["peft"] is None and versions["torch"] == "9.9"


def test_provenance_records_the_cpu_and_the_kernel_pin(tmp_path, monkeypatch):
    """The CPU, its vector flags, ATen's capability and the pin's variables (docs/numerics.md); a pin that cannot
    hold on the machine is a warning."""
    from tokenclean import numerics
    from tokenclean.provenance import gather, render_markdown

    data, tokens, losses, _ = experiment_files(tmp_path)
    monkeypatch.setenv(numerics.ENV, "avx2")
    monkeypatch.setattr(numerics, "problem", lambda level: None)
    record = gather(data, tokens, losses, "org/tiny")
    kernels = record["numerics"]
    assert kernels["level"] == "avx2" and kernels["holds"] and set(kernels["flags"] or {}) <= set(numerics.FLAGS)
    assert kernels["env"] == {name: os.environ.get(name) for name in numerics.VARIABLES}
    assert kernels["cpu_capability"] and record["warnings"] == []
    md = render_markdown(record)
    assert "## CPU numerics" in md and "kernel pin: avx2 (holds)" in md and kernels["cpu_capability"] in md
    monkeypatch.setattr(numerics, "problem", lambda level: "this CPU lacks avx2")
    record = gather(data, tokens, losses, "org/tiny")
    assert not record["numerics"]["holds"] and record["warnings"] == [
        "the CPU-kernel pin avx2 does not hold here: this CPU lacks avx2"]
    assert "does not hold: this CPU lacks avx2" in render_markdown(record)
