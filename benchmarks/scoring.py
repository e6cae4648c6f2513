"""Scoring throughput: `tokenclean loss`'s scorer beside the bare forward pass and a padded, official-style scorer.

One run, one model, one token table, interleaved repeats; every figure is a ratio of timings taken side by side
(the machine is shared, absolute speeds move with its load). Methods, all over the same tokens:

- ``ours``: :func:`tokenclean.loss.token_losses`, the code path of ``tokenclean loss`` (length-sorted batches
  under a token budget, output head and cross-entropy only at response positions);
- ``bare``: the model's own forward pass (``model(...).logits``, no loss) over the very batches ``ours`` uses,
  collated beforehand: the limit a scorer built on the model's forward pass can reach;
- ``trunk``: the decoder alone (no output head) over the same batches, for reference: what the forward pass
  costs before the vocabulary projection;
- ``padded``: the official code's style: 6 samples per batch in data order, right-padded to the longest,
  full-vocabulary float32 cross-entropy at every position, results converted to Python lists.

The data are synthetic and shaped like SFT data: log-normal sample lengths clipped to 20..2048 tokens, a prompt
of 10-70% of each sample. The model is a small random Llama with a 32k vocabulary, so that the vocabulary
projection and the cross-entropy matter as they do at scale (here they dominate: see ``trunk``). Tokens/s count
every token of the table (prompt and response). Ends with one JSON line of medians.

    python benchmarks/scoring.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from tokenclean.artifacts import TokenTable
from tokenclean.batching import budget_batches, collate
from tokenclean.loss import TOKEN_BUDGET, token_losses

PAD = 0


def sft_like_table(n_samples: int, vocab: int, seed: int, median: float = 250.0, sigma: float = 1.0) -> TokenTable:
    """Heavy-tailed lengths (log-normal, clipped to 20..2048) and a prompt of 10-70% of each sample."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, n_samples)), 20, 2048).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(3, vocab, int(offsets[-1])).astype(np.int32)
    mask = np.zeros(len(ids), dtype=bool)
    for start, length in zip(offsets[:-1], lengths):
        prompt = max(1, int(length * rng.uniform(0.1, 0.7)))
        mask[start + prompt: start + length] = True
    return TokenTable(ids, offsets, mask)


def small_llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=int(hidden * 8 / 3 // 16 * 16),
                         max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=PAD)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def bare_forward(model, prepared: list[dict[str, torch.Tensor]], trunk: bool) -> None:
    with torch.inference_mode():
        for batch in prepared:
            if trunk:
                model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            else:
                _ = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def padded_official_style(model, table: TokenTable, batch_size: int = 6) -> list[list[float]]:
    """Per-sample lists of per-token losses, computed the way the official script does (not our code)."""
    out: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, table.n_samples, batch_size):
            samples = np.arange(start, min(start + batch_size, table.n_samples))
            batch = collate(table, samples, PAD)
            labels = batch["input_ids"].masked_fill(~batch["target"], -100)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="none").view(len(samples), -1)
            for row, s in enumerate(samples):
                n = int(table.lengths[s])
                out.append([0.0] + loss[row, : n - 1].tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--token-budget", type=int, default=TOKEN_BUDGET, help="as `tokenclean loss --token-budget`")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    table = sft_like_table(a.samples, a.vocab, a.seed)
    model = small_llama(a.vocab, a.hidden, a.layers, a.seed)
    prepared = [collate(table, s, PAD) for s in budget_batches(table.lengths, a.token_budget)]
    cells = sum(b["input_ids"].numel() for b in prepared)

    results: dict[str, object] = {}
    runs = {
        "ours": lambda: results.__setitem__("ours", token_losses(model, table, a.token_budget, PAD, progress=False)),
        "bare": lambda: bare_forward(model, prepared, trunk=False),
        "trunk": lambda: bare_forward(model, prepared, trunk=True),
        "padded": lambda: results.__setitem__("padded", padded_official_style(model, table)),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order between repeats
            started = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - started)

    # the two scorers must agree token by token
    ours = results["ours"]
    theirs = np.concatenate([np.asarray(x, dtype=np.float32) for x in results["padded"]])
    gap = float(np.max(np.abs(ours[table.loss_mask] - theirs[table.loss_mask])))

    def ratio(num: str, den: str) -> float:  # median over repeats of per-repeat ratios of speed
        return round(statistics.median(d / n for n, d in zip(seconds[num], seconds[den])), 3)

    n = table.n_tokens
    figures = {
        "threads": a.threads, "repeats": a.repeats, "samples": table.n_samples, "tokens": n,
        "response_tokens": int(table.loss_mask.sum()), "max_length": int(table.lengths.max()),
        "vocab": a.vocab, "hidden": a.hidden, "layers": a.layers, "token_budget": a.token_budget,
        "budget_batches_padding_fraction": round(1 - n / cells, 4),
        **{f"{name}_tokens_per_s": round(n / statistics.median(s)) for name, s in seconds.items()},
        "ours_over_bare": ratio("ours", "bare"),
        "ours_over_padded": ratio("ours", "padded"),
        "ours_over_trunk": ratio("ours", "trunk"),
        "max_abs_diff_ours_vs_padded": round(gap, 7),
    }
    for name in names:
        print(f"{name:7} {figures[f'{name}_tokens_per_s']:8,d} tokens/s  (seconds: "
              + ", ".join(f"{s:.1f}" for s in seconds[name]) + ")")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
