"""TyDiQA GoldP v1.1 for lm-eval, set up as the paper's runs evaluated it (open-instruct's TyDiQA script).

What the paper did (paper-notes §5.2): the GoldP dev set, 1-shot per language with the shot drawn from that
language's training data, passages cut to 512 tokens of the evaluated model's tokenizer, greedy decoding of at
most 50 new tokens stopped at a newline, no chat template, SQuAD v1.1 F1 per language (answers normalised, the
best over the gold answers), averaged over the 9 languages; 100 examples per language in the paper-time runs
(200 in the release).

The data are the SQuAD-format files ``tydiqa-goldp-v1.1-dev.json`` and ``tydiqa-goldp-v1.1-train.json``. Their
paths and the settings come from lm-eval's task metadata (``lm_eval --metadata '{...}'``, or the ``metadata`` of a
``tokenclean evaluate --benchmarks`` entry), which lm-eval hands to :func:`load_tydiqa` together with the model
arguments (``pretrained``, ``tokenizer``):

- ``tydiqa_dev``, ``tydiqa_train``: the two files (required; the train file only when ``tydiqa_shots`` > 0);
- ``tydiqa_per_language``: dev examples per language (null = all);
- ``tydiqa_shots`` (1), ``tydiqa_max_context_tokens`` (512; 0 = no cut), ``tydiqa_seed`` (42),
  ``tydiqa_cut`` (``own_tokens``; see below).

Sampling draws exactly what the open-instruct script draws: one ``random.Random(seed)`` stream, first the dev
subsample of each language that has more than ``per_language`` examples (languages in sorted order), then the
shots of each language from its training examples. With the paper's seed 42 this gives the paper's examples.

One deliberate difference, a setting: open-instruct cut passages with ``tokenizer.encode``, which adds the
begin-of-text token, and decoded it back, so a cut passage began with the literal text of that token (e.g. ``<s>``)
inside the prompt, which the tokenizer then reads as the special token. ``tydiqa_cut: own_tokens`` (default) counts
the passage's own tokens only, so the model never sees that marker; ``with_bos`` is open-instruct's cut.

What the script did on the model side is set by model arguments (``tokenclean evaluate``'s per-benchmark
``model_args``; the paper configs set all three): its prompts began with BOS (``add_bos_token: true``), the model
was loaded in the checkpoint's own dtype (``dtype: auto``), and generation stopped only at the tokenizer's newline
*token* or EOS (``newline_stop: token``; lm-eval's rule, this task's default ``until: ["\n"]``, cuts at any newline
in the text, which differs where a token such as Llama-3's ``"\n\n"`` holds one). Its output was the decoded
continuation, stripped (:func:`process_results`). See docs/paper-fidelity.md.

Self-contained (standard library, ``datasets``, ``transformers``), so stock ``lm_eval --include_path`` runs it
without tokenclean installed.
"""
from __future__ import annotations

import functools
import json
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

