"""Selection rules checked against plain brute-force versions of the same rule."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenclean.artifacts import ArtifactError, TokenTable, load_array, save_array
from tokenclean.selection import keep_count, scores, select, select_file


def make_table(lengths, rng):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    loss_mask = rng.random(n) < 0.7
    loss_mask[offsets[:-1]] = False
    return TokenTable(rng.integers(0, 100, n), offsets, loss_mask)


def brute_floor(ratio, n):
    return math.floor(Fraction(str(ratio)) * n)


def brute_fixed(score, loss_mask, ratio):
    cand = [(-float(score[p]), p) for p in range(len(score)) if loss_mask[p]]
    cand.sort()
    keep = {p for _, p in cand[: brute_floor(ratio, len(cand))]}
    return np.array([p in keep for p in range(len(score))])


def brute_rho(score, loss_mask, offsets, ratio):
    out = np.zeros(len(score), dtype=bool)
    for i in range(len(offsets) - 1):
        cand = sorted((-float(score[p]), p) for p in range(offsets[i], offsets[i + 1]) if loss_mask[p])
        for _, p in cand[: brute_floor(ratio, len(cand))]:
            out[p] = True
    return out


tables = st.builds(
    lambda lengths, seed, levels: (make_table(lengths, np.random.default_rng(seed)), seed, levels),
    st.lists(st.integers(2, 30), min_size=1, max_size=20), st.integers(0, 2**31), st.sampled_from([3, 1000, 0]))
ratios = st.sampled_from([0.1, 0.29, 0.3, 0.5, 0.6, 0.7, 0.99, 1.0]) | st.floats(0.01, 1.0)


def random_scores(table, seed, levels):
    rng = np.random.default_rng(seed + 1)
    s = rng.integers(0, levels, table.n_tokens).astype(np.float32) if levels else rng.normal(size=table.n_tokens)
    s = s.astype(np.float32)
    s[~table.loss_mask] = np.nan
    return s


@settings(max_examples=150, deadline=None)
@given(tables, ratios)
def test_fixed_matches_brute_force(case, ratio):
    table, seed, levels = case
    s = random_scores(table, seed, levels)  # few levels = many ties: ties must go to the earlier token
    mask = select("fixed", table, ratio, score=s)
    assert np.array_equal(mask, brute_fixed(s, table.loss_mask, ratio))
    assert mask.sum() == brute_floor(ratio, int(table.loss_mask.sum()))
    assert not np.any(mask & ~table.loss_mask)


@settings(max_examples=150, deadline=None)
@given(tables, ratios)
def test_rho_matches_brute_force(case, ratio):
    table, seed, levels = case
    s = random_scores(table, seed, levels)
    mask = select("rho", table, ratio, score=s)
    assert np.array_equal(mask, brute_rho(s, table.loss_mask, table.offsets, ratio))
    for i in range(table.n_samples):
        a, b = table.offsets[i], table.offsets[i + 1]
        assert mask[a:b].sum() == brute_floor(ratio, int(table.loss_mask[a:b].sum()))


@settings(max_examples=60, deadline=None)
@given(tables, ratios, st.integers(0, 10**6))
def test_random_count_subset_and_reproducible(case, ratio, seed):
    table = case[0]
    a = select("random", table, ratio, seed=seed)
    assert a.sum() == brute_floor(ratio, int(table.loss_mask.sum()))
    assert not np.any(a & ~table.loss_mask)
    assert np.array_equal(a, select("random", table, ratio, seed=seed))


def test_random_differs_across_seeds_and_is_uniform():
    table = make_table([50] * 200, np.random.default_rng(0))
    masks = [select("random", table, 0.6, seed=s) for s in range(200)]
    assert not np.array_equal(masks[0], masks[1])
    freq = np.mean(masks, axis=0)[table.loss_mask]
    assert abs(freq.mean() - 0.6) < 0.01 and freq.std() < 0.06  # each token kept ~60% of the time


def test_random_in_blocks_is_a_uniform_subset_of_the_whole_dataset():
    """Blocks far smaller than the data: counts stay exact and every token, in any block, is kept ~ratio of
    the time (a per-block quota would show as equal counts per block; these vary like a uniform draw's)."""
    from tokenclean.selection import select_random

    loss_mask = np.ones(70, dtype=bool)
    masks = np.array([select_random(loss_mask, 0.3, seed, block=8) for seed in range(3000)])
    assert (masks.sum(axis=1) == 21).all()
    freq = masks.mean(axis=0)
    assert np.abs(freq - 0.3).max() < 0.04
    per_block = masks[:, :64].reshape(len(masks), 8, 8).sum(axis=2)
    # a uniform 21-of-70 draw puts Hypergeometric(70, 8, 21) tokens in a block of 8: mean 2.4, variance ~1.44
    assert abs(per_block.mean() - 2.4) < 0.05 and abs(per_block.var() - 8 * 0.3 * 0.7 * 62 / 69) < 0.1


def test_full_keeps_every_response_token():
    table = make_table([5, 9, 3], np.random.default_rng(1))
    assert np.array_equal(select("full", table), table.loss_mask)


def test_keep_count_is_exact_for_decimal_ratios():
    assert keep_count(0.29, 100) == 29 and math.floor(0.29 * 100) == 28
    assert keep_count(0.6, 10) == 6 and keep_count(1.0, 7) == 7
    with pytest.raises(ValueError):
        keep_count(0.0, 10)
    with pytest.raises(ValueError):
        keep_count(1.5, 10)


def test_score_is_base_minus_reference():
    mask = np.array([False, True, True])
    s = scores(np.array([9, 3.0, 1.0], np.float32), np.array([9, 1.0, 2.0], np.float32), mask)
    assert np.isnan(s[0]) and s[1] == 2.0 and s[2] == -1.0


def test_select_file_refuses_losses_of_another_table(tmp_path):
    rng = np.random.default_rng(0)
    t1, t2 = make_table([6, 7], rng), make_table([6, 8], rng)
    t1.save(tmp_path / "a.tokens.npz", {})
    t2.save(tmp_path / "b.tokens.npz", {})
    loss1 = np.where(t1.loss_mask, 1.0, np.nan).astype(np.float32)
    save_array(tmp_path / "base.loss.npy", loss1, {"tokens_fingerprint": t1.fingerprint(), "model": "b"})
    save_array(tmp_path / "ref.loss.npy", loss1, {"tokens_fingerprint": t1.fingerprint(), "model": "r"})
    meta = select_file("fixed", tmp_path / "a.tokens.npz", tmp_path / "m.mask.npy", 0.5, 0,
                       tmp_path / "base.loss.npy", tmp_path / "ref.loss.npy")
    mask, side = load_array(tmp_path / "m.mask.npy")
    assert mask.dtype == bool and side["n_selected"] == meta["n_selected"] == mask.sum()
    with pytest.raises(ArtifactError, match="not on"):
        select_file("fixed", tmp_path / "b.tokens.npz", tmp_path / "x.mask.npy", 0.5, 0,
                    tmp_path / "base.loss.npy", tmp_path / "ref.loss.npy")
    assert not (tmp_path / "x.mask.npy").exists()
    with pytest.raises(ValueError, match="needs --base-loss"):
        select_file("rho", tmp_path / "a.tokens.npz", tmp_path / "y.mask.npy", 0.5)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=60), st.integers(0, 4), st.integers(0, 2), st.integers(1, 9))
