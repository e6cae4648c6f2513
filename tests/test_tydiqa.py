"""TyDiQA GoldP as the paper ran it: the packaged lm-eval task on small hand-made files in the real (SQuAD) format."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tokenclean.evaluation import BENCHMARK_TASKS
from tokenclean.tasks.tydiqa import tc_tydiqa_utils as ty

LANGS = ["arabic", "bengali", "english", "finnish", "indonesian", "korean", "russian", "swahili", "telugu"]
CODES = ["ar", "bn", "en", "fi", "id", "ko", "ru", "sw", "te"]


def squad_file(path: Path, rows: list[dict]) -> Path:
    """rows of {id, context, question, answers} as a SQuAD v1.1 file: one article per language, questions on the
    same passage in one paragraph."""
    articles: dict[str, dict[str, list]] = {}
    for r in rows:
        paragraphs = articles.setdefault(r["id"].split("-")[0], {})
        paragraphs.setdefault(r["context"], []).append(
            {"id": r["id"], "question": r["question"],
             "answers": [{"text": a, "answer_start": 0} for a in r["answers"]]})
    data = [{"title": lang, "paragraphs": [{"context": c, "qas": qas} for c, qas in ps.items()]}
            for lang, ps in articles.items()]
    path.write_text(json.dumps({"version": "TyDiQA-GoldP-1.1", "data": data}, ensure_ascii=False))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """5 dev questions per language (English: 2, fewer than asked: all kept, no draw), 3 training questions each."""
    d = tmp_path_factory.mktemp("tydiqa")
    dev, train = [], []
    for lang in LANGS:
        for i in range(2 if lang == "english" else 5):
            dev.append({"id": f"{lang}-{700 + i}-{i % 2}", "context": f"the fox {i} jumps over the lazy dog {i // 2}",
                        "question": f"which fox {i} ?", "answers": [f"fox {i}", f"the fox {i} jumps"]})
        for i in range(3):
            train.append({"id": f"{lang}-{900 + i}-0", "context": f"hello world {i // 2} how are you",
                          "question": f"who {i} ?", "answers": [f"world {i}", "nobody"]})
    return {"dev": squad_file(d / "tydiqa-goldp-v1.1-dev.json", dev),
            "train": squad_file(d / "tydiqa-goldp-v1.1-train.json", train)}


def meta(files: dict[str, Path], **extra) -> dict:
    return {"tydiqa_dev": str(files["dev"]), "tydiqa_train": str(files["train"]), **extra}


def load_tasks(metadata: dict) -> dict:
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(p) for p in BENCHMARK_TASKS], include_defaults=False, metadata=metadata)
    return tm.load(["tc_tydiqa_goldp"])["tasks"]


def open_instruct_draw(files: dict[str, Path], per_language: int, seed: int = 42) -> dict[str, tuple[list, list]]:
    """The paper's script's draws, written out step by step: the module RNG seeded once, the dev subsample of
    each language (sorted) that has more than asked, then one shot per language from its training questions."""
    def questions(path):
        data = json.loads(Path(path).read_text())
        return [(qa["id"], qa["id"].split("-")[0]) for art in data["data"] for par in art["paragraphs"]
                for qa in par["qas"]]

    state = random.getstate()
    try:
        random.seed(seed)
        dev = questions(files["dev"])
        langs = sorted({lang for _, lang in dev})
        chosen = {}
        for lang in langs:
            ids = [q for q, lg in dev if lg == lang]
            chosen[lang] = random.sample(ids, per_language) if len(ids) > per_language else ids
        train = questions(files["train"])
        shots = {lang: random.sample([q for q, lg in train if lg == lang], 1) for lang in langs}
    finally:
        random.setstate(state)
    return {lang: (chosen[lang], shots[lang]) for lang in langs}


# ---------------------------------------------------------------------------------------------------------
# data: offline, exact and deterministic per-language subsampling, the paper's prompt
# ---------------------------------------------------------------------------------------------------------
def test_task_loads_offline_with_exactly_the_papers_draws(files, tiny_model_dir):
    tasks = load_tasks(meta(files, tydiqa_per_language=3, pretrained=str(tiny_model_dir)))
    assert sorted(tasks) == [f"tc_tydiqa_goldp_{c}" for c in CODES]
    expected = open_instruct_draw(files, 3)
    for code, lang in zip(CODES, LANGS):
        task = tasks[f"tc_tydiqa_goldp_{code}"]
        docs = list(task.validation_docs())
        assert [d["id"] for d in docs] == expected[lang][0]
        assert len(docs) == (3 if lang != "english" else 2)  # exactly as asked; English has only 2, all kept
        assert [d["id"] for d in task.fewshot_docs()] == expected[lang][1]
    again = load_tasks(meta(files, tydiqa_per_language=3, pretrained=str(tiny_model_dir)))
    assert [d["id"] for d in again["tc_tydiqa_goldp_ko"].validation_docs()] == expected["korean"][0]
    everything = load_tasks(meta(files, tydiqa_per_language=None, tydiqa_max_context_tokens=0))
    assert len(list(everything["tc_tydiqa_goldp_sw"].validation_docs())) == 5


def test_prompt_is_the_papers_one_shot_prompt(files, tiny_model_dir):
    task = load_tasks(meta(files, tydiqa_per_language=2, tydiqa_max_context_tokens=0))["tc_tydiqa_goldp_ru"]
    doc = next(iter(task.validation_docs()))
    shot_id = task.fewshot_docs()[0]["id"]
    i, j = int(doc["id"].split("-")[1]) - 700, int(shot_id.split("-")[1]) - 900
    expected = ("Ответьте на следующий вопрос на основе информации в данном отрывке.\n\n"
                f"Отрывок: hello world {j // 2} how are you\nВопрос: who {j} ?\nОтвет: world {j}\n\n"
                f"Отрывок: the fox {i} jumps over the lazy dog {i // 2}\nВопрос: which fox {i} ?\nОтвет:")
    assert task.fewshot_context(doc, 1) == expected
    gen = task.config.generation_kwargs
    assert gen["until"] == ["\n"] and gen["max_gen_toks"] == 50 and gen["do_sample"] is False


def test_passages_are_cut_to_max_context_tokens_of_the_models_tokenizer(files, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = load_tasks(meta(files, tydiqa_per_language=2, tydiqa_max_context_tokens=4,
                           pretrained=str(tiny_model_dir)))["tc_tydiqa_goldp_en"]
    full = {r["id"]: r["context"] for key in ("dev", "train") for r in ty.read_squad(files[key], key)}
    for doc in list(task.validation_docs()) + list(task.fewshot_docs()):
        passage = doc["prompt"].split("\n")[0].removeprefix("Passage: ")
        original = tok.encode(full[doc["id"]], add_special_tokens=False)
        assert len(original) > 4 and "<s>" not in passage
        assert tok.encode(passage, add_special_tokens=False) == original[:4] and full[doc["id"]].startswith(passage)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        ty.load_tydiqa("english", **meta(files, tydiqa_max_context_tokens=4))


def test_bad_files_and_settings_are_named(files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json not found; set metadata tydiqa_dev"):
        ty.load_tydiqa("english", tydiqa_dev=str(tmp_path / "nope.json"), tydiqa_max_context_tokens=0)
    bad = tmp_path / "bad.json"
    question = {"id": "english-1", "question": "q"}  # no answers
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [question]}]}]}))
    with pytest.raises(ValueError, match=r"bad\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: field 'answers'"):
        ty.load_tydiqa("english", tydiqa_dev=str(bad), tydiqa_shots=0, tydiqa_max_context_tokens=0)
    with pytest.raises(ValueError, match="no dev file"):
        ty.load_tydiqa("english")
    with pytest.raises(ValueError, match="needs the training file"):
        ty.load_tydiqa("english", tydiqa_dev=str(files["dev"]), tydiqa_max_context_tokens=0)


# ---------------------------------------------------------------------------------------------------------
# metric: SQuAD v1.1 F1 and exact match, by hand
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction, gold, f1, em", [
    ("The Cat sat.", "cat   sat", 1.0, 1.0),                 # case, article, punctuation, white space
    ("a big red dog", "the red dog barked", 2 / 3, 0.0),     # overlap {red, dog}: P = R = 2/3
    ("Paris, France", "Paris", 2 / 3, 0.0),                  # P = 1/2, R = 1
    ("dog dog", "dog", 2 / 3, 0.0),                          # repeated tokens count once per gold occurrence
    ("Eiffel-Tower", "eiffel tower", 0.0, 0.0),              # ASCII punctuation is removed, not spaced
    ("«Москва»", "Москва", 0.0, 0.0),                        # SQuAD v1.1: non-ASCII punctuation stays
    ("", "anything", 0.0, 0.0),
    ("an apple", "the apple", 1.0, 1.0),
])
def test_f1_and_exact_match_by_hand(prediction, gold, f1, em):
    assert ty.f1(prediction, gold) == pytest.approx(f1)
    assert ty.exact_match(prediction, gold) == em


def test_best_gold_answer_counts_and_the_generation_is_stripped():
    doc = {"answers": ["city of Paris", "Paris"]}
    # vs "city of Paris": P = 1/2, R = 1/3 -> 0.4; vs "Paris": 2/3
    assert ty.process_results(doc, ["  Paris, France "]) == {"f1": pytest.approx(2 / 3), "exact_match": 0.0}
    assert ty.process_results(doc, [" the city of paris."]) == {"f1": 1.0, "exact_match": 1.0}


# ---------------------------------------------------------------------------------------------------------
# end to end: `tokenclean evaluate` on the tiny model
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # runs lm-eval on a tiny model: 10-30 s
def test_tokenclean_evaluate_runs_tydiqa_end_to_end(files, tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    bench = [{"task": "tc_tydiqa_goldp", "num_fewshot": 1, "metric": "f1", "limit": None,
              "metadata": meta(files, tydiqa_per_language=2)}]
    from tokenclean.cli import main

    rc = main(["evaluate", "--model", str(tiny_model_dir), "--device", "cpu", "--benchmarks", json.dumps(bench),
               "--batch-size", "32", "--limit", "0.5", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    m = result["metrics"]["tc_tydiqa_goldp"]
    assert set(m["subtasks"]) == {f"tc_tydiqa_goldp_{c}" for c in CODES}
    assert all(0.0 <= v <= 1.0 for v in m["subtasks"].values())
    # the headline is the unweighted mean over the 9 languages (English has as many examples as the others here)
    assert m["score"] == m["f1"] == pytest.approx(sum(m["subtasks"].values()) / 9)
    assert result["average"]["score"] == m["score"]
    assert m["n_examples"] == 18  # its own limit (null: every drawn example), not the global --limit 0.5


# ---------------------------------------------------------------------------------------------------------
# the model side of the paper's TyDiQA script: batch size under auto, BOS, newline-token stop
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture()
def generate_calls(monkeypatch) -> list[dict]:
    """Every batch lm-eval generates: its size, first token ids, stop strings and extra generate arguments."""
    from lm_eval.models.huggingface import HFLM

    calls: list[dict] = []
    real = HFLM._model_generate

    def spy(self, context, max_length, stop, **kwargs):
        mask = kwargs["attention_mask"]  # left padding: a row's first real token is its first unmasked one
        first = [row[int(m.argmax())] for row, m in zip(context.tolist(), mask)]
        calls.append({"size": context.shape[0], "first": first, "ids": context.tolist(), "stop": list(stop),
                      "kwargs": {k: v for k, v in kwargs.items() if k != "attention_mask"}})
        return real(self, context, max_length, stop, **kwargs)

    monkeypatch.setattr(HFLM, "_model_generate", spy)
    return calls


@pytest.mark.slow  # runs lm-eval on a tiny model: 10-30 s
def test_auto_batch_size_never_probes_generation_at_the_models_max_length(files, tiny_model_dir, tmp_path,
                                                                          monkeypatch, generate_calls):
    from lm_eval.models.huggingface import HFLM

    from tokenclean.evaluation import GENERATION_BATCH_SIZE, evaluate_benchmarks

    def probe(self, requests=None, pos=0):
        if not requests:  # what generate_until does: a forward pass at self.max_length (131072 for Llama-3.x)
            raise AssertionError(f"batch-size probe at the model's max length {self.max_length}")
        return 4

    monkeypatch.setattr(HFLM, "_detect_batch_size", probe)
    bench = [{"task": "tc_tydiqa_goldp", "num_fewshot": 1, "metric": "f1", "limit": None,
              "metadata": meta(files, tydiqa_per_language=2)}]
    result = evaluate_benchmarks(str(tiny_model_dir), bench, tmp_path / "r.json", device="cpu", batch_size="auto")
    assert result["metrics"]["tc_tydiqa_goldp"]["n_examples"] == 18
    assert max(c["size"] for c in generate_calls) == GENERATION_BATCH_SIZE == 5  # open-instruct's eval batch size
    assert result["model_args"]["tc_tydiqa_goldp"]["batch_size"] == "auto"
    generate_calls.clear()
    evaluate_benchmarks(str(tiny_model_dir), [{**bench[0], "model_args": {"generation_batch_size": 7}}],
                        tmp_path / "r7.json", device="cpu", batch_size="auto")
    assert max(c["size"] for c in generate_calls) == 7


@pytest.fixture(scope="module")
def bos_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that prepends BOS by default, as Llama-3's and Mistral's do."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("bos") / "tiny"
    shutil.copytree(tiny_model_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                              special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(d)
    assert AutoTokenizer.from_pretrained(d).encode("x")[0] == tok.bos_token_id
    return d


@pytest.mark.slow  # runs lm-eval on a tiny model: 10-30 s
def test_the_scripts_bos_and_newline_token_stop_apply_to_the_tydiqa_run_only(files, bos_model_dir, tmp_path,
                                                                             generate_calls):
    from transformers import AutoTokenizer

    from tokenclean.evaluation import evaluate_benchmarks

    tiny_model_dir = bos_model_dir
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    paper = {"add_bos_token": True, "dtype": "auto", "newline_stop": "token"}
    bench = [{"task": "tc_tydiqa_goldp", "num_fewshot": 1, "metric": "f1", "limit": None, "model_args": paper,
              "metadata": meta(files, tydiqa_per_language=1, tydiqa_max_context_tokens=4)}]  # short: no truncation
    # max_length: the tiny model's 256 positions would left-truncate the byte-level non-English prompts (RoPE
    # runs past them)
    result = evaluate_benchmarks(str(tiny_model_dir), bench, tmp_path / "r.json", device="cpu", batch_size=4,
                                 model_args={"add_bos_token": False, "max_length": 1024})
    # the script: BOS first, no newline stop string, the newline token (and EOS) end each sequence
    assert generate_calls and all(c["first"] == [tok.bos_token_id] * c["size"] for c in generate_calls)
    assert all("\n" not in c["stop"] and c["kwargs"]["eos_token_id"] == [tok.eos_token_id, newline]
               for c in generate_calls)
    recorded = result["model_args"]["tc_tydiqa_goldp"]
    assert {k: recorded[k] for k in paper} == paper and recorded["batch_size"] == 4
    generate_calls.clear()
    # the evaluation's own arguments (the paper's lm-eval runs: no BOS) and lm-eval's stop rule otherwise
    result = evaluate_benchmarks(str(tiny_model_dir), [{k: v for k, v in bench[0].items() if k != "model_args"}],
                                 tmp_path / "r2.json", device="cpu", batch_size=4,
                                 model_args={"add_bos_token": False, "max_length": 1024})
    assert all(tok.bos_token_id not in row for c in generate_calls for row in c["ids"])
    assert all("\n" in c["stop"] and "eos_token_id" not in c["kwargs"] for c in generate_calls)
    assert result["model_args"]["tc_tydiqa_goldp"]["dtype"] == "float32"
    with pytest.raises(ValueError, match="newline_stop must be one of text, token"):
        evaluate_benchmarks(str(tiny_model_dir), [{**bench[0], "model_args": {"newline_stop": "line"}}],
                            tmp_path / "r3.json", device="cpu")


def test_open_instructs_passage_cut_is_a_setting(files, bos_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bos_model_dir)  # prepends BOS, as Llama-3's and Mistral's do
    text = "the fox 1 jumps over the lazy dog 0"
    # open-instruct: encode with special tokens (BOS counts), decode back: the cut passage starts with BOS's text
    assert ty.cut_passage(text, tok, 4, "with_bos") == tok.decode(tok.encode(text)[:4])
    assert ty.cut_passage(text, tok, 4, "with_bos").startswith(tok.bos_token)
    assert ty.cut_passage(text, tok, 4) == tok.decode(tok.encode(text, add_special_tokens=False)[:4])
    with pytest.raises(ValueError, match="tydiqa_cut must be one of own_tokens, with_bos"):
        ty.load_tydiqa("english", **meta(files, tydiqa_cut="bos"))
