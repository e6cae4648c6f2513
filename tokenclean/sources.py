"""Bringing SFT data into an experiment: the user's records, in the shapes and containers researchers hold them,
become the experiment's ``pool.jsonl`` and ``warmup.jsonl``, every record validated, each with an id and its other
columns, with checksums and provenance in ``data.json`` (docs/own-data.md).

A source is ``{"path": P}`` or ``{"hub": NAME, "split": "train", "revision": REV}``, optionally with ``"limit": N``
(the first N records), ``"format"`` (the record format, where it cannot be told from the columns), ``"columns"``
(the source's names for the fields, as LLaMA-Factory's ``columns``) and ``"roles"`` (more role names). ``P`` is a
file (JSON lines, a JSON array, Parquet, CSV, Arrow), a ``save_to_disk`` folder or a folder of such files; every
container is read by ``datasets``' own loaders, so nothing is converted by hand. A hub id that is a local folder is
that folder. The warm-up set may instead be ``{"first_of_pool": N}``: the pool's first N records, which is what the
paper's release code assumes its 10k warm-up set is (unverified; docs/paper-fidelity.md). A hub revision (a branch,
tag or commit; default the main branch) is resolved once to its commit sha, that sha is what is loaded and what
``data.json`` records.

Record formats (:data:`FORMATS`): OpenAI ``messages`` (``role``/``content``, or ShareGPT's ``from``/``value``),
``prompt``/``completion`` (strings, or TRL's conversational lists of messages), Alpaca (``instruction``, ``input``,
``output``, optional ``system`` and ``history``) and ShareGPT (``conversations`` of ``from``/``value``, optional
``system``). Every record becomes ``messages`` (or stays ``prompt``/``completion``); every assistant turn is
trained. A plain ``{"text": ...}`` record belongs to a pretraining corpus and is refused.

Each written record carries ``id`` (the source's ``id``/``idx`` column, else, or where that is empty,
``<source name>:<row>``, the row counted from 0 as ``datasets`` indexes it) and ``meta`` (the source's other
columns), so that what the suite makes of a record (its kept tokens, its scores) can be joined back to the user's
own records.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenclean.artifacts import WriteError, atomic_dir, write_fault, write_json
from tokenclean.data import ROLES, DataError, is_whole, iter_jsonl, parse_record

log = logging.getLogger(__name__)

# format -> the fields it reads (canonical names; ``columns`` maps them to the source's)
FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
           "alpaca": ("instruction", "input", "output", "system", "history"), "sharegpt": ("conversations", "system")}
# a format is a candidate when one of these columns is present
MARKERS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
           "alpaca": ("instruction", "output"), "sharegpt": ("conversations",)}
TURN_KEYS = ("role", "content")  # keys inside a turn; ``columns`` may rename them too
COLUMN_KEYS = tuple(dict.fromkeys([f for fields in FORMATS.values() for f in fields] + ["id", *TURN_KEYS]))
ID_COLUMNS = ("id", "idx")  # the source's id column, where it has one of these
# role names in the wild (lower-cased) -> ours; ``roles`` in the source adds others
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "bing": "assistant",
              "bard": "assistant", "ai": "assistant"}
SPEC_KEYS = ("path", "hub", "split", "revision", "limit", "format", "columns", "roles")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
EXTENSIONS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
              ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}


@dataclass
class Loaded:
    """The raw rows of a source (``datasets`` rows: a missing field is None), its columns and how to name a row."""

    rows: Sequence[dict[str, Any]]
    columns: list[str]
    name: str  # the source's name in default ids
    where: Callable[[int], str]  # row -> its place in error messages (``file:line`` for JSON lines)
    container: str


def _reason(e: BaseException) -> str:
    while e.__cause__ is not None and not str(e).strip():
        e = e.__cause__
    return f"{type(e).__name__}: {' '.join((str(e).strip().splitlines() or [''])[0].split())}".rstrip(": ")


def _datasets_call(what: Path, call: Callable[[], Any], cache: Path, fix: str) -> Any:
    """``call()`` (a ``datasets`` loader) with its failures as one-line DataErrors naming ``what``; a full disk
    while it writes its cache stays a fault of the machine (the cache lies inside the output being written)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        return call()
    except DataError:
        raise
    except Exception as e:
        for err in (e, e.__cause__, e.__context__):
            if err is not None and write_fault(err, cache) is not None:
                raise err from None
        raise DataError(f"{what}: {fix} ({_reason(e)})") from None


