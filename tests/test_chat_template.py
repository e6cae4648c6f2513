"""``chat_format: template``: chat records rendered with the tokenizer's own chat template, and a loss_mask that
trains exactly each assistant turn's content and its end-of-turn token, checked by brute force against a plain
re-implementation of a ChatML template on the tiny tokenizer (and on one whose end-of-turn token straddles).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tests.test_properties import conversations
from tokenclean.data import DataError, Message, Record
from tokenclean.tokenization import render_template, tokenize_file, tokenize_records

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# a Llama-3-like template: bos text first, no newline after the end-of-turn token
EOT = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|eot|>"
       "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n\n{% endif %}")
# rewrites history: an assistant turn in the past loses its content (as reasoning templates drop <think> blocks)
REWRITES = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|a|>{% else %}"
            "<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def chatml(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def eot(tiny_tokenizer_dir):
    """End-of-turn text that is no special token: several tokens, and it is trained whole."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = EOT
    return tok


def reference(record: Record, start: str, sep: str, end: str, trail: str, bos: str = "") -> tuple[str, list[bool]]:
    """The template's text written plainly, and which of its characters are trained: each assistant turn's
    (stripped) content and its end-of-turn text."""
    text, trained = bos, [False] * len(bos)
    for m in record.messages:
        head = f"{start}{m.role}{sep}"
        body = m.content.strip() + end
        text += head + body + trail
        trained += [False] * len(head) + [m.role == "assistant"] * len(body) + [False] * len(trail)
    return text, trained


def check(tok, records, start, sep, end, trail, bos=""):
    table, stats = tokenize_records(records, tok, 1 << 20, "template")
    assert stats["skipped_no_response_after_truncation"] == 0 and table.n_samples == len(records)
    for i, record in enumerate(records):
        a, b = table.offsets[i], table.offsets[i + 1]
        ids, mask = table.input_ids[a:b].tolist(), table.loss_mask[a:b]
        text, chars = reference(record, start, sep, end, trail, bos)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == enc["input_ids"]  # the template's text, tokenized whole
        assert ids == list(tok.apply_chat_template([{"role": m.role, "content": m.content}
                                                    for m in record.messages], tokenize=True, return_dict=False))
        want = [e > s and chars[s] for s, e in enc["offset_mapping"]]
        want[0] = False
        assert mask.tolist() == want
        replies = [m.content.strip() + end for m in record.messages if m.role == "assistant"]
        assert tok.decode(np.asarray(ids)[mask]) == "".join(replies)


@SETTINGS
@given(records=st.lists(conversations(), min_size=1, max_size=4))
def test_chatml_mask_is_each_reply_and_its_end_of_turn_token(chatml, records):
    check(chatml, records, "<|im_start|>", "\n", "<|im_end|>", "\n")


@SETTINGS
@given(records=st.lists(conversations(), min_size=1, max_size=4))
def test_a_multi_token_end_of_turn_and_bos_text_from_the_template(eot, records):
    check(eot, records, "<|start|>", "\n\n", "<|eot|>", "", bos=eot.bos_token)
    table, _ = tokenize_records(records, eot, 1 << 20, "template")
    assert table.input_ids[table.offsets[0]] == eot.bos_token_id  # once: nothing is prepended besides the template


def test_the_tulu_format_is_untouched_by_the_setting(chatml):
    record = Record((Message("user", "hello"), Message("assistant", "the answer is 42")))
    tulu, _ = tokenize_records([record], chatml, 1 << 20)
    again, _ = tokenize_records([record], chatml, 1 << 20, "tulu")
    assert tulu.fingerprint() == again.fingerprint()
    assert "<|user|>" in chatml.decode(tulu.input_ids) and "<|im_start|>" not in chatml.decode(tulu.input_ids)


def test_classes_are_placed_on_the_reply_under_the_template(chatml):
    record = Record((Message("user", "hi"), Message("assistant", "  the answer is 42")),
                    classes=((2, 5, 1), (16, 18, 0)))  # "the", "42" of the unstripped content
    sample = render_template(record, chatml)
    got = [(sample.text[s:e], c) for s, e, c in sample.classes]
    assert got == [("the", 1), ("42", 0)]


def test_a_template_that_rewrites_history_is_refused(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = REWRITES
    record = Record((Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "d")))
    with pytest.raises(ValueError, match="differently"):
        tokenize_records([record], tok, 1 << 20, "template")


def test_a_record_the_template_refuses_names_its_line(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    record = Record((Message("system", "s"), Message("user", "u"), Message("assistant", "a")), where="d.jsonl:7")
    with pytest.raises(DataError, match=r"^d\.jsonl:7: the tokenizer's chat template refuses this record "
                                        r"\(System role not supported\)"):
        tokenize_records([record], tok, 1 << 20, "template")


def test_template_without_a_template_is_one_line(tiny_tokenizer_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"chat_format: template, but .* has no chat template.*use chat_format: tulu"):
        tokenize_file(data, str(tiny_tokenizer_dir), 64, tmp_path / "t.tokens.npz", chat_format="template")
    assert not (tmp_path / "t.tokens.npz").exists()


def test_the_sidecar_records_the_chat_format(tiny_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = CHATML
    model = tmp_path / "tok"
    tok.save_pretrained(model)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hello", "completion": "world"}) + "\n")
    for fmt in ("tulu", "template"):
        meta = tokenize_file(data, str(model), 64, tmp_path / f"{fmt}.tokens.npz", chat_format=fmt)
        assert meta["chat_format"] == fmt
    from tokenclean.tokenization import concat_files
    with pytest.raises(ValueError, match="different chat formats"):
        concat_files([tmp_path / "tulu.tokens.npz", tmp_path / "template.tokens.npz"], tmp_path / "c.tokens.npz")
