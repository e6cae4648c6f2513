"""Model provenance: a hub model is loaded at a pinned revision and the commit loaded is recorded (offline: a
hub cache laid out on disk, no network)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

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
    assert main(["loss", "--model", str(tiny_model_dir), "--revision", "v1", "--tokens", str(tokens),
                 "--out", str(tmp_path / "x.loss.npy")]) == 2
    assert main(["loss", "--model", "org/tiny", "--revision", "v9", "--tokens", str(tokens),
                 "--out", str(tmp_path / "y.loss.npy")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenclean loss: error:")]
    assert len(errors) == 2 and "local directory" in errors[0] and "org/tiny" in errors[1]
    assert not list(tmp_path.glob("*.loss.*"))