def _split_of(data: Any, split: str, where: Path) -> Any:
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        return data
    if split not in data:
        raise DataError(f"{where}: has no split {split!r} (it has {', '.join(sorted(data)) or 'none'}); set split: "
                        "in the source")
    return data[split]


def _line_numbers(path: Path) -> list[int]:
    """The number of every non-blank line: JSON-lines row i is line ``_line_numbers(path)[i]``."""
    with open(path, "rb") as f:
        return [n for n, raw in enumerate(f, start=1) if raw.strip()]


def _require_utf8(path: Path) -> None:
    """A text file is UTF-8 throughout: Arrow's readers take invalid bytes into a table and fail only on reading
    the value, nowhere near the line that holds them. Names the line and the byte in it, as JSON lines' errors do."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    at = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                bad = at + e.start
                with open(path, "rb") as g:
                    head = g.read(bad)
                line, line_start = head.count(b"\n") + 1, head.rfind(b"\n") + 1
                raise DataError(f"{path}:{line}: invalid UTF-8 at byte {bad - line_start}") from None
            at += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}: invalid UTF-8 at its end (the file is cut short)") from None


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == b"["


def _json_file(path: Path, cache: Path) -> Loaded:
    """JSON lines or a JSON array through ``datasets``' json loader. Where it cannot make a table of the file,
    the file is read by :mod:`json` to name the bad line (JSON lines) or position (array); a file that is valid
    JSON but no table for Arrow (a field of varying types) is then taken as read."""
    from datasets import load_dataset

    if path.suffix.lower() in COMPRESSED:  # datasets reads it; rows are named by their index
        data = _datasets_call(path, lambda: load_dataset("json", data_files=str(path), split="train",
                                                         cache_dir=str(cache)), cache, "not readable as JSON")
        return Loaded(data, list(data.column_names), path.name, lambda i: f"{path}: row {i}", "JSON (compressed)")
    _require_utf8(path)
    array = _is_json_array(path)
    lines: list[int] = []

    def where(i: int) -> str:
        if array:
            return f"{path}: row {i}"
        if not lines:
            lines.extend(_line_numbers(path))
        return f"{path}:{lines[i]}" if i < len(lines) else f"{path}: row {i}"

    container = "JSON array" if array else "JSON lines"
    try:
        data = _datasets_call(path, lambda: load_dataset("json", data_files=str(path), split="train",
                                                         cache_dir=str(cache)), cache, "not readable as JSON")
        return Loaded(data, list(data.column_names), path.name, where, container)
    except DataError as unreadable:
        failure = unreadable
    if array:
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # else: JSON lines whose first record is a list
                raise DataError(f"{path}:{e.lineno}: invalid JSON at column {e.colno} ({e.msg})") from None
            array = False
        else:
            if not isinstance(rows, list):
                raise failure from None
            return Loaded(rows, _keys(rows), path.name, where, container)
    rows = [obj for _, obj in iter_jsonl(path)]  # names the first bad line
    return Loaded(rows, _keys(rows), path.name, where, "JSON lines")


def _keys(rows: list[Any]) -> list[str]:
    return list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))


def _csv_file(path: Path, cache: Path) -> Loaded:
    """CSV (or TSV) with every cell read as text (pandas would read a prompt ``42`` as a number) and an empty
    cell as an empty string."""
    from datasets import Features, Value, load_dataset

    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    _require_utf8(path)
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    if not header:
        raise DataError(f"{path}: no records (the file is empty)")
    features = Features({name: Value("string") for name in header})
    data = _datasets_call(path, lambda: load_dataset("csv", data_files=str(path), split="train", cache_dir=str(cache),
                                                     features=features, keep_default_na=False,
                                                     delimiter=delimiter), cache, "not readable as CSV")
    return Loaded(data, list(data.column_names), path.name, lambda i: f"{path}: row {i}", "CSV")


def _builder(path: Path) -> str:
    """``datasets``' packaged loader for a file: by its extension, else by its first bytes."""
    name = path.name.lower()
    for ext in COMPRESSED:
        name = name.removesuffix(ext)
    builder = EXTENSIONS.get(Path(name).suffix)
    if builder:
        return builder
    with open(path, "rb") as f:
        head = f.read(8)
    return "parquet" if head[:4] == b"PAR1" else "arrow" if head[:6] == b"ARROW1" else "json"


