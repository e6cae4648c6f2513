"""The embedded synthetic SFT world: rule-based tasks whose token quality is known.

Why synthetic: a world with ground truth lets a CPU run in minutes show whether token cleaning removes the
right tokens, which no real dataset can. Each sample is a single-turn instruction from one of a few task
families answered with a fixed template::

    user:      Add 3 and 5 .
    assistant: Sure ! The answer is 8 . Hope this helps .

Every response character carries a class (``tokenclean.data.TOKEN_CLASSES``):
- *informative*: the characters of a correct answer;
- *boilerplate*: the template, which the pretrained base already predicts well;
- *corrupted*: the answer characters that differ from the right answer (a plausible wrong answer);
- *garbage*: junk words inserted between template words;
- *novel*: the characters of a correct answer about knowledge that only the pool holds (``novel_capital``).

Families: ``add`` (two digits), ``reverse`` (3-5 letters), ``max`` (the larger of two numbers), ``sort``
(3 letters) are rules, so a reference trained on a small clean set can generalise to new instances;
``capital`` asks for the capital of an invented country: facts that exist only in the SFT data.
``novel_capital`` asks the same of countries that only the pool mentions, never the warm-up set: knowledge a
real pool holds beyond its curated warm-up subset. Its correct answer characters are class *novel* (informative
tokens that a reference trained on the warm-up set could not have learned): the blind spot of a fixed
reference, which self-evolving cleaning exists for. Its held-out questions form their own task, so a table shows
what only the pool teaches apart from what the reference could have learned (``capital`` is evaluated on the
countries the warm-up set mentions).

As with a real pretrained LLM, the base model brings skills that SFT has to connect to the chat format: the
corpus states true instances of the rule families in prose ("3 plus 5 makes 8 ."), never in the chat format.

Splits (each drawn from its own seeded stream, so resizing one leaves the others unchanged):
- ``corpus.jsonl``: pretraining text for the base model (shares set by ``corpus_mix``): chat-formatted
  questions with the template but random answers (the base learns format and template, not the answers),
  facts in prose, filler sentences made of template phrases and common words, and word lists that include the
  junk vocabulary (so junk is made of known tokens, as in real data, and scores cleanly negative rather than
  as noise);
- ``warmup.jsonl``: clean samples for the warm-up (reference) model;
- ``pool.jsonl``: the SFT pool to be cleaned, with ``corrupt_rate`` wrong answers and ``garbage_rate`` samples
  with junk words (independently);
- ``eval/<family>.jsonl``: clean held-out samples with the answer's character span, for the lm-eval tasks.
"""
from __future__ import annotations

import math
import os
import random
import string
from collections import Counter
from collections.abc import Callable
from itertools import permutations
from pathlib import Path
from typing import Any, NamedTuple

from tokenclean.artifacts import atomic_dir, write_json, writing
from tokenclean.data import is_number, is_whole, write_jsonl

