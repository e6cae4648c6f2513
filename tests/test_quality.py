"""Ground-truth rows and measures: the ground-truth masks, concatenated tables, the cleaning-quality table."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from tests.listing import all_files
from tokenclean.artifacts import TokenTable, save_array
from tokenclean.data import TOKEN_CLASSES
from tokenclean.report.quality import class_counts, write_quality
from tokenclean.selection import select
from tokenclean.tokenization import concat_files


def labelled_table(seed: int, n_samples: int = 12) -> TokenTable:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 20, n_samples)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offsets[-1])
    loss_mask = rng.random(n) < 0.6
    loss_mask[offsets[:-1]] = False
    token_class = np.where(loss_mask, rng.integers(0, len(TOKEN_CLASSES), n), -1).astype(np.int8)
    return TokenTable(rng.integers(0, 50, n), offsets, loss_mask,
                      {"token_class": token_class, "sample_index": np.arange(n_samples)})


def test_labelled_tables_hold_every_class():
    """The brute-force tests below see every class, novel included, inside and outside loss_mask."""
    cls, resp = labelled_table(0).extras["token_class"], labelled_table(0).loss_mask
    assert set(cls[resp].tolist()) == set(range(len(TOKEN_CLASSES))) and "novel" in TOKEN_CLASSES


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truth_drop_noisy_keeps_every_response_token_but_the_corrupted_and_garbage_ones(seed):
    table = labelled_table(seed)
    mask = select("truth_drop_noisy", table)
    for p in range(table.n_tokens):
        name = TOKEN_CLASSES[table.extras["token_class"][p]] if table.loss_mask[p] else None
        assert mask[p] == (table.loss_mask[p] and name not in ("corrupted", "garbage")), p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truth_keep_informative_keeps_exactly_the_informative_and_novel_tokens(seed):
    table = labelled_table(seed)
    mask = select("truth_keep_informative", table)
    for p in range(table.n_tokens):
        name = TOKEN_CLASSES[table.extras["token_class"][p]] if table.loss_mask[p] else None
        assert mask[p] == (table.loss_mask[p] and name in ("informative", "novel")), p


@pytest.mark.parametrize("method", ["truth_drop_noisy", "truth_keep_informative"])
def test_truth_rows_refuse_data_without_labels(method):
    table = labelled_table(1)
    table.extras.pop("token_class")
    with pytest.raises(ValueError, match=f"method '{method}' needs ground-truth token classes"):
        select(method, table)


@pytest.mark.parametrize("method", ["truth_drop_noisy", "truth_keep_informative"])
def test_select_command_on_data_without_labels_is_one_line_naming_the_table(method, tmp_path, capsys):
    from tokenclean.cli import main

    table = labelled_table(3)
    table.extras.pop("token_class")
    table.save(tmp_path / "pool.tokens.npz", {"tokenizer_fingerprint": "t"})
    before = all_files(tmp_path)
    code = main(["select", "--method", method, "--tokens", str(tmp_path / "pool.tokens.npz"),
                 "--out", str(tmp_path / "m.mask.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert err == (f"tokenclean select: error: {tmp_path / 'pool.tokens.npz'}: method '{method}' needs ground-truth "
                   "token classes, which only the embedded world has")
    assert all_files(tmp_path) == before  # no mask, sidecar or temporary


def test_oracle_is_no_method_any_more():
    with pytest.raises(ValueError, match=r"unknown method 'oracle'.*truth_drop_noisy, truth_keep_informative"):
        select("oracle", labelled_table(1))


def test_class_counts_match_a_plain_count():
    table = labelled_table(2)
    rng = np.random.default_rng(3)
    keep = table.loss_mask & (rng.random(table.n_tokens) < 0.5)
    row = class_counts(table.extras["token_class"], table.loss_mask, keep)
    resp = [p for p in range(table.n_tokens) if table.loss_mask[p]]
    for c, name in enumerate(TOKEN_CLASSES):
        members = [p for p in resp if table.extras["token_class"][p] == c]
        assert row[f"kept_{name}"] == pytest.approx(sum(keep[p] for p in members) / len(members))
    # "informative" for precision and recall: both classes of tokens worth learning, informative and novel
    worth = [p for p in resp if TOKEN_CLASSES[table.extras["token_class"][p]] in ("informative", "novel")]
    kept = [p for p in resp if keep[p]]
    worth_kept = [p for p in worth if keep[p]]
    assert row["precision_informative"] == pytest.approx(len(worth_kept) / len(kept))
    assert row["recall_informative"] == pytest.approx(len(worth_kept) / len(worth))


def test_class_counts_by_hand_with_novel_tokens():
    names = ["informative", "novel", "novel", "boilerplate", "garbage", "novel", "informative", "corrupted", "x"]
    token_class = np.array([TOKEN_CLASSES.index(n) if n != "x" else -1 for n in names], dtype=np.int8)
    loss_mask = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    keep = np.array([1, 1, 0, 1, 1, 0, 0, 0, 0], dtype=bool)
    row = class_counts(token_class, loss_mask, keep)
    assert (row["n_novel"], row["kept_novel"]) == (3, pytest.approx(1 / 3))  # what the reference could not know
    assert (row["n_informative"], row["kept_informative"]) == (2, 0.5)
    assert row["n_kept"] == 4 and row["precision_informative"] == pytest.approx(2 / 4)  # informative 0, novel 1
    assert row["recall_informative"] == pytest.approx(2 / 5)  # of 2 informative + 3 novel
    assert row["kept_boilerplate"] == 1.0 and row["kept_garbage"] == 1.0 and row["kept_corrupted"] == 0.0


def test_quality_csv_and_concat(tmp_path):
    a, b = labelled_table(4), labelled_table(5, n_samples=7)
    meta = {"tokenizer_fingerprint": "same"}
    a.save(tmp_path / "a.tokens.npz", meta)
    b.save(tmp_path / "b.tokens.npz", meta)
    both = concat_files([tmp_path / "a.tokens.npz", tmp_path / "b.tokens.npz"], tmp_path / "ab.tokens.npz")
    ab, _ = TokenTable.load(tmp_path / "ab.tokens.npz")
    assert both["n_samples"] == 19 and ab.n_tokens == a.n_tokens + b.n_tokens
    for i in range(a.n_samples):
        assert np.array_equal(ab.input_ids[ab.offsets[i]:ab.offsets[i + 1]], a.input_ids[a.offsets[i]:a.offsets[i + 1]])
    for j in range(b.n_samples):
        i = a.n_samples + j
        assert np.array_equal(ab.loss_mask[ab.offsets[i]:ab.offsets[i + 1]], b.loss_mask[b.offsets[j]:b.offsets[j + 1]])
    assert list(ab.extras["source"]) == [0] * 12 + [1] * 7
    assert np.array_equal(ab.extras["token_class"], np.concatenate([a.extras["token_class"], b.extras["token_class"]]))

    fingerprint = TokenTable.load(tmp_path / "a.tokens.npz")[1]["fingerprint"]
    save_array(tmp_path / "truth_drop_noisy.mask.npy", select("truth_drop_noisy", a),
               {"tokens_fingerprint": fingerprint})
    save_array(tmp_path / "full.mask.npy", a.loss_mask.copy(), {"tokens_fingerprint": fingerprint})
    write_quality(tmp_path / "a.tokens.npz", [tmp_path / "full.mask.npy", tmp_path / "truth_drop_noisy.mask.npy"],
                  tmp_path / "q.csv")
    rows = {r["mask"]: r for r in csv.DictReader((tmp_path / "q.csv").read_text().splitlines())}
    truth = rows["truth_drop_noisy"]
    assert float(rows["full"]["kept_garbage"]) == 1.0 and float(truth["kept_garbage"]) == 0.0
    assert float(truth["kept_corrupted"]) == 0.0 and float(truth["recall_informative"]) == 1.0


def test_concat_refuses_mixed_tokenizers(tmp_path):
    labelled_table(6).save(tmp_path / "a.tokens.npz", {"tokenizer_fingerprint": "x"})
    labelled_table(7).save(tmp_path / "b.tokens.npz", {"tokenizer_fingerprint": "y"})
    with pytest.raises(ValueError, match="different tokenizers"):
        concat_files([tmp_path / "a.tokens.npz", tmp_path / "b.tokens.npz"], tmp_path / "ab.tokens.npz")
    assert not (tmp_path / "ab.tokens.npz").exists()


def test_auroc_matches_counting_every_pair():
    from tokenclean.report.quality import auroc

    rng = np.random.default_rng(3)
    for _ in range(20):
        pos = rng.integers(0, 6, rng.integers(1, 15)).astype(float)  # small integers: many ties
        neg = rng.integers(0, 6, rng.integers(1, 15)).astype(float)
        pairs = [(1.0 if p > q else 0.5 if p == q else 0.0) for p in pos for q in neg]
        assert auroc(pos, neg) == pytest.approx(np.mean(pairs))
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0


def test_separation_rows_follow_the_classes():
    from tokenclean.report.quality import separation_rows

    table = labelled_table(4, n_samples=40)
    cls, resp = table.extras["token_class"], table.loss_mask
    rng = np.random.default_rng(0)
    base = rng.random(table.n_tokens).astype(np.float32) + 2
    ref = base.copy()
    ref[resp & (cls == TOKEN_CLASSES.index("informative"))] -= 1.0      # the reference learned the answers
    ref[resp & (cls == TOKEN_CLASSES.index("garbage"))] += 1.0          # and unlearned the junk
    ref[resp & (cls == TOKEN_CLASSES.index("novel"))] += 2.0            # and never saw the pool's own knowledge
    ref[~resp] = np.nan
    rows = {r["class"]: r for r in separation_rows(cls, resp, base, ref)}
    assert rows["informative"]["mean_score"] == pytest.approx(1.0, abs=1e-6)
    assert rows["garbage"]["mean_score"] == pytest.approx(-1.0, abs=1e-6)
    assert rows["informative"]["auroc_vs_noisy"] == 1.0
    assert 0.3 < rows["boilerplate"]["auroc_vs_noisy"] < 1.0  # ties with corrupted (score 0), above garbage
    assert rows["novel"]["mean_score"] == pytest.approx(-2.0, abs=1e-6)  # the reference's blind spot
    assert rows["novel"]["auroc_vs_noisy"] == 0.0  # below every noisy token (garbage -1, corrupted 0)
    assert np.isnan(rows["garbage"]["auroc_vs_noisy"]) and np.isnan(rows["corrupted"]["auroc_vs_noisy"])
    assert sum(r["n_tokens"] for r in rows.values()) == int(resp.sum())


def online_record(path, table: TokenTable, weights: np.ndarray, fingerprint: str) -> None:
    """An online run's weights.npy as the trainer writes it (kind weights, NaN where never trained)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_array(path, weights.astype(np.float32), {"kind": "weights", "tokens_fingerprint": fingerprint})