def _from_path(path: Path, split: str, cache: Path, key: str) -> Loaded:
    from datasets import load_dataset, load_from_disk

    if not path.exists():
        raise DataError(f"{path}: data file not found; fix {key}.path in the config")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():  # save_to_disk's
            data = _datasets_call(path, lambda: load_from_disk(str(path)), cache,
                                  "not readable as a datasets folder (save_to_disk)")
            container = "save_to_disk folder"
        else:
            data = _datasets_call(path, lambda: load_dataset(str(path), cache_dir=str(cache)), cache,
                                  "holds no data files datasets can read (JSON lines, JSON, Parquet, CSV, Arrow)")
            container = "folder"
        data = _split_of(data, split, path)
        return Loaded(data, list(data.column_names), path.name, lambda i: f"{path} [{split}]: row {i}", container)
    builder = _builder(path)
    if builder == "json":
        return _json_file(path, cache)
    if builder == "csv":
        return _csv_file(path, cache)
    data = _datasets_call(path, lambda: load_dataset(builder, data_files=str(path), split="train",
                                                     cache_dir=str(cache)), cache, f"not readable as {builder}")
    return Loaded(data, list(data.column_names), path.name, lambda i: f"{path}: row {i}", builder.capitalize())


def _from_hub(name: str, split: str, revision: str | None, key: str) -> tuple[Loaded, str]:
    """The rows of a hub data set and the commit sha they were loaded at."""
    try:
        from datasets import load_dataset
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(name, revision=revision).sha
        data = load_dataset(name, split=split, revision=sha)
    except Exception as e:  # offline, unknown name, no access: all end the same way for the user
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise DataError(f"data set {name!r} (split {split!r}) could not be loaded from the Hugging Face hub (offline, "
                        f"no access or no such id; {reason}); save it where the hub is reachable "
                        f"(save_to_disk, Parquet or JSON lines) and point the config at the copy: "
                        f"{key}: {{path: /path/to/copy}}") from None
    columns = list(getattr(data, "column_names", None) or _keys(list(data)))
    return Loaded(data, columns, name, lambda i: f"{name}[{split}]:{i}", "hub"), sha


# ---------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """How to read the rows of one source: its format (None: messages or prompt/completion, row by row, as
    JSON-lines data always was), its column names and its extra role names."""

    format: str | None
    columns: dict[str, str | None]
    roles: dict[str, str]

    def col(self, field: str) -> str:
        return self.columns.get(field) or field


def _detect(loaded: Loaded, spec: dict[str, Any], key: str) -> Shape:
    columns = spec.get("columns") or {}
    if not isinstance(columns, dict) or any(k not in COLUMN_KEYS for k in columns) or any(
            not isinstance(v, str) and not (k == "id" and v is None) for k, v in columns.items()):
        raise DataError(f"{key}.columns must map fields ({', '.join(COLUMN_KEYS)}) to the source's column names "
                        f"(id: null for none), got {columns!r}")
    roles = spec.get("roles") or {}
    if not isinstance(roles, dict) or any(v not in ROLES for v in roles.values()):
        raise DataError(f"{key}.roles must map the source's role names to {', '.join(ROLES)}, got {roles!r}")
    shape = Shape(spec.get("format"), columns, roles)
    have = set(loaded.columns)
    for field, name in columns.items():
        if name is not None and field not in TURN_KEYS and name not in have:
            raise DataError(f"{key}.columns.{field} names the column {name!r}, which {loaded.name} does not have "
                            f"(it has {', '.join(loaded.columns) or 'none'})")
    if shape.format is not None:
        if shape.format not in FORMATS:
            raise DataError(f"{key}.format must be one of {', '.join(FORMATS)}, got {shape.format!r}")
        return shape
    found = [f for f, marks in MARKERS.items() if any(shape.col(m) in have for m in marks)]
    if not found or set(found) <= {"messages", "prompt_completion"}:
        return shape  # row by row: messages, else prompt/completion, else a one-line refusal naming the row
    if len(found) > 1:
        raise DataError(f"{loaded.name}: its columns ({', '.join(loaded.columns)}) fit more than one record format "
                        f"({', '.join(found)}); name one in the source: {key}.format")
    return Shape(found[0], columns, roles)


def _text(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}': expected a string, got {type(value).__name__}")
    return value


def _role(value: object, shape: Shape, where: str, field: str) -> str:
    if isinstance(value, str):
        role = shape.roles.get(value) or ROLE_NAMES.get(value.strip().lower())
        if role:
            return role
    raise DataError(f"{where}: field '{field}': unknown role {value!r} (expected one of {', '.join(ROLES)} or a usual "
                    f"name of one: {', '.join(n for n in ROLE_NAMES if n not in ROLES)}; name others in the source, "
                    f"e.g. roles: {{{value}: user}})")


def _json_text(value: object) -> object:
    """A list column stored as JSON text (CSV) as the list; any other value as it is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _turns(value: object, shape: Shape, where: str, field: str) -> list[dict[str, str]]:
    """A list of turns (``role``/``content`` or ``from``/``value``, or the names ``columns`` gives) as messages."""
    value = _json_text(value)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}': expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{field}[{i}]': expected an object with 'role' and 'content' "
                            "(or 'from' and 'value')")
        turn = {k: v for k, v in turn.items() if v is not None}  # datasets fills absent keys with None
        role_key = shape.columns.get("role") or ("role" if "role" in turn else "from" if "from" in turn else "role")
        content_key = shape.columns.get("content") or ("content" if "content" in turn
                                                       else "value" if "value" in turn else "content")
        if role_key not in turn:
            raise DataError(f"{where}: field '{field}[{i}].{role_key}' is missing")
        role = _role(turn[role_key], shape, where, f"{field}[{i}].{role_key}")
        content = _text(turn.get(content_key), where, f"{field}[{i}].{content_key}")
        out.append({"role": role, "content": content})
    return out


