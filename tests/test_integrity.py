"""Integrity of what is read back: every kind of file tokenclean reads back, cut short, bit-flipped or emptied, is
never used as if it were good. An artifact ends the command in one line (exit 2) naming the file, saying it is
damaged and what re-creates it (the workflow rule that makes it); a damaged training checkpoint is set aside and the
run restarts from the start, ending with the weights of an uninterrupted run."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from tokenclean.artifacts import TokenTable, made_by, save_array, sidecar_path

DAMAGES = ("truncated", "bit_flipped", "emptied")


def damage(path: Path, how: str, at: int | None = None) -> None:
    """Damage ``path`` in place as storage or a copy would: cut to half its length, one bit flipped (in the middle,
    or at byte ``at``), or emptied."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "emptied":
        path.write_bytes(b"")
    else:
        data[len(data) // 2 if at is None else at] ^= 0x04
        path.write_bytes(bytes(data))


def one_line_damage_error(capsys, command: str, path: Path, rule: str | None) -> str:
    """The command's stderr: one line, naming ``path``, saying it is damaged, and giving the remedy."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"tokenclean {command}: error: {path}: damaged ("), err
    assert "Traceback" not in err[0]
    if rule is not None:
        assert f"--forcerun {rule}" in err[0] and "delete " in err[0], err[0]
    return err[0]


# ---------------------------------------------------------------------------------------------------------
# token tables, per-token arrays and their sidecars (read through TokenTable.load and load_array)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture()
def arrays(tmp_path) -> dict[str, Path]:
    """A token table, two loss arrays and a mask on it, at their workflow paths (results/x/...)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 30, size=200)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offsets[-1])
    loss_mask = rng.random(n) < 0.6
    loss_mask[offsets[:-1]] = False
    table = TokenTable(rng.integers(3, 300, size=n), offsets, loss_mask)
    root = tmp_path / "results" / "x"
    tokens = root / "tokens" / "pool.tokens.npz"
    tmeta = table.save(tokens, {"tokenizer": "t"})
    out = {"tokens": tokens}
    for name in ("base", "warmup"):
        loss = np.where(loss_mask, rng.random(n), np.nan).astype(np.float32)
        out[name] = root / "losses" / name / "pool.loss.npy"
        save_array(out[name], loss, {"kind": "loss", "tokens": str(tokens), "tokens_fingerprint": tmeta["fingerprint"]})
    out["mask"] = root / "masks" / "full.mask.npy"
    save_array(out["mask"], loss_mask.copy(), {"kind": "mask", "tokens": str(tokens),
                                               "tokens_fingerprint": tmeta["fingerprint"]})
    return out


def select_args(a: dict[str, Path], out: Path) -> list[str]:
    return ["select", "--method", "fixed", "--ratio", "0.5", "--seed", "0", "--tokens", str(a["tokens"]),
            "--base-loss", str(a["base"]), "--ref-loss", str(a["warmup"]), "--out", str(out)]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind,rule", [("tokens", "tokenize"), ("base", "token_loss"), ("tokens_sidecar", "tokenize"),
                                       ("base_sidecar", "token_loss")])
def test_a_damaged_table_or_array_stops_the_command_naming_it_and_its_rule(arrays, tmp_path, capsys, kind, rule, how):
    from tokenclean.cli import main

    target = arrays[kind.removesuffix("_sidecar")]
    if kind.endswith("_sidecar"):
        target = sidecar_path(target)
        # a sidecar's bit flip that changes what it says about the array: one in its recorded fingerprint
        at = target.read_text().index('"fingerprint": "') + len('"fingerprint": "') + 3
        damage(target, how, at)
    else:
        damage(target, how)
    out = tmp_path / "results" / "x" / "masks" / "fixed_r0.5.mask.npy"
    assert main(select_args(arrays, out)) == 2
    damaged = target if not kind.endswith("_sidecar") or how != "bit_flipped" else arrays[kind.removesuffix("_sidecar")]
    one_line_damage_error(capsys, "select", damaged, rule)
    assert not out.exists()


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_mask_stops_the_command_naming_it_and_its_rule(arrays, tmp_path, capsys, how):
    from tokenclean.cli import main

    damage(arrays["mask"], how)
    out = tmp_path / "export"
    assert main(["export", "--tokens", str(arrays["tokens"]), "--mask", str(arrays["mask"]), "--format", "jsonl",
                 "--out", str(out)]) == 2
    one_line_damage_error(capsys, "export", arrays["mask"], "select")
    assert not out.exists()


