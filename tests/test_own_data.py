"""Own SFT data as researchers hold it (docs/own-data.md): every common record format in every common container
goes through ``tokenclean data`` and the token table with nothing converted by hand, each record keeps its id (to
the token table, the export and the token view) and its other columns, and data of the wrong shape is refused in
one line naming the file, the row (or line) and the field."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokenclean.artifacts import TokenTable, save_array
from tokenclean.cli import main
from tokenclean.data import DataError
from tokenclean.sources import prepare_data

N = 400  # records per shape, as the issue tried them
WARMUP = {"first_of_pool": 4}


def conversation(i: int) -> list[tuple[str, str]]:
    """Record i's turns: a system turn on every fourth, a second exchange on every third (words the tiny
    tokenizer knows)."""
    turns = [("system", "hello world")] if i % 4 == 0 else []
    turns += [("user", f"Add {i} and 5 ."), ("assistant", f"The answer is {i + 5} .")]
    if i % 3 == 0:
        turns += [("user", "how are you ?"), ("assistant", f"fine thanks {i}")]
    return turns


def expected(i: int) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in conversation(i)]


def as_messages(i: int) -> dict[str, Any]:
    return {"id": f"r{i}", "messages": expected(i), "source": "mix", "score": i / 2}


ODD_USER, ODD_ASSISTANT = ("human", "Human", "user"), ("gpt", "GPT", "model", "assistant")


def as_sharegpt(i: int) -> dict[str, Any]:
    names = {"system": "system", "user": ODD_USER[i % 3], "assistant": ODD_ASSISTANT[i % 4]}
    return {"id": f"r{i}", "conversations": [{"from": names[r], "value": c} for r, c in conversation(i)],
            "source": "mix"}


def as_alpaca(i: int, history: bool = True) -> dict[str, Any]:
    turns = [t for t in conversation(i) if t[0] != "system"]
    pairs = [[turns[k][1], turns[k + 1][1]] for k in range(0, len(turns) - 2, 2)]
    row = {"instruction": turns[-2][1], "input": "", "output": turns[-1][1],
           "system": "hello world" if i % 4 == 0 else "", "source": "mix"}
    if history:
        row["history"] = pairs
    return row


def alpaca_expected(i: int, history: bool = True) -> list[dict[str, str]]:
    msgs = expected(i)
    if not history:
        msgs = [m for m in msgs if m["role"] == "system"] + msgs[-2:]
    return msgs


def as_trl(i: int) -> dict[str, Any]:
    msgs = expected(i)
    return {"prompt": msgs[:-1], "completion": msgs[-1:], "source": "mix"}


def as_prompt_completion(i: int) -> dict[str, Any]:
    return {"prompt": f"Add {i} and 5 .", "completion": f"The answer is {i + 5} .", "source": "mix"}


def pc_expected(i: int) -> dict[str, str]:
    return {"prompt": f"Add {i} and 5 .", "completion": f"The answer is {i + 5} ."}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_array(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, indent=1))
    return path


def dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    dataset(rows).to_parquet(str(path))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    dataset(rows).to_csv(str(path), index=False)
    return path


def write_arrow(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa

    table = dataset(rows).data.table
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_saved(path: Path, rows: list[dict]) -> Path:
    dataset(rows).save_to_disk(str(path))
    return path


def write_saved_dict(path: Path, rows: list[dict]) -> Path:
    from datasets import DatasetDict

    DatasetDict({"train": dataset(rows), "test": dataset(rows[:3])}).save_to_disk(str(path))
    return path


def write_folder(path: Path, rows: list[dict]) -> Path:
    path.mkdir()
    half = len(rows) // 2
    write_jsonl(path / "train-00000.jsonl", rows[:half])
    write_jsonl(path / "train-00001.jsonl", rows[half:])
    return path


def msg_row(i: int) -> dict:
    return {"messages": expected(i)}


# name -> (file name, writer, row maker, source options, expected record of row i, ids from the id column)
SHAPES: dict[str, tuple[str, Callable, Callable, dict, Callable[[int], dict], bool]] = {
    "jsonl_messages": ("data.jsonl", write_jsonl, as_messages, {}, msg_row, True),
    "json_array_alpaca": ("alpaca_data.json", write_array, as_alpaca, {}, lambda i: {"messages": alpaca_expected(i)},
                          False),
    "jsonl_sharegpt": ("sharegpt.jsonl", write_jsonl, as_sharegpt, {}, msg_row, True),
    "json_array_sharegpt": ("sharegpt.json", write_array, as_sharegpt, {}, msg_row, True),
    "parquet_messages": ("messages.parquet", write_parquet, as_messages, {}, msg_row, True),
    "parquet_trl_conversational": ("trl.parquet", write_parquet, as_trl, {}, msg_row, False),
    "csv_prompt_completion": ("pc.csv", write_csv, as_prompt_completion, {}, pc_expected, False),
    "csv_alpaca": ("alpaca.csv", write_csv, lambda i: as_alpaca(i, history=False), {},
                   lambda i: {"messages": alpaca_expected(i, history=False)}, False),
    "arrow_sharegpt": ("sharegpt.arrow", write_arrow, as_sharegpt, {}, msg_row, True),
    "save_to_disk_messages": ("saved", write_saved, as_messages, {}, msg_row, True),
    "save_to_disk_dict_alpaca": ("saved_dict", write_saved_dict, as_alpaca, {"split": "train"},
                                 lambda i: {"messages": alpaca_expected(i)}, False),
    "folder_of_jsonl_sharegpt": ("folder", write_folder, as_sharegpt, {}, msg_row, True),
    "hub_id_that_is_a_local_folder": ("hubcopy", write_saved, as_messages, {"hub": True}, msg_row, True),
}


def make_source(tmp_path: Path, shape: str, n: int = N) -> tuple[dict, list[str]]:
    """The shape written to disk as a source spec, and the ids its records must get."""
    name, writer, row, options, _, has_ids = SHAPES[shape]
    path = writer(tmp_path / name, [row(i) for i in range(n)])
    spec = {("hub" if options.get("hub") else "path"): str(path),
            **{k: v for k, v in options.items() if k != "hub"}}
    ids = [f"r{i}" for i in range(n)] if has_ids else [f"{name}:{i}" for i in range(n)]
    return spec, ids


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_and_container_reaches_the_token_table_with_its_ids(shape, tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from tokenclean.tokenization import tokenize_file

    spec, ids = make_source(tmp_path, shape)
    meta = prepare_data({"pool": spec, "warmup": WARMUP}, tmp_path / "data")
    rows = [json.loads(line) for line in (tmp_path / "data" / "pool.jsonl").read_text().splitlines()]
    make_expected = SHAPES[shape][4]
    assert [r["id"] for r in rows] == ids and meta["pool"]["records"] == N
    for i in (0, 1, 3, 12):  # system + second exchange, plain, second exchange, system
        assert {k: v for k, v in rows[i].items() if k in ("messages", "prompt", "completion")} == make_expected(i)
        assert rows[i]["meta"]["source"] == "mix"  # the user's other columns are kept
    assert not any(p.name.startswith(".") for p in (tmp_path / "data").iterdir())  # datasets' cache is gone
    table_meta = tokenize_file(tmp_path / "data" / "pool.jsonl", str(tiny_tokenizer_dir), 256,
                               tmp_path / "pool.tokens.npz")
    table, _ = TokenTable.load(tmp_path / "pool.tokens.npz")
    assert table_meta["n_samples"] == N and table.extras["record_id"].tolist() == ids
    # every assistant turn is trained: its end-of-turn token is in the loss mask
    eos = AutoTokenizer.from_pretrained(tiny_tokenizer_dir).eos_token_id
    for i in (0, 1, 3):
        a, b = table.offsets[i], table.offsets[i + 1]
        trained_eos = int(np.sum((table.input_ids[a:b] == eos) & table.loss_mask[a:b]))
        record = make_expected(i)
        assert trained_eos == sum(m["role"] == "assistant" for m in record.get("messages", [{"role": "assistant"}]))


def test_an_id_column_is_kept_and_a_row_without_one_is_named_by_its_place(tmp_path):
    rows = [as_messages(i) for i in range(3)]
    rows[1].pop("id")
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    prepare_data({"pool": {"path": str(pool)}, "warmup": WARMUP | {"first_of_pool": 1}}, tmp_path / "data")
    got = [json.loads(line)["id"] for line in (tmp_path / "data" / "pool.jsonl").read_text().splitlines()]
    assert got == ["r0", "pool.jsonl:1", "r2"]
    # another column as the id, or none
    prepare_data({"pool": {"path": str(pool), "columns": {"id": "score"}}, "warmup": {"first_of_pool": 1}},
                 tmp_path / "d2")
    assert json.loads((tmp_path / "d2" / "pool.jsonl").read_text().splitlines()[2])["id"] == "1.0"
    prepare_data({"pool": {"path": str(pool), "columns": {"id": None}}, "warmup": {"first_of_pool": 1}},
                 tmp_path / "d3")
    line = json.loads((tmp_path / "d3" / "pool.jsonl").read_text().splitlines()[0])
    assert line["id"] == "pool.jsonl:0" and line["meta"]["id"] == "r0"


def test_column_names_roles_and_format_can_be_named_in_the_source(tmp_path):
    qa = write_csv(tmp_path / "qa.csv", [{"question": "Add 1 and 5 .", "answer": "6", "uid": "q1"}])
    prepare_data({"pool": {"path": str(qa), "columns": {"prompt": "question", "completion": "answer", "id": "uid"}},
                  "warmup": {"first_of_pool": 1}}, tmp_path / "d1")
    assert json.loads((tmp_path / "d1" / "pool.jsonl").read_text()) == {
        "id": "q1", "prompt": "Add 1 and 5 .", "completion": "6"}

    tool = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "42"},
                               {"from": "gpt", "value": "fine"}]}]
    path = write_jsonl(tmp_path / "tool.jsonl", tool)
    prepare_data({"pool": {"path": str(path), "roles": {"observation": "user"}}, "warmup": {"first_of_pool": 1}},
                 tmp_path / "d2")
    assert [m["role"] for m in json.loads((tmp_path / "d2" / "pool.jsonl").read_text())["messages"]] == \
        ["user", "user", "assistant"]

    both = [{**as_alpaca(1), "conversations": as_sharegpt(1)["conversations"]}]
    path = write_jsonl(tmp_path / "both.jsonl", both)
    prepare_data({"pool": {"path": str(path), "format": "alpaca"}, "warmup": {"first_of_pool": 1}}, tmp_path / "d3")
    record = json.loads((tmp_path / "d3" / "pool.jsonl").read_text())
    assert record["messages"] == alpaca_expected(1) and "conversations" in record["meta"]

    renamed = [{"chat": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "fine"}]}]
    path = write_parquet(tmp_path / "renamed.parquet", renamed)
    prepare_data({"pool": {"path": str(path), "format": "messages",
                           "columns": {"messages": "chat", "role": "speaker", "content": "text"}},
                  "warmup": {"first_of_pool": 1}}, tmp_path / "d4")
    assert json.loads((tmp_path / "d4" / "pool.jsonl").read_text())["messages"][1] == {"role": "assistant",
                                                                                      "content": "fine"}


def _alpaca_rows(n: int = 5) -> list[dict]:
    return [as_alpaca(i) for i in range(n)]


def _bad_json_array(path: Path) -> None:
    text = json.dumps(_alpaca_rows(), indent=1)
    lines = text.splitlines()
    lines[7] = lines[7].replace('"', "", 1)  # a key without its opening quote, on line 8
    path.write_text("\n".join(lines))


def _truncated_jsonl(path: Path) -> None:
    write_jsonl(path, [as_sharegpt(i) for i in range(4)])
    path.write_text(path.read_text() + '{"conversations": [\n')


def _saved_dict_without_train(path: Path) -> None:
    from datasets import DatasetDict

    DatasetDict({"test": dataset([as_messages(0)])}).save_to_disk(str(path))


def _unreadable_parquet(path: Path) -> None:
    path.write_bytes(b"PAR1 this is no parquet file PAR1")


# (file name, how it is written, extra source settings, what the one-line error must hold after the file name)
REFUSED: dict[str, tuple[str, Callable[[Path], None], dict, str]] = {
    "alpaca_missing_output": ("alpaca.json", lambda p: write_array(p, [
        *(_alpaca_rows(2)), {"instruction": "Add 1 and 5 .", "input": ""}]),
        {}, ": row 2: field 'output' is missing (an Alpaca record needs 'instruction' and 'output')"),
    "sharegpt_unknown_role": ("sg.jsonl", lambda p: write_jsonl(p, [as_sharegpt(0), as_sharegpt(1), {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "x"}]}]),
        {}, ":3: field 'conversations[1].from': unknown role 'observation'"),
    "sharegpt_no_assistant_turn": ("sg.parquet", lambda p: write_parquet(p, [as_sharegpt(1), {
        "id": "x", "conversations": [{"from": "human", "value": "hi"}], "source": "mix"}]),
        {}, ": row 1: field 'conversations': no assistant turn"),
    "sharegpt_missing_conversations": ("sg2.jsonl", lambda p: write_jsonl(p, [as_sharegpt(1), {"id": "y"}]),
                                       {}, ":2: field 'conversations' is missing"),
    "wrong_shape_csv": ("qa.csv", lambda p: write_csv(p, [{"question": "a", "answer": "b"}]),
                        {}, ": row 0: neither 'messages' nor 'prompt'/'completion' is present"),
    "pretraining_text": ("corpus.jsonl", lambda p: write_jsonl(p, [{"text": "plain"}]),
                         {}, ":1: neither 'messages' nor 'prompt'/'completion' is present"),
    "two_formats_at_once": ("both.jsonl", lambda p: write_jsonl(p, [{
        **as_alpaca(1), "conversations": as_sharegpt(1)["conversations"]}]),
        {}, ": its columns (instruction, input, output, system, source, history, conversations) fit more than one "
            "record format (alpaca, sharegpt); name one in the source: data.pool.format"),
    "messages_not_a_list": ("m.jsonl", lambda p: write_jsonl(p, [as_messages(0), {"messages": {"role": "user"}}]),
                            {}, ":2: field 'messages': expected a non-empty list of turns"),
    "content_not_text": ("m2.jsonl", lambda p: write_jsonl(p, [as_messages(1), {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": 7}]}]),
        {}, ":2: field 'messages[1].content': expected a string, got int"),
    "duplicate_ids": ("dup.jsonl", lambda p: write_jsonl(p, [as_messages(0), as_messages(1), as_messages(1)]),
                      {}, ":3: id 'r1' is also the id of row 1; ids must be unique"),
    "invalid_json_array": ("bad.json", _bad_json_array, {}, ":8: invalid JSON at column"),
    "truncated_jsonl": ("cut.jsonl", _truncated_jsonl, {}, ":5: invalid JSON at column"),
    "invalid_utf8": ("latin.jsonl", lambda p: p.write_bytes(
        json.dumps(as_messages(0)).encode() + b'\n{"prompt": "caf\xe9", "completion": "b"}\n'), {},
        ":2: invalid UTF-8 at byte"),
    "unreadable_parquet": ("broken.parquet", _unreadable_parquet, {}, ": not readable as parquet"),
    "split_not_there": ("saved", _saved_dict_without_train, {}, ": has no split 'train' (it has test)"),
    "empty_folder": ("empty", lambda p: p.mkdir(), {}, ": holds no data files datasets can read"),
    "column_not_there": ("qa2.csv", lambda p: write_csv(p, [{"question": "a", "answer": "b"}]),
                        {"columns": {"prompt": "question", "completion": "reply"}},
                        "data.pool.columns.completion names the column 'reply', which qa2.csv does not have"),
    "unknown_format": ("m3.jsonl", lambda p: write_jsonl(p, [as_messages(0)]), {"format": "openai"},
                       "data.pool.format must be one of messages, prompt_completion, alpaca, sharegpt"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_data_of_the_wrong_shape_is_refused_in_one_line_naming_file_row_and_field(case, tmp_path, capsys):
    name, write, settings, message = REFUSED[case]
    path = tmp_path / name
    write(path)
    spec = {"pool": {"path": str(path), **settings}, "warmup": {"first_of_pool": 1}}
    code = main(["data", "--spec", json.dumps(spec), "--out", str(tmp_path / "data")])
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("tokenclean data: error: ") and message in err[0], err[0]
    if not message.startswith("data.pool"):
        assert f"{path}{message}" in err[0] or f"{path.name}{message}" in err[0], err[0]
    assert not (tmp_path / "data").exists() and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_the_data_command_takes_a_folder(tmp_path, capsys):
    """Before: `is a directory, expected a file` for a save_to_disk folder."""
    spec, _ = make_source(tmp_path, "save_to_disk_messages", n=6)
    code = main(["data", "--spec", json.dumps({"pool": spec, "warmup": {"first_of_pool": 2}}),
                 "--out", str(tmp_path / "data")])
    assert code == 0, capsys.readouterr().err
    source = json.loads((tmp_path / "data" / "data.json").read_text())["pool"]["source"]
    assert source["container"] == "save_to_disk folder" and source["formats"] == {"messages": 6}
    assert source["id_column"] == "id"


@pytest.fixture()
def own_table(tmp_path, tiny_tokenizer_dir) -> tuple[Path, TokenTable, list[str]]:
    from tokenclean.tokenization import tokenize_file

    spec, ids = make_source(tmp_path, "parquet_messages", n=8)
    prepare_data({"pool": spec, "warmup": WARMUP}, tmp_path / "data")
    tokenize_file(tmp_path / "data" / "pool.jsonl", str(tiny_tokenizer_dir), 256, tmp_path / "pool.tokens.npz")
    return tmp_path / "pool.tokens.npz", TokenTable.load(tmp_path / "pool.tokens.npz")[0], ids


def _mask(tokens: Path, table: TokenTable, drop_sample: int) -> Path:
    """A mask keeping every response token except those of sample ``drop_sample``."""
    meta = TokenTable.load(tokens)[1]
    mask = table.loss_mask.copy()
    mask[table.offsets[drop_sample]:table.offsets[drop_sample + 1]] = False
    path = tokens.with_name("pool.mask.npy")
    save_array(path, mask, {"kind": "mask", "tokens": str(tokens), "tokens_fingerprint": meta["fingerprint"]})
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "hf"])
def test_the_export_names_each_record_by_its_id(own_table, tmp_path, fmt):
    from tokenclean.export import export_file

    tokens, table, ids = own_table
    export_file(tokens, tmp_path / "export", _mask(tokens, table, 2), fmt=fmt)
    if fmt == "jsonl":
        rows = [json.loads(line) for line in (tmp_path / "export" / "data.jsonl").read_text().splitlines()]
    else:
        from datasets import load_from_disk

        rows = list(load_from_disk(str(tmp_path / "export")))
    assert [r["id"] for r in rows] == ids[:2] + ids[3:]  # sample 2 kept no token, so it is not written
    for r, i in zip(rows, [0, 1, 3]):
        a, b = table.offsets[i], table.offsets[i + 1]
        assert r["input_ids"] == table.input_ids[a:b].tolist()


def test_a_table_without_ids_exports_as_before(tmp_path, tok):
    from tokenclean.data import parse_record
    from tokenclean.export import export_file
    from tokenclean.tokenization import tokenize_records

    table, _ = tokenize_records([parse_record({"prompt": "hello", "completion": "fine"}, "x:1")], tok, 64)
    assert "record_id" not in table.extras
    table.save(tmp_path / "t.tokens.npz", {"tokenizer": "tiny"})
    record = export_file(tmp_path / "t.tokens.npz", tmp_path / "export", fmt="jsonl")
    assert record["columns"] == ["input_ids", "labels", "attention_mask"]
    assert set(json.loads((tmp_path / "export" / "data.jsonl").read_text())) == set(record["columns"])


def test_a_table_whose_ids_are_no_text_is_refused(tmp_path, tok):
    from tokenclean.artifacts import ArtifactError
    from tokenclean.data import parse_record
    from tokenclean.tokenization import tokenize_records

    table, _ = tokenize_records([parse_record({"id": 5, "prompt": "hello", "completion": "fine"}, "x:1")], tok, 64)
    assert table.extras["record_id"].tolist() == ["5"]
    table.extras["record_id"] = np.array([5])
    table.save(tmp_path / "t.tokens.npz", {"tokenizer": "tiny"})
    with pytest.raises(ArtifactError, match="member 'record_id' holds int64 values, expected one text id per sample"):
        TokenTable.load(tmp_path / "t.tokens.npz")


def test_the_token_view_heads_each_sample_with_its_id(own_table, tmp_path, tiny_tokenizer_dir):
    from tokenclean.report.token_view import write_token_view

    tokens, table, ids = own_table
    meta = TokenTable.load(tokens)[1]
    rng = np.random.default_rng(0)
    made_on = {"tokens": str(tokens), "tokens_fingerprint": meta["fingerprint"]}
    for name in ("base", "ref"):
        losses = np.where(table.loss_mask, rng.random(table.n_tokens), np.nan).astype(np.float32)
        save_array(tmp_path / f"{name}.loss.npy", losses, {"kind": "loss", **made_on})
    shown = write_token_view(tokens, tmp_path / "base.loss.npy", tmp_path / "ref.loss.npy",
                             [_mask(tokens, table, 2)], str(tiny_tokenizer_dir), tmp_path / "view.html", n_samples=3)
    page = (tmp_path / "view.html").read_text()
    for i in shown:
        assert f"sample {i} (id {ids[i]}): " in page


def test_own_data_config_settings_pass_the_schema():
    import yaml
    from jsonschema import Draft202012Validator

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml").read_text())
    source = {"$ref": "#/definitions/source", "definitions": schema["definitions"]}
    good = {"path": "x.csv", "format": "alpaca", "columns": {"output": "answer", "id": None},
            "roles": {"observation": "user"}}
    assert not list(Draft202012Validator(source).iter_errors(good))
    for bad in ({"path": "x", "format": "openai"}, {"path": "x", "columns": {"answer": "output"}},
                {"path": "x", "roles": {"observation": "tool"}}):
        assert list(Draft202012Validator(source).iter_errors(bad)), bad


def test_a_refused_record_stops_before_anything_is_written(tmp_path):
    rows = [as_alpaca(i) for i in range(3)]
    rows[2]["output"] = ["not", "text"]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pool.jsonl").write_text("earlier\n")
    with pytest.raises(DataError, match=r"a\.jsonl:3: field 'output': expected a string, got list"):
        prepare_data({"pool": {"path": str(path)}, "warmup": {"first_of_pool": 1}}, tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["pool.jsonl"]
    assert (tmp_path / "data" / "pool.jsonl").read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "data"]
