"""Held-out evaluation with lm-eval on the world's task families.

Tasks are declared in YAML (lm-eval's own format). :func:`write_tasks` writes, for each family ``f``:

- ``tc_<f>_gen.yaml`` (task ``tc_<f>_gen``): greedy generation after the chat-formatted prompt, until ``</s>`` or
  ``<|user|>`` (48 new tokens at most); metrics ``answer_acc`` (the text after the first answer lead-in, ``The
  answer is`` in the single template, up to the next `` .`` (or `` ,``) equals the gold answer; the world's
  ``eval/answer_format.json`` lists its lead-ins) and ``response_em`` (the stripped generation is the gold response
  or another well-formed one);
- ``tc_<f>_nll.yaml`` (task ``tc_<f>_nll``): ``answer_nll``, the summed negative log-likelihood (nats) of the
  gold answer's tokens, teacher-forced after the prompt and the gold response up to the answer;
- ``tc_<f>_mc.yaml`` (task ``tc_<f>_mc``, in a world whose eval records carry ``choices``): ``acc``, the question
  as a multiple choice scored by log-likelihood after a plain prompt, as six of the paper's seven benchmarks are.
  The evaluation reports it as ``mc_acc`` and the headline ``mix_acc`` = (6 ``mc_acc`` + 1 ``answer_acc``) / 7, the
  paper's mix of six likelihood benchmarks to one generation benchmark (TyDiQA);

each tagged ``tc_<f>`` (and ``tokenclean``), plus the shared templates they include and ``tc_utils.py``
(dataset loading and scoring), copied from the package.

Paths: each task YAML names its data file *relative to the tasks directory* (``../eval/<f>.jsonl`` in a world
directory) and ``tc_utils.py`` -- which lm-eval imports from the YAML's own directory -- resolves it against its
own location. Nothing depends on the working directory, and a results tree stays usable after it is moved as
long as ``tasks/`` and ``eval/`` keep their relative position. The same directory also works with the plain
lm-eval CLI (``lm_eval --include_path <tasks_dir> --tasks tc_add ...``) provided ``tokenclean`` is importable.

:func:`evaluate` runs lm-eval's Python API with a Hugging Face model. The token ids lm-eval feeds are the ids
the training table holds for the same sample (``<s>`` + prompt tokens, then the response's own tokens); see
:func:`check_alignment`, which also runs at the start of every evaluation.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenclean.artifacts import atomic_dir
from tokenclean.data import is_number, is_whole

log = logging.getLogger(__name__)

PACKAGE_TASKS = Path(__file__).resolve().parent / "tasks"
# lm-eval tasks shipped with the package (TyDiQA GoldP as the paper ran it, LogiQA over the release files);
# always on evaluate_benchmarks' include path
BENCHMARK_TASKS = (PACKAGE_TASKS / "tydiqa", PACKAGE_TASKS / "logiqa")
# generation batch size when batch_size is "auto": lm-eval's probe for generation runs at the model's maximum length
# (131072 tokens for Llama-3.x) and runs out of memory; 5 is what the paper's TyDiQA runs used
# (UCSC-REAL/TokenCleaning@b12ff75 run_eval_tydiqa.sh, --eval_batch_size 5)
GENERATION_BATCH_SIZE = 5
NEWLINE_STOPS = ("text", "token")
SHARED_FILES = ("tc_utils.py", "tc_generate_template.yaml", "tc_answer_nll_template.yaml",
                "tc_multiple_choice_template.yaml")
GEN_SUFFIX, NLL_SUFFIX, MC_SUFFIX = "_gen", "_nll", "_mc"
METRICS = ("answer_acc", "response_em", "answer_nll")
# A world with multiple-choice tasks adds these (its headline is mix_acc)
MC_METRICS = ("mix_acc", "mc_acc")
# The paper's evaluation mix: six benchmarks scored by the likelihood of given options, one (TyDiQA) by generation.
MIX_WEIGHTS = {"mc_acc": 6, "answer_acc": 1}


def mix(scores: dict[str, float]) -> float:
    """The headline of a world with multiple-choice tasks: the paper's 6 : 1 mix of likelihood and generation."""
    return sum(w * scores[m] for m, w in MIX_WEIGHTS.items()) / sum(MIX_WEIGHTS.values())


def task_names(family: str) -> tuple[str, str]:
    """The generation and answer-likelihood task of a family."""
    return f"tc_{family}{GEN_SUFFIX}", f"tc_{family}{NLL_SUFFIX}"