def _with_system(messages: list[dict[str, str]], system: object, where: str, field: str) -> list[dict[str, str]]:
    if system is None or (isinstance(system, str) and not system.strip()):
        return messages
    if messages and messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": _text(system, where, field)}] + messages


def _needs_answer(messages: list[dict[str, str]], where: str, field: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field '{field}': no assistant turn, so there is nothing to train on")


def _alpaca(row: dict[str, Any], shape: Shape, where: str) -> dict[str, Any]:
    col = shape.col
    for field in ("instruction", "output"):
        if row.get(col(field)) is None:
            raise DataError(f"{where}: field '{col(field)}' is missing (an Alpaca record needs "
                            f"'{col('instruction')}' and '{col('output')}')")
    prompt = _text(row[col("instruction")], where, col("instruction"))
    extra = row.get(col("input"))
    if extra is not None and _text(extra, where, col("input")).strip():
        prompt = f"{prompt}\n{extra}"  # as LLaMA-Factory and the Alpaca trainers join them
    messages: list[dict[str, str]] = []
    history = _json_text(row.get(col("history")))
    for i, pair in enumerate(history or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{where}: field '{col('history')}[{i}]': expected a [user, assistant] pair")
        messages += [{"role": "user", "content": _text(pair[0], where, f"{col('history')}[{i}][0]")},
                     {"role": "assistant", "content": _text(pair[1], where, f"{col('history')}[{i}][1]")}]
    messages += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": _text(row[col("output")], where, col("output"))}]
    return {"messages": _with_system(messages, row.get(col("system")), where, col("system"))}


def _sharegpt(row: dict[str, Any], shape: Shape, where: str) -> dict[str, Any]:
    field = shape.col("conversations")
    if row.get(field) is None:
        raise DataError(f"{where}: field '{field}' is missing (a ShareGPT record needs it)")
    messages = _with_system(_turns(row[field], shape, where, field), row.get(shape.col("system")), where,
                            shape.col("system"))
    _needs_answer(messages, where, field)
    return {"messages": messages}


def _messages(row: dict[str, Any], shape: Shape, where: str) -> dict[str, Any]:
    field = shape.col("messages")
    if row.get(field) is None:
        raise DataError(f"{where}: field '{field}' is missing")
    messages = _turns(row[field], shape, where, field)
    _needs_answer(messages, where, field)
    return {"messages": messages}


def _prompt_completion(row: dict[str, Any], shape: Shape, where: str) -> dict[str, Any]:
    p, c = shape.col("prompt"), shape.col("completion")
    for field, other in ((p, c), (c, p)):
        if row.get(field) is None:
            raise DataError(f"{where}: field '{field}' is missing (records with '{other}' need '{field}' too)")
    prompt, completion = row[p], row[c]
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt/completion
        messages = _turns(prompt, shape, where, p) + _turns(completion, shape, where, c)
        _needs_answer(messages, where, c)
        return {"messages": messages}
    return {"prompt": _text(prompt, where, p), "completion": _text(completion, where, c)}


CONVERT = {"messages": _messages, "prompt_completion": _prompt_completion, "alpaca": _alpaca,
           "sharegpt": _sharegpt}


def _record(row: object, shape: Shape, where: str) -> tuple[str, dict[str, Any]]:
    """(the row's format, its record as ``pool.jsonl`` holds it: ``messages`` or ``prompt``/``completion``)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    fmt = shape.format
    if fmt is None:
        if row.get(shape.col("messages")) is not None:
            fmt = "messages"
        elif row.get(shape.col("prompt")) is not None or row.get(shape.col("completion")) is not None:
            fmt = "prompt_completion"
        else:
            fields = ", ".join(repr(k) for k, v in row.items() if v is not None) or "none"
            plain = ("; plain 'text' records belong to a pretraining corpus" if row.get("text") is not None else "")
            raise DataError(f"{where}: neither 'messages' nor 'prompt'/'completion' is present (an SFT record needs "
                            f"one, or Alpaca's 'instruction'/'output' or ShareGPT's 'conversations'; the record has "
                            f"{fields}{plain}); name other columns in the source with columns:")
    record = CONVERT[fmt](row, shape, where)
    parse_record(record, where, allow_plain_text=False)  # the one check of what tokenization reads
    return fmt, record


def _plain(value: Any) -> Any:
    """A column value as JSON (dates as ISO text, bytes as base64, non-finite numbers as null)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return str(value)


def _id_column(loaded: Loaded, shape: Shape) -> str | None:
    if "id" in shape.columns:
        return shape.columns["id"]
    return next((c for c in ID_COLUMNS if c in loaded.columns), None)


def _records(loaded: Loaded, shape: Shape, limit: int | None, key: str) -> tuple[list[dict[str, Any]], dict]:
    """Every row as ``{"id", <record>, "meta"}``, validated; and what was found (formats, id column)."""
    id_col = _id_column(loaded, shape)
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    formats: dict[str, int] = {}
    for i, row in enumerate(loaded.rows):
        if limit is not None and i >= limit:
            break
        where = loaded.where(i)
        fmt, record = _record(row, shape, where)
        formats[fmt] = formats.get(fmt, 0) + 1
        used = {shape.col(f) for f in FORMATS[fmt]} | ({id_col} if id_col else set())
        # a row without a value in the id column is still joined back by its place
        rid = str(_plain(row[id_col])) if id_col and row.get(id_col) is not None else f"{loaded.name}:{i}"
        if rid in seen:
            raise DataError(f"{where}: id {rid!r} is also the id of row {seen[rid]}; ids must be unique to join "
                            f"results back (name another column with {key}.columns.id, or null for <source>:<row>)")
        seen[rid] = i
        meta = {k: _plain(v) for k, v in row.items() if k not in used}
        rows.append({"id": rid, **record, **({"meta": meta} if meta else {})})
    return rows, {"container": loaded.container, "formats": formats, "id_column": id_col}


def load_source(spec: dict[str, Any], key: str = "data.pool",
                cache: str | os.PathLike | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records of one source (validated, with ids) and a description of where they came from; ``key`` names
    the source's place in the config for error messages; ``cache``: where ``datasets`` may write (deleted after)."""
    if not isinstance(spec, dict):
        raise DataError(f"{key} must be an object with 'path' or 'hub', got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS) - {"first_of_pool"})
    if unknown:
        raise DataError(f"{key} has an unknown key {unknown[0]!r} ({', '.join(SPEC_KEYS)})")
    limit = spec.get("limit")
    if limit is not None and (not is_whole(limit) or limit < 1):
        raise DataError(f"{key}.limit must be a whole number of records, at least 1, or null; got {limit!r}")
    split = spec.get("split", "train")
    if not isinstance(split, str):
        raise DataError(f"{key}.split must be a split name, got {split!r}")
    local = spec.get("path")
    if local is None and isinstance(spec.get("hub"), str) and Path(spec["hub"]).is_dir():
        local = spec["hub"]  # what datasets.load_dataset does with a local folder too
    if local is not None and not isinstance(local, str):
        raise DataError(f"{key}.path must be a file or folder path, got {local!r}")
    if local is None and "hub" not in spec:
        raise DataError(f"a data source needs 'path' or 'hub', got {sorted(spec)}")
    scratch = Path(cache) if cache is not None else None
    try:
        if local is not None:
            if scratch is None:
                import tempfile

                scratch = Path(tempfile.mkdtemp(prefix="tokenclean-data-"))
            loaded = _from_path(Path(local), split, scratch, key)
            origin: dict[str, Any] = {"path": str(local), "split": split if Path(local).is_dir() else None}
        else:
            loaded, sha = _from_hub(spec["hub"], split, spec.get("revision"), key)
            origin = {"hub": spec["hub"], "split": split, "revision": spec.get("revision"), "resolved_sha": sha}
        rows, found = _records(loaded, _detect(loaded, spec, key), limit, key)
    finally:
        if scratch is not None and cache is None:
            shutil.rmtree(scratch, ignore_errors=True)
    given = {k: spec[k] for k in ("format", "columns", "roles") if k in spec}
    return rows, {**origin, "limit": limit, **given, **found}


def _empty_messages(rows: list[dict[str, Any]]) -> int:
    """Messages (or prompts / completions) that are empty or whitespace-only, in validated rows."""
    return sum(parse_record(r, "").empty_messages for r in rows)


def _write(rows: list[dict[str, Any]], path: Path) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load_into(spec: dict[str, Any], key: str, cache: Path, out_dir: str | os.PathLike
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`load_source` with ``datasets``' cache inside the output being written: a fault of the machine there is
    the output folder's, and its error names that folder, never the hidden cache."""
    try:
        return load_source(spec, key, cache)
    except WriteError as e:
        raise e.at(out_dir) from e.__cause__
    except OSError as e:
        fault = write_fault(e, out_dir) if str(cache) in str(e.filename or e) else None
        if fault is None:
            raise
        raise fault from e


def prepare_data(spec: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``pool.jsonl``, ``warmup.jsonl`` and ``data.json`` (sources, record counts, sha256) into ``out_dir``.
    ``datasets`` writes its cache inside the new output (deleted before it is put in place): nothing is left
    outside it, and a full disk is named as the output's."""
    if not isinstance(spec, dict) or "pool" not in spec or "warmup" not in spec:
        raise DataError("the data section needs a 'pool' and a 'warmup' source")
    unknown = sorted(set(spec) - {"pool", "warmup"})
    if unknown:
        raise DataError(f"the data section has an unknown key {unknown[0]!r} (it holds 'pool' and 'warmup')")
    meta: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        cache = tmp / ".datasets-cache"
        pool, pool_from = _load_into(spec["pool"], "data.pool", cache, out_dir)
        if not pool:
            raise DataError(f"the pool source {pool_from.get('path') or pool_from.get('hub')} holds no records")
        if isinstance(spec["warmup"], dict) and "first_of_pool" in spec["warmup"]:
            n = spec["warmup"]["first_of_pool"]
            if not is_whole(n):
                raise DataError(f"data.warmup.first_of_pool must be a whole number of records, got {n!r}")
            if not 0 < n <= len(pool):
                raise DataError(f"data.warmup.first_of_pool = {n}, but the pool holds {len(pool)} records")
            warmup, warmup_from = pool[:n], {"first_of_pool": n}
        else:
            warmup, warmup_from = _load_into(spec["warmup"], "data.warmup", cache, out_dir)
        if not warmup:
            raise DataError(f"the warm-up source {warmup_from.get('path') or warmup_from.get('hub')} holds no "
                            "records")
        shutil.rmtree(cache, ignore_errors=True)
        for name, rows, origin in (("pool", pool, pool_from), ("warmup", warmup, warmup_from)):
            meta[name] = {"source": origin, "records": len(rows), "sha256": _write(rows, tmp / f"{name}.jsonl"),
                          "empty_messages": _empty_messages(rows)}
            if meta[name]["empty_messages"]:
                log.warning("%s: %d empty or whitespace-only messages (kept: the official runs tokenized them)",
                            name, meta[name]["empty_messages"])
        write_json(tmp / "data.json", meta)
    return meta
