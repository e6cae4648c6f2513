"""lm-eval evaluation: task files, token alignment with training, metrics against a direct computation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tokenclean.data import Message, Record
from tokenclean.evaluation import check_alignment, evaluate, make_lm, samples_path, write_tasks
from tokenclean.tokenization import format_prompt, tokenize_records

PREFIX, SUFFIX = "Sure ! The answer is ", " . Hope this helps ."
TRAIN_PAIRS = [("Add 3 and 5 .", "8"), ("Add 2 and 7 .", "9"), ("Reverse the letters : c a t .", "t a c"),
               ("Reverse the letters : a b c .", "c b a")]
UNSEEN_PAIRS = [("Add 4 and 1 .", "5"), ("Which is larger : 37 or 52 ?", "52"),
                ("Reverse the letters : b a d .", "d a b")]


def row(family: str, prompt: str, response: str, answer: str) -> dict:
    start = len(PREFIX)
    assert response[start:start + len(answer)] == answer
    return {"family": family, "prompt": prompt, "response": response, "answer": answer,
            "answer_span": [start, start + len(answer)]}


def write_eval(eval_dir: Path, rows_by_family: dict[str, list[dict]]) -> None:
    eval_dir.mkdir(parents=True, exist_ok=True)
    for family, rows in rows_by_family.items():
        (eval_dir / f"{family}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def training_ids(tok, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of the sample in the training table and the number of ids before the response."""
    table, _ = tokenize_records([Record((Message("user", prompt), Message("assistant", response)))], tok, 1 << 20)
    return [int(i) for i in table.input_ids], int(table.loss_mask.argmax())


def answer_token_range(tok, response: str, span) -> tuple[int, int]:
    offsets = tok(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    hit = [i for i, (a, b) in enumerate(offsets) if a < span[1] and b > span[0]]
    return hit[0], hit[-1] + 1


def direct_generate(model, tok, prompt: str) -> str:
    """Greedy generation with plain transformers from the training prefix, cut at </s> or <|user|>."""
    ids, n_prefix = training_ids(tok, prompt, "x")
    x = torch.tensor([ids[:n_prefix]])
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<|user|>")]
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id)
    new = out[0, x.shape[1]:].tolist()
    for i, t in enumerate(new):
        if t in stops:
            new = new[:i]
            break
    return tok.decode(new, skip_special_tokens=False)


def direct_answer_nll(model, tok, r: dict) -> float:
    ids, n_prefix = training_ids(tok, r["prompt"], r["response"])
    a, b = answer_token_range(tok, r["response"], r["answer_span"])
    a, b = n_prefix + a, n_prefix + b
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:b]])).logits[0].double(), -1)
    return -sum(float(logp[i - 1, ids[i]]) for i in range(a, b))


def extract(text: str):
    at = text.find("The answer is")
    if at < 0:
        return None
    rest = text[at + len("The answer is"):]
    return (rest.split(" .")[0]).strip()


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny Llama briefly fitted to the chat template, so greedy generations are answers, not noise."""
    from transformers import AutoTokenizer

    from tokenclean.models import save_model, tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    recs = [Record((Message("user", p), Message("assistant", PREFIX + a + SUFFIX))) for p, a in TRAIN_PAIRS]
    table, _ = tokenize_records(recs, tok, 256)
    seqs = [table.input_ids[s:e] for s, e in zip(table.offsets[:-1], table.offsets[1:])]
    ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = labels[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    model = tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, hidden=32, layers=2,
                       heads=2, intermediate=64, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    torch.manual_seed(0)
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = tmp_path_factory.mktemp("trained") / "model"
    save_model(model.eval(), tok, d)
    return d


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained_model_dir):
    """One evaluate() run over three families.

    ``add`` and ``reverse`` hold the training prompts with the model's own greedy generation as the gold response
    (and its extracted answer as the gold answer): a model that is right by construction. ``unseen`` holds new
    prompts with their true answers: whatever the model does there is checked against a direct computation.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir, dtype=torch.float32).eval()
    rows: dict[str, list[dict]] = {"add": [], "reverse": [], "unseen": []}
    for prompt, _ in TRAIN_PAIRS:
        gen = direct_generate(model, tok, prompt).strip()
        answer = extract(gen)
        assert answer, f"the fitted tiny model did not learn the template: {gen!r}"
        start = gen.index(answer, gen.index("The answer is"))
        family = "add" if prompt.startswith("Add") else "reverse"
        rows[family].append({"family": family, "prompt": prompt, "response": gen, "answer": answer,
                             "answer_span": [start, start + len(answer)]})
    for prompt, answer in UNSEEN_PAIRS:
        rows["unseen"].append(row("unseen", prompt, PREFIX + answer + SUFFIX, answer))

    world = tmp_path_factory.mktemp("world")
    write_eval(world / "eval", rows)
    write_tasks(world / "eval", world / "tasks", list(rows))
    out = world / "evals" / "base.json"
    result = evaluate(trained_model_dir, world / "tasks", list(rows), out, device="cpu", seed=3)
    samples = [json.loads(line) for line in samples_path(out).read_text().splitlines()]
    return {"result": result, "out": out, "samples": samples, "rows": rows, "model": model, "tok": tok,
            "world": world}


