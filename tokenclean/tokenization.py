"""Chat formatting and tokenization into the flat token table.

Format (Tulu style, as the paper's runs built it: open-instruct's ``encode_with_messages_format``)::

    <bos><|user|>\\n{user}\\n<|assistant|>\\n{assistant}<eos>\\n<|user|>\\n...<|assistant|>\\n{assistant}<eos>

Every message content is ``.strip()``ped and the whole text is stripped, so nothing follows the last turn. The
text of a sample is tokenized **once, as a whole** (the eos token written as the tokenizer's eos text, which the
tokenizer maps to its eos id), exactly like the official runs; tokenizing pieces separately would add word-start
markers (SentencePiece) or split merges (BPE) that the model never sees at training or generation time.

``loss_mask`` comes from character offsets: the trained characters of a chat sample are, for every assistant
turn, its content, its eos and the newline that ends the turn (the official code leaves those unmasked; the
newline only exists between turns). A token is trained iff **its first character** is a trained character.
This is open-instruct's prefix-tokenization rule (the boundary index of a region is the token count of the
text before it) wherever that rule is well defined: a token straddling the header/content boundary starts in
the header and is masked; one straddling the end of a turn starts in the turn and is trained. Role headers are
never trained (the official code also trains the header of an assistant turn that directly follows another
assistant turn; we do not: a role marker is not response text). Where the prefix rule is ill-defined (the
text before a boundary, tokenized alone, ends in several tokens where the whole text has one straddling token;
or a conversation ends in a user turn, whose end the official code counts on the unstripped text), its counts
shift and mask response tokens or train prompt tokens; the first-character rule does neither. The bos id is
put first when the tokenizer has one: Llama and Mistral tokenizers add exactly that themselves (the official
code tokenizes with special tokens on); a tokenizer with a bos it does not add (the embedded world's) gets it
too, so position 0, never trained, is always a token without context.

Plain-text records (``{"text": ...}``, the pretraining corpus only) train every token after the first,
their eos included.

``chat_format="template"`` renders a chat record with the tokenizer's own chat template instead
(``apply_chat_template``, as the model's makers format conversations) and trains, of each assistant turn, exactly
what the template writes for it after its generation prompt, trailing whitespace excepted: its content and its
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``). That span is found by rendering the conversation up
to the turn with ``add_generation_prompt=True`` and up to and including the turn: the second must extend the
first, and each must be a prefix of the whole conversation, or the template is refused (it renders history
differently from a reply, so no exact mask exists). Nothing is prepended: the template writes the bos text when the
model wants one. The same first-character rule maps characters to tokens.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenclean.artifacts import ArtifactError, TokenTable, fingerprint_bytes, fingerprint_file, sha256_file
from tokenclean.data import TOKEN_CLASSES, DataError, Record, read_jsonl

log = logging.getLogger(__name__)

ROLE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
TURN_END = "\n"  # ends every message's text (the last one is stripped away)
# How chat records become text: the paper's Tulu format, or the tokenizer's own chat template (module docstring)
CHAT_FORMATS = ("tulu", "template")
NO_CLASS = -1  # token_class of tokens outside loss_mask (and of all tokens when the data carry no classes)
BOILERPLATE = TOKEN_CLASSES.index("boilerplate")


def format_prompt(user_text: str) -> str:
    """The text a model sees before it answers a single-turn user message (used by the evaluation tasks):
    the training text of ``[user, assistant]`` up to the assistant's content."""
    return ROLE_HEADERS["user"] + user_text.strip() + TURN_END + ROLE_HEADERS["assistant"]


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

    from tokenclean.models import require_model_dir, verify_model_dir

    require_model_dir(str(name_or_path))
    verify_model_dir(name_or_path)
    pinned = {"revision": revision} if revision else {}
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **pinned)
    except (OSError, ValueError) as e:
        from tokenclean.models import not_loadable

        raise FileNotFoundError(not_loadable(name_or_path, e, "tokenizer of")) from None
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no eos token; set one before tokenizing SFT data")
    return tok