# language -> (instruction, passage label, question label, answer label), as in the paper's evaluation
TEMPLATES = {
    "arabic": ("أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.", "المقطع:", "السؤال:", "الإجابة:"),
    "bengali": ("প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।", "অধ্যায়:", "প্রশ্ন:", "উত্তর:"),
    "english": ("Answer the following question based on the information in the given passage.", "Passage:",
                "Question:", "Answer:"),
    "finnish": ("Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.", "Kappale:", "Kysymys:",
                "Vastaus:"),
    "indonesian": ("Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.", "Bagian:",
                   "Pertanyaan:", "Jawaban:"),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "문단:", "질문:", "답변:"),
    "russian": ("Ответьте на следующий вопрос на основе информации в данном отрывке.", "Отрывок:", "Вопрос:",
                "Ответ:"),
    "swahili": ("Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.", "Kifungu:", "Swali:",
                "Jibu:"),
    "telugu": ("ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.", "పేరా:", "ప్రశ్న:", "సమాధానం:"),
}


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def read_squad(path: str | Path, key: str) -> list[dict[str, Any]]:
    """The questions of a SQuAD-format file: id, language (the id's prefix), passage, question, gold answers."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TyDiQA file {p} not found; set metadata {key} to the SQuAD-format JSON file "
                                "(tydiqa-goldp-v1.1-dev.json / -train.json; docs/paper-scale.md: where to get them)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a JSON file ({e})") from None
    rows = []
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{p}: field 'data' (a list of articles) missing; expected the SQuAD format")
    for a, article in enumerate(data["data"]):
        for g, paragraph in enumerate(article.get("paragraphs") or []):
            where = f"{p}: data[{a}].paragraphs[{g}]"
            if not isinstance(paragraph.get("context"), str):
                raise ValueError(f"{where}: field 'context' missing or not a string")
            for q, qa in enumerate(paragraph.get("qas") or []):
                for field, kind in (("id", str), ("question", str), ("answers", list)):
                    if not isinstance(qa.get(field), kind):
                        raise ValueError(f"{where}.qas[{q}]: field {field!r} missing or not a {kind.__name__}")
                answers = [x.get("text") if isinstance(x, dict) else None for x in qa["answers"]]
                if not answers or not all(isinstance(x, str) for x in answers):
                    raise ValueError(f"{where}.qas[{q}] (id {qa['id']}): field 'answers' needs at least one "
                                     "{'text': ...}")
                rows.append({"id": qa["id"], "lang": qa["id"].split("-")[0], "context": paragraph["context"],
                             "question": qa["question"], "answers": answers})
    return rows


@functools.lru_cache(maxsize=4)
def select(dev: str, train: str | None, per_language: int | None, shots: int, seed: int
           ) -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """language -> (evaluated dev examples, shots), drawn in the order open-instruct draws them (one stream)."""
    rng = random.Random(seed)
    rows = read_squad(dev, "tydiqa_dev")
    languages = sorted({r["lang"] for r in rows})
    chosen = {}
    for lang in languages:
        docs = [r for r in rows if r["lang"] == lang]
        if per_language is not None and len(docs) > per_language:
            docs = rng.sample(docs, per_language)
        chosen[lang] = docs
    demos: dict[str, list[dict[str, Any]]] = {lang: [] for lang in languages}
    if shots > 0:
        if not train:
            raise ValueError("TyDiQA: tydiqa_shots > 0 needs the training file; set metadata tydiqa_train")
        pool: dict[str, list[dict[str, Any]]] = {lang: [] for lang in languages}
        for r in read_squad(train, "tydiqa_train"):
            if r["lang"] in pool:
                pool[r["lang"]].append(r)
        for lang in languages:
            if len(pool[lang]) < shots:
                raise ValueError(f"{train}: {len(pool[lang])} training examples for {lang}, {shots} shots asked")
            demos[lang] = rng.sample(pool[lang], shots)
    return {lang: (chosen[lang], demos[lang]) for lang in languages}


@functools.lru_cache(maxsize=2)
def _tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)


CUTS = ("own_tokens", "with_bos")


def cut_passage(text: str, tokenizer: Any, max_tokens: int, cut: str = "own_tokens") -> str:
    """The passage cut to its first ``max_tokens`` tokens, decoded back to text.

    ``own_tokens`` counts the passage's own tokens; ``with_bos`` is open-instruct's cut (``encode`` with special
    tokens, so the begin-of-text token counts and its literal text starts every cut passage).
    """
    ids = tokenizer.encode(text, add_special_tokens=cut == "with_bos")
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def _doc(row: dict[str, Any], tokenizer: Any, max_tokens: int, cut: str) -> dict[str, Any]:
    instruction, passage, question, answer = TEMPLATES[row["lang"]]
    context = cut_passage(row["context"], tokenizer, max_tokens, cut) if max_tokens > 0 else row["context"]
    return {"id": row["id"], "lang": row["lang"], "instruction": instruction,
            "prompt": f"{passage} {context}\n{question} {row['question']}\n{answer}",
            "answer": row["answers"][0], "answers": row["answers"]}


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def load_tydiqa(language: str, tydiqa_dev: str | None = None, tydiqa_train: str | None = None,
                tydiqa_per_language: int | None = None, tydiqa_shots: int = 1, tydiqa_max_context_tokens: int = 512,
                tydiqa_seed: int = 42, tydiqa_cut: str = "own_tokens", pretrained: Any = None, tokenizer: Any = None,
                trust_remote_code: Any = False, revision: str | None = None, **_: Any) -> Any:
    """lm-eval ``custom_dataset``: ``validation`` = the language's evaluated examples, ``train`` = its shots.

    lm-eval calls it with the task metadata and the model arguments as keyword arguments (see module docstring).
    """
    import datasets

    if language not in TEMPLATES:
        raise ValueError(f"TyDiQA: no prompt template for language {language!r}")
    if tydiqa_cut not in CUTS:
        raise ValueError(f"TyDiQA: tydiqa_cut must be one of {', '.join(CUTS)}, got {tydiqa_cut!r}")
    if not tydiqa_dev:
        raise ValueError("TyDiQA: no dev file; set metadata tydiqa_dev (and tydiqa_train) to the SQuAD-format "
                         "GoldP v1.1 files")
    per_language = None if tydiqa_per_language in (None, "", "null") else int(tydiqa_per_language)
    if per_language is not None and per_language < 1:
        raise ValueError(f"TyDiQA: tydiqa_per_language must be positive or null, got {per_language}")
    by_lang = select(str(tydiqa_dev), str(tydiqa_train) if tydiqa_train else None, per_language, int(tydiqa_shots),
                     int(tydiqa_seed))
    if language not in by_lang:
        raise ValueError(f"{tydiqa_dev}: no {language} examples (it has {', '.join(by_lang) or 'none'})")
    max_tokens = int(tydiqa_max_context_tokens or 0)
    tok = None
    if max_tokens > 0:
        name = tokenizer if isinstance(tokenizer, str) and tokenizer else pretrained
        if isinstance(name, str) and name:
            # the evaluated model's tokenizer; a hub model's pinned revision (not a directory's) applies to it too
            tok = _tokenizer(name, _flag(trust_remote_code), revision if not Path(name).is_dir() else None)
        elif name is not None and hasattr(name, "encode"):
            tok = name
        else:
            raise ValueError("TyDiQA: cutting passages to tydiqa_max_context_tokens needs the model's tokenizer; "
                             "pass pretrained=... (lm_eval --model_args) or set tydiqa_max_context_tokens to 0")
    docs, demos = by_lang[language]
    return datasets.DatasetDict({
        "validation": datasets.Dataset.from_list([_doc(r, tok, max_tokens, tydiqa_cut) for r in docs]),
        "train": datasets.Dataset.from_list([_doc(r, tok, max_tokens, tydiqa_cut) for r in demos]),
    })


# ---------------------------------------------------------------------------------------------------------
# metric: SQuAD v1.1 (what the paper's script computed through `evaluate`'s squad metric), on a 0-1 scale
# ---------------------------------------------------------------------------------------------------------
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse white space (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 between the normalised prediction and one normalised gold answer."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The stripped generation against every gold answer; the best match counts."""
    prediction = results[0].strip()
    return {"f1": max(f1(prediction, g) for g in doc["answers"]),
            "exact_match": max(exact_match(prediction, g) for g in doc["answers"])}