def _family_yaml(task: str, template: str, family: str, data_file: str) -> str:
    # json.dumps gives a valid double-quoted YAML scalar for any family name / path
    return (f"# written by tokenclean.evaluation.write_tasks; data_file is relative to this directory\n"
            f"include: {template}\n"
            f"task: {json.dumps(task)}\n"
            f"tag: [{json.dumps(f'tc_{family}')}, tokenclean]\n"
            f"dataset_kwargs:\n  data_file: {json.dumps(data_file)}\n")


def mc_task_name(family: str) -> str:
    """The multiple-choice task of a family (worlds whose eval records carry options)."""
    return f"tc_{family}{MC_SUFFIX}"


def _has_choices(data_file: Path) -> bool:
    with open(data_file, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        return "choices" in json.loads(first)
    except json.JSONDecodeError:
        return False  # tc_utils.read_rows names the file and line when the task loads it


def write_tasks(eval_dir: str | os.PathLike, tasks_dir: str | os.PathLike, families: Sequence[str]) -> list[str]:
    """Write the lm-eval task directory for ``families`` (data in ``eval_dir/<family>.jsonl``); atomic. A family
    whose eval records carry ``choices`` also gets its multiple-choice task.

    Returns the task names written. Data file paths are stored relative to ``tasks_dir`` (see module docstring).
    """
    families = list(families or [])
    if not families:
        raise ValueError("no task families given; the world settings must list at least one family")
    for f in families:
        if not f or not all(c.isalnum() or c in "_-" for c in f):
            raise ValueError(f"family name {f!r} is not usable as a task name (letters, digits, '_' and '-' only)")
    eval_dir, tasks_dir = Path(eval_dir), Path(tasks_dir)
    missing = [f for f in families if not (eval_dir / f"{f}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"eval data for {', '.join(missing)} not found in {eval_dir} "
                                f"(expected {eval_dir}/<family>.jsonl); generate the world first")
    names = []
    with atomic_dir(tasks_dir) as tmp:
        for name in SHARED_FILES:
            shutil.copyfile(PACKAGE_TASKS / name, tmp / name)
        for f in families:
            # relative to the final tasks directory (tmp is its sibling, so the same relative path holds)
            rel = os.path.relpath((eval_dir / f"{f}.jsonl").resolve(), tasks_dir.resolve())
            gen, nll = task_names(f)
            (tmp / f"{gen}.yaml").write_text(_family_yaml(gen, "tc_generate_template.yaml", f, rel))
            (tmp / f"{nll}.yaml").write_text(_family_yaml(nll, "tc_answer_nll_template.yaml", f, rel))
            names += [gen, nll]
            if _has_choices(eval_dir / f"{f}.jsonl"):
                mc = mc_task_name(f)
                (tmp / f"{mc}.yaml").write_text(_family_yaml(mc, "tc_multiple_choice_template.yaml", f, rel))
                names.append(mc)
    return names


# ---------------------------------------------------------------------------------------------------------
# model wrapper
# ---------------------------------------------------------------------------------------------------------
def load_eval_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The model's tokenizer, set up so that ``encode(text)`` starts with exactly one ``<s>`` like training."""
    from tokenclean.tokenization import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    if tok.bos_token_id is None:
        raise ValueError(f"tokenizer of {model_dir} has no bos token; training prepends one, so evaluation needs it")
    # Our tokenizers have no post-processor adding <s>, so HFLM's add_bos_token=True alone would feed no <s>.
    tok.add_bos_token = True
    if hasattr(tok, "add_eos_token"):
        tok.add_eos_token = False
    probe = tok.encode("x", add_special_tokens=True)
    if probe[:1] != [tok.bos_token_id] or probe.count(tok.bos_token_id) != 1:
        raise ValueError(f"tokenizer of {model_dir} cannot be made to prepend exactly one bos token; "
                         "evaluation would not see what training saw")
    return tok


def _hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class TokencleanHFLM(HFLM):
        """HFLM with two changes that keep evaluation on the training token ids.

        - ``_encode_pair``: lm-eval moves the context's trailing spaces into the continuation. With our
          tokenizers (digits split, the space before an answer is its own token) that would score the space
          token as part of the answer. We split the whole encoding at the context's own tokens instead when
          they are a prefix of it (they are for our tokenizers), else fall back to lm-eval's behaviour.
        - ``tok_decode`` keeps special tokens, so a generation that emits ``<|user|>`` is cut there by the stop
          sequences rather than having the marker silently dropped (and text after it kept) in a batch.
        """

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if self.backend == "causal" and context:
                whole = self.tok_encode(context + continuation)
                ctx = self.tok_encode(context)
                if len(ctx) < len(whole) and whole[:len(ctx)] == ctx:
                    return ctx, whole[len(ctx):]
            return super()._encode_pair(context, continuation)

        def tok_decode(self, tokens: Any, skip_special_tokens: bool = False) -> str:
            return super().tok_decode(tokens, skip_special_tokens=skip_special_tokens)

    return TokencleanHFLM


def make_lm(model_dir: str | os.PathLike, device: str | None = None, batch_size: int | None = None) -> Any:
    """The lm-eval model: fp32 on CPU, bf16 on CUDA, ``<s>`` prepended, no chat template.

    ``batch_size`` defaults to 32 (generation with a tiny model is overhead-bound); lm-eval left-pads batched
    generation (the tests check that the generations equal unbatched greedy decoding with plain transformers).
    """
    from tokenclean.models import loading, pick_device, require_finite_weights

    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model_dir} not found (or has no config.json); run the workflow "
                                "step that trains it or fix --model")
    dev = pick_device(device)
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if batch_size is None:
        batch_size = 32
    tokenizer = load_eval_tokenizer(model_dir)
    with loading(str(model_dir)):
        lm = _hflm_class()(pretrained=str(model_dir), tokenizer=tokenizer, device=str(dev), dtype=dtype,
                           batch_size=batch_size, add_bos_token=True)
    require_finite_weights(lm.model, str(model_dir))
    return lm