def require_tokenizer_of(tokens: str | os.PathLike, tmeta: dict[str, Any], tokenizer: Any, model_name: str) -> None:
    """A token table is used with a model only if it was made with that model's tokenizer (else scores and
    training would read every id as another token)."""
    if tokenizer_fingerprint(tokenizer) != tmeta.get("tokenizer_fingerprint"):
        raise ArtifactError(f"{tokens}: tokenized with {tmeta.get('tokenizer')!r}, whose vocabulary differs from the "
                            f"tokenizer of {model_name!r}; re-tokenize the data with the model's tokenizer")


@dataclass(frozen=True)
class SampleText:
    """One record as the single string the model is trained on, with character spans into it."""

    text: str
    trained: tuple[tuple[int, int], ...]  # trained character ranges
    eos_at: tuple[int, ...]  # where each eos text starts (each must become exactly one eos token)
    content: tuple[int, int] | None = None  # the class-annotated content (last assistant turn), if any
    classes: tuple[tuple[int, int, int], ...] = ()  # (start, end, class id), in text coordinates


def render(record: Record, eos_token: str) -> SampleText:
    """The training text of ``record`` (see the module docstring for the format and the trained spans)."""
    if record.plain_text:
        content = record.messages[0].content
        text = content + eos_token
        return SampleText(text, ((0, len(text)),), (len(content),))
    parts: list[str] = []
    at = 0
    trained: list[tuple[int, int]] = []
    eos_at: list[int] = []
    span: tuple[int, int] | None = None
    classes: tuple[tuple[int, int, int], ...] = ()
    last_assistant = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
    for i, m in enumerate(record.messages):
        content = m.content.strip()
        parts += [ROLE_HEADERS[m.role], content]
        at += len(ROLE_HEADERS[m.role])
        start = at
        at += len(content)
        if m.role == "assistant":
            if i == last_assistant and record.classes:
                span = (start, at)
                lead = len(m.content) - len(m.content.lstrip())  # the spans index the unstripped content
                classes = tuple((start + max(s - lead, 0), start + min(e - lead, len(content)), c)
                                for s, e, c in record.classes if min(e - lead, len(content)) > max(s - lead, 0))
            parts.append(eos_token)
            eos_at.append(at)
            at += len(eos_token)
        parts.append(TURN_END)
        at += len(TURN_END)
        if m.role == "assistant":
            trained.append((start, at))
    text = "".join(parts)
    stripped = text.rstrip()  # the text starts with a role header, so only its end can be stripped
    trained = [(a, min(b, len(stripped))) for a, b in trained]
    return SampleText(stripped, tuple(trained), tuple(eos_at), span, classes)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer brings a chat template of its own (``chat_format: template`` needs one)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's TemplateError (e.g. "roles must alternate") and whatever the template raises
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{where}: the tokenizer's chat template refuses this record ({reason}); fix the record or "
                        "use chat_format: tulu") from None


def render_template(record: Record, tokenizer: Any, where: str = "") -> SampleText:
    """The training text of chat ``record`` under the tokenizer's chat template (see the module docstring)."""
    if record.plain_text:
        return render(record, tokenizer.eos_token)
    messages = [{"role": m.role, "content": m.content} for m in record.messages]
    whole = _apply_template(tokenizer, messages, False, where)
    trained: list[tuple[int, int]] = []
    span: tuple[int, int] | None = None
    classes: tuple[tuple[int, int, int], ...] = ()
    last_assistant = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
    for i, m in enumerate(record.messages):
        if m.role != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i], True, where) if i else ""
        through = _apply_template(tokenizer, messages[:i + 1], False, where)
        if not (through.startswith(before) and whole.startswith(through)):
            raise ValueError(f"the chat template renders assistant turn {i + 1} differently from the prompt before "
                             "it or from the whole conversation (e.g. it rewrites earlier turns), so its trained "
                             "tokens cannot be found exactly; use chat_format: tulu")
        start, end = len(before), len(before) + len(through[len(before):].rstrip())
        if end > start:
            trained.append((start, end))
        if i == last_assistant and record.classes:
            text = whole[start:end]
            lead = next((k for k in (0, len(m.content) - len(m.content.lstrip())) if
                         text.startswith(m.content[k:].rstrip())), None)
            if lead is None:
                raise ValueError("the chat template rewrites the response's content, so its ground-truth classes "
                                 "cannot be placed; use chat_format: tulu")
            content = m.content[lead:].rstrip()
            span = (start, start + len(content))
            classes = tuple((start + max(s - lead, 0), start + min(e - lead, len(content)), c)
                            for s, e, c in record.classes if min(e - lead, len(content)) > max(s - lead, 0))
    return SampleText(whole, tuple(trained), (), span, classes)


