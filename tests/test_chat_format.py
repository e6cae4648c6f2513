"""The chat text and loss_mask as the paper's runs built them (open-instruct's ``encode_with_messages_format``),
on tokenizers of the three kinds that matter: the embedded world's (byte-level BPE, role markers special),
a SentencePiece-style one like Mistral / Llama-2 (Metaspace, ``prepend_scheme="first"``, bos added by the
tokenizer) and a byte-level BPE like Llama-3 (its split regex, bos added by the tokenizer); plus a tokenizer
built so that tokens straddle the masked/trained boundaries.

The references below re-implement the official rule plainly: the text is ``_concat_messages(...).strip()``,
tokenized as a whole; each non-assistant message masks the token range from the token count of the text
before it to the token count of the text through it (plus the next assistant header).
"""
from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tests.test_properties import conversations
from tokenclean.data import DataError, Message, Record, parse_record, read_jsonl
from tokenclean.tokenization import render, tokenize_file, tokenize_records

HEAD = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
WORDS = ["the", "answer", "is", "42", "fox", "Sure", "!", ".", "?", "hello", "world", ",", "3", "and", "5",
         "caf\u00e9", "lazy", "dog", "\n", "  ", "```", "<|", ">"]
TRAIN = ["Sure ! The answer is 42 . Hope this helps . café",
         "<|user|>\nAdd 3 and 5 .\n<|assistant|>\nSure ! The answer is 8 .\n<|user|>\nthanks\n",
         "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 ``` <| >",
         "hello world , how are you ? fine thanks and you <|system|>\nbe nice\n"] * 20
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _wrap(tok: Tokenizer, bos: str, eos: str, add_bos: bool, **kw) -> PreTrainedTokenizerFast:
    if add_bos:  # like Llama / Mistral: the tokenizer itself puts bos first
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, **kw)


def world_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    from tokenclean.world import build_tokenizer

    return build_tokenizer(TRAIN, tmp_path_factory.mktemp("world_tok"), 300)


def sentencepiece_style() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # newlines stand alone, like the byte-fallback <0x0A> of Llama-2 / Mistral vocabularies
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    return _wrap(tok, "<s>", "</s>", add_bos=True, unk_token="<unk>")


def llama3_style() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=400,
                                                       special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _wrap(tok, "<|begin_of_text|>", "<|end_of_text|>", add_bos=True)


def straddling() -> PreTrainedTokenizerFast:
    """Characters as tokens, no pre-tokenizer, and two merges that cross the boundaries of the chat format:
    ``"\\nS"`` (end of an assistant header + the first letter of "Sure") and ``"\\n<"`` (the newline ending an
    assistant turn + the next header)."""
    chars = sorted(set("".join(TRAIN + WORDS)) | set("ST"))
    vocab = {c: i for i, c in enumerate(["<s>", "</s>"] + chars)}
    vocab["\nS"], vocab["\n<"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "S"), ("\n", "<")]))
    tok.add_special_tokens(["<s>", "</s>"])
    return _wrap(tok, "<s>", "</s>", add_bos=True)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, PreTrainedTokenizerFast]:
    return {"world": world_tokenizer(tmp_path_factory), "sentencepiece": sentencepiece_style(),
            "llama3": llama3_style(), "straddling": straddling()}


# ---------------------------------------------------------------------------------------------------------
# the plain references
# ---------------------------------------------------------------------------------------------------------
def official_concat(messages: tuple[Message, ...], eos: str) -> str:
    """open-instruct's ``_concat_messages`` (without the final strip)."""
    return "".join(HEAD[m.role] + m.content.strip() + (eos if m.role == "assistant" else "") + "\n"
                   for m in messages)


def encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """The ids the official code trains on: the tokenizer's own special tokens (bos for Llama / Mistral); a
    tokenizer that has a bos token but does not add it (the world's) gets it put first."""
    ids = tok(text)["input_ids"]
    return ids if ids[:1] == [tok.bos_token_id] else [tok.bos_token_id] + ids