def check_alignment(lm: Any, prompt: str, response: str, answer_span: Sequence[int]) -> None:
    """Fail unless lm-eval's token ids for this sample equal the training table's ids for it.

    Generation context == the training prefix before the first response token; the answer-likelihood request's
    context + continuation == the training ids up to the answer's end, with the continuation being exactly the
    tokens of the answer.
    """
    from tokenclean.data import Message, Record
    from tokenclean.tokenization import format_prompt, tokenize_records

    tok = lm.tokenizer
    table, _ = tokenize_records([Record((Message("user", prompt), Message("assistant", response)))], tok, 1 << 30)
    ids = [int(i) for i in table.input_ids]
    n_prefix = int(table.loss_mask.argmax())
    context = format_prompt(prompt)
    fed = lm.tok_batch_encode([context])[0][0].tolist()
    if fed != ids[:n_prefix]:
        raise ValueError(f"lm-eval's generation context ids {fed} differ from the training prefix {ids[:n_prefix]} "
                         f"for prompt {prompt!r}")
    start, end = answer_span
    ctx, cont = lm._encode_pair(context + response[:start], response[start:end])
    # the answer's tokens in training: the response tokens whose characters overlap the answer span
    offsets = tok(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    hit = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if (ctx + cont != ids[:len(ctx) + len(cont)] or not hit
            or (len(ctx), len(cont)) != (n_prefix + hit[0], hit[-1] + 1 - hit[0])):
        raise ValueError(f"lm-eval's answer-likelihood ids {ctx} | {cont} differ from the training ids {ids} "
                         f"(answer tokens at {[n_prefix + i for i in hit]}) for prompt {prompt!r}")


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------
def _family_of(name: str) -> str:
    """``add`` / ``tc_add`` / ``tc_add_gen`` -> ``add``."""
    for suffix in (GEN_SUFFIX, NLL_SUFFIX, MC_SUFFIX):
        if name.startswith("tc_") and name.endswith(suffix):
            return name[3:-len(suffix)]
    return name[3:] if name.startswith("tc_") else name


def _task_manager(tasks_dir: Path) -> Any:
    from lm_eval.tasks import TaskManager

    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"tasks directory {tasks_dir} not found; run `tokenclean world` to write it")
    return TaskManager(include_path=str(tasks_dir), include_defaults=False)  # only our tasks: ms, not ~15 s


def _data_file(tm: Any, task: str) -> Path:
    from tokenclean.tasks.tc_utils import resolve_data_file

    entry = tm.task_index[task]
    data_file = ((entry.cfg or {}).get("dataset_kwargs") or {}).get("data_file")
    if not data_file:
        raise ValueError(f"task {task} ({entry.yaml_path}) names no dataset_kwargs.data_file; "
                         "regenerate the tasks with `tokenclean world`")
    return resolve_data_file(data_file, Path(entry.yaml_path).parent)


