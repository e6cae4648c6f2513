"""The self-evolving chain's pieces: chunks of the pool, the rounds' step budget, the per-round curve."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tokenclean.artifacts import TokenTable
from tokenclean.report import write_rounds
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
