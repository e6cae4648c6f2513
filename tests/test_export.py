"""tokenclean export: the written labels select exactly our trained tokens, and outside trainers read them as such."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenclean.artifacts import TokenTable, save_array
from tokenclean.cli import main
from tokenclean.data import parse_record
from tokenclean.export import export_file
from tokenclean.tokenization import tokenize_records

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [("Add 3 and 5 .", "Sure ! The answer is 8 ."), ("hello", "fine thanks and you"),
         ("how are you ?", "the quick brown fox"), ("Reverse the letters : c a t", "t a c"),
         ("x y z", "Hope this helps ."), ("what", "the lazy dog jumps")]


@pytest.fixture()
def files(tok, tmp_path):
    """A saved table, a mask that keeps about half its response tokens and none of sample 1, and weights."""
    recs = [parse_record({"prompt": p, "completion": c}, f"x:{i}") for i, (p, c) in enumerate(TEXTS)]
    table = tokenize_records(recs, tok, 64)[0]
    tokens = tmp_path / "pool.tokens.npz"
    tmeta = table.save(tokens, {"tokenizer": "tiny"})
    rng = np.random.default_rng(0)
    mask = table.loss_mask & (rng.random(table.n_tokens) < 0.5)
    for i in range(table.n_samples):  # every sample keeps its first response token, but sample 1 keeps none
        a, b = table.offsets[i], table.offsets[i + 1]
        mask[a:b] = False if i == 1 else mask[a:b]
        mask[a + np.flatnonzero(table.loss_mask[a:b])[0]] = i != 1
    made_on = {"tokens": str(tokens), "tokens_fingerprint": tmeta["fingerprint"]}
    save_array(tmp_path / "pool.mask.npy", mask, {"kind": "mask", **made_on})
    weights = np.where(table.loss_mask, rng.random(table.n_tokens), np.nan).astype(np.float32)  # NaN: no response
    save_array(tmp_path / "pool.weights.npy", weights, {"kind": "weights", **made_on})
    return table, tokens, tmp_path / "pool.mask.npy", tmp_path / "pool.weights.npy", mask, weights


def brute_force_rows(table: TokenTable, mask: np.ndarray, weights: np.ndarray, keep_empty: bool) -> list[dict]:
    """The rows as a plain loop over the table: token t is trained iff loss_mask[t] and mask[t]."""
    rows = []
    for i in range(table.n_samples):
        row = {"input_ids": [], "labels": [], "attention_mask": [], "weights": []}
        for t in range(table.offsets[i], table.offsets[i + 1]):
            trained = bool(table.loss_mask[t] and mask[t])
            row["input_ids"].append(int(table.input_ids[t]))
            row["labels"].append(int(table.input_ids[t]) if trained else -100)
            row["attention_mask"].append(1)
            row["weights"].append(float(weights[t]) if trained else 0.0)
        if keep_empty or any(label != -100 for label in row["labels"]):
            rows.append(row)
    return rows


@pytest.mark.parametrize("keep_empty", [False, True])
def test_labels_are_the_input_ids_exactly_where_trained(files, tmp_path, keep_empty):
    from datasets import load_from_disk

    table, tokens, mask_path, weights_path, mask, weights = files
    out = tmp_path / "export"
    assert main(["export", "--tokens", str(tokens), "--mask", str(mask_path), "--weights", str(weights_path),
                 "--out", str(out)] + (["--keep-empty"] if keep_empty else [])) == 0
    rows = list(load_from_disk(str(out)))
    expected = brute_force_rows(table, mask, weights, keep_empty)
    assert rows == expected
    assert len(rows) == table.n_samples - (0 if keep_empty else 1)  # sample 1 keeps no token
    record = json.loads((out / "export.json").read_text())
    assert record["n_samples"] == len(expected) and record["n_samples_dropped"] == (0 if keep_empty else 1)
    assert record["n_trained_tokens"] == int(mask.sum()) == sum(label != -100 for r in rows for label in r["labels"])
    assert record["n_tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert record["mask_fingerprint"] and record["tokens_fingerprint"] == table.fingerprint()


def test_without_a_mask_every_response_token_is_trained(files, tmp_path):
    from datasets import load_from_disk

    table, tokens = files[:2]
    export_file(tokens, tmp_path / "export")
    rows = list(load_from_disk(str(tmp_path / "export")))
    expected = brute_force_rows(table, table.loss_mask, np.zeros(table.n_tokens), keep_empty=False)
    assert [{k: r[k] for k in ("input_ids", "labels")} for r in rows] == \
        [{k: r[k] for k in ("input_ids", "labels")} for r in expected]
    assert "weights" not in rows[0]


def test_trainer_loss_on_the_export_is_our_mean_nll_over_the_selected_tokens(files, tmp_path, tok, tiny_model_dir):
    """transformers.Trainer with a stock collator (labels padded with -100) on the exported dataset computes, on
    its first batch, the mean NLL of exactly the tokens our trainer trains: the -100 labels select our tokens."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tokenclean.batching import collate
    from tokenclean.loss import target_nll

    table, tokens, mask_path, _, mask, _ = files
    export_file(tokens, tmp_path / "export", mask_path)
    dataset = load_from_disk(str(tmp_path / "export"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    samples = np.flatnonzero(np.add.reduceat(mask, table.offsets[:-1]) > 0)
    batch = collate(table, samples, tok.pad_token_id, mask=mask)
    with torch.no_grad():
        ours = float(target_nll(model, batch["input_ids"], batch["attention_mask"], batch["target"]).mean())
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=len(dataset),
                             max_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    result = trainer.train()
    assert result.training_loss == pytest.approx(ours, abs=1e-5)
    # the weights of the step changed: a training step really ran on these labels
    assert not torch.equal(model.lm_head.weight.cpu(),
                           AutoModelForCausalLM.from_pretrained(tiny_model_dir).lm_head.weight)


def test_jsonl_loads_with_datasets_to_the_same_rows(files, tmp_path):
    from datasets import load_dataset, load_from_disk

    _, tokens, mask_path, weights_path = files[:4]
    export_file(tokens, tmp_path / "hf", mask_path, weights_path, "hf")
    export_file(tokens, tmp_path / "jsonl", mask_path, weights_path, "jsonl")
    from_json = load_dataset("json", data_files=str(tmp_path / "jsonl" / "data.jsonl"), split="train",
                             cache_dir=str(tmp_path / "cache"))
    from_disk = load_from_disk(str(tmp_path / "hf"))
    assert from_json.column_names == from_disk.column_names == ["input_ids", "labels", "attention_mask", "weights"]
    assert list(from_json) == list(from_disk)
    assert json.loads((tmp_path / "jsonl" / "export.json").read_text())["format"] == "jsonl"


def _other_table(tmp_path: Path) -> Path:
    other = TokenTable(np.arange(4), np.array([0, 4]), np.array([False, True, True, True]))
    other.save(tmp_path / "other.tokens.npz", {})
    return tmp_path / "other.tokens.npz"


@pytest.mark.parametrize("case,expected", [
    ("missing tokens", "pool.tokens.npz: file not found"),
    ("missing mask", "nothing.mask.npy: file not found"),
    ("mask of another table", "pool.mask.npy: made on"),
    ("loss array as mask", "pool.loss.npy: is a loss array (X.loss.npy), expected a selection mask"),
    ("mask as weights", "pool.mask.npy: is a selection mask (X.mask.npy), expected"),
    ("mask outside loss_mask", "wide.mask.npy: selects a token outside the response tokens (loss_mask)"),
    ("negative weights", "negative.weights.npy: holds a negative or infinite weight on a response token"),
    ("empty selection", "none.mask.npy: selects no token at all"),
])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, case, expected):
    table, tokens, mask_path, _, mask, weights = files
    made_on = {"tokens": str(tokens), "tokens_fingerprint": table.fingerprint()}
    argv = ["export", "--tokens", str(tokens), "--out", str(tmp_path / "export")]
    if case == "missing tokens":
        tokens.unlink()
    elif case == "missing mask":
        argv += ["--mask", str(tmp_path / "nothing.mask.npy")]
    elif case == "mask of another table":
        argv[2] = str(_other_table(tmp_path))
        argv += ["--mask", str(mask_path)]
    elif case == "loss array as mask":
        save_array(tmp_path / "pool.loss.npy", np.zeros(table.n_tokens, np.float32), {"kind": "loss", **made_on})
        argv += ["--mask", str(tmp_path / "pool.loss.npy")]
    elif case == "mask as weights":
        argv += ["--weights", str(mask_path)]
    elif case == "mask outside loss_mask":
        save_array(tmp_path / "wide.mask.npy", np.ones(table.n_tokens, bool), {"kind": "mask", **made_on})
        argv += ["--mask", str(tmp_path / "wide.mask.npy")]
    elif case == "negative weights":
        bad = weights.copy()
        bad[np.flatnonzero(mask)[0]] = -1
        save_array(tmp_path / "negative.weights.npy", bad, {"kind": "weights", **made_on})
        argv += ["--mask", str(mask_path), "--weights", str(tmp_path / "negative.weights.npy")]
    elif case == "empty selection":
        save_array(tmp_path / "none.mask.npy", np.zeros(table.n_tokens, bool), {"kind": "mask", **made_on})
        argv += ["--mask", str(tmp_path / "none.mask.npy")]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert code == 2 and len(err) == 1 and err[0].startswith("tokenclean export: error: ") and expected in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporaries


def test_a_weight_outside_the_trained_tokens_is_not_checked_and_written_as_zero(files, tmp_path):
    """An online method's array may hold NaN where a token was never trained; the column holds 0 there."""
    from datasets import load_from_disk

    table, tokens, mask_path, _, mask, weights = files
    nan_outside = np.where(mask, weights, np.nan).astype(np.float32)
    save_array(tmp_path / "nan.weights.npy", nan_outside,
               {"kind": "weights", "tokens": str(tokens), "tokens_fingerprint": table.fingerprint()})
    export_file(tokens, tmp_path / "export", mask_path, tmp_path / "nan.weights.npy")
    rows = list(load_from_disk(str(tmp_path / "export")))
    assert rows == brute_force_rows(table, mask, weights, keep_empty=False)


def test_the_export_command_parses_without_torch():
    code = ("import sys; from tokenclean.cli import build_parser; "
            "build_parser().parse_args(['export', '--tokens', 'a', '--out', 'b', '--format', 'jsonl']); "
            "import tokenclean.export; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_documented_commands_parse():
    from tokenclean.cli import build_parser

    doc = (ROOT / "docs" / "export.md").read_text()
    commands = [line.split()[1:] for line in doc.splitlines() if line.startswith("tokenclean export ")]
    assert len(commands) == 2
    for argv in commands:
        assert build_parser().parse_args(argv).command == "export"
