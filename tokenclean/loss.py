"""Per-token losses: position p holds -log P(x_p | x_<p), computed only where it is needed.

The same function (:func:`target_nll`) gives the training loss and the scores, so what is trained and what is
scored can never drift apart. Scoring runs in length-sorted batches under a token budget, under
``torch.inference_mode``, and applies the output head only at scored positions and a chunk of them at a time
(no full-vocabulary logits for prompt tokens or padding, nor for a whole batch at once). Training does the same
with gradients (:func:`head_nll`): each chunk's logits are recomputed in the backward pass instead of kept, so
a micro-batch's full-vocabulary float32 logits never exist at once (issue 15: 6 x 2048 targets x a 128k
vocabulary is 6.3 GB per copy).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from tokenclean.artifacts import TokenTable, save_array
from tokenclean.batching import budget_batches, collate

log = logging.getLogger(__name__)

# Padded tokens per scoring batch (`tokenclean loss --token-budget`; the workflow's is the config schema's
# scoring.token_budget, the same number).
TOKEN_BUDGET = 16384


def _has_plain_head(model: Any) -> bool:
    """True when logits = lm_head(last hidden state), with no soft-capping or scaling in between."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    try:
        return model.get_decoder() is not None and model.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def head_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows of logits computed at once, when scoring and when training: about 128 MB of float32 logits on a CPU
    (the allocator then reuses one buffer, and the head and softmax work in cache; measured 1.8x faster than one
    batch-wide block at a 32k vocabulary), 1 GB on an accelerator so the head's matrix multiply stays
    compute-bound (2048 rows at a 128k vocabulary). Fewer target rows than this run as one block, unchunked."""
    elements = 1 << 25 if device.type == "cpu" else 1 << 28
    return max(256, elements // max(1, vocab_size))


def _chunk_nll(head: Any, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-token loss of a block of target rows: the head in the model's dtype, the softmax in float32."""
    return F.cross_entropy(head(hidden).float(), labels, reduction="none")


def head_nll(head: Any, hidden: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """``cross_entropy(head(hidden).float(), labels)`` per row, ``chunk_rows`` rows at a time (default
    :func:`head_chunk_rows`), so at most one chunk's full-vocabulary logits exist at once, forward or backward.

    With gradients each chunk runs under a non-reentrant :func:`torch.utils.checkpoint.checkpoint`: the forward
    keeps only the chunk's hidden states and labels, and the backward recomputes the chunk's logits (one more
    head matrix multiply per chunk; the price of the bound, paid only when there is more than one chunk). The
    same idea as torchtune's ``CEWithChunkedOutputLoss``/``LinearCrossEntropyLoss`` (chunks of token rows) and
    torch's ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``, whose ``reduction='none'``
    path also recomputes in backward. Here the head module itself is called, so a wrapped or adapted head works
    and the logits keep the model's dtype before the float32 softmax: each row's loss is the unchunked
    computation's, bit for bit in ``benchmarks/loss_memory.py`` (torch's op computes bfloat16 models' logits in
    float32 and moved the losses by up to 0.03 there, and took 2.8x the time on a CPU).
    """
    step = chunk_rows or head_chunk_rows(head.weight.shape[0], hidden.device)
    if len(labels) <= step:
        return _chunk_nll(head, hidden, labels)
    pieces = zip(hidden.split(step), labels.split(step))
    if torch.is_grad_enabled():
        return torch.cat([checkpoint(_chunk_nll, head, h, y, use_reentrant=False) for h, y in pieces])
    return torch.cat([_chunk_nll(head, h, y) for h, y in pieces])


def _targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, target: torch.Tensor,
             position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], torch.Tensor]:
    """The target positions (rows, cols, row-major), the model's inputs and the target tokens: what
    :func:`target_nll` and :func:`target_forward` share."""
    if target[:, 0].any():
        raise ValueError("position 0 cannot be a target: it has no context")
    rows, cols = target.nonzero(as_tuple=True)
    # use_cache=False: a KV cache is for generation; building one here only holds every layer's keys and values
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    return rows, cols, inputs, input_ids[rows, cols]


