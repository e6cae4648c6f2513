"""Per-token loss alignment: position p holds -log P(x_p | x_<p)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenclean.artifacts import ArtifactError, load_array
from tokenclean.data import parse_record
from tokenclean.loss import loss_file, token_losses
from tokenclean.tokenization import tokenize_file, tokenize_records

RECORDS = [
    {"prompt": "Add 3 and 5 .", "completion": "Sure ! The answer is 8 . Hope this helps ."},
    {"prompt": "hello", "completion": "fine"},
    {"messages": [{"role": "user", "content": "Reverse the letters : c a t"},
                  {"role": "assistant", "content": "t a c"},
                  {"role": "user", "content": "the quick brown fox jumps over the lazy dog"},
                  {"role": "assistant", "content": "Which is larger : 37 or 52 ? 52"}]},
    {"prompt": "how are you ?", "completion": "fine thanks and you"},
]


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_dir, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    table, _ = tokenize_records([parse_record(r, f"x:{i}") for i, r in enumerate(RECORDS)], tok, 128)
    return tok, model, table


@pytest.mark.parametrize("head_only", [True, False])
@pytest.mark.parametrize("budget", [8, 64, 100000])
def test_mean_of_token_losses_equals_models_own_loss(setup, head_only, budget):
    tok, model, table = setup
    losses = token_losses(model, table, token_budget=budget, pad_id=tok.pad_token_id,
                          head_only_at_targets=head_only, progress=False)
    assert np.all(np.isnan(losses[~table.loss_mask])) and np.all(np.isfinite(losses[table.loss_mask]))
    for i in range(table.n_samples):
        a, b = table.offsets[i], table.offsets[i + 1]
        ids = torch.tensor(table.input_ids[a:b], dtype=torch.long)[None]
        labels = ids.clone()
        labels[0, ~torch.from_numpy(table.loss_mask[a:b])] = -100
        with torch.no_grad():
            expected = model(input_ids=ids, labels=labels).loss.item()
        assert np.nanmean(losses[a:b]) == pytest.approx(expected, abs=1e-5)


def test_each_position_holds_its_own_token_loss(setup):
    tok, model, table = setup
    losses = token_losses(model, table, token_budget=50, pad_id=tok.pad_token_id, progress=False)
    i = 2
    a, b = table.offsets[i], table.offsets[i + 1]
    ids = torch.tensor(table.input_ids[a:b], dtype=torch.long)[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    for p in np.flatnonzero(table.loss_mask[a:b]):
        assert losses[a + p] == pytest.approx(-logp[p - 1, ids[0, p]].item(), abs=1e-5)


def test_loss_cli_checks_tokenizer_and_writes_provenance(tmp_path, tiny_tokenizer_dir, tiny_model_dir):
    import json

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    tokens = tmp_path / "d.tokens.npz"
    tokenize_file(data, str(tiny_tokenizer_dir), 128, tokens)
    out = tmp_path / "d.loss.npy"
    meta = loss_file(str(tiny_model_dir), tokens, out)
    losses, side = load_array(out)
    assert losses.dtype == np.float32 and side["tokens_fingerprint"] == meta["tokens_fingerprint"]
    assert side["model_fingerprint"]

    # a token table from another tokenizer must be refused, not silently misaligned
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(["completely different text"] * 5,
                              trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>", "<pad>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other_dir = tmp_path / "other_tok"
    PreTrainedTokenizerFast(tokenizer_object=other, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(other_dir)
    other_tokens = tmp_path / "o.tokens.npz"
    tokenize_file(data, str(other_dir), 128, other_tokens)
    with pytest.raises(ArtifactError, match="tokeniz"):
        loss_file(str(tiny_model_dir), other_tokens, tmp_path / "o.loss.npy")
    assert not (tmp_path / "o.loss.npy").exists()


def test_missing_model_directory_is_a_clear_error(tmp_path):
    from tokenclean.models import load_model

    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope"))


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, None])
def test_chunked_head_gives_the_losses_of_the_full_logits(setup, chunk_rows):
    """Scoring applies the head in chunks of target rows; each loss must equal the one from the model's logits."""
    from tokenclean.batching import collate
    from tokenclean.loss import target_nll

    tok, model, table = setup
    batch = collate(table, np.arange(table.n_samples), tok.pad_token_id)
    with torch.inference_mode():
        chunked = target_nll(model, batch["input_ids"], batch["attention_mask"], batch["target"],
                             chunk_rows=chunk_rows)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows, cols = batch["target"].nonzero(as_tuple=True)
    logp = torch.log_softmax(logits.float(), -1)[rows, cols - 1]
    expected = -logp.gather(1, batch["input_ids"][rows, cols][:, None])[:, 0]
    assert len(chunked) == int(table.loss_mask.sum())
    torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-5)