def test_a_table_damaged_where_a_format_check_also_catches_it_gives_the_damage_message(arrays, tmp_path, capsys):
    """Swapped offsets break the table's format, but its sidecar's fingerprint says the file changed since written."""
    from tokenclean.cli import main

    with np.load(arrays["tokens"]) as z:
        members = {k: z[k] for k in z.files}
    members["offsets"][[3, 4]] = members["offsets"][[4, 3]]
    np.savez(arrays["tokens"], **members)
    out = tmp_path / "m.npy"
    assert main(["select", "--method", "full", "--tokens", str(arrays["tokens"]), "--out", str(out)]) == 2
    assert "do not match the fingerprint" in one_line_damage_error(capsys, "select", arrays["tokens"], "tokenize")


# ---------------------------------------------------------------------------------------------------------
# model directories (every file the model dir holds is checked against tokenclean.json before any load)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made_model(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny model directory as tokenclean makes one (with its tokenclean.json record), at a workflow path."""
    from transformers import AutoTokenizer

    from tokenclean.models import save_model, tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, hidden=32, layers=2,
                       heads=2, intermediate=64, seed=0)
    d = tmp_path_factory.mktemp("made") / "results" / "x" / "models" / "warmup"
    save_model(model, tok, d, {"kind": "model"})
    return d


@pytest.fixture(scope="module")
def model_tokens(made_model, tmp_path_factory) -> Path:
    from tokenclean.cli import main

    work = tmp_path_factory.mktemp("model_tokens")
    data = work / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and 5 .", "completion": "Sure ! The answer is 8 ."}) + "\n"
                            for i in range(4)))
    tokens = work / "d.tokens.npz"
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(made_model), "--max-length", "64",
                 "--out", str(tokens)]) == 0
    return tokens


def test_a_model_made_by_tokenclean_records_the_checksum_of_every_file(made_model):
    from tokenclean.artifacts import sha256_file

    files = json.loads((made_model / "tokenclean.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert all(sha256_file(made_model / name) == digest for name, digest in files.items())


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "tokenclean.json"])
def test_a_damaged_model_directory_is_never_loaded(made_model, model_tokens, tmp_path, capsys, name, how):
    from tokenclean.cli import main

    d = tmp_path / "results" / "x" / "models" / "warmup"
    shutil.copytree(made_model, d)
    if name == "tokenclean.json" and how == "bit_flipped":  # a flip in what it records: a checksum
        text = (d / name).read_text()
        at = text.index('"model.safetensors": "') + len('"model.safetensors": "') + 5
        damage(d / name, how, at)
        damaged = d / "model.safetensors"
    else:
        damage(d / name, how)
        damaged = d / name
    out = tmp_path / "pool.loss.npy"
    assert main(["loss", "--model", str(d), "--tokens", str(model_tokens), "--out", str(out)]) == 2
    one_line_damage_error(capsys, "loss", damaged, "warmup")
    assert not out.exists()


def test_a_model_without_a_record_loads_as_before(tiny_model_dir, model_tokens, tmp_path):
    """A model tokenclean did not make (no tokenclean.json: a hub model, a user's directory) has nothing to check."""
    from tokenclean.cli import main

    assert not (tiny_model_dir / "tokenclean.json").exists()
    out = tmp_path / "pool.loss.npy"
    assert main(["loss", "--model", str(tiny_model_dir), "--tokens", str(model_tokens), "--out", str(out)]) == 0