def target_nll(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, target: torch.Tensor,
               head_only_at_targets: bool = True, position_ids: torch.Tensor | None = None,
               chunk_rows: int | None = None) -> torch.Tensor:
    """Negative log-likelihood of every target token, in row-major order of ``target``.

    Token p is predicted from the hidden state at p-1; ``target[:, 0]`` must be False. Packed rows (see
    :func:`tokenclean.batching.pack`) pass ``position_ids`` and no ``attention_mask``. Without gradients
    (scoring) and with them (training), the output head and the cross-entropy run over ``chunk_rows`` target
    positions at a time (:func:`head_nll`), so a batch's full-vocabulary logits never exist at once; each
    token's loss is the same computation either way.
    """
    rows, cols, inputs, labels = _targets(input_ids, attention_mask, target, position_ids)
    if not (head_only_at_targets and _has_plain_head(model)):
        logits = model(**inputs).logits[rows, cols - 1]
        return F.cross_entropy(logits.float(), labels, reduction="none")
    hidden = model.get_decoder()(**inputs).last_hidden_state[rows, cols - 1]
    return head_nll(model.get_output_embeddings(), hidden, labels, chunk_rows)


def attention_layers(model: Any) -> list[tuple[Any, int]]:
    """The modules whose outputs transformers collects as the model's attention weights when a forward is asked
    for ``output_attentions``, with the position of the weights in their output, in forward order: what the model
    class declares in ``_can_record_outputs["attentions"]`` (a class, a class-name suffix or an ``OutputRecorder``,
    matched as transformers matches them). Empty for a model that declares none (older transformers, remote code,
    a model without attention)."""
    decoder = model.get_decoder()
    declared = getattr(decoder, "can_record_outputs", None)  # transformers 5's property over _can_record_outputs
    if not isinstance(declared, dict):
        declared = getattr(decoder, "_can_record_outputs", None)
    specs = (declared or {}).get("attentions")
    if specs is None:
        return []
    found = []
    for name, module in decoder.named_modules():
        for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
            target = spec if isinstance(spec, type) else getattr(spec, "target_class", None)
            suffix = spec if isinstance(spec, str) else getattr(spec, "class_name", None)
            layer = getattr(spec, "layer_name", None)
            if not ((target is not None and isinstance(module, target)) or (suffix and name.endswith(suffix))):
                continue
            if layer and f".{layer.strip('.')}." not in f".{name}.":
                continue
            found.append((module, getattr(spec, "index", 1)))
            break
    return found


def _accepts_output_attentions(model: Any) -> bool:
    """Whether the decoder's forward takes ``output_attentions`` by name (the older transformers interface)."""
    import inspect

    try:
        return "output_attentions" in inspect.signature(model.get_decoder().forward).parameters
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        return False


def attention_problem(model: Any) -> str | None:
    """Why the last layer's attention weights of ``model`` (loaded, or built with empty weights) cannot be read,
    or None: it neither declares the layers transformers records them from nor takes ``output_attentions``."""
    try:
        if attention_layers(model) or _accepts_output_attentions(model):
            return None
    except (AttributeError, NotImplementedError):
        pass
    return "it returns no attention weights (transformers' output_attentions)"


def target_forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, target: torch.Tensor,
                   position_ids: torch.Tensor | None = None, logits: bool = False,
                   attention: bool = False, chunk_rows: int | None = None) -> dict[str, torch.Tensor]:
    """The training forward of :func:`target_nll` (same ops, same per-token losses), plus what online weighting
    reads: ``logits`` = the detached float32 full-vocabulary logits that predicted each target (the ones the
    loss is computed from, no second head pass), ``attention`` = the last layer's attention weights
    [rows, heads, width, width], detached (needs eager attention): read by a forward hook on the last of the
    layers transformers' ``output_attentions`` reads (:func:`attention_layers`), so the other layers' weights are
    never kept, on any family that declares them; from ``output_attentions=True`` on a model that does not.

    Without ``logits`` the loss is chunked as in :func:`target_nll` (:func:`head_nll`). With them (EAFT) the
    micro-batch's full-vocabulary logits are materialised at once, as the method reads them all (and returned
    detached): the memory bound does not hold for that method, nor for a model without a plain head."""
    rows, cols, inputs, labels = _targets(input_ids, attention_mask, target, position_ids)
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if attention:
        layers = attention_layers(model)
        if layers:  # only the last layer's weights are kept (all of them would stay alive until the forward ends)
            module, at = layers[-1]

            def keep_weights(module: Any, args: Any, output: Any) -> None:
                weights = output[at] if isinstance(output, (tuple, list)) and len(output) > at else None
                if isinstance(weights, torch.Tensor):
                    captured["attention"] = weights.detach()
            hook = module.register_forward_hook(keep_weights)
        elif _accepts_output_attentions(model):
            inputs["output_attentions"] = True
        else:
            raise ValueError(f"{type(model).__name__}: {attention_problem(model)}; ssToken reads them")
    try:
        plain = _has_plain_head(model)
        if plain:
            decoded = model.get_decoder()(**inputs)
            hidden = decoded.last_hidden_state[rows, cols - 1]
        if plain and not logits:
            result = {"nll": head_nll(model.get_output_embeddings(), hidden, labels, chunk_rows)}
        else:
            if not plain:
                decoded = model(**inputs)
            out = (model.get_output_embeddings()(hidden) if plain else decoded.logits[rows, cols - 1]).float()
            result = {"nll": F.cross_entropy(out, labels, reduction="none")}
    finally:
        if hook is not None:
            hook.remove()
    if logits:
        result["logits"] = out.detach()
    if attention:
        if hook is None and getattr(decoded, "attentions", None):
            captured["attention"] = decoded.attentions[-1].detach()
        weights = captured.get("attention")
        if weights is None or weights.dim() != 4 or tuple(weights.shape[-2:]) != tuple(input_ids.shape[-1:]) * 2:
            raise ValueError(f"{type(model).__name__}: its last attention layer returned no weights of shape [rows, "
                             "heads, width, width]; ssToken needs eager attention")
        result["attention"] = weights
    return result


