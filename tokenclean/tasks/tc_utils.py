"""Helpers the tokenclean lm-eval task YAMLs call through ``!function tc_utils.<name>``.

:func:`tokenclean.evaluation.write_tasks` copies this file next to the generated task YAMLs, where lm-eval
finds it (it resolves ``!function`` modules relative to the YAML's own directory). ``data_file`` in a task's
``dataset_kwargs`` is resolved relative to the directory holding this copy, i.e. the tasks directory, so a
results tree can be moved or used from any working directory as long as ``tasks/`` and ``eval/`` move together.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenclean.tokenization import format_prompt

ANSWER_MARKER = "The answer is"
ANSWER_END = " ."
REQUIRED_FIELDS = ("prompt", "response", "answer", "answer_span")


def resolve_data_file(data_file: str, base_dir: str | Path | None = None) -> Path:
    """``data_file`` as written in the YAML, resolved against the tasks directory (absolute paths stay)."""
    path = Path(data_file).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else Path(__file__).resolve().parent) / path
    return path


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a held-out eval file; add the two contexts the tasks score from."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval data file {path} not found; re-run `tokenclean world` to write it "
                                "(tasks/ and eval/ must stay side by side)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            missing = [k for k in REQUIRED_FIELDS if k not in row] if isinstance(row, dict) else list(REQUIRED_FIELDS)
            if missing:
                raise ValueError(f"{where}: field(s) {', '.join(missing)} missing from the eval record")
            start, end = row["answer_span"]
            if row["response"][start:end] != row["answer"]:
                raise ValueError(f"{where}: field 'answer_span' {[start, end]} does not cover 'answer' in 'response'")
            context = format_prompt(row["prompt"])
            rows.append({
                "family": str(row.get("family", path.stem)),
                "prompt": row["prompt"],
                "response": row["response"],
                "answer": row["answer"],
                "answer_span": [int(start), int(end)],
                # what the model sees before it answers (generation) ...
                "gen_context": context,
                # ... and before the answer inside the gold response (teacher-forced answer likelihood)
                "nll_context": context + row["response"][:start],
            })
    if not rows:
        raise ValueError(f"{path}: eval data file has no records")
    return rows


def load_family(data_file: str | None = None, **_metadata: Any):
    """lm-eval ``custom_dataset``: a DatasetDict with one ``test`` split (no Hugging Face cache involved)."""
    import datasets

    if not data_file:
        raise ValueError("tokenclean task has no dataset_kwargs.data_file; "
                         "regenerate the tasks with `tokenclean world`")
    rows = read_rows(resolve_data_file(data_file))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def extract_answer(text: str) -> str | None:
    """The text between the first ``The answer is`` and the next `` .`` (or the end); None without the marker."""
    at = text.find(ANSWER_MARKER)
    if at < 0:
        return None
    rest = text[at + len(ANSWER_MARKER):]
    end = rest.find(ANSWER_END)
    return (rest if end < 0 else rest[:end]).strip()


def process_generation(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    generated = results[0]
    return {
        "answer_acc": float(extract_answer(generated) == doc["answer"]),
        "response_em": float(generated.strip() == doc["response"].strip()),
    }


def process_answer_nll(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    loglikelihood, _is_greedy = results[0]
    return {"answer_nll": -float(loglikelihood)}
