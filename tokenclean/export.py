"""Export a token table with its selection for other trainers (Hugging Face ``Trainer``, TRL, LLaMA-Factory, ...).

One row per sample with ``input_ids``, ``labels`` and ``attention_mask`` (and ``weights`` when given; and ``id``,
the user's id of the record, where the table was made from own data: ``tokenclean data``), the
columns a causal LM's ``forward(labels=...)`` and the standard collators (``DataCollatorForSeq2Seq`` pads
``labels`` with -100) read. ``labels`` are NOT shifted: ``labels[p]`` is ``input_ids[p]`` where token p is
trained and -100 elsewhere; the model shifts them itself (token p is predicted from position p-1), the same
alignment as :func:`tokenclean.loss.target_nll`. So an outside trainer's mean loss over a batch is our mean
NLL over the same selected tokens (tests/test_export.py checks it with ``transformers.Trainer``).

No torch here: ``tokenclean export`` runs on a machine without an accelerator in a fraction of a second per
million tokens (the columns are built from the flat arrays, never sample by sample in Python, for ``hf``).
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from tokenclean import __version__
from tokenclean.artifacts import ArtifactError, TokenTable, atomic_dir, fingerprint_bytes, load_array, write_json

FORMATS = ("hf", "jsonl")
IGNORE_INDEX = -100  # the label that PyTorch's cross_entropy and every HF causal LM skip
JSONL_NAME = "data.jsonl"
PROVENANCE_NAME = "export.json"


def export_columns(table: TokenTable, mask: np.ndarray | None = None, weights: np.ndarray | None = None,
                   keep_empty: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """The flat columns of the written samples and their offsets: ``(offsets, columns, counts)``; where the table
    holds the records' ids (own data), ``columns["id"]`` is one per written sample, not per token.

    A token is trained where ``loss_mask`` and ``mask`` (default: every ``loss_mask`` token) hold. Samples
    with no trained token are dropped unless ``keep_empty``, as :func:`tokenclean.training.train_model` drops
    them (they would add compute and, in a trainer that averages per batch, a batch of nothing).
    """
    trained = table.loss_mask.copy() if mask is None else table.loss_mask & mask
    per_sample = np.add.reduceat(trained.astype(np.int64), table.offsets[:-1])
    keep = np.ones(table.n_samples, dtype=bool) if keep_empty else per_sample > 0
    tokens = np.repeat(keep, table.lengths)
    offsets = np.concatenate([[0], np.cumsum(table.lengths[keep])]).astype(np.int64)
    ids = table.input_ids[tokens]
    trained = trained[tokens]
    columns = {"input_ids": ids, "labels": np.where(trained, ids, IGNORE_INDEX).astype(np.int32),
               "attention_mask": np.ones(len(ids), dtype=np.int8)}
    if weights is not None:
        columns["weights"] = np.where(trained, weights[tokens], 0).astype(np.float32)
    if "record_id" in table.extras:  # own data: the user's id of each written sample, to join results back
        columns["id"] = table.extras["record_id"][keep]
    counts = {"n_samples_in_table": table.n_samples, "n_samples": int(keep.sum()),
              "n_samples_dropped": int((~keep).sum()), "n_tokens": len(ids),
              "n_response_tokens": int(table.loss_mask[tokens].sum()), "n_trained_tokens": int(trained.sum())}
    return offsets, columns, counts


def _arrow_table(offsets: np.ndarray, columns: dict[str, np.ndarray]) -> Any:
    """One list column per flat array, sharing ``offsets`` (zero-copy; large lists past 2**31 tokens)."""
    import pyarrow as pa

    large = offsets[-1] >= np.iinfo(np.int32).max
    make = pa.LargeListArray if large else pa.ListArray
    index = pa.array(offsets.astype(np.int64 if large else np.int32))
    return pa.table({name: pa.array(values.tolist(), pa.string()) if name == "id" else
                     make.from_arrays(index, pa.array(values)) for name, values in columns.items()})


def _jsonl_lines(offsets: np.ndarray, columns: dict[str, np.ndarray]) -> Iterator[str]:
    for i, (a, b) in enumerate(itertools.pairwise(offsets)):
        yield json.dumps({name: str(values[i]) if name == "id" else values[a:b].tolist()
                          for name, values in columns.items()}, separators=(",", ":"), ensure_ascii=False) + "\n"


def export_file(tokens: str | os.PathLike, out: str | os.PathLike, mask_path: str | os.PathLike | None = None,
                weights_path: str | os.PathLike | None = None, fmt: str = "hf",
                keep_empty: bool = False) -> dict[str, Any]:
    """CLI entry: write the table's samples with their selection into directory ``out``, all or nothing.

    ``hf``: a ``datasets`` directory (``datasets.load_from_disk(out)``); ``jsonl``: ``out/data.jsonl``, one
    object per sample (``datasets.load_dataset("json", data_files=...)``). Either way ``out/export.json`` records
    the inputs' fingerprints and the counts.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} ({', '.join(FORMATS)})")
    table, tmeta = TokenTable.load(tokens)
    mask, mmeta = None, {}
    if mask_path is not None:
        mask, mmeta = load_array(mask_path, "mask", made_on=(tokens, tmeta, table))
    weights, wmeta = None, {}
    if weights_path is not None:
        weights, wmeta = load_array(weights_path, "weights", made_on=(tokens, tmeta, table))
    offsets, columns, counts = export_columns(table, mask, weights, keep_empty)
    if weights is not None:
        trained = columns["labels"] != IGNORE_INDEX
        bad = trained & ~(np.isfinite(columns["weights"]) & (columns["weights"] >= 0))
        if bad.any():
            raise ArtifactError(f"{weights_path}: {int(bad.sum())} trained tokens have a negative or non-finite "
                                "weight")
    if counts["n_samples"] == 0:
        raise ValueError(f"{mask_path or tokens}: selects no token at all; nothing to export")
    record = {
        "tokenclean_version": __version__, "format": fmt, "columns": list(columns), "keep_empty": keep_empty,
        "labels": "not shifted: labels[p] = input_ids[p] where token p is trained, -100 elsewhere",
        "tokens": str(tokens), "tokens_fingerprint": tmeta.get("fingerprint"), "tokenizer": tmeta.get("tokenizer"),
        "tokenizer_fingerprint": tmeta.get("tokenizer_fingerprint"),
        "mask": str(mask_path) if mask_path is not None else None, "mask_fingerprint": mmeta.get("fingerprint"),
        "mask_method": mmeta.get("method"), "mask_ratio": mmeta.get("ratio"), "mask_seed": mmeta.get("seed"),
        "weights": str(weights_path) if weights_path is not None else None,
        "weights_fingerprint": wmeta.get("fingerprint"), **counts,
    }
    with atomic_dir(out) as tmp:
        if fmt == "hf":
            from datasets import Dataset
            from datasets.table import InMemoryTable

            # datasets' own fingerprint (its cache key) from what made the export, not a random one
            identity = fingerprint_bytes(json.dumps(record, sort_keys=True).encode())
            dataset = Dataset(InMemoryTable(_arrow_table(offsets, columns)), fingerprint=identity)
            dataset.save_to_disk(str(tmp))
        else:
            with open(tmp / JSONL_NAME, "w", encoding="utf-8") as f:  # inside the directory renamed last
                f.writelines(_jsonl_lines(offsets, columns))
        write_json(tmp / PROVENANCE_NAME, record)
    return record