def test_earliest_ties_and_response_counts_are_blockwise_exact(levels, need, value, block):
    """The blockwise helpers behind fixed and rho give the same answer for any block size."""
    from tokenclean.selection import _mark_earliest, response_counts

    values = np.array(levels, dtype=np.float32)
    where = np.arange(len(values)) % 3 != 0
    keep = np.zeros(len(values), dtype=bool)
    _mark_earliest(keep, values, value, need, where=where, block=block)
    expected = np.flatnonzero((values == value) & where)[:need]
    assert np.array_equal(np.flatnonzero(keep), expected)

    lengths = np.array(levels, dtype=np.int64)  # samples of 0-4 tokens, empty ones included
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    mask = np.arange(offsets[-1]) % 2 == 1
    counts = response_counts(mask, offsets, block=block)
    assert counts.tolist() == [int(mask[a:b].sum()) for a, b in itertools.pairwise(offsets)]


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.6, 0.99, 1.0])
def test_rho_and_fixed_handle_one_token_and_prompt_only_samples(ratio):
    """Samples without any response token (a lone first token, a prompt-only sample) between ordinary ones;
    token tables never hold empty samples (TokenTable refuses them)."""
    rng = np.random.default_rng(3)
    lengths = [1, 6, 1, 4, 9, 1, 1, 12, 12, 12]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    loss_mask = rng.random(offsets[-1]) < 0.6
    loss_mask[offsets[:-1][np.diff(offsets) > 0]] = False
    loss_mask[offsets[3]: offsets[4]] = False  # a sample with no response token
    table = TokenTable(rng.integers(0, 100, offsets[-1]), offsets, loss_mask)
    s = np.where(loss_mask, rng.integers(0, 3, offsets[-1]), np.nan).astype(np.float32)  # many ties
    assert np.array_equal(select("rho", table, ratio, score=s), brute_rho(s, loss_mask, offsets, ratio))
    assert np.array_equal(select("fixed", table, ratio, score=s), brute_fixed(s, loss_mask, ratio))


def test_a_select_job_never_starts_torch_yet_its_threads_bind_torch_when_it_starts(tmp_path):
    """Light jobs (select, report, ...) skip torch's two-second start; `--threads` still limits torch later."""
    import subprocess
    import sys

    table = TokenTable(np.arange(12) % 7, np.array([0, 5, 12]),
                       np.array([False, True, True, True, True, False] + [True] * 6))
    tokens = tmp_path / "t.tokens.npz"
    table.save(tokens, {})
    code = ("import sys; from tokenclean.cli import main\n"
            f"assert main(['select', '--threads', '1', '--method', 'full', '--tokens', {str(tokens)!r},"
            f" '--out', {str(tmp_path / 'm.mask.npy')!r}]) == 0\n"
            "assert 'torch' not in sys.modules, 'select imported torch'\n"
            "import torch; print(torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1"
