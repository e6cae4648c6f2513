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
