"""Chat formatting and tokenization into the flat token table.

Format (Tulu style, as the paper's runs used)::

    <bos><|user|>\\n{user}\\n<|assistant|>\\n{assistant}<eos>\\n<|user|>\\n...

Each piece is tokenized on its own and concatenated, so the boundary between masked and trained tokens is
exact by construction: role headers, system and user turns and separators are out of ``loss_mask``; the content
of every assistant turn and its end-of-turn token are in. Plain-text records (``{"text": ...}``) train every
token after the first.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenclean.artifacts import TokenTable, fingerprint_bytes, fingerprint_file
from tokenclean.data import TOKEN_CLASSES, Record, read_jsonl

log = logging.getLogger(__name__)

ROLE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
TURN_SEPARATOR = "\n"
NO_CLASS = -1  # token_class of tokens outside loss_mask (and of all tokens when the data carry no classes)


def format_prompt(user_text: str) -> str:
    """The text a model sees before it answers a single-turn user message (used by the evaluation tasks)."""
    return ROLE_HEADERS["user"] + user_text + TURN_SEPARATOR + ROLE_HEADERS["assistant"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies the exact vocabulary and pre/post-processing of a fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError("tokenclean needs a fast (Rust-backed) tokenizer")
    special = f"{tokenizer.bos_token_id}|{tokenizer.eos_token_id}"
    return fingerprint_bytes(backend.to_str().encode(), special.encode())


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """A model's fast tokenizer (``revision``: the hub commit to load, see :func:`tokenclean.models.hub_commit`)."""
    from transformers import AutoTokenizer

    from tokenclean.models import require_model_dir

    require_model_dir(str(name_or_path))
    pinned = {"revision": revision} if revision else {}
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **pinned)
    except (OSError, ValueError) as e:
        from tokenclean.models import not_loadable

        raise FileNotFoundError(not_loadable(name_or_path, e, "tokenizer of")) from None
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no eos token; set one before tokenizing SFT data")
    return tok


@dataclass
class _Piece:
    text: str
    trained: bool
    classes: tuple[tuple[int, int, int], ...] | None = None


def _pieces(record: Record) -> list[_Piece | int]:
    """The record as text pieces (tokenized separately) and special-token placeholders (-1 = eos)."""
    if record.plain_text:
        return [_Piece(record.messages[0].content, True), -1]
    out: list[_Piece | int] = []
    last_assistant = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
    for i, m in enumerate(record.messages):
        out.append(_Piece(ROLE_HEADERS[m.role], False))
        if m.role == "assistant":
            out.append(_Piece(m.content, True, record.classes if i == last_assistant else None))
            out.append(-1)
            if i < len(record.messages) - 1:
                out.append(_Piece(TURN_SEPARATOR, False))
        else:
            out.append(_Piece(m.content + TURN_SEPARATOR, False))
    return out


def _token_classes(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int, int], ...]) -> list[int]:
    """Class of each token = class of the span holding the token's first non-space character."""
    starts = np.array([s for s, _, _ in spans])
    ends = np.array([e for _, e, _ in spans])
    classes = []
    for a, b in offsets:
        hit = np.nonzero((starts <= a) & (a < ends))[0]
        if len(hit) == 0 and b > a:  # a leading space belonging to no span: use the token's last character
            hit = np.nonzero((starts <= b - 1) & (b - 1 < ends))[0]
        classes.append(int(spans[hit[0]][2]) if len(hit) else TOKEN_CLASSES.index("boilerplate"))
    return classes