DEFAULT_WORLD: dict[str, Any] = {
    "seed": 0,
    "families": ["add", "reverse", "max", "sort"],
    "pretrain_docs": 20000,
    "warmup_samples": 1000,
    "pool_samples": 3000,
    "eval_samples": 200,      # per family
    "corrupt_rate": 0.3,      # fraction of pool samples with a plausible wrong answer
    "garbage_rate": 0.2,      # fraction of pool samples with junk words inserted
    "junk_words": [2, 5],     # how many junk words a garbage sample gets (inclusive range)
    "junk_vocab": 60,         # size of the junk vocabulary
    "entities": 40,           # invented countries of the `capital` family (in the warm-up set and the pool)
    "novel_entities": 20,     # invented countries of the `novel_capital` family (in the pool only)
    # The corpus states the capitals of the `capital` family (its facts and qa documents): then the base brings
    # that knowledge, as a real base brings most of what SFT questions ask, and only `novel_capital` is new.
    "capitals_in_corpus": False,
    # Shares of the pretraining corpus: chat-formatted questions with random answers (format and template),
    # facts stating task instances in prose (the skills a pretrained model brings), prose of template phrases
    # and common words, word lists with the junk vocabulary.
    # `qa`: true instances as question and answer in plain text ("Add 3 and 5 . The answer is 8 ."), outside
    # the chat format: the skill in the question's own words, as a web-trained base has seen it.
    "corpus_mix": {"chat": 0.3, "facts": 0.3, "prose": 0.2, "words": 0.2, "qa": 0.0},
    # How many phrasings the responses are written in: 1 is the single template `Sure ! The answer is X . Hope
    # this helps .` (the single-template world); more are drawn from PHRASING_PARTS (openers x answer sentences x
    # closers), so that the answer stands at different places in responses of different lengths, as in a pool of
    # responses written by people and models. The corpus uses the same phrasings (the base knows them).
    "phrasings": 1,
    # The parts those phrasings are drawn from (null: PHRASING_PARTS): {openers: [...], answers: [[lead, end], ...],
    # closers: [...]}; an empty opener or closer is a phrasing without one.
    "phrasing_parts": None,
    # Also evaluate every family as a multiple-choice task scored by log-likelihood (lm-eval `multiple_choice`, a
    # plain prompt), the output type of six of the paper's seven benchmarks; the headline is then mix_acc.
    "multiple_choice": False,
}

PREFIX = "Sure ! The answer is "
SUFFIX = " . Hope this helps ."
# The parts phrasings are drawn from (world setting `phrasings` > 1). Every answer sentence has a lead-in before
# the answer and ends with " ." or " ," right after it, so the answer of any phrasing can be read back
# (tokenclean/tasks/tc_utils.py: extract_answer).
PHRASING_PARTS: dict[str, list[Any]] = {
    "openers": ["", "Sure !", "Of course .", "Okay .", "Let me see .", "Good question .", "Happy to help .",
                "Right ."],
    "answers": [("The answer is", "."), ("It is", "."), ("I think it is", "."), ("That gives", "."),
                ("My answer :", "."), ("The result is", ", I believe ."), ("Here you go :", "."),
                ("We get", ", as asked .")],
    "closers": ["", "Hope this helps .", "Let me know if you need more .", "Glad to help .", "Have a nice day .",
                "Ask me anything else .", "That is all .", "Thanks for asking ."],
}
# Where an answer ends in a response: " ." (the single template's only end) or " ," (other answer sentences).
ANSWER_ENDS = (" .", " ,")
# The plain prompt of the multiple-choice tasks: the question and `The answer is`, no chat format (the paper's
# lm-eval runs used plain prompts, no chat template); the corpus's `qa` documents use the same words.
MC_CUE = " The answer is"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
COMMON_WORDS = ["the", "a", "of", "to", "and", "is", "in", "it", "that", "for", "on", "with", "as", "this", "be", "at",
                "by", "from", "or", "an", "are", "was", "we", "can", "you", "will", "not", "have", "one", "all",
                "more", "about", "which", "their", "time", "when", "there", "some", "what", "out", "so", "up", "if",
                "into", "answer", "sure", "hope", "helps", "number", "letters", "larger", "smaller", "sort", "reverse",
                "add", "order"]
LETTERS = string.ascii_lowercase


def _letters(rng: random.Random, n: int, distinct: bool = False) -> list[str]:
    return rng.sample(LETTERS, n) if distinct else [rng.choice(LETTERS) for _ in range(n)]


class Phrasing(NamedTuple):
    """One form of a response: ``opener`` (may be empty), the answer sentence (``lead`` + answer + ``end``), then
    ``closer`` (may be empty)."""

    opener: str
    lead: str
    end: str
    closer: str

    @property
    def prefix(self) -> str:
        """The response's text before the answer."""
        return " ".join(p for p in (self.opener, self.lead) if p) + " "

    @property
    def suffix(self) -> str:
        """The response's text after the answer."""
        return " " + " ".join(p for p in (self.end, self.closer) if p)


