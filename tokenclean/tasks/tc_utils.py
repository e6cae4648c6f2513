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
from tokenclean.world import MC_CUE, SINGLE_TEMPLATE, answer_format

REQUIRED_FIELDS = ("prompt", "response", "answer", "answer_span")
# How a response is read when the eval directory has no answer_format.json (worlds written before it existed):
# the single template.
SINGLE_TEMPLATE_FORMAT = answer_format([SINGLE_TEMPLATE])


def read_answer_format(data_file: Path) -> dict[str, Any]:
    """The world's ``answer_format.json`` beside its eval files (how a generated response is read)."""
    path = data_file.parent / "answer_format.json"
    if not path.is_file():
        return SINGLE_TEMPLATE_FORMAT
    try:
        fmt = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-run `tokenclean world`") from None
    for key in ("leads", "ends", "forms"):
        value = fmt.get(key) if isinstance(fmt, dict) else None
        if not isinstance(value, list) or not value:
            raise ValueError(f"{path}: field {key!r} must be a non-empty list; re-run `tokenclean world`")
    return fmt


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
    fmt = read_answer_format(path)
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
            choices = row.get("choices")
            if choices is not None and (not isinstance(choices, list) or row["answer"] not in choices
                                        or choices.index(row["answer"]) != row.get("gold")):
                raise ValueError(f"{where}: field 'gold' must index 'answer' in 'choices'")
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
                # the multiple-choice task: the plain prompt (the question and MC_CUE, no chat format) and the
                # options (none in a generation-only world)
                "mc_context": row["prompt"] + MC_CUE,
                "choices": choices or [row["answer"]],
                "gold": int(row.get("gold", 0)),
                # how a generated response is read: answer lead-ins and ends, and every well-formed response
                # (the gold one and the answer in each of the world's phrasings)
                "answer_leads": fmt["leads"],
                "answer_ends": fmt["ends"],
                "responses": [row["response"]] + [prefix + row["answer"] + suffix for prefix, suffix in fmt["forms"]],
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


def extract_answer(text: str, leads: list[str] = tuple(SINGLE_TEMPLATE_FORMAT["leads"]),
                   ends: list[str] = tuple(SINGLE_TEMPLATE_FORMAT["ends"])) -> str | None:
    """The answer of a response: the text after the first answer lead-in (``The answer is`` in the single
    template; the longest of those starting at the same place) up to the next answer end (`` .``; also `` ,`` in a
    world of many phrasings) or the end of the text; None without any lead-in."""
    found = [(at, -len(lead)) for lead in leads if (at := text.find(lead)) >= 0]
    if not found:
        return None
    at, minus_len = min(found)
    rest = text[at - minus_len:]
    cuts = [i for end in ends if (i := rest.find(end)) >= 0]
    return (rest[:min(cuts)] if cuts else rest).strip()


def process_generation(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``answer_acc``: the answer read from the generation is the gold one; ``response_em``: the generation is the
    gold response or another well-formed one (the gold answer in any of the world's phrasings; in the
    single-template world that is the gold response exactly)."""
    generated = results[0]
    return {
        "answer_acc": float(extract_answer(generated, doc["answer_leads"], doc["answer_ends"]) == doc["answer"]),
        "response_em": float(generated.strip() in {r.strip() for r in doc["responses"]}),
    }


def process_answer_nll(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    loglikelihood, _is_greedy = results[0]
    return {"answer_nll": -float(loglikelihood)}
