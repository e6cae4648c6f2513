"""The self-evolving chain's pieces: chunks of the pool, the rounds' step budget, the per-round curve."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tokenclean.artifacts import TokenTable
from tokenclean.report.table import write_rounds
from tokenclean.tokenization import chunk_range
from tokenclean.training import TrainConfig, round_config, round_steps


def ragged_table(n_samples: int, seed: int = 0) -> TokenTable:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, n_samples)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offsets[-1])
    loss_mask = rng.random(n) < 0.5
    loss_mask[offsets[:-1]] = False
    return TokenTable(rng.integers(0, 100, n), offsets, loss_mask,
                      {"token_class": rng.integers(0, 4, n).astype(np.int8), "sample_index": np.arange(n_samples)})


@pytest.mark.parametrize("n,chunks", [(10, 3), (9, 3), (7, 7), (100, 4), (5, 1)])
def test_chunks_cut_the_samples_into_contiguous_near_equal_parts(n, chunks):
    parts = [chunk_range(n, chunks, i) for i in range(1, chunks + 1)]
    assert [s for p in parts for s in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        chunk_range(n, chunks, chunks + 1)


def test_take_keeps_every_token_and_extra_of_the_chosen_samples():
    table = ragged_table(12)
    samples = np.array([7, 2, 3, 11])
    part = table.take(samples)
    for j, s in enumerate(samples):
        a, b = table.offsets[s], table.offsets[s + 1]
        c, d = part.offsets[j], part.offsets[j + 1]
        assert part.input_ids[c:d].tolist() == table.input_ids[a:b].tolist()
        assert part.loss_mask[c:d].tolist() == table.loss_mask[a:b].tolist()
        assert part.extras["token_class"][c:d].tolist() == table.extras["token_class"][a:b].tolist()
    assert part.extras["sample_index"].tolist() == samples.tolist()


@pytest.mark.parametrize("total,rounds", [(1000, 3), (10, 4), (7, 7), (5, 1)])
def test_rounds_share_the_row_step_budget_exactly(total, rounds):
    steps = [round_steps(total, rounds, t) for t in range(1, rounds + 1)]
    assert sum(steps) == total and max(steps) - min(steps) <= 1
    assert round_config(TrainConfig(steps=total), rounds, 1).steps == steps[0]
    assert round_config(TrainConfig(steps=0, epochs=2.0), rounds, 1).epochs == 2.0  # epoch mode: per chunk


def fake_eval(path, add: float, sort: float) -> None:
    metrics = {"add": {"answer_acc": add}, "sort": {"answer_acc": sort}}
    path.write_text(json.dumps({"metrics": metrics, "average": {"answer_acc": (add + sort) / 2}}))


def test_rounds_table_starts_at_the_warmup_model_and_ends_at_the_row(tmp_path):
    (tmp_path / "rounds").mkdir()
    files = [tmp_path / "warmup.json"]
    fake_eval(files[0], 0.2, 0.4)
    for seed, shift in ((1, 0.0), (2, 0.1)):
        for t in (1, 2):
            files.append(tmp_path / "rounds" / f"self_evolving_r0.6_s{seed}_t{t}.json")
            fake_eval(files[-1], 0.3 + 0.1 * t + shift, 0.5)
        files.append(tmp_path / f"self_evolving_r0.6_s{seed}.json")
        fake_eval(files[-1], 0.8 + shift, 0.6)
    out = tmp_path / "rounds.csv"
    write_rounds([str(f) for f in files], rounds=3, out_csv=out)
    rows = list(csv.DictReader(out.open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert {r["method"] for r in rows} == {"self_evolving"} and {r["ratio"] for r in rows} == {"0.6"}
    assert float(rows[0]["add_mean"]) == pytest.approx(0.2)
    assert float(rows[1]["add_mean"]) == pytest.approx(0.45) and int(rows[1]["n_seeds"]) == 2
    assert float(rows[3]["average_mean"]) == pytest.approx((0.85 + 0.6) / 2)


def fake_model(path, steps: int, batch: int, samples: int) -> str:
    path.mkdir(parents=True)
    (path / "tokenclean.json").write_text(json.dumps(
        {"steps": steps, "samples_used": samples, "samples_without_selected_tokens": 0, "seconds": 1.0,
         "train_config": {"batch_size": batch}}))
    return str(path)


def test_rounds_table_shows_each_rounds_passes_over_its_own_data(tmp_path):
    """round 0: the warm-up model over the warm-up set; round t: the mean over seeds of its chunk passes (steps ×
    batch / samples, as each round's model recorded them); blank without the models."""
    files = [tmp_path / "warmup.json"]
    fake_eval(files[0], 0.2, 0.4)
    models = [fake_model(tmp_path / "models" / "warmup", 10, 8, 20)]  # 4 passes
    for seed, steps in ((1, 6), (2, 9)):
        for t in (1, 2):
            files.append(tmp_path / f"self_evolving_r0.6_s{seed}_t{t}.json")
            fake_eval(files[-1], 0.5, 0.5)
            models.append(fake_model(tmp_path / "models" / "rounds" / f"self_evolving_r0.6_s{seed}_t{t}",
                                     steps * t, 4, 12))
    rows = write_rounds([str(f) for f in files], rounds=2, out_csv=tmp_path / "rounds.csv", models=models)
    assert [r["passes"] for r in rows] == [4.0, pytest.approx((2 + 3) / 2), pytest.approx((4 + 6) / 2)]
    assert [r["passes"] for r in write_rounds([str(f) for f in files], 2, tmp_path / "r2.csv")] == ["", "", ""]
    header = (tmp_path / "rounds.csv").read_text().splitlines()[0]
    assert header.startswith("method,ratio,round,n_seeds,passes,")


def test_a_chunk_of_the_pools_losses_is_the_chunks_rows_and_passes_as_made_on_the_chunk(tmp_path):
    """`tokenclean chunk --loss`: what the chain reads for a model that scored the whole pool (base, warm-up)."""
    from tokenclean.artifacts import load_array, save_array
    from tokenclean.cli import main
    from tokenclean.selection import select_file

    table = ragged_table(11)
    pool = tmp_path / "pool.tokens.npz"
    pmeta = table.save(pool, {"tokenizer_fingerprint": "t"})
    rng = np.random.default_rng(1)
    for name in ("base", "ref"):
        losses = np.where(table.loss_mask, rng.random(table.n_tokens), np.nan).astype(np.float32)
        save_array(tmp_path / f"{name}.loss.npy", losses, {"kind": "loss", "tokens": str(pool),
                                                           "tokens_fingerprint": pmeta["fingerprint"]})
    for index in (1, 2, 3):
        chunk = tmp_path / f"pool.c{index}of3.tokens.npz"
        assert main(["chunk", "--tokens", str(pool), "--chunks", "3", "--index", str(index), "--out", str(chunk)]) == 0
        ctable, cmeta = TokenTable.load(chunk)
        for name in ("base", "ref"):
            out = tmp_path / f"{name}.c{index}of3.loss.npy"
            assert main(["chunk", "--tokens", str(pool), "--loss", str(tmp_path / f"{name}.loss.npy"), "--chunks", "3",
                         "--index", str(index), "--out", str(out)]) == 0
            part, _ = load_array(out, "loss", made_on=(chunk, cmeta, ctable))  # refused if made on another table
            whole, _ = load_array(tmp_path / f"{name}.loss.npy", "loss")
            expected = [whole[p] for s in ctable.extras["source_sample"]  # brute force: sample by sample
                        for p in range(table.offsets[s], table.offsets[s + 1])]
            np.testing.assert_array_equal(part, np.asarray(expected, dtype=np.float32))
        select_file("fixed", chunk, tmp_path / f"round{index}.mask.npy", 1.0,  # a chunk may hold 1 response token
                    base_loss=str(tmp_path / f"base.c{index}of3.loss.npy"),
                    ref_loss=str(tmp_path / f"ref.c{index}of3.loss.npy"))
    # a loss array made on another table is refused: one line, exit 2
    other = tmp_path / "other.tokens.npz"
    ragged_table(12, seed=5).save(other, {})
    assert main(["chunk", "--tokens", str(other), "--loss", str(tmp_path / "base.loss.npy"), "--chunks", "3",
                 "--index", "1", "--out", str(tmp_path / "bad.loss.npy")]) == 2
    assert not (tmp_path / "bad.loss.npy").exists()
