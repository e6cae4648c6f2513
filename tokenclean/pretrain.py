"""Pretraining the embedded world's tiny base model: tokenizer + small Llama trained on the world's corpus.

It uses the same tokenizer path and the same trainer as SFT (every token of a document trained), so the base
model is made by exactly the code that later fine-tunes it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from tokenclean.artifacts import atomic_dir, fingerprint_file
from tokenclean.data import is_whole, read_jsonl
from tokenclean.models import tiny_llama, write_model_dir
from tokenclean.tokenization import tokenize_records
from tokenclean.training import TrainConfig, train_model

DEFAULT_MODEL = {"hidden": 128, "layers": 4, "heads": 4, "intermediate": 512, "max_positions": 256,
                 "vocab_size": 512, "max_length": 256}


def check_model_settings(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The model settings over :data:`DEFAULT_MODEL`, each a whole number that makes a model (named when not)."""
    unknown = set(model_cfg) - set(DEFAULT_MODEL)
    if unknown:
        raise ValueError(f"unknown model settings: {', '.join(sorted(unknown))} (known: {', '.join(DEFAULT_MODEL)})")
    mc = {**DEFAULT_MODEL, **model_cfg}
    for key, value in mc.items():
        low = 2 if key in ("max_length", "max_positions") else 1
        if not is_whole(value) or value < low:
            raise ValueError(f"model setting {key} must be a whole number of at least {low}, got {value!r}")
    if mc["hidden"] % mc["heads"]:
        raise ValueError(f"model setting hidden ({mc['hidden']}) must be a multiple of heads ({mc['heads']})")
    return mc


def pretrain_base(corpus: str | os.PathLike, out: str | os.PathLike, model_cfg: dict[str, Any],
                  train_cfg: TrainConfig) -> dict[str, Any]:
    from tokenclean.world import build_tokenizer

    mc = check_model_settings(model_cfg)
    records = read_jsonl(corpus)
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = build_tokenizer((r.messages[0].content for r in records), tok_dir, mc["vocab_size"])
    table, stats = tokenize_records(records, tokenizer, mc["max_length"])
    model = tiny_llama(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                       hidden=mc["hidden"], layers=mc["layers"], heads=mc["heads"],
                       intermediate=mc["intermediate"], max_positions=mc["max_positions"], seed=train_cfg.seed)
    with atomic_dir(out) as tmp:
        model, summary = train_model(model, table, table.loss_mask, train_cfg, tokenizer.pad_token_id,
                                     log_path=Path(tmp) / "train_log.jsonl")
        write_model_dir(model, tokenizer, tmp, {
            "kind": "base_model", "corpus": str(corpus), "corpus_fingerprint": fingerprint_file(corpus),
            "model_config": mc, "parameters": sum(p.numel() for p in model.parameters()),
            "corpus_tokens": table.n_tokens, **stats, **summary})
    return summary
