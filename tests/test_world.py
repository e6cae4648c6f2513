"""The synthetic world: deterministic, its answers right by the task rules, its class labels exact."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tokenclean.data import TOKEN_CLASSES, read_jsonl
from tokenclean.tokenization import tokenize_records
from tokenclean.world import POOL_ONLY, PREFIX, SUFFIX, build_tokenizer, generate_world

SMALL = {"seed": 3, "pretrain_docs": 300, "warmup_samples": 40, "pool_samples": 400, "eval_samples": 20,
         "families": ["add", "reverse", "max", "sort", "capital", "novel_capital"], "entities": 12,
         "novel_entities": 5}
FAMILIES = SMALL["families"]


def solve(prompt: str, capitals: dict[str, str] | None = None) -> str:
    """The task rules, re-derived from the prompt text alone (and the world's table of invented capitals)."""
    if m := re.fullmatch(r"What is the capital of (\w+) \?", prompt):
        return capitals[m[1]]
    if m := re.fullmatch(r"Add (\d) and (\d) \.", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Reverse the letters : ([a-z ]+) \.", prompt):
        return " ".join(m[1].split()[::-1])
    if m := re.fullmatch(r"Which is larger : (\d+) or (\d+) \?", prompt):
        return str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"Sort the letters : ([a-z ]+) \.", prompt):
        return " ".join(sorted(m[1].split()))
    raise AssertionError(f"unknown prompt {prompt!r}")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    generate_world(SMALL, out)
    return out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def capitals(world: Path) -> dict[str, str]:
    stats = json.loads((world / "world.json").read_text())
    return dict(stats["entities"] + stats["novel_entities"])


def country(prompt: str) -> str | None:
    m = re.fullmatch(r"What is the capital of (\w+) \?", prompt)
    return m[1] if m else None


def test_novel_knowledge_is_in_the_pool_only(world):
    """novel_capital's countries occur in the pool, never in the warm-up set; `capital` is evaluated on the countries
    the warm-up set mentions, `novel_capital` on the novel ones; only novel_capital's right answers are class novel."""
    stats = json.loads((world / "world.json").read_text())
    novel = {c for c, _ in stats["novel_entities"]}
    known = {c for c, _ in stats["entities"]}
    assert len(novel) == 5 and len(known) == 12 and not novel & known
    warmup = rows(world / "warmup.jsonl")
    pool = rows(world / "pool.jsonl")
    in_warmup = {country(r["messages"][0]["content"]) for r in warmup} - {None}
    in_pool_novel = {country(r["messages"][0]["content"]) for r in pool if r["family"] == "novel_capital"}
    assert in_warmup <= known and not in_warmup & novel and in_pool_novel == novel
    assert all(r["family"] != "novel_capital" for r in warmup)
    assert {country(r["prompt"]) for r in rows(world / "eval" / "capital.jsonl")} <= in_warmup
    assert {country(r["prompt"]) for r in rows(world / "eval" / "novel_capital.jsonl")} <= novel
    assert stats["entities_in_warmup"] == len(in_warmup)
    for r in pool:
        names = {c for _, _, c in r["classes"]}
        assert ("novel" in names) <= (r["family"] == "novel_capital")
        assert ("informative" in names) <= (r["family"] != "novel_capital")


def test_deterministic_and_seed_dependent(world, tmp_path):
    generate_world(SMALL, tmp_path / "again")
    generate_world({**SMALL, "seed": 4}, tmp_path / "other")
    for name in ("corpus.jsonl", "warmup.jsonl", "pool.jsonl", "eval/add.jsonl"):
        assert (world / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
        assert (world / name).read_bytes() != (tmp_path / "other" / name).read_bytes()


def test_resizing_one_split_leaves_the_others_unchanged(world, tmp_path):
    generate_world({**SMALL, "pool_samples": 100}, tmp_path / "w")
    for name in ("corpus.jsonl", "warmup.jsonl", "eval/sort.jsonl"):
        assert (world / name).read_bytes() == (tmp_path / "w" / name).read_bytes()


def test_answers_follow_the_rules_and_classes_are_exact(world):
    pool = rows(world / "pool.jsonl")
    junk = set(json.loads((world / "world.json").read_text())["junk_vocabulary"])
    n_corrupt = n_garbage = 0
    for r in pool:
        prompt, response = r["messages"][0]["content"], r["messages"][1]["content"]
        right = solve(prompt, capitals(world))
        assert r["right_answer"] == right and (r["answer"] != right) == r["corrupted"]
        # Removing the garbage spans leaves exactly the template around the given answer.
        garbage = [(s, e) for s, e, c in r["classes"] if c == "garbage"]
        assert all(response[s:e] in junk for s, e in garbage) and bool(garbage) == r["garbage"]
        kept = " ".join(w for w in response.split(" ") if w not in junk)
        assert kept == PREFIX + r["answer"] + SUFFIX
        # Answer characters: informative (novel) where they match the right answer, corrupted where they differ.
        start = response.index(PREFIX) + len(PREFIX) if not garbage else None
        if start is not None:
            labels = {i: c for s, e, c in r["classes"] for i in range(s, e)}
            for i, ch in enumerate(r["answer"]):
                if ch != " ":
                    ok = i < len(right) and right[i] == ch
                    right_class = "novel" if r["family"] in POOL_ONLY else "informative"
                    assert labels[start + i] == (right_class if ok else "corrupted")
        has_corrupted = any(c == "corrupted" for _, _, c in r["classes"])
        assert has_corrupted == r["corrupted"]
        n_corrupt += r["corrupted"]
        n_garbage += r["garbage"]
    # 400 draws at rates 0.3 / 0.2: far outside these bounds only if the rates were ignored.
    assert 80 < n_corrupt < 160 and 45 < n_garbage < 115


def test_warmup_and_eval_are_clean(world):
    for r in rows(world / "warmup.jsonl"):
        assert not r["corrupted"] and not r["garbage"]
        assert r["messages"][1]["content"] == PREFIX + solve(r["messages"][0]["content"], capitals(world)) + SUFFIX
    for family in FAMILIES:
        ev = rows(world / "eval" / f"{family}.jsonl")
        assert len(ev) == SMALL["eval_samples"]
        for r in ev:
            s, e = r["answer_span"]
            assert r["family"] == family and r["answer"] == solve(r["prompt"], capitals(world)) == r["response"][s:e]


def test_records_parse_and_token_classes_follow_labels(world, tmp_path):
    corpus = read_jsonl(world / "corpus.jsonl")
    tok = build_tokenizer((r.messages[0].content for r in corpus), tmp_path / "tok", 400)
    pool = read_jsonl(world / "pool.jsonl")
    table, _ = tokenize_records(pool, tok, 128)
    cls = table.extras["token_class"]
    assert (cls[table.loss_mask] >= 0).all() and (cls[~table.loss_mask] == -1).all()
    raw = rows(world / "pool.jsonl")
    for i in range(table.n_samples):
        a, b = table.offsets[i], table.offsets[i + 1]
        ids, c = table.input_ids[a:b], cls[a:b]
        right_class = "novel" if raw[i]["family"] in POOL_ONLY else "informative"
        other_class = "informative" if right_class == "novel" else "novel"
        assert not (c == TOKEN_CLASSES.index(other_class)).any()
        answer_ids = ids[np.isin(c, [TOKEN_CLASSES.index(right_class), TOKEN_CLASSES.index("corrupted")])]
        assert tok.decode(answer_ids.tolist()).replace(" ", "") == raw[i]["answer"].replace(" ", "")
        if raw[i]["family"] not in ("capital", "novel_capital"):  # one token per answer character
            answer_text = tok.decode(ids[c == TOKEN_CLASSES.index(right_class)].tolist()).replace(" ", "")
            expect = "".join(ch for j, ch in enumerate(raw[i]["answer"])
                             if ch != " " and j < len(raw[i]["right_answer"]) and raw[i]["right_answer"][j] == ch)
            assert answer_text == expect
        assert (c == TOKEN_CLASSES.index("corrupted")).any() == raw[i]["corrupted"]


def test_tokenizer_splits_digits_and_keeps_role_markers_whole(tmp_path):
    tok = build_tokenizer(["Sure ! The answer is 123 . <|user|> hi"] * 50, tmp_path / "t", 300)
    assert [tok.decode([i]) for i in tok("123", add_special_tokens=False)["input_ids"]] == ["1", "2", "3"]
    ids = tok("<|user|>\nAdd 3 and 5 .\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and tok.convert_tokens_to_ids("<|assistant|>") in ids
    assert tok.decode(ids) == "<|user|>\nAdd 3 and 5 .\n<|assistant|>\n"
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>" and tok.pad_token == "<pad>"


@pytest.mark.parametrize("bad", [{"nope": 1}, {"families": ["add", "fly"]}, {"corrupt_rate": 1.5},
                                 {"pool_samples": 0}, {"junk_words": [3, 2]}, {"corpus_mix": {"chat": -1}},
                                 {"corpus_mix": {"poetry": 1}}, {"entities": 1}])
def test_bad_settings_are_refused_and_nothing_is_written(bad, tmp_path):
    with pytest.raises(ValueError, match=r"world setting|unknown world|families"):
        generate_world({**SMALL, **bad}, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_corpus_states_rule_facts_in_prose_and_never_the_invented_facts(world):
    corpus = [json.loads(line)["text"] for line in (world / "corpus.jsonl").read_text().splitlines()]
    facts = [t for t in corpus if " plus " in t or " backwards is " in t or " in order is " in t]
    assert facts and not any("<|assistant|>" in t for t in facts)
    for t in facts:  # every prose fact is true
        for a, b, c in re.findall(r"(\d) plus (\d) makes (\d+) \.", t):
            assert int(a) + int(b) == int(c)
    table = capitals(world)
    for t in corpus:  # capitals appear only as random chat answers, never next to their country
        for country, capital in table.items():
            assert not (country in t and capital in t and "<|assistant|>" not in t)
        if m := re.search(r"capital of (\w+) \?\n<\|assistant\|>\n.*The answer is (\w+)", t):
            assert m[2] in table.values()


def test_qa_documents_state_true_answers_outside_the_chat_format(tmp_path):
    """corpus_mix.qa: plain-text question and answer pairs, each answer right by the rules, no chat markers; the
    share 0 (default) adds none."""
    out = tmp_path / "qa"
    generate_world({**SMALL, "corpus_mix": {"chat": 0.2, "qa": 0.8}}, out)
    qa = [r["text"] for r in rows(out / "corpus.jsonl") if "<|user|>" not in r["text"]]
    assert len(qa) > 150
    for text in qa:
        for question, answer in re.findall(r"(.+?) The answer is (.+?) \. ?", text):
            assert solve(question.strip()) == answer
    question = re.compile(r"(Add \d and \d|Which is larger|Reverse the letters|Sort the letters)[^<]*The answer is")
    assert not any(question.search(r["text"]) and "<|user|>" not in r["text"]
                   for r in rows(world_dir(tmp_path) / "corpus.jsonl"))


def world_dir(tmp_path: Path) -> Path:
    out = tmp_path / "default-mix"
    generate_world({**SMALL, "corpus_mix": {"chat": 0.3, "facts": 0.3, "prose": 0.2, "words": 0.2}}, out)
    return out


@pytest.mark.parametrize("in_corpus", [False, True])
def test_capitals_in_corpus_states_known_capitals_never_novel_ones(tmp_path, in_corpus):
    """capitals_in_corpus: the corpus's facts and qa documents state the capital family's capitals (all of them
    right); novel_capital's countries never get their capital stated; the SFT splits do not change."""
    out = tmp_path / "w"
    generate_world({**SMALL, "capitals_in_corpus": in_corpus, "corpus_mix": {"facts": 0.5, "qa": 0.5}}, out)
    stats = json.loads((out / "world.json").read_text())
    known, novel = dict(stats["entities"]), dict(stats["novel_entities"])
    text = " ".join(r["text"] for r in rows(out / "corpus.jsonl"))
    stated = dict(re.findall(r"the capital of (\w+) is (\w+) \.", text))
    asked = dict(re.findall(r"What is the capital of (\w+) \? The answer is (\w+) \.", text))
    assert not (set(stated) | set(asked)) & set(novel)
    if in_corpus:
        assert set(stated) == set(known) and set(asked) == set(known)
        assert all(known[c] == v for c, v in {**stated, **asked}.items())
    else:
        assert not stated and not asked
    generate_world({**SMALL, "corpus_mix": {"facts": 0.5, "qa": 0.5}}, tmp_path / "other")
    for name in ("warmup.jsonl", "pool.jsonl", "eval/capital.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "other" / name).read_bytes()


# ---------------------------------------------------------------------------------------------------------
# worlds: the single-template world (v1) reproduced; the varied world (v2) of the default experiment
# ---------------------------------------------------------------------------------------------------------
# sha256 (first 16 hex digits) of the single-template world's files as the code before issue 23 wrote them
# (configs/single-template/default.yaml): its table is reproducible to the last digit only if these hold.
SINGLE_TEMPLATE_WORLD = {"corpus.jsonl": "da7ae2ae31cfb6e3", "warmup.jsonl": "48f4afc59ad27c94",
                         "pool.jsonl": "65134d97aa041fc7", "eval/add.jsonl": "e5fdc8005230cf5c",
                         "eval/capital.jsonl": "6ed7b08f15081407", "eval/max.jsonl": "79efda017f81d4a9",
                         "eval/novel_capital.jsonl": "627c5574ab21bf78", "eval/sort.jsonl": "22a025270ea68b19"}
ROOT = Path(__file__).resolve().parents[1]


def test_the_single_template_config_writes_the_world_of_before_byte_for_byte(tmp_path):
    import hashlib

    import yaml

    params = yaml.safe_load((ROOT / "configs" / "single-template" / "default.yaml").read_text())["world"]
    generate_world(params, tmp_path / "w")
    got = {name: hashlib.sha256((tmp_path / "w" / name).read_bytes()).hexdigest()[:16]
           for name in SINGLE_TEMPLATE_WORLD}
    assert got == SINGLE_TEMPLATE_WORLD
    fmt = json.loads((tmp_path / "w" / "eval" / "answer_format.json").read_text())
    assert fmt == {"leads": ["The answer is"], "ends": [" ."], "forms": [[PREFIX, SUFFIX]]}


VARIED = {**SMALL, "phrasings": 24, "multiple_choice": True}


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v") / "world"
    generate_world(VARIED, out)
    return out


def test_varied_world_writes_every_response_in_one_of_its_phrasings(varied):
    """Removing the junk leaves one of the world's phrasings around the given answer; the answer stands at many
    places; the warm-up set and the eval responses carry the right answer in a phrasing too."""
    from tokenclean.world import world_phrasings

    forms = world_phrasings(VARIED["seed"], VARIED["phrasings"])
    assert len(set(forms)) == 24
    stats = json.loads((varied / "world.json").read_text())
    assert stats["phrasings"] == [[f.prefix, f.suffix] for f in forms]
    junk = set(stats["junk_vocabulary"])
    starts, used = set(), set()
    for r in rows(varied / "pool.jsonl") + rows(varied / "warmup.jsonl"):
        response = r["messages"][1]["content"]
        kept = " ".join(w for w in response.split(" ") if w not in junk)
        form = [f for f in forms if kept == f.prefix + r["answer"] + f.suffix]
        assert form, kept
        used.add(form[0])
        answer_chars = [s for s, _, c in r["classes"] if c != "garbage"]
        if not r["garbage"]:
            starts.add(min(answer_chars))
            assert response[min(answer_chars):].startswith(r["answer"].split()[0])
    assert len(used) == 24 and len(starts) >= 8
    for family in VARIED["families"]:
        for r in rows(varied / "eval" / f"{family}.jsonl"):
            s, e = r["answer_span"]
            assert any(r["response"] == f.prefix + r["answer"] + f.suffix for f in forms)
            assert r["response"][s:e] == r["answer"] == solve(r["prompt"], capitals(varied))


def test_boilerplate_positions_count_phrasing_and_word_position_pairs(varied, world):
    """The single template repeats a dozen (phrasing, position) pairs in every sample; the varied world spreads
    them; counted against a plain recount."""
    for w, n_forms in ((world, 1), (varied, 24)):
        pool = rows(w / "pool.jsonl")
        stats = json.loads((w / "world.json").read_text())["pool_boilerplate"]
        assert 0 < stats["word_share"] < 1 and stats["words"] <= sum(len(r["messages"][1]["content"].split())
                                                                         for r in pool)
        if n_forms == 1:
            assert stats["distinct_positions"] <= 12 + 5 * 2  # the template's words, moved by junk words
    v = json.loads((varied / "world.json").read_text())["pool_boilerplate"]
    s = json.loads((world / "world.json").read_text())["pool_boilerplate"]
    assert v["distinct_positions"] > 3 * s["distinct_positions"] and v["most_repeated_position"] < \
        s["most_repeated_position"] / 4


def test_multiple_choice_options_are_drawn_as_corrupted_answers(varied):
    """Every eval record has the right answer at `gold` among distinct options; the wrong ones are what the pool's
    corruption would write: sums off by 1-3, the smaller number, other orders of the letters, other capitals."""
    caps = capitals(varied)
    for family in VARIED["families"]:
        golds = []
        for r in rows(varied / "eval" / f"{family}.jsonl"):
            options, gold = r["choices"], r["gold"]
            assert options[gold] == r["answer"] and len(set(options)) == len(options)
            golds.append(gold)
            wrong = [o for i, o in enumerate(options) if i != gold]
            if family == "add":
                assert len(options) == 4 and all(1 <= abs(int(o) - int(r["answer"])) <= 3 for o in wrong)
            elif family == "max":
                a, b = re.findall(r"\d+", r["prompt"])
                assert wrong == [str(min(int(a), int(b)))]
            elif family in ("sort", "reverse"):
                assert all(sorted(o.split()) == sorted(r["answer"].split()) for o in wrong) and len(wrong) >= 2
            else:
                assert len(wrong) == 3 and set(wrong) <= set(caps.values())
                pool_only = family in POOL_ONLY
                novel = set(dict(json.loads((varied / "world.json").read_text())["novel_entities"]).values())
                assert all((o in novel) == pool_only for o in wrong)
        if family != "max":
            assert len(set(golds)) > 1  # the right option is not always at the same place


def test_varied_world_corpus_uses_its_phrasings(varied):
    from tokenclean.world import world_phrasings

    forms = world_phrasings(VARIED["seed"], VARIED["phrasings"])
    chats = [json.loads(line)["text"] for line in (varied / "corpus.jsonl").read_text().splitlines()
             if json.loads(line)["text"].startswith("<|user|>")]
    answers = [t.split("<|assistant|>\n", 1)[1] for t in chats]
    assert chats and all(any(a.startswith(f.prefix) and a.endswith(f.suffix) for f in forms) for a in answers)
    assert len({f for a in answers for f in forms if a.startswith(f.prefix) and a.endswith(f.suffix)}) > 12


@pytest.mark.parametrize("bad", [{"phrasings": 0}, {"phrasings": 513}, {"phrasings": True},
                                 {"multiple_choice": "yes"}])
def test_bad_phrasing_settings_are_refused(bad, tmp_path):
    with pytest.raises(ValueError, match=next(iter(bad))):
        generate_world({**SMALL, **bad}, tmp_path / "w")
    assert not (tmp_path / "w").exists()
