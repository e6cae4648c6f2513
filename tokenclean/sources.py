"""Bringing SFT data into an experiment: a local JSON-lines file or a hub data set becomes the experiment's
``pool.jsonl`` and ``warmup.jsonl``, every record validated, with checksums and provenance in ``data.json``.

A source is ``{"path": FILE.jsonl}`` or ``{"hub": NAME, "split": "train", "revision": REV}`` (optionally with
``"limit": N``, the first N records); the warm-up set may instead be ``{"first_of_pool": N}``: the pool's first
N records, which is what the paper's release code assumes its 10k warm-up set is (unverified; docs/paper-fidelity.md).
A hub revision (a branch, tag or commit; default the main branch) is resolved once to its commit sha, that
sha is what is loaded and what ``data.json`` records. Only SFT records (``messages`` or ``prompt``/``completion``)
are accepted: a plain ``{"text": ...}`` record belongs to a pretraining corpus.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from tokenclean.artifacts import atomic_dir, write_json
from tokenclean.data import DataError, is_whole, iter_jsonl, parse_record

log = logging.getLogger(__name__)

FIELDS = ("messages", "prompt", "completion")


def _from_file(path: str, limit: int | None) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found; fix data.*.path in the config")
    rows = []
    for where, obj in iter_jsonl(p):
        parse_record(obj, where, allow_plain_text=False)
        rows.append({k: obj[k] for k in FIELDS if k in obj})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _from_hub(name: str, split: str, revision: str | None, limit: int | None,
              key: str) -> tuple[list[dict[str, Any]], str]:
    """The records of a hub data set and the commit sha they were loaded at."""
    try:
        from datasets import load_dataset
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(name, revision=revision).sha
        data = load_dataset(name, split=split, revision=sha)
    except Exception as e:  # offline, unknown name, no access: all end the same way for the user
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise DataError(f"data set {name!r} (split {split!r}) could not be loaded from the Hugging Face hub (offline, "
                        f"no access or no such id; {reason}); save it as JSON lines where the hub is reachable and "
                        f"point the config at the copy: {key}: {{path: /path/to/file.jsonl}}") from None
    rows = []
    for i, obj in enumerate(data):
        if limit is not None and i >= limit:
            break
        present = {k: obj[k] for k in FIELDS if obj.get(k) is not None}
        parse_record(present, f"{name}[{split}]:{i}", allow_plain_text=False)
        rows.append(present)
    return rows, sha


def load_source(spec: dict[str, Any], key: str = "data.pool") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records of one source (validated) and a description of where they came from; ``key`` names the
    source's place in the config for error messages."""
    if not isinstance(spec, dict):
        raise DataError(f"{key} must be an object with 'path' or 'hub', got {spec!r}")
    unknown = sorted(set(spec) - {"path", "hub", "split", "revision", "limit", "first_of_pool"})
    if unknown:
        raise DataError(f"{key} has an unknown key {unknown[0]!r} (path, hub, split, revision, limit)")
    limit = spec.get("limit")
    if limit is not None and (not is_whole(limit) or limit < 1):
        raise DataError(f"{key}.limit must be a whole number of records, at least 1, or null; got {limit!r}")
    if "path" in spec:
        return _from_file(spec["path"], limit), {"path": str(spec["path"]), "limit": limit}
    if "hub" in spec:
        split = spec.get("split", "train")
        rows, sha = _from_hub(spec["hub"], split, spec.get("revision"), limit, key)
        return rows, {"hub": spec["hub"], "split": split, "revision": spec.get("revision"), "resolved_sha": sha,
                      "limit": limit}
    raise DataError(f"a data source needs 'path' or 'hub', got {sorted(spec)}")


def _empty_messages(rows: list[dict[str, Any]]) -> int:
    """Messages (or prompts / completions) that are empty or whitespace-only, in validated rows."""
    return sum(parse_record(r, "").empty_messages for r in rows)


def _write(rows: list[dict[str, Any]], path: Path) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare_data(spec: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``pool.jsonl``, ``warmup.jsonl`` and ``data.json`` (sources, record counts, sha256) into ``out_dir``."""
    if "pool" not in spec or "warmup" not in spec:
        raise DataError("the data section needs a 'pool' and a 'warmup' source")
    unknown = sorted(set(spec) - {"pool", "warmup"})
    if unknown:
        raise DataError(f"the data section has an unknown key {unknown[0]!r} (it holds 'pool' and 'warmup')")
    pool, pool_from = load_source(spec["pool"], "data.pool")
    if not pool:
        raise DataError(f"the pool source {pool_from} holds no records")
    if isinstance(spec["warmup"], dict) and "first_of_pool" in spec["warmup"]:
        n = spec["warmup"]["first_of_pool"]
        if not is_whole(n):
            raise DataError(f"data.warmup.first_of_pool must be a whole number of records, got {n!r}")
        if not 0 < n <= len(pool):
            raise DataError(f"data.warmup.first_of_pool = {n}, but the pool holds {len(pool)} records")
        warmup, warmup_from = pool[:n], {"first_of_pool": n}
    else:
        warmup, warmup_from = load_source(spec["warmup"], "data.warmup")
    if not warmup:
        raise DataError(f"the warm-up source {warmup_from} holds no records")
    meta: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        for name, rows, origin in (("pool", pool, pool_from), ("warmup", warmup, warmup_from)):
            meta[name] = {"source": origin, "records": len(rows), "sha256": _write(rows, tmp / f"{name}.jsonl"),
                          "empty_messages": _empty_messages(rows)}
            if meta[name]["empty_messages"]:
                log.warning("%s: %d empty or whitespace-only messages (kept: the official runs tokenized them)",
                            name, meta[name]["empty_messages"])
        write_json(tmp / "data.json", meta)
    return meta
