"""LogiQA as lm-eval's stock `logiqa` task scores it, from the original release files (the hub copy is a loading
script that `datasets` 4+ refuses): small hand-made files in the release format."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

from tokenclean.evaluation import BENCHMARK_TASKS
from tokenclean.tasks.logiqa import tc_logiqa_utils as lq

# one record: answer letter, passage, question, four options ("A." prefix, no space, as in the release files)
RECORD = "{label}\n{context}\n{question}\nA.{a}\nB.{b}\nC.{c}\nD.{d}\n"


def record(i: int, label: str = "c") -> str:
    return RECORD.format(label=label, context=f"All cats sleep.Tom is a cat {i}. So what?",
                         question=f"Which one follows {i}?", a="tom sleeps.", b=f"tom runs {i}",
                         c="no cat.sleeps", d="none of the above")


@pytest.fixture(scope="module")
def logiqa_dir(tmp_path_factory) -> Path:
    """Train (2 records), Eval (2), Test (3, CRLF line ends and a trailing blank line, as a Windows copy has)."""
    d = tmp_path_factory.mktemp("logiqa")
    (d / "Train.txt").write_text("\n".join(record(i, "a") for i in range(2)), encoding="utf-8")
    (d / "Eval.txt").write_text("\n".join(record(i, "b") for i in range(2)), encoding="utf-8")
    test = "\n".join(record(i, "abd"[i]) for i in range(3)) + "\n\n"
    (d / "Test.txt").write_bytes(test.replace("\n", "\r\n").encode("utf-8"))
    return d


def stock_logiqa():
    """lm-eval's own logiqa prompt functions and task YAML (installed with lm-eval; no data needed)."""
    utils = importlib.import_module("lm_eval.tasks.logiqa.utils_logiqa")
    text = (Path(utils.__file__).parent / "logiqa.yaml").read_text()
    return utils, yaml.safe_load(text.replace("!function ", ""))


def test_release_format_is_parsed_as_the_hub_script_did(logiqa_dir):
    rows = lq.read_logiqa(logiqa_dir / "Test.txt")
    assert [r["label"] for r in rows] == ["a", "b", "d"]
    # every "." gets a space after it, then the text is stripped: "sleep.Tom" -> "sleep. Tom", ". So" -> ".  So"
    assert rows[1]["context"] == "All cats sleep. Tom is a cat 1.  So what?"
    assert rows[1]["question"] == "Which one follows 1?"
    assert rows[1]["options"] == ["tom sleeps.", "tom runs 1", "no cat. sleeps", "none of the above"]
    assert len(lq.read_logiqa(logiqa_dir / "Train.txt")) == 2


def test_prompt_choices_and_target_equal_lm_evals_logiqa(logiqa_dir):
    from lm_eval.tasks import TaskManager

    utils, stock = stock_logiqa()
    tm = TaskManager(include_path=[str(p) for p in BENCHMARK_TASKS], include_defaults=False,
                     metadata={"logiqa_dir": str(logiqa_dir)})
    task = tm.load(["tc_logiqa"])["tasks"]["tc_logiqa"]
    docs = list(task.eval_docs)
    assert len(docs) == 3 and task.has_test_docs()  # the test split is the evaluated one, as in lm-eval
    for doc in docs:
        assert task.doc_to_text(doc) == utils.doc_to_text(doc)
        assert task.doc_to_target(doc) == utils.doc_to_target(doc)
        assert task.doc_to_choice(doc) == doc["options"]
    assert task.doc_to_text(docs[0]) == ("Passage: All cats sleep. Tom is a cat 0.  So what?\n"
                                         "Question: Which one follows 0?\nChoices:\nA. tom sleeps.\nB. tom runs 0\n"
                                         "C. no cat. sleeps\nD. none of the above\nAnswer:")
    ours = yaml.safe_load((BENCHMARK_TASKS[1] / "tc_logiqa.yaml").read_text().replace("!function ", ""))
    for key in ("output_type", "training_split", "validation_split", "test_split", "doc_to_choice", "metric_list"):
        assert ours[key] == stock[key], key


def test_bad_files_are_named(logiqa_dir, tmp_path):
    with pytest.raises(ValueError, match="set metadata logiqa_dir"):
        lq.load_logiqa()
    with pytest.raises(FileNotFoundError, match=r"Train\.txt not found; set metadata logiqa_dir"):
        lq.load_logiqa(str(tmp_path))
    bad = tmp_path / "Test.txt"
    bad.write_text(record(0) + "\n" + "e\npassage\nquestion\nA.x\nB.y\n")
    with pytest.raises(ValueError, match=r"Test\.txt:9: not a LogiQA record"):
        lq.read_logiqa(bad)


@pytest.mark.slow  # lm-eval end to end on a tiny model: ~13 s
def test_tokenclean_evaluate_runs_logiqa_end_to_end(logiqa_dir, tiny_model_dir, tmp_path):
    from tokenclean.cli import main

    out = tmp_path / "r.json"
    bench = [{"task": "tc_logiqa", "num_fewshot": 0, "metric": "acc", "metadata": {"logiqa_dir": str(logiqa_dir)}}]
    assert main(["evaluate", "--model", str(tiny_model_dir), "--device", "cpu", "--benchmarks", json.dumps(bench),
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]["tc_logiqa"]
    assert m["n_examples"] == 3 and m["score"] in (0.0, 1 / 3, 2 / 3, 1.0)