def tokenize_records(records: list[Record], tokenizer: Any, max_length: int) -> tuple[TokenTable, dict[str, int]]:
    """Tokenize records into a TokenTable; samples whose response is entirely truncated away are skipped."""
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    pieces = [_pieces(r) for r in records]
    texts = [p.text for ps in pieces for p in ps if isinstance(p, _Piece)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids_iter = iter(zip(encoded["input_ids"], encoded["offset_mapping"]))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    all_ids: list[np.ndarray] = []
    all_mask: list[np.ndarray] = []
    all_cls: list[np.ndarray] = []
    kept_index: list[int] = []
    stats = {"records": len(records), "skipped_no_response_after_truncation": 0, "truncated": 0}
    for index, ps in enumerate(pieces):
        ids: list[int] = [bos] if bos is not None else []
        mask: list[bool] = [False] * len(ids)
        cls: list[int] = [NO_CLASS] * len(ids)
        for p in ps:
            if isinstance(p, int):  # end-of-turn token, trained
                ids.append(eos)
                mask.append(True)
                cls.append(TOKEN_CLASSES.index("boilerplate") if records[index].classes else NO_CLASS)
                continue
            piece_ids, piece_offsets = next(ids_iter)
            ids.extend(piece_ids)
            mask.extend([p.trained] * len(piece_ids))
            if p.classes:
                cls.extend(_token_classes(piece_offsets, p.classes))
            else:
                cls.extend([NO_CLASS] * len(piece_ids))
        mask[0] = False  # position 0 has no context: never trained, whatever the record form
        if len(ids) > max_length:
            stats["truncated"] += 1
            ids, mask, cls = ids[:max_length], mask[:max_length], cls[:max_length]
        if not any(mask):
            stats["skipped_no_response_after_truncation"] += 1
            continue
        all_ids.append(np.asarray(ids, dtype=np.int32))
        all_mask.append(np.asarray(mask, dtype=bool))
        all_cls.append(np.asarray(cls, dtype=np.int8))
        kept_index.append(index)
    if not kept_index:
        raise ValueError(f"no sample has a response token left after truncation to max_length={max_length}; "
                         "raise max_length")
    lengths = np.array([len(a) for a in all_ids], dtype=np.int64)
    extras = {"sample_index": np.asarray(kept_index, dtype=np.int64)}
    if any(r.classes for r in records):
        extras["token_class"] = np.concatenate(all_cls)
    table = TokenTable(np.concatenate(all_ids), np.concatenate([[0], np.cumsum(lengths)]), np.concatenate(all_mask), extras)
    if stats["skipped_no_response_after_truncation"]:
        log.warning("%d of %d samples skipped: their response was entirely cut by max_length=%d",
                    stats["skipped_no_response_after_truncation"], len(records), max_length)
    return table, stats


def tokenize_file(data: str | os.PathLike, tokenizer_name: str, max_length: int, out: str | os.PathLike,
                  trust_remote_code: bool = False, revision: str | None = None) -> dict[str, Any]:
    """CLI entry: validate ``data``, tokenize it and write ``out`` (nothing is written if anything fails).
    ``revision`` pins a hub tokenizer; the commit loaded is recorded either way."""
    from tokenclean.models import hub_commit

    records = read_jsonl(data)
    commit = hub_commit(tokenizer_name, revision)
    tokenizer = load_tokenizer(tokenizer_name, trust_remote_code, commit)
    try:
        table, stats = tokenize_records(records, tokenizer, max_length)
    except ValueError as e:
        raise ValueError(f"{data}: {e}") from None
    meta = {
        "kind": "tokens",
        "data": str(data),
        "data_fingerprint": fingerprint_file(data),
        "tokenizer": str(tokenizer_name),
        "tokenizer_revision": revision or None,
        "tokenizer_commit": commit,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        **stats,
    }
    return table.save(Path(out), meta)


def concat_files(tokens: list[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """CLI entry: one token table holding the samples of ``tokens`` in order (e.g. the pool plus the warm-up set).

    The tables must come from the same tokenizer; the per-sample ``source`` extra records which input each
    sample came from.
    """
    loaded = [TokenTable.load(t) for t in tokens]
    fingerprints = {m.get("tokenizer_fingerprint") for _, m in loaded}
    if len(fingerprints) != 1:
        raise ValueError(f"{', '.join(map(str, tokens))} were tokenized with different tokenizers; re-tokenize them "
                         "with one tokenizer before concatenating")
    table = TokenTable.concat([t for t, _ in loaded])
    meta = {"kind": "tokens", "data": [m.get("data") for _, m in loaded], "sources": [str(t) for t in tokens],
            "source_fingerprints": [m["fingerprint"] for _, m in loaded],
            "tokenizer": loaded[0][1].get("tokenizer"), "tokenizer_fingerprint": fingerprints.pop(),
            "max_length": loaded[0][1].get("max_length")}
    return table.save(Path(out), meta)


def chunk_range(n_samples: int, chunks: int, index: int) -> range:
    """Samples of chunk ``index`` (1-based) when ``n_samples`` are cut into ``chunks`` contiguous, near-equal
    parts in file order (the self-evolving rounds' data; sizes differ by at most one)."""
    if chunks < 1 or not 1 <= index <= chunks:
        raise ValueError(f"chunk {index} of {chunks}: need 1 <= index <= chunks")
    if n_samples < chunks:
        raise ValueError(f"cannot cut {n_samples} samples into {chunks} chunks")
    return range((index - 1) * n_samples // chunks, index * n_samples // chunks)


def chunk_file(tokens: str | os.PathLike, chunks: int, index: int, out: str | os.PathLike) -> dict[str, Any]:
    """CLI entry: chunk ``index`` of ``chunks`` of a token table, as a token table of its own."""
    table, meta = TokenTable.load(tokens)
    part = chunk_range(table.n_samples, chunks, index)
    chunk = table.take(np.arange(part.start, part.stop))
    chunk.extras["source_sample"] = np.arange(part.start, part.stop, dtype=np.int64)
    return chunk.save(Path(out), {**meta, "source": str(tokens), "source_fingerprint": meta["fingerprint"],
                                  "chunk": index, "chunks": chunks})
