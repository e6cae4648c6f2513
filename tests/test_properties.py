"""Property tests: random conversations through tokenization, random scores (with ties) through selection.

Each property is stated directly (what the mask must be), not by re-running the code under test another way.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenclean.artifacts import TokenTable
from tokenclean.data import Message, Record
from tokenclean.selection import keep_count, select
from tokenclean.tokenization import tokenize_records

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORDS = ["the", "answer", "is", "42", "fox", "Sure", "!", ".", "?", "hello", "world", ",", "3", "and", "5",
         "caf\u00e9", "\u00fcber", "lazy", "dog", "\n", "  "]


content = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join).filter(lambda s: s.strip())


@st.composite
def conversations(draw, contents: st.SearchStrategy[str] = content) -> Record:
    """An optional system turn, then user/assistant turns whose texts come from ``contents``; at least one
    assistant turn (each follows a user turn), any turn may come last."""
    messages = [Message("system", draw(contents))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [Message("user", draw(contents)), Message("assistant", draw(contents))]
    if draw(st.booleans()):
        messages.append(Message("user", draw(contents)))
    return Record(tuple(messages))


def _sample(table: TokenTable, i: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = table.offsets[i], table.offsets[i + 1]
    return table.input_ids[a:b], table.loss_mask[a:b]


@SETTINGS
@given(records=st.lists(conversations(), min_size=1, max_size=4))
def test_mask_is_exactly_the_assistant_turns_and_their_end_of_turn_tokens(tok, records):
    table, stats = tokenize_records(records, tok, 1 << 20)
    assert stats["skipped_no_response_after_truncation"] == 0 and table.n_samples == len(records)
    assert not table.loss_mask[table.offsets[:-1]].any()  # position 0 of every sample
    for i, record in enumerate(records):
        ids, mask = _sample(table, i)
        # each reply (stripped), its eos, and the newline ending it when another turn follows (official runs)
        trained = "".join(m.content.strip() + tok.eos_token + ("\n" if j < len(record.messages) - 1 else "")
                          for j, m in enumerate(record.messages) if m.role == "assistant")
        replies = [m for m in record.messages if m.role == "assistant"]
        assert tok.decode(ids[mask]) == trained
        assert int(np.sum(ids[mask] == tok.eos_token_id)) == len(replies) == int(np.sum(ids == tok.eos_token_id))
        assert ids[0] == tok.bos_token_id
        # everything else (role headers, system and user text, separators) is untrained and in order
        untrained = tok.decode(ids[~mask][1:])
        at = 0
        for m in record.messages:
            if m.role != "assistant":
                at = untrained.index(m.content.strip(), at) + len(m.content.strip())


@SETTINGS
@given(records=st.lists(conversations(), min_size=1, max_size=4), max_length=st.integers(2, 40))
def test_truncation_keeps_a_prefix_and_skips_only_samples_left_without_response(tok, records, max_length):
    whole, _ = tokenize_records(records, tok, 1 << 20)
    survivors = [i for i in range(len(records)) if _sample(whole, i)[1][:max_length].any()]
    if not survivors:
        with pytest.raises(ValueError, match="no sample has a response token left"):
            tokenize_records(records, tok, max_length)
        return
    cut, stats = tokenize_records(records, tok, max_length)
    assert cut.extras["sample_index"].tolist() == survivors
    assert stats["skipped_no_response_after_truncation"] == len(records) - len(survivors)
    assert cut.lengths.max() <= max_length and not cut.loss_mask[cut.offsets[:-1]].any()
    for j, i in enumerate(survivors):
        ids, mask = _sample(whole, i)
        got_ids, got_mask = _sample(cut, j)
        assert np.array_equal(got_ids, ids[:max_length]) and np.array_equal(got_mask, mask[:max_length])


# ---------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------
@st.composite
def scored_tables(draw) -> tuple[TokenTable, np.ndarray]:
    lengths = draw(st.lists(st.integers(1, 25), min_size=1, max_size=12))
    n = sum(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    loss_mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    loss_mask[offsets[:-1]] = False
    levels = draw(st.sampled_from([1, 2, 4, 1000]))  # few levels = many ties
    values = np.array(draw(st.lists(st.integers(0, levels - 1), min_size=n, max_size=n)), dtype=np.float32)
    score = np.where(loss_mask, values, np.nan).astype(np.float32)
    return TokenTable(np.zeros(n, dtype=np.int32), offsets, loss_mask), score


ratios = st.sampled_from([0.1, 0.29, 0.5, 0.6, 0.99, 1.0]) | st.floats(0.001, 1.0)


def _check_top(score: np.ndarray, candidates: np.ndarray, keep: np.ndarray, k: int) -> None:
    """Exactly k kept; no dropped score above a kept one; among equal scores the earlier positions are kept."""
    kept, dropped = candidates[keep[candidates]], candidates[~keep[candidates]]
    assert len(kept) == k
    if len(kept) and len(dropped):
        assert score[kept].min() >= score[dropped].max()
        boundary = score[kept].min()
        tied_kept, tied_dropped = kept[score[kept] == boundary], dropped[score[dropped] == boundary]
        if len(tied_dropped):
            assert tied_kept.max() < tied_dropped.min()


@SETTINGS
@given(case=scored_tables(), ratio=ratios)
def test_fixed_keeps_the_global_top_with_ties_broken_by_position(case, ratio):
    table, score = case
    keep = select("fixed", table, ratio, score=score)
    assert not np.any(keep & ~table.loss_mask)
    candidates = np.flatnonzero(table.loss_mask)
    _check_top(score, candidates, keep, keep_count(ratio, len(candidates)))


@SETTINGS
@given(case=scored_tables(), ratio=ratios)
def test_rho_keeps_each_samples_top_with_ties_broken_by_position(case, ratio):
    table, score = case
    keep = select("rho", table, ratio, score=score)
    assert not np.any(keep & ~table.loss_mask)
    for i in range(table.n_samples):
        a, b = table.offsets[i], table.offsets[i + 1]
        candidates = a + np.flatnonzero(table.loss_mask[a:b])
        _check_top(score, candidates, keep, keep_count(ratio, len(candidates)))


@SETTINGS
@given(case=scored_tables(), ratio=ratios, seed=st.integers(0, 2**32 - 1))
def test_random_and_full_keep_exact_counts_inside_the_response(case, ratio, seed):
    table, _ = case
    keep = select("random", table, ratio, seed)
    assert not np.any(keep & ~table.loss_mask)
    assert keep.sum() == keep_count(ratio, int(table.loss_mask.sum()))
    assert np.array_equal(keep, select("random", table, ratio, seed))  # a function of the seed
    assert np.array_equal(select("full", table), table.loss_mask)
    if ratio == 1.0:
        assert np.array_equal(keep, table.loss_mask)


def test_equal_tables_save_to_equal_bytes_whatever_the_order_of_their_extras(tmp_path):
    """Determinism down to the bytes: npz members are written in a fixed order (concat once took them from a
    set, whose order changes with PYTHONHASHSEED)."""
    base = dict(input_ids=np.arange(6), offsets=np.array([0, 3, 6]), loss_mask=np.array([0, 1, 1, 0, 0, 1], bool))
    extras = {"sample_index": np.arange(2), "token_class": np.zeros(6, np.int8), "source": np.zeros(2)}
    TokenTable(**base, extras=extras).save(tmp_path / "a.tokens.npz", {})
    TokenTable(**base, extras=dict(reversed(extras.items()))).save(tmp_path / "b.tokens.npz", {})
    assert (tmp_path / "a.tokens.npz").read_bytes() == (tmp_path / "b.tokens.npz").read_bytes()