def test_a_damaged_model_is_refused_by_evaluation_too(made_model, tmp_path):
    """lm-eval loads the directory itself: the check runs before it does."""
    from tokenclean.artifacts import ArtifactError
    from tokenclean.evaluation import make_lm

    d = tmp_path / "m"
    shutil.copytree(made_model, d)
    damage(d / "model.safetensors", "bit_flipped")
    with pytest.raises(ArtifactError, match=r"model\.safetensors: damaged"):
        make_lm(d, device="cpu")


# ---------------------------------------------------------------------------------------------------------
# files the report reads: evaluation results and tables (no checksum; a file cut short or emptied still names
# the rule that re-creates it)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["truncated", "emptied"])
def test_a_damaged_evaluation_result_names_the_evaluate_rule(tmp_path, capsys, how):
    from tokenclean.cli import main

    ev = tmp_path / "results" / "x" / "eval" / "full_s1.json"
    ev.parent.mkdir(parents=True)
    ev.write_text(json.dumps({"metrics": {"tc_add": {"exact_match": 0.5}}, "average": {"exact_match": 0.5}},
                             indent=2))
    damage(ev, how)
    assert main(["report", str(ev), "--out-csv", str(tmp_path / "t.csv"), "--out-md", str(tmp_path / "t.md")]) == 2
    one_line_damage_error(capsys, "report", ev, "evaluate")


@pytest.mark.parametrize("how", ["truncated", "emptied"])
def test_a_damaged_table_names_the_report_rule(tmp_path, how):
    """A table a later rule reads (figures, compare) that was cut short or emptied: the reader's one line says
    what is wrong and what re-creates it."""
    from tokenclean.artifacts import ArtifactError, csv_text, read_csv_rows

    table = tmp_path / "results" / "x" / "table.csv"
    table.parent.mkdir(parents=True)
    table.write_text(csv_text([{"method": "full", "average_mean": 0.5 + i / 100} for i in range(3)]))
    damage(table, how, at=None)
    if how == "truncated":  # cut inside the header: the rows' number cells no longer line up
        table.write_text(table.read_text().splitlines()[0][:8] + "\n")
    with pytest.raises(ArtifactError, match=r"table\.csv: .*; re-create it: delete .*table\.csv and run snakemake "
                                            r"again, or run snakemake with --forcerun report$"):
        read_csv_rows(table, ["method"])


# ---------------------------------------------------------------------------------------------------------
# training checkpoints: set aside and restarted, never resumed
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_setup(tok):
    from transformers import AutoModelForCausalLM  # noqa: F401  (imported once for the module)

    from tokenclean.data import parse_record
    from tokenclean.tokenization import tokenize_records

    texts = [("Add 3 and 5 .", "Sure ! The answer is 8 ."), ("hello", "fine thanks and you"),
             ("how are you ?", "the quick brown fox"), ("x y z", "Hope this helps .")]
    recs = [parse_record({"prompt": p, "completion": c}, f"x:{i}") for i, (p, c) in enumerate(texts)]
    return tokenize_records(recs, tok, 64)[0]


@pytest.fixture(scope="module")
def straight(train_setup, tiny_model_dir, tok, tmp_path_factory):
    """The weights of an uninterrupted run, and the settings it used."""
    from transformers import AutoModelForCausalLM

    from tokenclean.training import TrainConfig, train_model

    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, warmup_ratio=0.25, seed=5, checkpoint_every=2)
    model, _ = train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), train_setup,
                           train_setup.loss_mask.copy(), cfg, tok.pad_token_id, progress=False,
                           checkpoint_dir=tmp_path_factory.mktemp("straight") / "checkpoint")
    return cfg, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["weights.safetensors", "optimizer.safetensors", "state.json"])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_restarts(train_setup, tiny_model_dir, tok, straight, tmp_path,
                                                                caplog, name, how):
    import torch
    from transformers import AutoModelForCausalLM

    from tokenclean.training import TrainingInterrupted, train_model

    cfg, expected = straight
    checkpoint = tmp_path / "out.resume" / "checkpoint"
    with pytest.raises(TrainingInterrupted):  # killed after step 3: its checkpoint is from step 2
        train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), train_setup, train_setup.loss_mask.copy(),
                    cfg, tok.pad_token_id, progress=False, checkpoint_dir=checkpoint, stop_after=3)
    damage(checkpoint / name, how)
    damaged_bytes = (checkpoint / name).read_bytes()
    with caplog.at_level(logging.WARNING, logger="tokenclean.training"):
        model, _ = train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), train_setup,
                                     train_setup.loss_mask.copy(), cfg, tok.pad_token_id, progress=False,
                                     checkpoint_dir=checkpoint)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    aside = checkpoint.with_name("checkpoint.damaged-1")
    assert len(warnings) == 1 and str(checkpoint) in warnings[0] and "damaged" in warnings[0], warnings
    assert str(aside) in warnings[0] and "restarts from the start" in warnings[0]
    assert (aside / name).read_bytes() == damaged_bytes  # set aside, not deleted
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, model.parameters()))


