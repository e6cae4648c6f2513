"""Reading and validating JSON-lines SFT data.

Accepted record forms (one JSON object per line):
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``; at least one assistant turn;
- ``{"prompt": str, "completion": str}``;
- ``{"text": str}``: plain text, every token trained (pretraining corpora only: SFT sources refuse it).
Contents may be empty or whitespace-only: the official runs tokenized such records (an empty assistant turn
still trains its end-of-turn token), so they are accepted and counted, not refused.
A record may carry ``"id"`` (any JSON value, kept as text: the user's id of the record, which ``tokenclean data``
writes for every record) and ``"classes": [[start, end, name], ...]``: ground-truth character spans over the content of
its last assistant turn (the synthetic world writes them; real data has none).

Every problem is reported as one line naming the file, the line and the field.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
# Ground-truth classes of the embedded world (tokenclean/world.py); `novel` (informative tokens of knowledge only
# the pool holds) comes last so that the ids of the others never change.
def is_whole(value: object) -> bool:
    """A JSON whole number (true and false are ints to Python, not counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A JSON number, whole or not (not true or false)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


TOKEN_CLASSES = ("informative", "boilerplate", "corrupted", "garbage", "novel")
# The classes worth learning (novel tokens are informative ones a reference trained on the warm-up set cannot
# know) and the harmful ones: the ground-truth rows, the cleaning-quality measures and the score separation
# all group the classes this way.
INFORMATIVE_CLASSES = ("informative", "novel")
NOISY_CLASSES = ("corrupted", "garbage")
# The ground-truth rows (selection methods, embedded world only) and the classes each keeps: they say what
# training on exactly those tokens gives; whether that beats every method is for the table to show.
TRUTH_METHODS = {"truth_drop_noisy": tuple(c for c in TOKEN_CLASSES if c not in NOISY_CLASSES),
                 "truth_keep_informative": INFORMATIVE_CLASSES}


class DataError(ValueError):
    """Malformed input data; the message is one line naming file, line and field."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """One validated sample. ``plain_text`` records train every token; chat records train assistant turns."""

    messages: tuple[Message, ...]
    plain_text: bool = False
    classes: tuple[tuple[int, int, int], ...] | None = None  # (start, end, class id) over the last assistant turn
    # the user's id of the record (``tokenclean data`` gives every record one), carried into the token table
    id: str | None = None
    # ``file:line`` it was read from, for errors found later (e.g. by the tokenizer)
    where: str = field(default="", compare=False)

    @property
    def empty_messages(self) -> int:
        """Messages whose content is empty or whitespace-only."""
        return sum(not m.content.strip() for m in self.messages)


def _content(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def parse_record(obj: object, where: str, allow_plain_text: bool = True) -> Record:
    """Validate one decoded JSON value; ``where`` is ``file:line`` used as the prefix of every error.

    ``allow_plain_text=False`` (SFT data) refuses ``{"text": ...}`` records, which only a pretraining corpus holds.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages': expected a non-empty list")
        messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(f"{where}: field 'messages[{i}]': expected an object with 'role' and 'content'")
            role = m.get("role")
            if role not in ROLES:
                raise DataError(f"{where}: field 'messages[{i}].role': unknown role {role!r} "
                                f"(expected one of {', '.join(ROLES)})")
            messages.append(Message(role, _content(m.get("content"), f"{where}: field 'messages[{i}].content'")))
        if not any(m.role == "assistant" for m in messages):
            raise DataError(f"{where}: field 'messages': no assistant turn, so there is nothing to train on")
        record = Record(tuple(messages))
    elif "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise DataError(f"{where}: field '{key}' is missing "
                                "(records with 'prompt' need 'completion' and vice versa)")
        record = Record((Message("user", _content(obj["prompt"], f"{where}: field 'prompt'")),
                         Message("assistant", _content(obj["completion"], f"{where}: field 'completion'"))))
    elif "text" in obj and allow_plain_text:
        record = Record((Message("assistant", _content(obj["text"], f"{where}: field 'text'")),), plain_text=True)
    elif allow_plain_text:
        raise DataError(f"{where}: neither 'messages' nor 'prompt'/'completion' (nor 'text') is present")
    else:
        raise DataError(f"{where}: neither 'messages' nor 'prompt'/'completion' is present (an SFT record needs one; "
                        f"plain 'text' records belong to a pretraining corpus)")
    classes = _parse_classes(obj["classes"], record, where) if "classes" in obj else None
    rid = obj.get("id")
    return Record(record.messages, record.plain_text, classes, None if rid is None else str(rid), where)


def _parse_classes(spans: object, record: Record, where: str) -> tuple[tuple[int, int, int], ...]:
    target = [m for m in record.messages if m.role == "assistant"][-1].content
    if not isinstance(spans, list):
        raise DataError(f"{where}: field 'classes': expected a list of [start, end, class]")
    out = []
    for i, s in enumerate(spans):
        ok = (isinstance(s, list) and len(s) == 3 and isinstance(s[0], int) and isinstance(s[1], int)
              and 0 <= s[0] < s[1] <= len(target) and s[2] in TOKEN_CLASSES)
        if not ok:
            raise DataError(f"{where}: field 'classes[{i}]': expected [start, end, class] within the response "
                            f"with class in {', '.join(TOKEN_CLASSES)}, got {s!r}")
        out.append((s[0], s[1], TOKEN_CLASSES.index(s[2])))
    return tuple(out)


def iter_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    """``(where, object)`` for every non-blank line of a JSON-lines file; ``where`` is ``file:line`` for errors."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 at byte {e.start}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON at column {e.colno} ({e.msg})") from None
            yield where, obj


def read_jsonl(path: str | os.PathLike, allow_plain_text: bool = True) -> list[Record]:
    """Read and validate a whole JSON-lines file (blank lines are skipped)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    records = [parse_record(obj, where, allow_plain_text) for where, obj in iter_jsonl(path)]
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows as JSON lines atomically."""
    from tokenclean.artifacts import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