def test_soft_class_counts_match_a_weighted_count_and_a_mask_as_zeros_and_ones():
    table = labelled_table(8, n_samples=30)
    rng = np.random.default_rng(5)
    kept = np.where(table.loss_mask, rng.random(table.n_tokens), 0.0)
    kept[rng.random(table.n_tokens) < 0.2] = 0.0
    row = class_counts(table.extras["token_class"], table.loss_mask, kept)
    resp = [p for p in range(table.n_tokens) if table.loss_mask[p]]
    for c, name in enumerate(TOKEN_CLASSES):
        members = [p for p in resp if table.extras["token_class"][p] == c]
        assert row[f"kept_{name}"] == pytest.approx(sum(kept[p] for p in members) / len(members))
    worth = [p for p in resp if TOKEN_CLASSES[table.extras["token_class"][p]] in ("informative", "novel")]
    assert row["n_kept"] == pytest.approx(sum(kept[p] for p in resp))
    assert row["precision_informative"] == pytest.approx(sum(kept[p] for p in worth) / sum(kept[p] for p in resp))
    assert row["recall_informative"] == pytest.approx(sum(kept[p] for p in worth) / len(worth))
    # a 0/1 record gives exactly the row of the mask it equals
    mask = kept > 0.5
    assert class_counts(table.extras["token_class"], table.loss_mask, mask.astype(float)) == pytest.approx(
        {**class_counts(table.extras["token_class"], table.loss_mask, mask), "n_kept": float(mask.sum())})