def test_a_checkpoint_whose_files_are_intact_still_resumes(train_setup, tiny_model_dir, tok, straight, tmp_path,
                                                            caplog):
    import torch
    from transformers import AutoModelForCausalLM

    from tokenclean.training import TrainingInterrupted, train_model

    cfg, expected = straight
    checkpoint = tmp_path / "checkpoint"
    with pytest.raises(TrainingInterrupted):
        train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), train_setup, train_setup.loss_mask.copy(),
                    cfg, tok.pad_token_id, progress=False, checkpoint_dir=checkpoint, stop_after=3)
    assert set(json.loads((checkpoint / "state.json").read_text())["files"]) == {"weights.safetensors",
                                                                                  "optimizer.safetensors"}
    with caplog.at_level(logging.INFO, logger="tokenclean.training"):
        model, _ = train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), train_setup,
                               train_setup.loss_mask.copy(), cfg, tok.pad_token_id, progress=False,
                               checkpoint_dir=checkpoint)
    assert any("resuming from" in r.getMessage() for r in caplog.records)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, model.parameters()))


def test_a_training_log_line_cut_short_is_dropped_on_resume(tmp_path, caplog):
    from tokenclean.training import _log_lines_until

    log_path = tmp_path / "train_log.jsonl"
    log_path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="tokenclean.training"):
        assert _log_lines_until(log_path, 2) == ['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.9}']
    assert len(caplog.records) == 1 and "1 unreadable line" in caplog.records[0].getMessage()


# ---------------------------------------------------------------------------------------------------------
# which rule makes what: the one mapping (artifacts.made_by) agrees with the workflow's plan
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_made_by_names_the_rule_of_every_output_a_later_rule_reads(tmp_path):
    from tests.snakemake_plan import ROOT, plan

    jobs = plan(tmp_path, ROOT / "configs" / "smoke.yaml")["jobs"]
    checked = 0
    for job in jobs:
        for out in job["output"]:
            if Path(out).suffix in (".png", ".md", ".tex", ".html"):
                continue
            inside = [out]
            if "/models/" in out:
                inside += [f"{out}/model.safetensors", f"{out}/tokenclean.json"]
            elif not Path(out).suffix:  # the world's (or the data's) directory
                inside += [f"{out}/{Path(out).name}.json", f"{out}/pool.jsonl"]
            if Path(out).suffix in (".npy", ".npz"):
                inside.append(str(sidecar_path(out)))
            for path in inside:
                assert made_by(path) == (job["rule"], Path(out)), (path, job["rule"])
                checked += 1
    assert checked > 50


def test_made_by_knows_nothing_outside_the_workflow_layout():
    assert made_by("/home/me/my.loss.npy") is None and made_by("data.tokens.npz") is None


def test_load_model_checks_the_record_itself(made_model, tmp_path):
    """A caller that loads only the model (the LoRA merge's start weights, lm-eval's own loader) is checked too."""
    from tokenclean.artifacts import ArtifactError
    from tokenclean.models import load_model

    d = tmp_path / "m"
    shutil.copytree(made_model, d)
    damage(d / "model.safetensors", "bit_flipped")
    with pytest.raises(ArtifactError, match=r"model\.safetensors: damaged"):
        load_model(str(d), "cpu")