# ---------------------------------------------------------------------------------------------------------
# task files
# ---------------------------------------------------------------------------------------------------------
def test_write_tasks_is_self_contained_and_movable(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    world = tmp_path / "results" / "world"
    write_eval(world / "eval", {"add": [row("add", "Add 3 and 5 .", PREFIX + "8" + SUFFIX, "8")] * 3,
                                "max": [row("max", "Which is larger : 37 or 52 ?", PREFIX + "52" + SUFFIX, "52")] * 2})
    names = write_tasks(world / "eval", world / "tasks", ["add", "max"])
    assert names == ["tc_add_gen", "tc_add_nll", "tc_max_gen", "tc_max_nll"]
    assert sorted(p.name for p in (world / "tasks").iterdir()) == sorted(
        [f"{n}.yaml" for n in names] + ["tc_utils.py", "tc_generate_template.yaml", "tc_answer_nll_template.yaml",
                                        "tc_multiple_choice_template.yaml"])
    assert not [p for p in world.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    assert "../eval/add.jsonl" in (world / "tasks" / "tc_add_gen.yaml").read_text()

    # move the whole results tree and work from an unrelated directory: the tasks still find their data
    moved = tmp_path / "elsewhere" / "w"
    shutil.move(str(world), moved)
    monkeypatch.chdir(tmp_path)
    tm = TaskManager(include_path=str(moved / "tasks"), include_defaults=False)
    assert set(tm.all_subtasks) == set(names)
    assert set(tm.all_tags) >= {"tc_add", "tc_max", "tokenclean"}
    tasks = tm.load(["tc_add_gen", "tc_max_nll"])["tasks"]
    assert len(tasks["tc_add_gen"].eval_docs) == 3 and len(tasks["tc_max_nll"].eval_docs) == 2
    doc = tasks["tc_add_gen"].eval_docs[0]
    assert tasks["tc_add_gen"].doc_to_text(doc) == format_prompt("Add 3 and 5 .")
    assert tasks["tc_max_nll"].doc_to_text(tasks["tc_max_nll"].eval_docs[0]) == \
        format_prompt("Which is larger : 37 or 52 ?") + PREFIX
    assert tasks["tc_max_nll"].doc_to_target(tasks["tc_max_nll"].eval_docs[0]) == "52"


def test_write_tasks_errors(tmp_path):
    write_eval(tmp_path / "eval", {"add": [row("add", "Add 3 and 5 .", PREFIX + "8" + SUFFIX, "8")]})
    with pytest.raises(FileNotFoundError, match="reverse"):
        write_tasks(tmp_path / "eval", tmp_path / "tasks", ["add", "reverse"])
    with pytest.raises(ValueError, match="family"):
        write_tasks(tmp_path / "eval", tmp_path / "tasks", [])
    assert not (tmp_path / "tasks").exists()


# ---------------------------------------------------------------------------------------------------------
# token alignment with training
# ---------------------------------------------------------------------------------------------------------
def _world_tokenizer_model(tmp_path: Path) -> Path:
    from tokenclean.models import save_model, tiny_llama
    from tokenclean.world import build_tokenizer

    texts = [f"<|user|>\nAdd {a} and {b} .\n<|assistant|>\n{PREFIX}{a + b}{SUFFIX}"
             for a in range(10) for b in range(10)]
    texts += ["Reverse the letters : c a t . t a c Which is larger : 37 or 52 ? 52"] * 20
    tok = build_tokenizer(texts, tmp_path / "tok", vocab_size=320)
    d = tmp_path / "model"
    save_model(tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, hidden=16, layers=1,
                          heads=2, intermediate=32), tok, d)
    return d


@pytest.mark.parametrize("which", ["fixture_tokenizer", "world_tokenizer"])
def test_lm_eval_ids_equal_training_ids(which, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir if which == "fixture_tokenizer" else _world_tokenizer_model(tmp_path)
    lm = make_lm(model_dir, device="cpu")
    tok = lm.tokenizer
    for prompt, answer in TRAIN_PAIRS + UNSEEN_PAIRS + [(" leading space , 12 + 30", "42")]:
        r = row("f", prompt, PREFIX + answer + SUFFIX, answer)
        ids, n_prefix = training_ids(tok, prompt, r["response"])
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        # generation: what HFLM feeds the model (tok_batch_encode) is the training prefix, <s> included
        fed, mask = lm.tok_batch_encode([format_prompt(prompt)])
        assert fed[0].tolist() == ids[:n_prefix] and bool(mask.all())
        assert lm.tok_encode(format_prompt(prompt)) == ids[:n_prefix]
        # answer likelihood: context + continuation are the training ids, continuation = the answer's tokens
        a, b = answer_token_range(tok, r["response"], r["answer_span"])
        ctx, cont = lm._encode_pair(format_prompt(prompt) + r["response"][:r["answer_span"][0]], answer)
        assert ctx == ids[:n_prefix + a] and cont == ids[n_prefix + a:n_prefix + b]
        check_alignment(lm, prompt, r["response"], r["answer_span"])  # the guard evaluate() runs


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the evaluated fixture fits a model and runs lm-eval: ~30 s
def test_model_that_is_right_scores_one(evaluated):
    m = evaluated["result"]["metrics"]
    for family in ("add", "reverse"):
        assert m[family]["answer_acc"] == 1.0 and m[family]["response_em"] == 1.0
    assert all(s["answer_correct"] for s in evaluated["samples"] if s["family"] != "unseen")


@pytest.mark.slow  # the evaluated fixture fits a model and runs lm-eval: ~30 s
def test_metrics_match_direct_computation(evaluated):
    model, tok, result = evaluated["model"], evaluated["tok"], evaluated["result"]
    samples = {(s["family"], s["prompt"]): s for s in evaluated["samples"]}
    for family, rows in evaluated["rows"].items():
        acc, em, nll = [], [], []
        for r in rows:
            s = samples[(family, r["prompt"])]
            gen = direct_generate(model, tok, r["prompt"])
            assert s["generated"] == gen
            assert s["gold"] == r["response"] and s["answer"] == r["answer"]
            acc.append(float(extract(gen) == r["answer"]))
            em.append(float(gen.strip() == r["response"].strip()))
            nll.append(direct_answer_nll(model, tok, r))
            assert s["answer_correct"] == bool(acc[-1])
            assert s["answer_nll"] == pytest.approx(nll[-1], abs=1e-4)
        got = result["metrics"][family]
        assert got["answer_acc"] == pytest.approx(sum(acc) / len(acc))
        assert got["response_em"] == pytest.approx(sum(em) / len(em))
        assert got["answer_nll"] == pytest.approx(sum(nll) / len(nll), abs=1e-4)
        assert result["n_examples"][family] == len(rows)
    for metric in ("answer_acc", "response_em", "answer_nll"):
        fams = result["metrics"].values()
        assert result["average"][metric] == pytest.approx(sum(f[metric] for f in fams) / len(result["metrics"]))


@pytest.mark.slow  # the evaluated fixture fits a model and runs lm-eval: ~30 s
def test_output_files(evaluated):
    import lm_eval

    out = evaluated["out"]
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(evaluated["result"]))
    assert on_disk["tasks"] == ["add", "reverse", "unseen"]
    assert on_disk["seed"] == 3 and on_disk["limit"] is None and on_disk["lm_eval_version"] == lm_eval.__version__
    assert set(on_disk["metrics"]["add"]) >= {"answer_acc", "response_em", "answer_nll"}
    assert {"family", "prompt", "gold", "generated", "answer_correct"} <= set(evaluated["samples"][0])
    assert len(evaluated["samples"]) == sum(map(len, evaluated["rows"].values()))
    assert sorted(p.name for p in out.parent.iterdir()) == ["base.json", "base.samples.jsonl"]

    from tokenclean.report.table import collect

    tasks, rows = collect([out])
    assert tasks == ["add", "reverse", "unseen"] and rows[0]["add_mean"] == 1.0


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the evaluated fixture fits a model and runs lm-eval: ~30 s
def test_errors_are_clear(evaluated, tmp_path):
    world = evaluated["world"]
    tasks_dir = world / "tasks"
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*add, reverse, unseen"):
        evaluate(tmp_path / "no_model", tasks_dir, ["add", "nope"], tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match=r"model directory .*no_model"):
        evaluate(tmp_path / "no_model", tasks_dir, ["add"], tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="tasks directory"):
        evaluate(tmp_path / "no_model", tmp_path / "no_tasks", ["add"], tmp_path / "x.json")
    copy = tmp_path / "w"
    shutil.copytree(world / "tasks", copy / "tasks")
    with pytest.raises(FileNotFoundError, match=r"eval data file .*add\.jsonl"):
        evaluate(tmp_path / "no_model", copy / "tasks", ["add"], tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow  # the evaluated fixture fits a model and runs lm-eval: ~30 s
def test_benchmark_suite_scores_each_task_with_its_own_shots_and_metric(evaluated, trained_model_dir, tmp_path):
    from tokenclean.evaluation import evaluate_benchmarks

    suite = [{"task": "tc_add_gen", "num_fewshot": 0, "metric": "answer_acc"},
             {"task": "tc_reverse_nll", "num_fewshot": 1, "metric": "answer_nll"}]
    out = tmp_path / "bench.json"
    result = evaluate_benchmarks(str(trained_model_dir), suite, out, device="cpu",
                                 include_path=evaluated["world"] / "tasks", model_args={"add_bos_token": True})
    per_family = evaluated["result"]["metrics"]
    assert result["metrics"]["tc_add_gen"]["score"] == pytest.approx(per_family["add"]["answer_acc"])
    assert result["metrics"]["tc_reverse_nll"]["answer_nll"] > 0
    assert result["average"]["score"] == pytest.approx(
        (result["metrics"]["tc_add_gen"]["score"] + result["metrics"]["tc_reverse_nll"]["score"]) / 2)
    assert json.loads(out.read_text())["benchmarks"][1]["num_fewshot"] == 1
    # per-example scores beside the results (for the report's paired bootstrap); their means are the task scores
    rows = [json.loads(line) for line in (tmp_path / "bench.samples.jsonl").read_text().splitlines()]
    for task in ("tc_add_gen", "tc_reverse_nll"):
        scores = [r["score"] for r in rows if r["task"] == task]
        assert len(scores) == evaluated["result"]["n_examples"]["add"]
        assert sum(scores) / len(scores) == pytest.approx(result["metrics"][task]["score"])
    # a generation task keeps what the model wrote (the same greedy text as the world's own evaluation) and the
    # reference; a likelihood task has no generation
    gen = sorted((r for r in rows if r["task"] == "tc_add_gen"), key=lambda r: r["doc_id"])
    own = sorted((r for r in evaluated["samples"] if r["family"] == "add"), key=lambda r: r["doc_id"])
    assert [r["generated"] for r in gen] == [r["generated"] for r in own]
    assert all(isinstance(r["target"], str) and r["target"] for r in gen)
    assert not any("generated" in r for r in rows if r["task"] == "tc_reverse_nll")
    with pytest.raises(ValueError, match="reports no metric 'acc'"):
        evaluate_benchmarks(str(trained_model_dir), [{"task": "tc_add_gen"}], tmp_path / "x.json", device="cpu",
                            include_path=evaluated["world"] / "tasks", model_args={"add_bos_token": True})
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------------------------------------------------
# worlds of many phrasings and multiple-choice tasks (issue 23)
# ---------------------------------------------------------------------------------------------------------
def _single_template_answer(text: str):
    """The single-template world's reading before issue 23, verbatim: what its table was computed with."""
    at = text.find("The answer is")
    if at < 0:
        return None
    rest = text[at + len("The answer is"):]
    end = rest.find(" .")
    return (rest if end < 0 else rest[:end]).strip()


def test_local_benchmarks_are_found_without_the_stock_index(tmp_path, monkeypatch):
    """Benchmarks that are all plain tasks of the package's or the include path's YAMLs need no index of lm-eval's
    ~15,000 stock tasks (about 10 s of CPU per evaluation job); a stock name or a group brings the stock index in."""
    import lm_eval.tasks

    from tokenclean import evaluation

    real, stock_index = lm_eval.tasks.TaskManager, []

    def spy(**kwargs):  # builds each index without the stock tasks (seconds), recording which was asked for
        stock_index.append(kwargs.pop("include_defaults", True))
        return real(include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", spy)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\ndataset_path: json\noutput_type: loglikelihood\n"
                                     "doc_to_text: x\ndoc_to_target: y\n")
    paths = [str(p) for p in evaluation.BENCHMARK_TASKS] + [str(tasks)]
    assert "mine" in evaluation._benchmark_task_manager(paths, {}, ["mine"]).all_subtasks
    assert stock_index == [False]
    for names in (["mine", "arc_easy"], ["tc_tydiqa_goldp"]):  # a stock task; the package's group
        stock_index.clear()
        evaluation._benchmark_task_manager(paths, {}, names)
        assert stock_index == [False, True], names


@pytest.mark.parametrize("text", [
    "Sure ! The answer is 8 . Hope this helps .", "The answer is 8", "The answer is", "no marker", "",
    "x The answer is 1 2 , 3 . The answer is 4 .", "Sure The answer is  a b c .", "The answer is 8 ,. x",
    "It is 5 . The answer is 6 .", "The answer isn't . 9", " . The answer is 7 . .",
])
def test_single_template_reading_is_unchanged(text):
    """With no answer_format.json (or the single template's), answers and well-formed responses are read exactly
    as before issue 23, so the single-template world's table reproduces."""
    from tokenclean.tasks.tc_utils import SINGLE_TEMPLATE_FORMAT, extract_answer, process_generation

    fmt = SINGLE_TEMPLATE_FORMAT
    assert extract_answer(text, fmt["leads"], fmt["ends"]) == _single_template_answer(text)
    for gold in (PREFIX + "8" + SUFFIX, "The answer is 8", text):  # the template, or any gold text of an eval file
        doc = {"answer": "8", "response": gold, "answer_leads": fmt["leads"], "answer_ends": fmt["ends"],
               "responses": [gold] + [p + "8" + s for p, s in fmt["forms"]]}
        got = process_generation(doc, [text])
        assert got["answer_acc"] == float(_single_template_answer(text) == "8")
        if gold == PREFIX + "8" + SUFFIX or gold == text:
            assert got["response_em"] == float(text.strip() == gold.strip())


def test_answers_are_read_from_any_phrasing():
    """The first answer lead-in wins (the longest of those at the same place); the answer ends at ' .' or ' ,'."""
    from tokenclean.tasks.tc_utils import extract_answer

    leads, ends = ["The answer is", "It is", "I think it is", "We get", "My answer :"], [" .", " ,"]
    cases = {"Okay . I think it is 4 2 . Glad to help .": "4 2", "We get 7 , as asked .": "7",
             "Sure ! It is Vudu . The answer is Rite .": "Vudu", "My answer : a b c": "a b c",
             "Right . That is all .": None, "It is 3 , I believe . It is 4 .": "3"}
    for text, answer in cases.items():
        assert extract_answer(text, leads, ends) == answer, text


@pytest.fixture(scope="module")
def evaluated_mc(tmp_path_factory, trained_model_dir):
    """evaluate() on a world with multiple-choice tasks and two phrasings: options after the plain prompt."""
    rows: dict[str, list[dict]] = {"add": [], "max": []}
    options = {"Add 3 and 5 .": ["8", "6", "9", "11"], "Add 2 and 7 .": ["10", "9", "7", "8"],
               "Add 4 and 1 .": ["5", "4", "7", "2"], "Which is larger : 37 or 52 ?": ["37", "52"]}
    for i, (prompt, choices) in enumerate(options.items()):
        answer = str(eval(prompt.split(" ")[1] + "+" + prompt.split(" ")[3])) if prompt.startswith("Add") else "52"
        prefix, suffix = ("Sure ! The answer is ", " .") if i % 2 else ("Okay . It is ", " , as asked .")
        r = {"family": "add" if prompt.startswith("Add") else "max", "prompt": prompt,
             "response": prefix + answer + suffix, "answer": answer,
             "answer_span": [len(prefix), len(prefix) + len(answer)], "choices": choices,
             "gold": choices.index(answer)}
        rows[r["family"]].append(r)
    world = tmp_path_factory.mktemp("mcworld")
    write_eval(world / "eval", rows)
    fmt = {"leads": ["The answer is", "It is"], "ends": [" .", " ,"],
           "forms": [["Sure ! The answer is ", " ."], ["Okay . It is ", " , as asked ."]]}
    (world / "eval" / "answer_format.json").write_text(json.dumps(fmt))
    names = write_tasks(world / "eval", world / "tasks", list(rows))
    out = world / "evals" / "x.json"
    result = evaluate(trained_model_dir, world / "tasks", list(rows), out, device="cpu", seed=0)
    samples = [json.loads(line) for line in samples_path(out).read_text().splitlines()]
    return {"result": result, "rows": rows, "samples": samples, "names": names, "fmt": fmt}


@pytest.mark.slow  # fits a model (shared fixture) and runs lm-eval
def test_multiple_choice_accuracy_and_the_mix_match_direct_computation(evaluated_mc, trained_model_dir):
    """mc_acc: the option with the highest summed log-likelihood after '<s>' + question + ' The answer is', each
    option after a space; mix_acc = (6 mc_acc + answer_acc) / 7 per family, on average and per example."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenclean.tasks.tc_utils import extract_answer

    assert "tc_add_mc" in evaluated_mc["names"] and "tc_max_mc" in evaluated_mc["names"]
    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir, dtype=torch.float32).eval()
    result, fmt = evaluated_mc["result"], evaluated_mc["fmt"]
    samples = {(s["family"], s["prompt"]): s for s in evaluated_mc["samples"]}
    for family, rows in evaluated_mc["rows"].items():
        mc, gen = [], []
        for r in rows:
            context = [tok.bos_token_id] + tok(r["prompt"] + " The answer is", add_special_tokens=False)["input_ids"]
            scores = []
            for option in r["choices"]:
                cont = tok(r["prompt"] + " The answer is " + option, add_special_tokens=False)["input_ids"]
                cont = cont[len(context) - 1:]
                ids = torch.tensor([context + cont])
                with torch.no_grad():
                    logp = torch.log_softmax(model(ids).logits[0].double(), -1)
                scores.append(sum(float(logp[len(context) + j - 1, t]) for j, t in enumerate(cont)))
            mc.append(float(max(range(len(scores)), key=scores.__getitem__) == r["gold"]))
            generated = direct_generate(model, tok, r["prompt"])
            gen.append(float(extract_answer(generated, fmt["leads"], fmt["ends"]) == r["answer"]))
            s = samples[(family, r["prompt"])]
            assert s["mc_correct"] == bool(mc[-1]) and s["answer_correct"] == bool(gen[-1])
            assert s["mix_score"] == pytest.approx((6 * mc[-1] + gen[-1]) / 7)
        got = result["metrics"][family]
        assert got["mc_acc"] == pytest.approx(sum(mc) / len(mc))
        assert got["mix_acc"] == pytest.approx((6 * got["mc_acc"] + got["answer_acc"]) / 7)
    assert result["average"]["mix_acc"] == pytest.approx(
        sum(m["mix_acc"] for m in result["metrics"].values()) / len(result["metrics"]))


def test_a_world_with_options_for_some_families_only_is_refused(tmp_path, trained_model_dir):
    rows = {"add": [row("add", "Add 3 and 5 .", PREFIX + "8" + SUFFIX, "8")],
            "max": [row("max", "Which is larger : 3 or 5 ?", PREFIX + "5" + SUFFIX, "5")]}
    rows["add"][0].update(choices=["8", "9"], gold=0)
    write_eval(tmp_path / "eval", rows)
    write_tasks(tmp_path / "eval", tmp_path / "tasks", ["add", "max"])
    with pytest.raises(ValueError, match="multiple-choice tasks for add but not for max"):
        evaluate(trained_model_dir, tmp_path / "tasks", ["add", "max"], tmp_path / "x.json", device="cpu")
    assert not (tmp_path / "x.json").exists()


def test_options_that_do_not_hold_the_answer_are_refused(tmp_path):
    from tokenclean.tasks.tc_utils import read_rows

    r = row("add", "Add 3 and 5 .", PREFIX + "8" + SUFFIX, "8")
    r.update(choices=["7", "9"], gold=0)
    write_eval(tmp_path, {"add": [r]})
    with pytest.raises(ValueError, match=r"add.jsonl:1: field 'gold' must index 'answer' in 'choices'"):
        read_rows(tmp_path / "add.jsonl")
