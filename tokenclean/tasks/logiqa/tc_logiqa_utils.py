"""LogiQA for lm-eval from the original release files, scored exactly as lm-eval's stock ``logiqa`` task.

Why: lm-eval's ``logiqa`` reads the hub data set ``EleutherAI/logiqa``, which is a loading script; ``datasets`` 4+
refuses scripts ("Dataset scripts are no longer supported"), so the stock task cannot load on our stack. This task
reads the same three files that script downloaded (``Train.txt``, ``Eval.txt``, ``Test.txt`` of
github.com/lgw863/LogiQA-dataset, branch master) and parses them as it did (lm-eval's former
``lm_eval/datasets/logiqa/logiqa.py``): records separated by a blank line; line 1 the answer letter, line 2 the
passage, line 3 the question, then one ``A.``-prefixed line per option; every text with ``.`` replaced by ``. ``
and stripped. The prompt (:func:`doc_to_text`), the choices (the options) and the target (:func:`doc_to_target`)
equal lm-eval's ``logiqa`` task; the test split (651 questions) is the one evaluated.

Metadata (``lm_eval --metadata`` or a ``tokenclean evaluate --benchmarks`` entry's ``metadata``):
``logiqa_dir``, the directory holding the three files (download commands: docs/paper-fidelity.md).

Self-contained (standard library and ``datasets``), so stock ``lm_eval --include_path`` runs it too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

SPLITS = {"train": "Train.txt", "validation": "Eval.txt", "test": "Test.txt"}
LETTERS = ["a", "b", "c", "d"]


def _normalize(text: str) -> str:
    """The loading script's normalisation: a space after every full stop, outer white space removed."""
    return text.replace(".", ". ").strip()


def read_logiqa(path: str | Path) -> list[dict[str, Any]]:
    """The records of one release file: ``{"label", "context", "question", "options"}`` as the hub script gave."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LogiQA file {p} not found; set metadata logiqa_dir to the directory holding "
                                "Train.txt, Eval.txt and Test.txt (docs/paper-fidelity.md has the download commands)")
    try:
        with open(p, encoding="utf-8") as fh:  # universal newlines, as the script read it
            text = fh.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e})") from None
    body = text.strip()
    line = text[:len(text) - len(text.lstrip())].count("\n") + 1  # line of the first record
    rows = []
    for block in body.split("\n\n"):
        lines = block.split("\n")
        label = lines[0].strip()
        if len(lines) < 4 or label not in LETTERS or LETTERS.index(label) >= len(lines) - 3:
            raise ValueError(f"{p}:{line}: not a LogiQA record (answer letter a-d, passage, question, then the "
                             f"options, one per line); got {len(lines)} line(s) starting {lines[0][:40]!r}")
        rows.append({"label": label, "context": _normalize(lines[1]), "question": _normalize(lines[2]),
                     "options": [_normalize(option[2:]) for option in lines[3:]]})
        line += block.count("\n") + 2
    return rows


def load_logiqa(logiqa_dir: str | None = None, **_: Any) -> Any:
    """lm-eval ``custom_dataset``: the ``train``/``validation``/``test`` splits from ``logiqa_dir``."""
    import datasets

    if not logiqa_dir:
        raise ValueError("LogiQA: no data directory; set metadata logiqa_dir to the directory holding the release "
                         "files Train.txt, Eval.txt and Test.txt")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_logiqa(Path(logiqa_dir) / name))
                                 for split, name in SPLITS.items()})


def doc_to_text(doc: dict[str, Any]) -> str:
    """``Passage: ...\\nQuestion: ...\\nChoices:\\nA. ...\\n...\\nAnswer:`` (lm-eval's logiqa prompt)."""
    options = "".join(f"{letter.upper()}. {option}\n" for letter, option in zip(LETTERS, doc["options"]))
    return f"Passage: {doc['context']}\nQuestion: {doc['question']}\nChoices:\n{options}Answer:"


def doc_to_target(doc: dict[str, Any]) -> int:
    """Index of the gold option (the answer letter a-d)."""
    return LETTERS.index(doc["label"].strip())