SINGLE_TEMPLATE = Phrasing("Sure !", "The answer is", ".", "Hope this helps .")
assert SINGLE_TEMPLATE.prefix == PREFIX and SINGLE_TEMPLATE.suffix == SUFFIX


def world_phrasings(seed: int, n: int, parts: dict[str, list[Any]] | None = None) -> list[Phrasing]:
    """The world's response forms: the single template when ``n`` is 1, else ``n`` distinct combinations of an
    opener, an answer sentence and a closer from ``parts`` (default PHRASING_PARTS), drawn by the world seed."""
    if n == 1:
        return [SINGLE_TEMPLATE]
    parts = parts or PHRASING_PARTS
    combos = [(o, lead, end, c) for o in parts["openers"] for lead, end in parts["answers"] for c in parts["closers"]]
    return [Phrasing(*combo) for combo in random.Random(f"{seed}:phrasings").sample(combos, n)]


def answer_format(forms: list[Phrasing]) -> dict[str, Any]:
    """How an evaluation reads a generated response (``eval/answer_format.json``): the answer sentences' lead-ins,
    the marks that end an answer, and every well-formed response as [prefix, suffix]."""
    ends = ANSWER_ENDS[:1] if forms == [SINGLE_TEMPLATE] else ANSWER_ENDS  # the single template: as it always read
    return {"leads": list(dict.fromkeys(f.lead for f in forms)), "ends": list(ends),
            "forms": [[f.prefix, f.suffix] for f in forms]}


class Draw(NamedTuple):
    """One task instance. ``fact`` states the same instance as plain prose for the pretraining corpus (None for
    families whose knowledge exists only in the SFT data)."""

    prompt: str
    right: str
    wrong: str
    fact: str | None


# Answers are strings of space-separated symbols so that the tokenizer gives one token per letter or digit.
def _add(rng: random.Random) -> Draw:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    if wrong < 0:
        wrong = a + b + rng.randint(1, 3)
    return Draw(f"Add {a} and {b} .", str(a + b), str(wrong), f"{a} plus {b} makes {a + b} .")


def _reverse(rng: random.Random) -> Draw:
    word = _letters(rng, rng.randint(3, 5))
    while word == word[::-1]:
        word = _letters(rng, len(word))
    w, r = " ".join(word), " ".join(word[::-1])
    return Draw(f"Reverse the letters : {w} .", r, w, f"{w} backwards is {r} .")


def _max(rng: random.Random) -> Draw:
    a, b = rng.sample(range(10, 100), 2)
    return Draw(f"Which is larger : {a} or {b} ?", str(max(a, b)), str(min(a, b)),
                f"of {a} and {b} the larger is {max(a, b)} .")


def _sort(rng: random.Random) -> Draw:
    letters = _letters(rng, 3, distinct=True)
    right = sorted(letters)
    wrong = right[:]
    while wrong == right:
        rng.shuffle(wrong)
    w, r = " ".join(letters), " ".join(right)
    return Draw(f"Sort the letters : {w} .", r, " ".join(wrong), f"{w} in order is {r} .")


def invented_entities(seed: int, n: int) -> list[tuple[str, str]]:
    """(country, capital) pairs of made-up names, fixed by the world seed: facts no pretraining text states."""
    rng = random.Random(f"{seed}:entities")
    consonants, vowels = "bdfgklmnprstvz", "aeiou"

    def name(syllables: int) -> str:
        return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)).capitalize()

    countries: set[str] = set()
    while len(countries) < n:
        countries.add(name(3) + "ia")
    capitals: list[str] = []
    while len(capitals) < n:
        c = name(2)
        if c not in capitals:
            capitals.append(c)
    return list(zip(sorted(countries), capitals))