def token_losses(model: Any, table: TokenTable, token_budget: int = TOKEN_BUDGET, pad_id: int = 0,
                 head_only_at_targets: bool = True, progress: bool = True) -> np.ndarray:
    """float32[N]: the model's loss of every ``loss_mask`` token, NaN elsewhere."""
    device = next(model.parameters()).device
    out = np.full(table.n_tokens, np.nan, dtype=np.float32)
    positions = np.flatnonzero(table.loss_mask)
    if len(positions) == 0:
        return out
    model.eval()
    batches = budget_batches(table.lengths, token_budget)
    started = time.perf_counter()
    bar = tqdm(total=table.n_tokens, unit="tok", unit_scale=True, desc="scoring", disable=not progress,
               mininterval=2.0)
    with torch.inference_mode():
        for samples in batches:
            batch = collate(table, samples, pad_id, device=device)
            nll = target_nll(model, batch["input_ids"], batch["attention_mask"], batch["target"],
                             head_only_at_targets).cpu().numpy()
            # target is row-major, so the losses come in the order (sample in batch, position in sample)
            index = np.concatenate([np.flatnonzero(table.loss_mask[table.offsets[s]:table.offsets[s + 1]])
                                    + table.offsets[s] for s in samples])
            out[index] = nll
            bar.update(int(table.lengths[samples].sum()))
    bar.close()
    elapsed = time.perf_counter() - started
    log.info("scored %d tokens (%d response tokens) in %.1fs: %.0f tokens/s", table.n_tokens, len(positions),
             elapsed, table.n_tokens / max(elapsed, 1e-9))
    if not np.all(np.isfinite(out[positions])):
        raise FloatingPointError("non-finite loss on a response token; check the model's dtype and weights")
    return out


def loss_file(model_name: str, tokens: str | os.PathLike, out: str | os.PathLike, token_budget: int = TOKEN_BUDGET,
              device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
              revision: str | None = None) -> dict:
    """CLI entry: per-token losses of ``model_name`` on a token table, written with their provenance
    (``revision`` pins a hub model; the commit loaded is recorded either way)."""
    from tokenclean.models import hub_commit, load_model, model_fingerprint, peak_memory, pick_device, require_ids_fit
    from tokenclean.tokenization import load_tokenizer, require_tokenizer_of

    table, tmeta = TokenTable.load(tokens)
    commit = hub_commit(model_name, revision)
    tokenizer = load_tokenizer(model_name, trust_remote_code, commit)
    require_tokenizer_of(tokens, tmeta, tokenizer, model_name)
    dev = pick_device(device)
    model = load_model(model_name, dev, dtype, trust_remote_code, commit)
    require_ids_fit(model, model_name, table.input_ids, tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    losses = token_losses(model, table, token_budget, pad_id)
    seconds = time.perf_counter() - started  # the scoring loop only (make gpu-check reads its rate)
    meta = {
        "kind": "loss",
        "model": str(model_name),
        "model_revision": revision or None,
        "model_commit": commit,
        "model_fingerprint": model_fingerprint(model_name, commit),
        "tokens": str(tokens),
        "tokens_fingerprint": tmeta["fingerprint"],
        "tokenizer_fingerprint": tmeta.get("tokenizer_fingerprint"),
        "device": str(dev),
        "dtype": str(next(model.parameters()).dtype),
        "mean_response_loss": float(np.nanmean(losses)),
        "n_tokens": table.n_tokens, "seconds": round(seconds, 6),
        "tokens_per_s": round(table.n_tokens / max(seconds, 1e-9), 1), **peak_memory(dev),
    }
    save_array(Path(out), losses, meta)
    return meta