def official_mask(record: Record, tok: PreTrainedTokenizerFast) -> tuple[list[int], list[bool]] | None:
    """open-instruct's prefix-tokenization masking, plainly; position 0 never trained (our contract).

    None where the rule is ill-defined: a region's boundary index is the token count of the text before it,
    which is a position in the whole text's tokens only if that text's tokens are the whole text's, but for
    the last (the head of a token straddling the boundary). Otherwise the count overshoots, and the official
    code masks response tokens after the straddler (or trains prompt tokens); the first-character rule does not.
    """
    msgs = record.messages
    ids = encode(tok, official_concat(msgs, tok.eos_token).strip())

    def boundary(prefix: str) -> int | None:
        p = encode(tok, prefix)
        return len(p) if len(p) <= len(ids) and p[:-1] == ids[:len(p) - 1] else None

    trained = [True] * len(ids)
    for i, m in enumerate(msgs):
        if m.role == "assistant":
            continue
        start = 0 if i == 0 else boundary(official_concat(msgs[:i], tok.eos_token))
        through = official_concat(msgs[:i + 1], tok.eos_token)
        if i + 1 < len(msgs) and msgs[i + 1].role == "assistant":
            through += HEAD["assistant"]
        # a final non-assistant turn is masked to the end: the official end index, counted on the unstripped
        # text, can fall short of the stripped text's last tokens (it would train a piece of a role header)
        end = len(ids) if i == len(msgs) - 1 else boundary(through)
        if start is None or end is None:
            return None
        for j in range(start, end):
            trained[j] = False
    trained[0] = False
    return ids, trained


# any content may be empty or padded with whitespace
content = st.lists(st.sampled_from(WORDS), min_size=0, max_size=8).map(" ".join)




def _one(table) -> tuple[list[int], list[bool]]:
    return table.input_ids.tolist(), table.loss_mask.tolist()


# ---------------------------------------------------------------------------------------------------------
# text, ids and mask against the official rule
# ---------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(record=conversations(content))
def test_text_is_the_official_concatenation_stripped(record):
    assert render(record, "</s>").text == official_concat(record.messages, "</s>").strip()


@pytest.mark.parametrize("kind", ["world", "sentencepiece", "llama3", "straddling"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(record=conversations(content))
def test_ids_and_mask_equal_the_official_prefix_rule(tokenizers, kind, record):
    tok = tokenizers[kind]
    official = official_mask(record, tok)
    assume(official is not None)
    table, _ = tokenize_records([record], tok, 1 << 20)
    assert _one(table) == official


@pytest.mark.parametrize("kind", ["world", "sentencepiece", "llama3"])
def test_a_fixed_multi_turn_record_on_every_tokenizer(tokenizers, kind):
    """Trained text: each reply (stripped), its eos, and the newline that ends a non-final turn."""
    tok = tokenizers[kind]
    record = Record((Message("system", " be nice "), Message("user", "Add 3 and 5 ."),
                     Message("assistant", "Sure ! The answer is 8 . \n"), Message("user", "thanks"),
                     Message("assistant", "  Hope this helps .")))
    table, _ = tokenize_records([record], tok, 1 << 20)
    assert _one(table) == official_mask(record, tok)
    assert table.input_ids[0] == tok.bos_token_id and not table.loss_mask[0]
    eos = tok.eos_token
    got = tok.decode(table.input_ids[table.loss_mask], skip_special_tokens=False).replace(" ", "")
    assert got == f"Sure!Theansweris8.{eos}\nHopethishelps.{eos}"


def test_separate_piece_tokenization_differs_from_the_joint_text(tokenizers):
    """Mistral-like tokenizers put a word-start marker before every separately tokenized piece: the ids must be
    those of the whole text, as the model is trained and prompted."""
    tok = tokenizers["sentencepiece"]
    record = Record((Message("user", "hello world"), Message("assistant", "Sure ! The answer is 42 .")))
    text = render(record, tok.eos_token).text
    joint = tok(text)["input_ids"]
    parts = ("<|user|>\n", "hello world\n", "<|assistant|>\n", "Sure ! The answer is 42 .")
    pieces = [tok.bos_token_id] + [i for p in parts for i in tok(p, add_special_tokens=False)["input_ids"]]
    assert pieces != joint[:-1]  # the premise: piecewise tokenization is different text to the model
    table, _ = tokenize_records([record], tok, 1 << 20)
    assert table.input_ids.tolist() == joint


def test_straddling_tokens_follow_their_first_character(tokenizers):
    """A token across the header/content boundary is masked (it starts in the header); one across the end of a
    turn is trained (it starts in the turn) - what the official prefix rule gives."""
    tok = tokenizers["straddling"]
    record = Record((Message("user", "hi"), Message("assistant", "Sure"), Message("user", "ok"),
                     Message("assistant", "Sure")))
    table, _ = tokenize_records([record], tok, 1 << 20)
    ids, mask = _one(table)
    pieces = [tok.convert_ids_to_tokens(i) for i in ids]
    at_header = [j for j, p in enumerate(pieces) if p == "\nS"]
    at_turn_end = [j for j, p in enumerate(pieces) if p == "\n<" and ids[j - 1] == tok.eos_token_id]
    in_prompt = [j for j, p in enumerate(pieces) if p == "\n<" and ids[j - 1] != tok.eos_token_id]
    assert len(at_header) == 2 and len(at_turn_end) == 1 and len(in_prompt) == 2  # the premise: straddlers occur
    assert not any(mask[j] for j in at_header + in_prompt) and all(mask[j] for j in at_turn_end)
    assert (ids, mask) == official_mask(record, tok)


# ---------------------------------------------------------------------------------------------------------
# empty messages, text the tokenizer cannot encode, truncation, provenance
# ---------------------------------------------------------------------------------------------------------
def test_empty_messages_are_tokenized_counted_and_logged(tokenizers, tmp_path, caplog):
    tok = tokenizers["llama3"]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " "}]})
                 + "\n" + json.dumps({"messages": [{"role": "system", "content": ""}, {"role": "user", "content": ""},
                                                   {"role": "assistant", "content": "Sure"}]}) + "\n")
    records = read_jsonl(f)
    with caplog.at_level(logging.WARNING):
        table, stats = tokenize_records(records, tok, 1 << 20)
    assert stats["empty_messages"] == 3 and stats["records_with_empty_messages"] == 2
    assert "3 empty or whitespace-only messages in 2 of 2 records" in caplog.text
    for i, r in enumerate(records):
        a, b = table.offsets[i], table.offsets[i + 1]
        assert (table.input_ids[a:b].tolist(), table.loss_mask[a:b].tolist()) == official_mask(r, tok)
    first = table.input_ids[table.offsets[0]:table.offsets[1]][table.loss_mask[table.offsets[0]:table.offsets[1]]]
    assert first.tolist() == [tok.eos_token_id]  # an empty reply still trains its end-of-turn token
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.content': expected a string"):
        parse_record({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "f:1")


def _lossy_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    model, trainer = {"bpe": (models.BPE(),
                              trainers.BpeTrainer(vocab_size=60, special_tokens=["<s>", "</s>"])),
                      "wordlevel": (models.WordLevel(),
                                    trainers.WordLevelTrainer(special_tokens=["<s>", "</s>"]))}[kind]
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["<|user|>\nhello\n<|assistant|>\nfine thanks"] * 10, trainer)
    return _wrap(tok, "<s>", "</s>", add_bos=False)