def test_an_online_runs_record_is_a_row_of_the_quality_table_named_by_its_run(tmp_path):
    table = labelled_table(9, n_samples=20)
    meta = table.save(tmp_path / "pool.tokens.npz", {"tokenizer_fingerprint": "t"})
    rng = np.random.default_rng(1)
    # Rho-1 over two passes: each trained token kept 0, 1 or 2 times; one sample never trained (NaN)
    weights = np.where(table.loss_mask, rng.integers(0, 3, table.n_tokens) / 2, np.nan)
    weights[table.offsets[3]:table.offsets[4]] = np.nan
    record = tmp_path / "models" / "sft" / "rho1_r0.6_s2" / "weights.npy"
    online_record(record, table, weights, meta["fingerprint"])
    save_array(tmp_path / "full.mask.npy", table.loss_mask.copy(), {"tokens_fingerprint": meta["fingerprint"]})
    write_quality(tmp_path / "pool.tokens.npz", [tmp_path / "full.mask.npy", record], tmp_path / "q.csv")
    rows = {r["mask"]: r for r in csv.DictReader((tmp_path / "q.csv").read_text().splitlines())}
    assert rows["full"]["record"] == "mask" and rows["rho1_r0.6_s2"]["record"] == "weights"
    resp = [p for p in range(table.n_tokens) if table.loss_mask[p]]
    for c, name in enumerate(TOKEN_CLASSES):  # brute force: never trained counts as dropped
        members = [p for p in resp if table.extras["token_class"][p] == c]
        expected = sum(0.0 if np.isnan(weights[p]) else weights[p] for p in members) / len(members)
        assert float(rows["rho1_r0.6_s2"][f"kept_{name}"]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("bad, message", [
    (2.0, "holds weights outside [0, 1], which cannot be read as a kept fraction"),
    ("other", "made on"),
])
def test_a_record_that_is_no_kept_fraction_of_this_pool_is_one_line(tmp_path, capsys, bad, message):
    from tokenclean.cli import main

    table = labelled_table(10)
    meta = table.save(tmp_path / "pool.tokens.npz", {"tokenizer_fingerprint": "t"})
    weights = np.where(table.loss_mask, 0.5, np.nan)
    if bad == 2.0:
        weights[np.flatnonzero(table.loss_mask)[0]] = bad
    record = tmp_path / "dft_s0" / "weights.npy"
    online_record(record, table, weights, meta["fingerprint"] if bad == 2.0 else "another table")
    code = main(["quality", str(record), "--tokens", str(tmp_path / "pool.tokens.npz"),
                 "--out", str(tmp_path / "q.csv")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith(f"tokenclean quality: error: {record}: "), err
    assert message in err and not (tmp_path / "q.csv").exists()