def _head_rows(model) -> tuple[list[int], object]:
    """Rows of every call of the output head (forward and backward recomputation), and the hook's handle."""
    seen: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    return seen, handle


def _loss_and_grads(model, nll: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The per-token losses (detached) and every parameter's gradient of sum(weights * nll)."""
    model.zero_grad(set_to_none=True)
    (weights * nll).sum().backward()
    return nll.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow  # ~8 s per case
@pytest.mark.parametrize("packed", [True, False])
def test_chunked_training_loss_gives_the_full_logits_losses_and_gradients(setup, packed):
    """With gradients, the head runs over chunks of target rows, forward and backward (recomputed), never over a
    whole micro-batch; the losses and gradients equal those of the model's own full logits (the unchunked
    computation), for chunk sizes that do not divide the number of targets, in packed and padded rows. (The
    unchunked head-only path differs from the full logits by the same float32 rounding: 4e-6 at gradients of 13.)"""
    from tokenclean.batching import collate, pack
    from tokenclean.loss import target_forward, target_nll

    tok, model, table = setup
    samples = np.arange(table.n_samples)
    batch = pack(table, samples, 128, tok.pad_token_id) if packed else collate(table, samples, tok.pad_token_id)
    args = (model, batch["input_ids"], batch.get("attention_mask"), batch["target"])
    n = int(batch["target"].sum())
    weights = torch.from_numpy(np.random.default_rng(0).uniform(0.1, 2.0, n).astype(np.float32))
    # the reference: the model's full logits for the whole batch, then the cross-entropy (today's computation)
    want, want_grads = _loss_and_grads(model, target_nll(*args, head_only_at_targets=False,
                                                         position_ids=batch.get("position_ids")), weights)
    for chunk_rows in (1, 7, n // 2 + 1):
        assert n % chunk_rows or chunk_rows == 1
        for forward in (target_nll, target_forward):
            seen, handle = _head_rows(model)
            try:
                nll = forward(*args, position_ids=batch.get("position_ids"), chunk_rows=chunk_rows)
                got, grads = _loss_and_grads(model, nll if forward is target_nll else nll["nll"], weights)
            finally:
                handle.remove()
            assert max(seen) == min(chunk_rows, n) and sum(seen) == 2 * n  # each chunk: forward + recomputed once
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            for g, w in zip(grads, want_grads):  # float32 rounding of sums over ~200 tokens, at the tensor's scale
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))


def test_small_training_batches_run_the_head_once_without_recomputation(setup):
    """Below the chunk size the loss is one plain block (nothing recomputed): no cost at small sizes."""
    from tokenclean.batching import collate
    from tokenclean.loss import target_nll

    tok, model, table = setup
    batch = collate(table, np.arange(table.n_samples), tok.pad_token_id)
    seen, handle = _head_rows(model)
    try:
        target_nll(model, batch["input_ids"], batch["attention_mask"], batch["target"]).sum().backward()
    finally:
        handle.remove()
    assert seen == [int(batch["target"].sum())]


def test_budget_batches_cover_each_sample_once_within_budget_and_padding():
    from tokenclean.batching import budget_batches

    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(250), 1.0, 500)), 20, 2048).astype(np.int64)
    for budget, max_padding in ((4096, 0.05), (16384, 0.05), (16384, 0.2), (1000, 0.0)):
        batches = budget_batches(lengths, budget, max_padding=max_padding)
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(lengths)))
        for b in batches:
            cells = len(b) * lengths[b].max()
            if len(b) > 1:  # a single sample may exceed the budget and has no padding
                assert cells <= budget and cells - lengths[b].sum() <= max_padding * cells


@pytest.mark.parametrize("head_only", [True, False])
def test_scoring_builds_no_kv_cache(setup, head_only):
    """A scoring pass is one forward: the decoder must not fill a cache of every layer's keys and values."""
    tok, model, table = setup
    seen = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True)
    try:
        token_losses(model, table, token_budget=64, pad_id=tok.pad_token_id, head_only_at_targets=head_only,
                     progress=False)
    finally:
        hook.remove()
    assert seen and all(flag is False for flag in seen)
