"""Token table and loss_mask: which tokens are trained, in every record form."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tokenclean.artifacts import TokenTable
from tokenclean.data import DataError, parse_record, read_jsonl
from tokenclean.tokenization import tokenize_records


def trained_text(tok, table: TokenTable, i: int) -> str:
    a, b = table.offsets[i], table.offsets[i + 1]
    return tok.decode(table.input_ids[a:b][table.loss_mask[a:b]])


MULTI = {"messages": [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "Add 3 and 5 ."},
    {"role": "assistant", "content": "Sure ! The answer is 8 ."},
    {"role": "user", "content": "thanks you fox"},
    {"role": "assistant", "content": "Hope this helps ."},
]}


def test_multi_turn_every_assistant_turn_in_mask_and_no_user_text(tok):
    table, _ = tokenize_records([parse_record(MULTI, "x:1")], tok, 256)
    # the newline ending a non-final assistant turn is trained, as in the official runs
    assert trained_text(tok, table, 0) == "Sure ! The answer is 8 .</s>\nHope this helps .</s>"
    ids, mask = table.input_ids, table.loss_mask
    untrained = tok.decode(ids[~mask])
    for text in ("be nice", "Add 3 and 5 .", "thanks you fox", "<|user|>", "<|assistant|>", "<|system|>"):
        assert text in untrained
    assert not mask[0] and ids[0] == tok.bos_token_id
    # both end-of-turn tokens are trained
    assert int(np.sum(ids[mask] == tok.eos_token_id)) == 2


def test_prompt_completion_form_equals_messages_form(tok):
    a, _ = tokenize_records([parse_record({"prompt": "hello", "completion": "world , how are you"}, "x:1")], tok, 64)
    b, _ = tokenize_records([parse_record({"messages": [{"role": "user", "content": "hello"},
                                                        {"role": "assistant", "content": "world , how are you"}]},
                                          "x:1")], tok, 64)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)
    assert trained_text(tok, a, 0) == "world , how are you</s>"


def test_truncation_and_skipping(tok):
    recs = [parse_record({"prompt": "hello world " * 10, "completion": "fine thanks"}, "x:1"),
            parse_record({"prompt": "hello", "completion": "fine thanks and you"}, "x:2")]
    table, stats = tokenize_records(recs, tok, 12)
    assert stats["skipped_no_response_after_truncation"] == 1
    assert table.n_samples == 1 and table.extras["sample_index"].tolist() == [1]
    assert table.lengths.max() <= 12
    assert table.loss_mask.sum() >= 1


def test_plain_text_trains_every_token_but_the_first(tok):
    table, _ = tokenize_records([parse_record({"text": "the quick brown fox"}, "x:1")], tok, 64)
    assert not table.loss_mask[0] and table.loss_mask[1:].all()


def test_flat_ragged_layout(tok):
    recs = [parse_record({"prompt": p, "completion": c}, f"x:{i}")
            for i, (p, c) in enumerate([("a", "b c"), ("hello world", "fine"), ("x y z", "the lazy dog")])]
    table, _ = tokenize_records(recs, tok, 64)
    assert table.offsets[0] == 0 and table.offsets[-1] == table.n_tokens == len(table.loss_mask)
    for i, r in enumerate(recs):
        one, _ = tokenize_records([r], tok, 64)
        a, b = table.offsets[i], table.offsets[i + 1]
        assert np.array_equal(table.input_ids[a:b], one.input_ids)
        assert not table.loss_mask[a]


def test_token_table_roundtrip_and_tamper_detection(tok, tmp_path):
    table, _ = tokenize_records([parse_record(MULTI, "x:1")], tok, 256)
    path = tmp_path / "x.tokens.npz"
    table.save(path, {"kind": "tokens"})
    loaded, meta = TokenTable.load(path)
    assert np.array_equal(loaded.input_ids, table.input_ids) and meta["fingerprint"] == table.fingerprint()
    assert loaded.input_ids.dtype == np.int32 and loaded.offsets.dtype == np.int64 and loaded.loss_mask.dtype == bool
    meta_path = tmp_path / "x.tokens.json"
    m = json.loads(meta_path.read_text())
    m["fingerprint"] = "0" * 16
    meta_path.write_text(json.dumps(m))
    with pytest.raises(Exception, match="fingerprint"):
        TokenTable.load(path)


@pytest.mark.parametrize("line,field", [
    ('{"prompt": "a", "completion": "b"', "invalid JSON"),
    ('{"prompt": "a"}', "'completion'"),
    ('{"foo": 1}', "neither 'messages'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 7}]}', "messages[1].content"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"prompt": "a", "completion": 3}', "field 'completion'"),
])
def test_bad_records_name_file_line_and_field(tmp_path, line, field):
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "ok", "completion": "fine"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_jsonl(f)
    msg = str(e.value)
    assert f"{f}:2" in msg and field in msg and "\n" not in msg


def test_empty_file_and_invalid_utf8(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "ok", "completion": "fine"}\n{"prompt": "\xff", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid UTF-8"):
        read_jsonl(bad)


def test_cli_tokenize_bad_input_exits_nonzero_and_writes_nothing(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "ok", "completion": "fine"}\n{"prompt": "ok", "completion": "fine"\n')
    out = tmp_path / "d.tokens.npz"
    r = subprocess.run([sys.executable, "-m", "tokenclean.cli", "tokenize", "--data", str(data), "--tokenizer",
                        str(tiny_tokenizer_dir), "--max-length", "64", "--out", str(out)],
                       capture_output=True, text=True, check=False)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert f"{data}:2" in last and "invalid JSON" in last
    assert list(tmp_path.iterdir()) == [data]


def test_cli_tokenize_writes_table_with_provenance(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "ok", "completion": "fine"}\n' + json.dumps(MULTI) + "\n")
    out = tmp_path / "d.tokens.npz"
    r = subprocess.run([sys.executable, "-m", "tokenclean.cli", "tokenize", "--data", str(data), "--tokenizer",
                        str(tiny_tokenizer_dir), "--max-length", "64", "--out", str(out)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    table, meta = TokenTable.load(out)
    assert table.n_samples == 2 and meta["data_fingerprint"] and meta["tokenizer_fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d.tokens.json", "d.tokens.npz"]