def _token_classes(starts: np.ndarray, ends: np.ndarray, spans: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """Class of each token = class of the span holding the token's first character; a token whose first
    character (a leading space) is in no span takes the class of its last character; else boilerplate."""
    def holding(x: int) -> int | None:
        return next((c for s, e, c in spans if s <= x < e), None)

    out = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        c = holding(a)
        if c is None and b > a:
            c = holding(b - 1)
        out.append(BOILERPLATE if c is None else c)
    return np.asarray(out, dtype=np.int8)


def _where(record: Record, index: int) -> str:
    return record.where or f"record {index + 1}"


def _encode(texts: list[str], records: list[Record], tokenizer: Any) -> dict[str, list]:
    """Tokenize all texts at once; if the tokenizer fails, find and name the record it fails on."""
    kwargs = {"add_special_tokens": False, "return_offsets_mapping": True}
    try:
        return tokenizer(texts, **kwargs)
    except Exception:
        pass
    for i, t in enumerate(texts):
        try:
            tokenizer(t, **kwargs)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{_where(records[i], i)}: the tokenizer cannot encode this record ({reason})") from None
    raise DataError("the tokenizer failed on the batch of records but on none of them alone")


def _check_encoded(sample: SampleText, ids: list[int], starts: np.ndarray, ends: np.ndarray, tokenizer: Any,
                   where: str) -> None:
    """Every visible character is covered by a token, and every eos text became the single eos id."""
    n = len(sample.text)
    depth = np.zeros(n + 1, dtype=np.int64)
    np.add.at(depth, starts, 1)
    np.add.at(depth, ends, -1)
    covered = np.cumsum(depth)[:n] > 0
    for j in np.nonzero(~covered)[0]:
        ch = sample.text[j]
        if not ch.isspace():
            raise DataError(f"{where}: the tokenizer cannot encode the character {ch!r} (no token covers it; "
                            "the tokenizer has no unknown token)")
    eos_len = len(tokenizer.eos_token)
    for p in sample.eos_at:
        hit = np.nonzero((starts == p) & (ends == p + eos_len))[0]
        if len(hit) != 1 or ids[hit[0]] != tokenizer.eos_token_id:
            raise ValueError(f"the tokenizer does not encode its eos text {tokenizer.eos_token!r} as the single "
                             f"token {tokenizer.eos_token_id}; it cannot tokenize chat data")


def require_chat_format(chat_format: str, tokenizer: Any, name: str = "the tokenizer") -> None:
    """``chat_format`` is known, and ``template`` only with a tokenizer that has a chat template."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r} (known: {', '.join(CHAT_FORMATS)})")
    if chat_format == "template" and not has_chat_template(tokenizer):
        raise ValueError(f"chat_format: template, but {name} has no chat template (no chat_template in its "
                         "tokenizer_config.json or chat_template.jinja); use chat_format: tulu")


def tokenize_records(records: list[Record], tokenizer: Any, max_length: int,
                     chat_format: str = "tulu") -> tuple[TokenTable, dict[str, int]]:
    """Tokenize records into a TokenTable; samples whose response is entirely truncated away are skipped.
    ``chat_format``: ``tulu`` (the paper's format) or ``template`` (the tokenizer's chat template)."""
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token; set one before tokenizing SFT data")
    require_chat_format(chat_format, tokenizer)
    if chat_format == "template":
        samples = [render_template(r, tokenizer, _where(r, i)) for i, r in enumerate(records)]
        head = []  # the template writes the bos text itself when the model wants one
    else:
        samples = [render(r, tokenizer.eos_token) for r in records]
        bos = tokenizer.bos_token_id
        head = [bos] if bos is not None else []
    encoded = _encode([s.text for s in samples], records, tokenizer)

    all_ids: list[np.ndarray] = []
    all_mask: list[np.ndarray] = []
    all_cls: list[np.ndarray] = []
    kept_index: list[int] = []
    stats = {"records": len(records), "skipped_no_response_after_truncation": 0, "truncated": 0,
             "empty_messages": sum(r.empty_messages for r in records),
             "records_with_empty_messages": sum(r.empty_messages > 0 for r in records)}
    for index, (sample, ids, offsets) in enumerate(zip(samples, encoded["input_ids"], encoded["offset_mapping"])):
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = off[:, 0], off[:, 1]
        _check_encoded(sample, ids, starts, ends, tokenizer, _where(records[index], index))
        trained_char = np.zeros(len(sample.text) + 1, dtype=bool)
        for a, b in sample.trained:
            trained_char[a:b] = True
        mask = (ends > starts) & trained_char[starts]
        cls = np.full(len(ids), NO_CLASS, dtype=np.int8)
        if records[index].classes:
            cls[mask] = BOILERPLATE
            if sample.content is not None:
                a, b = sample.content
                inside = mask & (a <= starts) & (starts < b)
                cls[inside] = _token_classes(starts[inside], ends[inside], sample.classes)
        ids_arr = np.asarray(head + list(ids), dtype=np.int32)
        mask = np.concatenate([np.zeros(len(head), dtype=bool), mask])
        cls = np.concatenate([np.full(len(head), NO_CLASS, dtype=np.int8), cls])
        mask[0] = False  # position 0 has no context: never trained, whatever the record form
        cls[0] = NO_CLASS
        if len(ids_arr) > max_length:
            stats["truncated"] += 1
            ids_arr, mask, cls = ids_arr[:max_length], mask[:max_length], cls[:max_length]
        if not mask.any():
            stats["skipped_no_response_after_truncation"] += 1
            continue
        all_ids.append(ids_arr)
        all_mask.append(mask)
        all_cls.append(cls)
        kept_index.append(index)
    if stats["empty_messages"]:
        log.warning("%d empty or whitespace-only messages in %d of %d records: tokenized as the official code "
                    "does (an empty assistant turn still trains its end-of-turn token)", stats["empty_messages"],
                    stats["records_with_empty_messages"], len(records))
    if stats["truncated"]:
        log.warning("%d of %d samples truncated to max_length=%d tokens", stats["truncated"], len(records),
                    max_length)
    if not kept_index:
        raise ValueError(f"no sample has a response token left after truncation to max_length={max_length}; "
                         "raise max_length")
    lengths = np.array([len(a) for a in all_ids], dtype=np.int64)
    extras = {"sample_index": np.asarray(kept_index, dtype=np.int64)}
    if any(r.id is not None for r in records):  # own data: the user's ids, to join results back (no object arrays)
        extras["record_id"] = np.asarray([records[i].id or "" for i in kept_index], dtype=np.str_)
    if any(r.classes for r in records):
        extras["token_class"] = np.concatenate(all_cls)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    table = TokenTable(np.concatenate(all_ids), offsets, np.concatenate(all_mask), extras)
    if stats["skipped_no_response_after_truncation"]:
        log.warning("%d of %d samples skipped: their response was entirely cut by max_length=%d",
                    stats["skipped_no_response_after_truncation"], len(records), max_length)
    return table, stats


def tokenize_file(data: str | os.PathLike, tokenizer_name: str, max_length: int, out: str | os.PathLike,
                  trust_remote_code: bool = False, revision: str | None = None,
                  chat_format: str = "tulu") -> dict[str, Any]:
    """CLI entry: validate ``data``, tokenize it and write ``out`` (nothing is written if anything fails).
    ``revision`` pins a hub tokenizer; the commit loaded is recorded either way, and so is ``chat_format``."""
    from tokenclean.models import hub_commit

    records = read_jsonl(data, allow_plain_text=False)
    commit = hub_commit(tokenizer_name, revision)
    tokenizer = load_tokenizer(tokenizer_name, trust_remote_code, commit)
    require_chat_format(chat_format, tokenizer, repr(str(tokenizer_name)))
    try:
        table, stats = tokenize_records(records, tokenizer, max_length, chat_format)
    except DataError:
        raise  # already names the file and line
    except ValueError as e:
        raise ValueError(f"{data}: {e}") from None
    meta = {
        "kind": "tokens",
        "data": str(data),
        "data_fingerprint": fingerprint_file(data),
        "data_sha256": sha256_file(data),
        "tokenizer": str(tokenizer_name),
        "tokenizer_revision": revision or None,
        "tokenizer_commit": commit,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "chat_format": chat_format,
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
    formats = {m.get("chat_format", "tulu") for _, m in loaded}  # tables from before the setting are tulu
    if len(formats) != 1:
        raise ValueError(f"{', '.join(map(str, tokens))} were tokenized in different chat formats "
                         f"({', '.join(sorted(formats))}); re-tokenize them with one chat_format")
    table = TokenTable.concat([t for t, _ in loaded])
    meta = {"kind": "tokens", "chat_format": formats.pop(), "data": [m.get("data") for _, m in loaded],
            "sources": [str(t) for t in tokens],
            "source_fingerprints": [m["fingerprint"] for _, m in loaded],
            "data_sha256": [m.get("data_sha256") for _, m in loaded],
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


def chunk_table(table: TokenTable, chunks: int, index: int) -> TokenTable:
    """Chunk ``index`` of ``chunks`` of a table; ``extras["source_sample"]`` says which samples of it."""
    part = chunk_range(table.n_samples, chunks, index)
    chunk = table.take(np.arange(part.start, part.stop))
    chunk.extras["source_sample"] = np.arange(part.start, part.stop, dtype=np.int64)
    return chunk


def chunk_file(tokens: str | os.PathLike, chunks: int, index: int, out: str | os.PathLike,
               loss: str | os.PathLike | None = None) -> dict[str, Any]:
    """CLI entry: chunk ``index`` of ``chunks`` of a token table, as a token table of its own; or, with ``loss``
    (a loss array made on ``tokens``), that chunk's rows of the loss array, recorded as made on the chunk's table.

    Cutting a model's losses on the whole pool gives the self-evolving chain the losses of a model that scores the
    whole pool anyway (base and warm-up, for rho and fixed) without scoring each chunk again. They equal a chunk's
    own scoring up to float rounding (about 1e-5 nats on 1-2% of the tokens: batches of other lengths).
    """
    from tokenclean.artifacts import load_array, save_array

    table, meta = TokenTable.load(tokens)
    chunk = chunk_table(table, chunks, index)
    where = {"source": str(tokens), "source_fingerprint": meta["fingerprint"], "chunk": index, "chunks": chunks}
    if loss is None:
        return chunk.save(Path(out), {**meta, **where})
    losses, lmeta = load_array(loss, "loss", made_on=(tokens, meta, table))
    first, last = chunk.extras["source_sample"][[0, -1]]  # a chunk is contiguous
    part = losses[table.offsets[first]:table.offsets[last + 1]]
    kept = {k: v for k, v in lmeta.items() if k not in ("dtype", "shape", "fingerprint", "tokenclean_version")}
    save_array(Path(out), part, {
        **kept, **where, "tokens": f"{tokens} (chunk {index} of {chunks})", "tokens_fingerprint": chunk.fingerprint(),
        "cut_from": str(loss), "cut_from_fingerprint": lmeta["fingerprint"],
        "mean_response_loss": float(np.nanmean(part)) if np.any(chunk.loss_mask) else float("nan")})
    return {"n_samples": chunk.n_samples, "n_tokens": chunk.n_tokens}