def _check_tasks(tm: Any, tasks_dir: Path, families: list[str]) -> dict[str, Path]:
    """Every family has both tasks in ``tasks_dir`` and its data file exists; returns family -> data file."""
    known = sorted({_family_of(t) for t in tm.all_subtasks if t.startswith("tc_")})
    files = {}
    for f in families:
        for task in task_names(f):
            if task not in tm.task_index:
                raise ValueError(f"unknown task {f!r}: {tasks_dir} has no {task}.yaml (it has tasks for "
                                 f"{', '.join(known) or 'no family'}); fix the task list or regenerate the world")
        data = _data_file(tm, task_names(f)[0])
        if not data.is_file():
            raise FileNotFoundError(f"eval data file {data} of task {f!r} not found; tasks/ and eval/ must stay "
                                    "side by side (re-run `tokenclean world`)")
        files[f] = data
    return files


def _check_lm_alignment(lm: Any, data_files: dict[str, Path]) -> None:
    from tokenclean.tasks.tc_utils import read_rows

    for path in data_files.values():
        row = read_rows(path)[0]
        check_alignment(lm, row["prompt"], row["response"], row["answer_span"])


def run_lm_eval(lm: Any, tm: Any, tasks: list[str], num_fewshot: int | None, limit: int | float | None,
                seed: int, apply_chat_template: bool = False) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` for a model already loaded, without its environment report.

    The same steps as ``simple_evaluate`` (load the tasks, apply ``num_fewshot`` where a task's config does not
    fix it at 0, seed everything and each task's few-shot sampler, then ``lm_eval.evaluator.evaluate`` with the
    per-sample log) but not its ``add_env_info``, which runs ``pip list`` and other subprocesses: about 1.3 s of
    each of the embedded run's 32 evaluation jobs, for a record these results do not keep (provenance.json has
    the versions).
    """
    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loaded = tm.load(tasks)
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    out = lm_eval_evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=True, bootstrap_iters=0,
                           apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template)
    if out is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results")
    return out


def evaluate(model_dir: str | os.PathLike, tasks_dir: str | os.PathLike, tasks_list: Sequence[str],
             out_json: str | os.PathLike, device: str | None = None, limit: int | None = None, seed: int = 0,
             batch_size: int | None = None) -> dict[str, Any]:
    """Evaluate ``model_dir`` on the families ``tasks_list`` (``add`` or ``tc_add``) and write ``out_json``.

    Writes ``out_json`` = ``{"model", "tasks", "metrics": {family: {answer_acc, response_em, answer_nll}},
    "average": {...} (unweighted over families), "n_examples": {family: n}, "seed", "limit", "lm_eval_version",
    "batch_size", "device", "seconds"}`` and the per-sample generations to ``<out_json minus .json>.samples.jsonl``.
    Both are written atomically (samples first). Returns the results dict.
    """
    t0 = time.perf_counter()
    tasks_dir = Path(tasks_dir)
    families = []
    for name in tasks_list:
        f = _family_of(str(name).strip())
        if f and f not in families:
            families.append(f)
    if not families:
        raise ValueError("no tasks given; pass --tasks add,reverse,... (the families of the world)")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be a positive number of examples per task, got {limit}")
    tm = _task_manager(tasks_dir)
    data_files = _check_tasks(tm, tasks_dir, families)
    lm = make_lm(model_dir, device=device, batch_size=batch_size)
    _check_lm_alignment(lm, data_files)
    t_setup = time.perf_counter() - t0

    names = [n for f in families for n in task_names(f)]
    # the multiple-choice tasks: every family has one or none does (the headline mixes them in)
    with_mc = [f for f in families if mc_task_name(f) in tm.task_index]
    if with_mc and with_mc != families:
        raise ValueError(f"{tasks_dir} has multiple-choice tasks for {', '.join(with_mc)} but not for "
                         f"{', '.join(f for f in families if f not in with_mc)}; regenerate the world")
    names += [mc_task_name(f) for f in with_mc]
    out = run_lm_eval(lm, tm, names, num_fewshot=None, limit=limit, seed=seed)
    metrics: dict[str, dict[str, float]] = {}
    n_examples: dict[str, int] = {}
    sample_rows: list[dict[str, Any]] = []
    for f in families:
        gen, nll = task_names(f)
        res_gen, res_nll = out["results"][gen], out["results"][nll]
        metrics[f] = {"answer_acc": float(res_gen["answer_acc,none"]),
                      "response_em": float(res_gen["response_em,none"]),
                      "answer_nll": float(res_nll["answer_nll,none"])}
        if with_mc:
            metrics[f]["mc_acc"] = float(out["results"][mc_task_name(f)]["acc,none"])
            metrics[f]["mix_acc"] = mix(metrics[f])
        gen_samples = sorted(out["samples"][gen], key=lambda s: s["doc_id"])
        nll_by_doc = {s["doc_id"]: s for s in out["samples"][nll]}
        mc_by_doc = {s["doc_id"]: s for s in out["samples"].get(mc_task_name(f), [])} if with_mc else {}
        n_examples[f] = len(gen_samples)
        for s in gen_samples:
            doc = s["doc"]
            generated = s["filtered_resps"][0]
            generated = generated[0] if isinstance(generated, list) else generated
            from_nll = nll_by_doc.get(s["doc_id"])
            if with_mc:
                # lm-eval logs each example's acc; both tasks read the same held-out file, so doc ids pair up
                mc_correct = bool(mc_by_doc[s["doc_id"]]["acc"])
                extra = {"mc_correct": mc_correct,
                         "mix_score": mix({"mc_acc": float(mc_correct), "answer_acc": float(s["answer_acc"])})}
            else:
                extra = {}
            sample_rows.append({
                "family": f, "doc_id": s["doc_id"], "prompt": doc["prompt"], "gold": doc["response"],
                "answer": doc["answer"], "generated": generated,
                "answer_correct": bool(s["answer_acc"]), "response_em": bool(s["response_em"]),
                "answer_nll": None if from_nll is None else float(from_nll["answer_nll"]),
                **extra,
            })
    reported = METRICS + (MC_METRICS if with_mc else ())
    average = {m: sum(metrics[f][m] for f in families) / len(families) for m in reported}
    headline = "mix_acc" if with_mc else "answer_acc"
    return finish_evaluation(out_json, t0, sample_rows, headline, headline, {
        "model": str(model_dir), "tasks": families, "metrics": metrics, "average": average,
        "n_examples": n_examples, "seed": int(seed), "limit": limit,
        "batch_size": lm.batch_size, "device": str(lm.device), "seconds": {"setup": round(t_setup, 3)},
    })


def _benchmark_hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class BenchmarkHFLM(HFLM):
        """Stock HFLM plus two generation settings (model arguments, so a task's run can set them).

        - ``generation_batch_size``: the batch size of generation requests when ``batch_size`` is ``auto``.
          lm-eval probes generation at the model's maximum length (``_detect_batch_size`` without requests), which
          for Llama-3.x is 131072 tokens and runs out of memory; the likelihood tasks keep lm-eval's probe, which
          uses their own longest request.
        - ``newline_stop``: ``text`` (lm-eval: generation stops at, and is cut at, the first newline anywhere in the
          decoded text) or ``token`` (open-instruct's TyDiQA script, as the paper ran it: a sequence stops when it
          generates the tokenizer's newline token ``encode("\\n")[-1]`` or EOS and nothing is cut afterwards, so a
          token such as Llama-3's ``"\\n\\n"`` does not stop it). Applies to requests whose stop strings hold a
          newline.
        """

        def __init__(self, *args: Any, generation_batch_size: int = GENERATION_BATCH_SIZE,
                     newline_stop: str = "text", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.generation_batch_size = int(generation_batch_size)
            self.newline_stop = newline_stop

        def _stop_at_newline_token(self, request: Any) -> Any:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if "\n" not in until:
                return request
            newline = self.tokenizer.encode("\n", add_special_tokens=False)[-1]
            eos = [self.eot_token_id] if self.eot_token_id is not None else []
            kwargs = {**gen_kwargs, "until": [u for u in until if u != "\n"], "eos_token_id": eos + [newline]}
            return dataclasses.replace(request, arguments=(context, kwargs))

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            if self.newline_stop == "token":
                requests = [self._stop_at_newline_token(r) for r in requests]
            if self.batch_size_per_gpu != "auto":
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            self.batch_size_per_gpu = self.generation_batch_size
            try:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            finally:
                self.batch_size_per_gpu = "auto"

    return BenchmarkHFLM


def make_hf_lm(model: str, **kwargs: Any) -> Any:
    """lm-eval's ``HFLM`` (with :func:`_benchmark_hflm_class`'s two generation settings) for a directory or hub
    id; a model that cannot be loaded is one clear error."""
    from tokenclean.models import loading, require_finite_weights

    local = Path(model)
    if model.startswith((".", "/")) and not local.is_dir():
        raise FileNotFoundError(f"model directory {model} not found; run the workflow step that makes it or fix "
                                "the path")
    stop = kwargs.get("newline_stop", "text")
    if stop not in NEWLINE_STOPS:
        raise ValueError(f"model argument newline_stop must be one of {', '.join(NEWLINE_STOPS)}, got {stop!r}")
    size = kwargs.get("generation_batch_size", GENERATION_BATCH_SIZE)
    if not is_whole(size) or size < 1:
        raise ValueError(f"model argument generation_batch_size must be a positive integer, got {size!r}")
    with loading(model):
        lm = _benchmark_hflm_class()(pretrained=model, **kwargs)
    require_finite_weights(lm.model, model)
    return lm


def check_benchmarks(benchmarks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validated benchmark entries: ``{"task": lm-eval task or group, "num_fewshot": k, "metric": name}``, plus
    optionally ``"limit"`` (this task's own limit; null = every example), ``"metadata"`` (lm-eval task
    metadata, e.g. the TyDiQA data files) and ``"model_args"`` (model arguments for this task's run only, over
    the evaluation's own: the paper's TyDiQA script prepended BOS and loaded the checkpoint's own dtype while its
    lm-eval runs did neither)."""
    checked = []
    for i, b in enumerate(benchmarks):
        if not isinstance(b, dict) or not isinstance(b.get("task"), str) or not b["task"]:
            raise ValueError(f"benchmark {i}: needs a 'task' name, got {b!r}")
        unknown = sorted(set(b) - {"task", "num_fewshot", "metric", "limit", "metadata", "model_args"})
        if unknown:
            raise ValueError(f"benchmark {b['task']}: unknown field(s) {', '.join(unknown)}")
        shots = b.get("num_fewshot", 0)
        if not isinstance(shots, int) or shots < 0:
            raise ValueError(f"benchmark {b['task']}: num_fewshot must be a non-negative integer, got {shots!r}")
        entry = {"task": b["task"], "num_fewshot": shots, "metric": str(b.get("metric", "acc"))}
        if "limit" in b:
            if b["limit"] is not None and (not is_number(b["limit"])
                                           or b["limit"] <= 0):
                raise ValueError(f"benchmark {b['task']}: limit must be positive or null, got {b['limit']!r}")
            entry["limit"] = b["limit"]
        for field in ("metadata", "model_args"):
            if field in b:
                if not isinstance(b[field], dict):
                    raise ValueError(f"benchmark {b['task']}: {field} must be a mapping, got {b[field]!r}")
                entry[field] = dict(b[field])
        checked.append(entry)
    if not checked:
        raise ValueError("no benchmarks given")
    return checked


def task_metadata(benchmarks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The benchmarks' metadata as one mapping for lm-eval (every task sees it); a key set twice must agree."""
    merged: dict[str, Any] = {}
    for b in benchmarks:
        for key, value in (b.get("metadata") or {}).items():
            if key in merged and merged[key] != value:
                raise ValueError(f"benchmark {b['task']}: metadata {key} = {value!r} contradicts {merged[key]!r} "
                                 "set by another benchmark")
            merged[key] = value
    return merged


def evaluate_benchmarks(model: str, benchmarks: Sequence[dict[str, Any]], out_json: str | os.PathLike,
                        device: str | None = None, limit: int | float | None = None, seed: int = 0,
                        batch_size: int | str | None = None, include_path: str | os.PathLike | None = None,
                        trust_remote_code: bool = False, model_args: dict[str, Any] | None = None,
                        revision: str | None = None, apply_chat_template: bool = False) -> dict[str, Any]:
    """Evaluate any Hugging Face model (directory or hub id) on lm-eval tasks, each with its own few-shot count
    and metric (the paper's suite: MMLU 5-shot, the others 0-shot, ``acc``; TyDiQA 1-shot, ``f1``).

    Writes ``out_json`` with ``metrics = {task: {"score": value, <metric>: value}}`` and ``average = {"score":
    unweighted mean over tasks}``: ``score`` is each task's configured metric, so tasks scored differently
    (accuracy, F1) share one headline. ``model_args`` go to lm-eval's HFLM as they would on the command line
    (e.g. ``add_bos_token``); the defaults are stock ``lm_eval --model hf``, as the paper ran it. A benchmark's
    own ``limit`` replaces ``limit`` for it; the benchmarks' ``metadata`` reach lm-eval's tasks together with the
    model arguments, as ``lm_eval --metadata`` does. A benchmark's own ``model_args`` apply to its run only (one
    model load per distinct set of arguments). The package's tasks (``tc_tydiqa_goldp``, ``tc_logiqa``) are always
    found. ``revision`` pins a hub model (ignored for a directory). The model arguments each task ran with
    (dtype included) are recorded under ``model_args``.

    Prompts are lm-eval's plain text (the paper's runs), whatever format the model was trained in;
    ``apply_chat_template`` wraps them in the model's chat template instead (few-shot examples as turns, lm-eval's
    ``--apply_chat_template --fewshot_as_multiturn``), recorded in the results. A model without a chat template is
    refused.
    Per-example scores go to ``<out_json minus .json>.samples.jsonl`` (``{"task", "subtask", "doc_id", "score"}``,
    one line per example; a group's examples under its own task name) for the paired bootstrap of the report; the
    examples of a generation task also keep the model's output (``generated``) and the reference (``target``).
    """
    from tokenclean.models import pick_device

    t0 = time.perf_counter()
    benchmarks = check_benchmarks(benchmarks)
    hub = {"revision": revision} if revision and not Path(model).is_dir() else {}
    metadata = {"pretrained": str(model), "trust_remote_code": trust_remote_code, **hub, **(model_args or {}),
                **task_metadata(benchmarks)}
    paths = [str(p) for p in BENCHMARK_TASKS] + ([str(include_path)] if include_path else [])
    tm = _benchmark_task_manager(paths, metadata, [b["task"] for b in benchmarks])
    unknown = [b["task"] for b in benchmarks if b["task"] not in tm.all_tasks]
    if unknown:  # lm-eval itself would fail later with a KeyError
        raise ValueError(f"unknown lm-eval task {', '.join(map(repr, unknown))}: neither a stock task"
                         f"{f' nor one under {include_path}' if include_path else ''}; fix evaluation.benchmarks")
    dev = pick_device(device)
    # stock `lm_eval --model hf` with the paper's dtype=bfloat16 on CUDA; the evaluation's and then the
    # benchmark's own model arguments override these
    base_args = {"device": str(dev), "dtype": "bfloat16" if dev.type == "cuda" else "float32",
                 "batch_size": batch_size or (8 if dev.type == "cuda" else 1), "trust_remote_code": trust_remote_code,
                 **hub, **(model_args or {})}
    metrics: dict[str, dict[str, float]] = {}
    sample_rows: list[dict[str, Any]] = []
    used_args: dict[str, dict[str, Any]] = {}
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for b in benchmarks:  # one lm-eval run per (model arguments, shots, limit)
        args = json.dumps({**base_args, **b.get("model_args", {})}, sort_keys=True)
        runs.setdefault((args, b["num_fewshot"], json.dumps(b.get("limit", limit))), []).append(b)
    lm, lm_args = None, None
    for (args, shots, run_limit), group in sorted(runs.items()):
        if args != lm_args:  # runs are sorted by their model arguments: each set is loaded once
            lm = None
            _free_accelerator_memory()
            lm, lm_args = make_hf_lm(str(model), **json.loads(args)), args
            if apply_chat_template and not getattr(lm.tokenizer, "chat_template", None):
                raise ValueError(f"{model}: the model's tokenizer has no chat template; set "
                                 "evaluation.apply_chat_template: false (lm-eval's plain prompts)")
        used_args.update({b["task"]: json.loads(args) for b in group})
        out = run_lm_eval(lm, tm, [b["task"] for b in group], num_fewshot=shots, limit=json.loads(run_limit),
                          seed=seed, apply_chat_template=apply_chat_template)
        for b in group:
            found = out["results"].get(b["task"], {})
            key = f"{b['metric']},none"
            if key not in found:
                have = sorted(k.split(",")[0] for k in found if "," in k and "_stderr" not in k)
                raise ValueError(f"task {b['task']} reports no metric {b['metric']!r} (it reports: {', '.join(have)})")
            metrics[b["task"]] = {"score": float(found[key]), b["metric"]: float(found[key])}
            sample_rows += benchmark_sample_rows(out, b["task"], b["metric"])
            # a group's members too (TyDiQA: F1 of each language), and how many examples each scored
            members = [s for s in out.get("group_subtasks", {}).get(b["task"], []) if key in out["results"].get(s, {})]
            if members:
                metrics[b["task"]]["subtasks"] = {s: float(out["results"][s][key]) for s in members}
            counted = out.get("n-samples", {})
            counts = {s: counted[s]["effective"] for s in members or [b["task"]] if s in counted}
            if counts:
                metrics[b["task"]]["n_examples"] = sum(counts.values())
    metrics = {b["task"]: metrics[b["task"]] for b in benchmarks}  # the configured order
    return finish_evaluation(out_json, t0, sample_rows, "score", "average score", {
        "model": str(model), "tasks": [b["task"] for b in benchmarks], "benchmarks": benchmarks,
        "metrics": metrics, "average": {"score": sum(m["score"] for m in metrics.values()) / len(metrics)},
        "seed": int(seed), "limit": limit, "device": str(dev),
        "revision": hub.get("revision"), "model_args": {b["task"]: used_args[b["task"]] for b in benchmarks},
        "apply_chat_template": bool(apply_chat_template),
    })


def _benchmark_task_manager(paths: list[str], metadata: dict[str, Any], names: list[str]) -> Any:
    """lm-eval's task index over ``paths`` alone when every benchmark is a plain task there (a task, unlike a
    group, names no other task; a stock YAML it includes is read by its path), else with lm-eval's ~15,000 stock
    tasks too, whose index costs about 10 s of CPU per evaluation job."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if set(names) <= set(local.all_subtasks):
        return local
    return TaskManager(include_path=paths, metadata=metadata)


def _free_accelerator_memory() -> None:
    """Release the previous model's GPU memory before the next load (the TyDiQA run loads its own)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finish_evaluation(out_json: str | os.PathLike, t0: float, sample_rows: list[dict[str, Any]], headline: str,
                      label: str, result: dict[str, Any]) -> dict[str, Any]:
    """The ending both evaluators share: stamp ``result`` with the lm-eval version and the total seconds since
    ``t0``, write it with its per-example rows (:func:`write_results`), log the ``headline`` metric on average and
    per task, and return it."""
    import lm_eval

    result = {**result, "lm_eval_version": lm_eval.__version__,
              "seconds": {**result.get("seconds", {}), "total": round(time.perf_counter() - t0, 3)}}
    write_results(out_json, result, sample_rows)
    log.info("%s: %s %.4f (%s)", out_json, label, result["average"][headline],
             ", ".join(f"{t} {m[headline]:.3f}" for t, m in result["metrics"].items()))
    return result


def write_results(out_json: str | os.PathLike, result: dict[str, Any], sample_rows: list[dict[str, Any]]) -> None:
    """The evaluation JSON and its per-example file, both or neither (the JSON, the rule's marker, is renamed last)."""
    from tokenclean.artifacts import write_texts

    write_texts({samples_path(out_json): "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows),
                 out_json: json.dumps(result, indent=2, sort_keys=True) + "\n"})


def samples_path(out_json: str | os.PathLike) -> Path:
    """``evals/x.json`` -> ``evals/x.samples.jsonl``."""
    p = Path(out_json)
    return p.with_name(p.name.removesuffix(".json") + ".samples.jsonl")


def benchmark_sample_rows(out: dict[str, Any], task: str, metric: str) -> list[dict[str, Any]]:
    """Per-example ``metric`` of ``task`` from lm-eval's logged samples; a group (MMLU) pools its leaf tasks,
    so the mean over rows is the size-weighted group score."""
    children = out.get("group_subtasks") or {}
    leaves, stack = [], [task]
    while stack:
        name = stack.pop()
        if children.get(name):
            stack.extend(sorted(children[name], reverse=True))
        else:
            leaves.append(name)
    rows = []
    for leaf in leaves:
        generation = (out.get("configs", {}).get(leaf) or {}).get("output_type") == "generate_until"
        for s in sorted(out.get("samples", {}).get(leaf, []), key=lambda s: s["doc_id"]):
            if metric in s:
                row = {"task": task, "subtask": leaf, "doc_id": s["doc_id"], "score": float(s[metric])}
                if generation:  # what the model wrote (after the task's filters) and what it was scored against
                    row.update(generated=_first(s.get("filtered_resps")), target=s.get("target"))
                rows.append(row)
    return rows


def _first(resps: Any) -> Any:
    """The one generation of a generate_until example (lm-eval logs it as ``[text]``, or ``[[text]]``)."""
    while isinstance(resps, list) and resps:
        resps = resps[0]
    return resps if isinstance(resps, str) else None