def _capital(entities: list[tuple[str, str]], in_corpus: bool = False) -> Callable[[random.Random], Draw]:
    """Capital questions about ``entities``; a wrong answer is another of their capitals. ``in_corpus``: the
    pretraining corpus states these capitals (knowledge the base brings), else only SFT data holds them."""
    def draw(rng: random.Random) -> Draw:
        i = rng.randrange(len(entities))
        j = rng.choice([k for k in range(len(entities)) if k != i] or [i])  # one entity: no wrong capital
        country, capital = entities[i]
        fact = f"the capital of {country} is {capital} ." if in_corpus else None
        return Draw(f"What is the capital of {country} ?", capital, entities[j][1], fact)
    return draw


def entity_split(seed: int, n_entities: int, n_novel: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(known, novel) invented countries: known ones may occur anywhere, novel ones only in the pool."""
    everything = invented_entities(seed, n_entities + n_novel)
    return everything[:n_entities], everything[n_entities:]


def task_families(seed: int, n_entities: int, n_novel: int = 2,
                  capitals_in_corpus: bool = False) -> dict[str, Callable[[random.Random], Draw]]:
    """Every available family: arithmetic, two string transformations, a comparison, and invented facts (of
    countries every split may mention, and of countries only the pool mentions: never in the corpus)."""
    known, novel = entity_split(seed, n_entities, n_novel)
    return {"add": _add, "reverse": _reverse, "max": _max, "sort": _sort,
            "capital": _capital(known, capitals_in_corpus), "novel_capital": _capital(novel)}


FAMILIES = tuple(task_families(0, 2))
# Families whose knowledge only the pool holds: the warm-up set never draws them, their right answers are *novel*.
POOL_ONLY = ("novel_capital",)


def _check_params(params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(DEFAULT_WORLD)
    if unknown:
        raise ValueError(f"unknown world settings: {', '.join(sorted(unknown))} (known: {', '.join(DEFAULT_WORLD)})")
    p = {**DEFAULT_WORLD, **params}
    for key, low in (("seed", 0), ("pretrain_docs", 1), ("warmup_samples", 1), ("pool_samples", 1),
                     ("eval_samples", 1), ("junk_vocab", 1), ("entities", 2), ("novel_entities", 2)):
        if not is_whole(p[key]) or p[key] < low:
            raise ValueError(f"world setting {key} must be a whole number of at least {low}, got {p[key]!r}")
    for key in ("corrupt_rate", "garbage_rate"):
        if not is_number(p[key]) or not 0.0 <= p[key] <= 1.0:
            raise ValueError(f"world setting {key} must be a number in [0, 1], got {p[key]!r}")
    mix = p["corpus_mix"]
    if (not isinstance(mix, dict) or set(mix) - set(DEFAULT_WORLD["corpus_mix"])
            or any(not is_number(v) or not math.isfinite(v) or v < 0
                   for v in mix.values()) or sum(mix.values()) <= 0):
        raise ValueError(f"world setting corpus_mix must map some of {', '.join(DEFAULT_WORLD['corpus_mix'])} "
                         f"to non-negative shares with a positive sum, got {mix}")
    if not isinstance(p["capitals_in_corpus"], bool):
        raise ValueError(f"world setting capitals_in_corpus must be true or false, got {p['capitals_in_corpus']!r}")
    parts = _check_parts(p["phrasing_parts"])
    n_forms = len(parts["openers"]) * len(parts["answers"]) * len(parts["closers"])
    if not is_whole(p["phrasings"]) or not 1 <= p["phrasings"] <= n_forms:
        raise ValueError(f"world setting phrasings must be an integer from 1 to {n_forms}, got {p['phrasings']!r}")
    if not isinstance(p["multiple_choice"], bool):
        raise ValueError(f"world setting multiple_choice must be true or false, got {p['multiple_choice']!r}")
    bad = [f for f in p["families"] if f not in FAMILIES]
    if bad or not p["families"]:
        raise ValueError(f"world families must be a non-empty subset of {', '.join(FAMILIES)}; got {p['families']}")
    if all(f in POOL_ONLY for f in p["families"]):
        raise ValueError(f"world families must include one the warm-up set can hold (not only {', '.join(POOL_ONLY)}); "
                         f"got {p['families']}")
    words = p["junk_words"]
    if (not isinstance(words, list) or len(words) != 2 or any(not is_whole(w)
                                                              for w in words) or not 1 <= words[0] <= words[1]):
        raise ValueError(f"world setting junk_words must be [min, max] with 1 <= min <= max, got {p['junk_words']}")
    return p


def _check_parts(parts: Any) -> dict[str, list[Any]]:
    """The phrasing parts a world setting gives (or PHRASING_PARTS): openers and closers are distinct strings (one
    may be empty), answers distinct [lead, end] pairs whose end starts with '.' or ',' (where answers are read
    back to end)."""
    if parts is None:
        return PHRASING_PARTS
    what = ("world setting phrasing_parts must map openers and closers to lists of distinct strings and answers "
            f"to a list of distinct [lead, end] pairs (end starting with '.' or ','), got {parts!r}")
    if not isinstance(parts, dict) or set(parts) != {"openers", "answers", "closers"}:
        raise ValueError(what)
    for key in ("openers", "closers"):
        items = parts[key]
        if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items) \
                or len(set(items)) != len(items):
            raise ValueError(what)
    answers = parts["answers"]
    if not isinstance(answers, list) or not answers or len({tuple(a) for a in answers if isinstance(a, list)}) != \
            len(answers) or not all(isinstance(a, list) and len(a) == 2 and all(isinstance(x, str) for x in a)
                                    and a[0].strip() and a[1][:1] in (".", ",") for a in answers):
        raise ValueError(what)
    return {"openers": parts["openers"], "answers": [tuple(a) for a in answers], "closers": parts["closers"]}


def junk_vocabulary(seed: int, size: int) -> list[str]:
    """Pronounceable nonsense words (never a common word), fixed by the world seed."""
    rng = random.Random(f"{seed}:junk")
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < size:
        w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
        if w not in COMMON_WORDS:
            words.add(w)
    return sorted(words)


def _answer_classes(start: int, given: str, right: str, informative: str = "informative") -> list[list[Any]]:
    """Per-character classes of an answer: characters equal to the right answer's at the same position are
    ``informative`` (or *novel*), the others (and any extra characters) corrupted. Spaces carry no class."""
    spans: list[list[Any]] = []
    for i, ch in enumerate(given):
        if ch == " ":
            continue
        cls = informative if i < len(right) and right[i] == ch else "corrupted"
        if spans and spans[-1][1] == start + i and spans[-1][2] == cls:
            spans[-1][1] += 1
        else:
            spans.append([start + i, start + i + 1, cls])
    return spans


def make_sample(rng: random.Random, family: str, draw: Callable[[random.Random], Draw], corrupt: bool,
                junk: list[str], phrasing: Phrasing = SINGLE_TEMPLATE) -> dict[str, Any]:
    """One SFT record with ground-truth classes, written in ``phrasing``; ``junk`` words are inserted between its
    words."""
    prompt, right, wrong, _ = draw(rng)
    answer = wrong if corrupt else right
    words = phrasing.prefix.split() + ["\0"] + phrasing.suffix.split()  # \0 marks the answer slot
    for w in junk:  # insert at random word boundaries, never inside the answer
        words.insert(rng.randint(0, len(words)), "\1" + w)
    response, classes = "", []
    for w in words:
        if response:
            response += " "
        if w == "\0":
            classes += _answer_classes(len(response), answer, right,
                                       "novel" if family in POOL_ONLY else "informative")
            response += answer
        elif w.startswith("\1"):
            classes.append([len(response), len(response) + len(w) - 1, "garbage"])
            response += w[1:]
        else:
            response += w
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            "classes": classes, "family": family, "corrupted": corrupt, "garbage": bool(junk),
            "answer": answer, "right_answer": right}


def _sft_split(p: dict[str, Any], name: str, n: int, corrupt_rate: float, garbage_rate: float,
               junk_vocab: list[str], forms: list[Phrasing]) -> tuple[list[dict[str, Any]], list[int]]:
    """The split's records and the index of the phrasing each is written in (drawn from a stream of its own, so
    the single-template world's records do not depend on it)."""
    rng = random.Random(f"{p['seed']}:{name}")
    form_rng = random.Random(f"{p['seed']}:{name}:phrasing")
    families = task_families(p["seed"], p["entities"], p["novel_entities"])
    drawn = [f for f in p["families"] if name == "pool" or f not in POOL_ONLY]
    rows = []
    for i in range(n):
        family = drawn[i % len(drawn)]
        corrupt = rng.random() < corrupt_rate
        junk = rng.sample(junk_vocab, rng.randint(*p["junk_words"])) if rng.random() < garbage_rate else []
        form = form_rng.randrange(len(forms))
        rows.append((make_sample(rng, family, families[family], corrupt, junk, forms[form]), form))
    rng.shuffle(rows)
    return [r for r, _ in rows], [f for _, f in rows]


def _eval_split(p: dict[str, Any], family: str, forms: list[Phrasing],
                draw: Callable[[random.Random], Draw] | None = None) -> list[dict[str, Any]]:
    """Held-out questions of ``family``, each with a gold response in one of the world's phrasings and, in a world
    with multiple-choice tasks, its options (``choices``, the right one at ``gold``)."""
    rng = random.Random(f"{p['seed']}:eval:{family}")
    form_rng = random.Random(f"{p['seed']}:eval:{family}:phrasing")
    choice_rng = random.Random(f"{p['seed']}:eval:{family}:choices")
    draw = draw or task_families(p["seed"], p["entities"], p["novel_entities"])[family]
    known, novel = entity_split(p["seed"], p["entities"], p["novel_entities"])
    capitals = [c for _, c in (novel if family in POOL_ONLY else known)]
    rows = []
    for _ in range(p["eval_samples"]):
        d = draw(rng)
        form = forms[form_rng.randrange(len(forms))]
        row = {"family": family, "prompt": d.prompt, "response": form.prefix + d.right + form.suffix,
               "answer": d.right, "answer_span": [len(form.prefix), len(form.prefix) + len(d.right)]}
        if p["multiple_choice"]:
            options = [d.right] + distractors(family, d, choice_rng, capitals)
            choice_rng.shuffle(options)
            row.update(choices=options, gold=options.index(d.right))
        rows.append(row)
    return rows


def distractors(family: str, d: Draw, rng: random.Random, capitals: list[str]) -> list[str]:
    """Wrong options of a multiple-choice question, drawn as the pool's corrupted answers are: sums off by 1 to 3
    (``add``), the smaller number (``max``: two options, as BoolQ has), other orders of the same letters (``sort``,
    ``reverse``), other capitals of the same countries (``capital``, ``novel_capital``). Three where the family has
    them."""
    if family == "add":
        pool = [str(int(d.right) + k) for k in (-3, -2, -1, 1, 2, 3) if int(d.right) + k >= 0]
    elif family == "max":
        return [d.wrong]
    elif family in ("sort", "reverse"):
        letters = d.right.split()
        pool = sorted({" ".join(q) for q in permutations(letters)} - {d.right})
        if d.wrong not in pool:
            pool.append(d.wrong)
        rest = [x for x in pool if x != d.wrong]
        return [d.wrong] + rng.sample(rest, min(2, len(rest)))
    else:
        pool = sorted(set(capitals) - {d.right})
    return rng.sample(pool, min(3, len(pool)))


def _random_answer(rng: random.Random, draw: Callable[[random.Random], Draw]) -> str:
    """The right answer of an unrelated instance of the same family: the right shape, no relation to the question
    (the base learns what answers look like, not the rule)."""
    return draw(rng).right


def _corpus(p: dict[str, Any], junk_vocab: list[str], forms: list[Phrasing]) -> list[dict[str, str]]:
    rng = random.Random(f"{p['seed']}:corpus")
    form_rng = random.Random(f"{p['seed']}:corpus:phrasing")
    families = task_families(p["seed"], p["entities"], p["novel_entities"], p["capitals_in_corpus"])
    with_facts = [f for f in p["families"] if families[f](random.Random(0)).fact is not None]
    kinds = [k for k, share in p["corpus_mix"].items() if share > 0 and (k not in ("facts", "qa") or with_facts)]
    weights = [p["corpus_mix"][k] for k in kinds]
    # the phrasings' parts and whole openings and endings (the single template: "Sure !", "The answer is",
    # "Hope this helps .", and its text before and after the answer)
    template_phrases = list(dict.fromkeys(x for f in forms for x in (f.opener, f.lead, f.closer, f.prefix.strip(),
                                                                      f.suffix.strip()) if x))
    docs = []
    for _ in range(p["pretrain_docs"]):
        kind = rng.choices(kinds, weights)[0]
        if kind == "chat":  # chat-formatted question, template, random answer
            family = families[rng.choice(p["families"])]
            form = forms[form_rng.randrange(len(forms))]
            text = (f"<|user|>\n{family(rng).prompt}\n<|assistant|>\n"
                    f"{form.prefix}{_random_answer(rng, family)}{form.suffix}")
        elif kind == "facts":  # a few true statements of task instances, in prose
            text = " ".join(families[rng.choice(with_facts)](rng).fact for _ in range(rng.randint(1, 4)))
        elif kind == "qa":  # a few true instances as question and answer, outside the chat format
            draws = [families[rng.choice(with_facts)](rng) for _ in range(rng.randint(1, 4))]
            text = " ".join(f"{d.prompt}{MC_CUE} {d.right} ." for d in draws)
        elif kind == "prose":  # filler prose around template phrases
            parts = []
            for _ in range(rng.randint(3, 8)):
                parts.append(rng.choice(template_phrases) if rng.random() < 0.4
                             else " ".join(rng.choices(COMMON_WORDS, k=rng.randint(2, 6))))
            text = " ".join(parts)
        else:  # word lists with junk words, letters and numbers
            pool = COMMON_WORDS + junk_vocab + list(LETTERS) + [str(d) for d in range(100)]
            text = " ".join(rng.choices(pool, k=rng.randint(8, 24)))
        docs.append({"text": text})
    return docs


def generate_world(params: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write the world's splits to ``out_dir`` (atomically) and return its statistics (also in world.json)."""
    p = _check_params(params)
    junk = junk_vocabulary(p["seed"], p["junk_vocab"])
    forms = world_phrasings(p["seed"], p["phrasings"], _check_parts(p["phrasing_parts"]))
    warmup, _ = _sft_split(p, "warmup", p["warmup_samples"], 0.0, 0.0, junk, forms)
    pool, pool_forms = _sft_split(p, "pool", p["pool_samples"], p["corrupt_rate"], p["garbage_rate"], junk, forms)
    known, novel = entity_split(p["seed"], p["entities"], p["novel_entities"])
    # `capital` is evaluated on the countries the warm-up set mentions (what the reference could have learned);
    # `novel_capital` on those only the pool mentions (what only the pool teaches).
    warmup_prompts = {r["messages"][0]["content"] for r in warmup}
    in_warmup = [e for e in known if f"What is the capital of {e[0]} ?" in warmup_prompts]
    draws = {"capital": _capital(in_warmup)} if in_warmup else {}
    if "capital" in p["families"] and not in_warmup:
        raise ValueError("the warm-up set mentions no country of the capital family; raise warmup_samples")
    evals = {f: _eval_split(p, f, forms, draws.get(f)) for f in p["families"]}
    corpus = _corpus(p, junk, forms)

    train_prompts = {r["messages"][0]["content"] for r in warmup + pool}
    stats: dict[str, Any] = {
        "params": p, "families": p["families"], "junk_vocabulary": junk,
        "entities": known if "capital" in p["families"] else [],
        "entities_in_warmup": len(in_warmup) if "capital" in p["families"] else 0,
        "novel_entities": novel if "novel_capital" in p["families"] else [],
        "n": {"corpus": len(corpus), "warmup": len(warmup), "pool": len(pool),
              **{f"eval_{f}": len(rows) for f, rows in evals.items()}},
        "pool_corrupted": sum(r["corrupted"] for r in pool),
        "pool_garbage": sum(r["garbage"] for r in pool),
        "pool_response_chars_by_class": _chars_by_class(pool),
        "phrasings": [[f.prefix, f.suffix] for f in forms],
        "pool_boilerplate": boilerplate_positions(pool, pool_forms),
        # Small instance spaces (add has 100 questions) make some held-out questions appear in training data.
        "eval_prompts_seen_in_training": {f: sum(r["prompt"] in train_prompts for r in rows) / len(rows)
                                          for f, rows in evals.items()},
    }
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "corpus.jsonl", corpus)
        write_jsonl(tmp / "warmup.jsonl", warmup)
        write_jsonl(tmp / "pool.jsonl", pool)
        (tmp / "eval").mkdir()
        for family, rows in evals.items():
            write_jsonl(tmp / "eval" / f"{family}.jsonl", rows)
        write_json(tmp / "eval" / "answer_format.json", answer_format(forms))
        write_json(tmp / "world.json", stats)
    return stats


def boilerplate_positions(rows: list[dict[str, Any]], forms: list[int]) -> dict[str, Any]:
    """How repetitive the pool's boilerplate is: its share of the response words, and how many distinct
    (phrasing, word position) pairs its words occupy (one template: a dozen pairs, each repeated in every sample),
    with the largest number of times one pair occurs."""
    pairs: Counter[tuple[int, int]] = Counter()
    words = 0
    for row, form in zip(rows, forms):
        response = row["messages"][1]["content"]
        labelled = [(s, e) for s, e, _ in row["classes"]]
        start = 0
        for i, word in enumerate(response.split(" ")):
            end = start + len(word)
            words += 1
            if not any(s < end and e > start for s, e in labelled):
                pairs[(form, i)] += 1
            start = end + 1
    n = sum(pairs.values())
    return {"word_share": round(n / max(words, 1), 4), "words": n, "distinct_positions": len(pairs),
            "most_repeated_position": max(pairs.values(), default=0)}


def _chars_by_class(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for r in rows:
        response = r["messages"][1]["content"]
        labelled = sum(e - s for s, e, _ in r["classes"])
        counts["boilerplate"] += len(response.replace(" ", "")) - labelled
        for s, e, cls in r["classes"]:
            counts[cls] += e - s
    return dict(counts)


def build_tokenizer(texts: Any, out_dir: str | os.PathLike, vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer (digits always split) on ``texts`` and save it to ``out_dir``.

    Chat role markers and bos/eos/pad are special tokens, so they are single ids that BPE never merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    specials = tuple(SPECIAL_TOKENS)

    def plain(batch: Any) -> Any:  # role markers are not text to learn merges from
        for t in batch:
            for s in specials:
                t = t.replace(s, " ")
            yield t

    tok.train_from_iterator(plain(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    out = Path(out_dir)
    with writing(out):  # the Rust writer's "os error 28" in words, like every other output's
        out.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(out)
    return fast