@pytest.mark.parametrize("kind,what", [("bpe", "cannot encode the character '€'"),
                                       ("wordlevel", "the tokenizer cannot encode this record")])
def test_text_the_tokenizer_cannot_encode_names_the_file_and_line(tmp_path, kind, what):
    """A BPE without unknown token drops the character silently; a word-level one raises: both are a one-line
    error at the record."""
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "hello", "completion": "fine thanks"}\n{"prompt": "hello", "completion": "fine €"}\n')
    with pytest.raises(DataError) as e:
        tokenize_records(read_jsonl(f), _lossy_tokenizer(kind), 64)
    assert str(e.value).startswith(f"{f}:2: ") and what in str(e.value) and "\n" not in str(e.value)


def test_truncation_is_logged_and_the_sidecar_records_it_and_the_data_sha256(tmp_path, caplog, tiny_tokenizer_dir):
    import hashlib

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hello", "completion": "fine thanks " * 10}) + "\n"
                    + json.dumps({"prompt": "hello", "completion": "fine"}) + "\n")
    with caplog.at_level(logging.WARNING):
        meta = tokenize_file(data, str(tiny_tokenizer_dir), 16, tmp_path / "d.tokens.npz")
    assert "1 of 2 samples truncated to max_length=16 tokens" in caplog.text
    sidecar = json.loads((tmp_path / "d.tokens.json").read_text())
    assert sidecar["truncated"] == 1 and sidecar["max_length"] == 16 and meta["truncated"] == 1
    assert sidecar["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert sidecar["empty_messages"] == 0


def test_tokenize_refuses_plain_text_records(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hello", "completion": "fine"}\n{"text": "hello"}\n')
    with pytest.raises(DataError, match=f"{data}:2: neither 'messages' nor 'prompt'/'completion' is present"):
        tokenize_file(data, str(tiny_tokenizer_dir), 16, tmp_path / "d.tokens.npz")
    assert not (tmp_path / "d.tokens.npz").exists()
