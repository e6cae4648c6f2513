"""Planning's cheap checks (tokenclean/preflight.py): each problem is one line naming the config file, the key and,
for data, the data file and line, before any job runs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tokenclean.config import ConfigError, check_config
from tokenclean.preflight import check_plan

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper" / "llama-3.2-3b.yaml"


def own_data(tmp_path: Path, **changes) -> tuple[dict, list[str]]:
    """The paper's config on local data files (valid unless changed), written to a config file."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(5)))
    config = yaml.safe_load(PAPER.read_text())
    config["data"] = {"pool": {"path": str(pool)}, "warmup": {"first_of_pool": 2}}
    config.update(changes)
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(config))
    return check_config(config, [str(path)]), [str(path)]


def test_the_paper_configs_pass(tmp_path):
    config, files = own_data(tmp_path)
    check_plan(config, files)


def test_data_in_any_accepted_shape_passes_planning(tmp_path):
    """Planning reads the sources with the data job's own loader: an Alpaca JSON array and ShareGPT records
    pass, as they pass the data job (a JSON-lines-only check would refuse both)."""
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]))
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"q{i}"},
                                                               {"from": "gpt", "value": f"a{i}"}]}) + "\n"
                                for i in range(5)))
    config, files = own_data(tmp_path)
    config["data"] = {"pool": {"path": str(alpaca)}, "warmup": {"path": str(sharegpt)}}
    check_plan(config, files)


@pytest.mark.parametrize("line, match", [
    ("{not json", r"pool\.jsonl:3: invalid JSON"),
    (json.dumps({"text": "plain"}), r"pool\.jsonl:3: neither 'messages' nor 'prompt'/'completion'"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"pool\.jsonl:3: field 'messages': no assistant"),
])
def test_a_bad_record_among_the_first_is_named_by_file_and_line(tmp_path, line, match):
    config, files = own_data(tmp_path)
    pool = Path(config["data"]["pool"]["path"])
    rows = pool.read_text().splitlines()
    pool.write_text("\n".join(rows[:2] + [line] + rows[2:]) + "\n")
    with pytest.raises(ConfigError, match=r"^.*my\.yaml: data\.pool\.path: .*" + match):
        check_plan(config, files)


def test_a_missing_or_empty_data_file(tmp_path):
    config, files = own_data(tmp_path)
    config["data"]["warmup"] = {"path": str(tmp_path / "nope.jsonl")}
    with pytest.raises(ConfigError, match=r"data\.warmup\.path: .*nope\.jsonl: data file or folder not found"):
        check_plan(config, files)
    Path(config["data"]["pool"]["path"]).write_text("\n\n")
    with pytest.raises(ConfigError, match=r"data\.pool\.path: .*pool\.jsonl: no records"):
        check_plan(config, files)


def test_a_metric_the_task_does_not_report_and_an_unknown_task(tmp_path):
    config, files = own_data(tmp_path)
    mmlu = next(i for i, b in enumerate(config["evaluation"]["benchmarks"]) if b["task"] == "mmlu")
    config["evaluation"]["benchmarks"][mmlu]["metric"] = "acc_norm"  # mmlu's group aggregates acc only
    with pytest.raises(ConfigError, match=rf"evaluation\.benchmarks\[{mmlu}\]\.metric: task mmlu .*reports no "
                                          r"metric 'acc_norm' \(it reports: acc\)"):
        check_plan(config, files)
    config["evaluation"]["benchmarks"][mmlu] = {"task": "mmlu_typo", "metric": "acc", "num_fewshot": 0}
    with pytest.raises(ConfigError, match=rf"benchmarks\[{mmlu}\]\.task: unknown lm-eval task 'mmlu_typo'"):
        check_plan(config, files)


def test_an_included_task_yaml_with_its_include_chain(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "base.yaml").write_text("output_type: generate_until\nmetric_list:\n  - metric: exact\n"
                                     "process_results: !function utils.process\n")
    (tasks / "mine.yaml").write_text("include: base.yaml\ntask: my_task\n")
    config, files = own_data(tmp_path)
    config["evaluation"]["include_path"] = str(tasks)
    config["evaluation"]["benchmarks"] = [{"task": "my_task", "metric": "exact", "num_fewshot": 0}]
    check_plan(config, files)
    config["evaluation"]["benchmarks"][0]["metric"] = "f1"
    with pytest.raises(ConfigError, match=r"task my_task \(.*mine\.yaml\) reports no metric 'f1' "
                                          r"\(it reports: exact\)"):
        check_plan(config, files)


def _model(tmp_path: Path, model_type: str, template: bool) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"} if template else {}))
    return d


def test_the_chat_template_setting_needs_a_model_with_one(tmp_path):
    config, files = own_data(tmp_path)
    config["base_model"] = {"name": str(_model(tmp_path, "llama", template=False))}
    check_plan(config, files)  # tulu needs no template
    config["chat_format"] = "template"
    with pytest.raises(ConfigError, match=r"my\.yaml: chat_format: the tokenizer of .* has no chat template; use "
                                          r"chat_format: tulu$"):
        check_plan(config, files)
    config["chat_format"] = "tulu"
    config["evaluation"]["apply_chat_template"] = True
    with pytest.raises(ConfigError, match=r"evaluation\.apply_chat_template: .* has no chat template"):
        check_plan(config, files)
    _model(tmp_path, "llama", template=True)
    config["chat_format"] = "template"
    check_plan(config, files)


def _hub_cache(cache: Path, repo: str, files: dict[str, str], looked_for: tuple[str, ...] = ()) -> None:
    """A hub model as huggingface_hub caches it: refs/main naming a commit, that commit's files, and the files it
    looked for there and did not find (.no_exist)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    (root / "snapshots" / sha).mkdir(parents=True)
    for name, text in files.items():
        (root / "snapshots" / sha / name).write_text(text)
    (root / ".no_exist" / sha).mkdir(parents=True)
    for name in looked_for:
        (root / ".no_exist" / sha / name).write_text("")


def test_a_hub_models_chat_template_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    """The template check reads the hub cache and never the network (even with the hub online); a model that is
    not in the cache (or whose cache cannot tell) is one line saying the check was skipped, not a pass in silence."""
    import socket

    import huggingface_hub.constants

    from tokenclean.preflight import TEMPLATE_FILES

    def no_network(*args, **kwargs):
        raise AssertionError("planning went online")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    _hub_cache(cache, "org/plain", {"tokenizer_config.json": "{}"}, looked_for=TEMPLATE_FILES)
    _hub_cache(cache, "org/inline", {"tokenizer_config.json": json.dumps({"chat_template": "{{ x }}"})})
    _hub_cache(cache, "org/jinja", {"tokenizer_config.json": "{}", "chat_template.jinja": "{{ x }}"},
               looked_for=("chat_template.json",))
    _hub_cache(cache, "org/unsure", {"tokenizer_config.json": "{}"})  # the template files never looked for
    config, files = own_data(tmp_path)
    config["chat_format"] = "template"
    for name in ("org/inline", "org/jinja"):
        config["base_model"] = {"name": name}
        assert check_plan(config, files) == [], name
    config["base_model"] = {"name": "org/plain"}
    with pytest.raises(ConfigError, match=r"my\.yaml: chat_format: the tokenizer of org/plain has no chat template"):
        check_plan(config, files)
    for name in ("org/absent", "org/unsure"):
        config["base_model"] = {"name": name}
        (note,) = check_plan(config, files)
        assert re.fullmatch(rf"chat_format: chat template check skipped: the tokenizer of {name} is not "
                            r"in the local Hugging Face cache \(planning never downloads\); the tokenize job checks it",
                            note), note
    config["chat_format"] = "tulu"
    config["evaluation"]["apply_chat_template"] = True
    (note,) = check_plan(config, files)
    assert note.startswith("evaluation.apply_chat_template: chat template check skipped") and "each evaluation" in note
    config["evaluation"]["apply_chat_template"] = False
    assert check_plan(config, files) == []  # nothing uses the template: nothing to check


def test_a_method_that_reads_attention_weights_needs_a_model_that_returns_them(tmp_path):
    """Judged on the model built from its config with empty weights: whatever its layout, a family whose
    transformers class returns attention weights passes (GPT-2, GPT-NeoX: not Llama's module path), Mamba,
    which has none, is refused in one line (tests/test_families.py: the checks on real tiny models)."""
    config, files = own_data(tmp_path)
    for block in ("warmup", "sft"):  # LoRA targets are checked on the same model: not this test's subject
        config[block]["train"]["lora_r"] = 0
    config["base_model"] = {"name": str(_model(tmp_path, "mamba", template=False))}
    config["methods"] = ["full"]
    check_plan(config, files)
    config["methods"] = ["full", "sstoken"]
    with pytest.raises(ConfigError, match=r"methods\[1\]: sstoken reads the last layer's attention weights, but a "
                                          r"mamba model .*: it returns no attention weights"):
        check_plan(config, files)
    for family in ("gpt2", "gpt_neox", "llama"):
        _model(tmp_path, family, template=False)
        check_plan(config, files)


def test_the_embedded_world_refuses_the_template_setting():
    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    with pytest.raises(ConfigError, match="chat_format: the embedded world's tokenizer has no chat template"):
        check_config({**config, "chat_format": "template"})


def _snakemake(work: Path, *args: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), *args],
                          capture_output=True, text=True, cwd=work, env={**os.environ}, timeout=300, check=False)


@pytest.mark.slow  # starts Snakemake
def test_planning_prints_the_skipped_template_check_in_one_line(tmp_path):
    """`snakemake -n` with a hub model that is not in the cache and chat_format: template plans the run and says in
    one line that the template was not checked."""
    import os
    import subprocess
    import sys

    own_data(tmp_path)
    written = yaml.safe_load((tmp_path / "my.yaml").read_text())
    written.update(chat_format="template", base_model={"name": "org/not-downloaded"})
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(written))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-n", "--configfile",
                           "my.yaml"], capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("config warning:")]
    assert warnings == ["config warning: chat_format: chat template check skipped: the tokenizer of "
                        "org/not-downloaded is not in the local Hugging Face cache (planning never downloads); the "
                        "tokenize job checks it"], proc.stderr[-3000:]


@pytest.mark.slow  # starts Snakemake twice
def test_planning_stops_on_a_bad_record_and_a_failed_job_shows_its_error(tmp_path):
    """A bad record among the first is one line at `snakemake -n`; one further on passes planning, and the data
    job that finds it prints its one-line error on the console (profiles/default: show-failed-logs)."""
    config, _ = own_data(tmp_path)
    pool = Path(config["data"]["pool"]["path"])
    good = json.dumps({"prompt": "q", "completion": "a"}) + "\n"
    pool.write_text(good * 2 + "{oops\n")
    files = yaml.safe_load((tmp_path / "my.yaml").read_text())
    files["results_dir"] = "results"
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(files))
    proc = _snakemake(tmp_path, "-n", "--configfile", "my.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: my.yaml: data.pool.path: ")
    assert "pool.jsonl:3: invalid JSON" in proc.stderr
    pool.write_text(good * 150 + "{oops\n")  # line 151: past what planning reads
    target = f"results/{files['experiment']}/data"
    proc = _snakemake(tmp_path, target, "--cores", "1", "--configfile", "my.yaml")
    assert proc.returncode != 0
    assert "pool.jsonl:151: invalid JSON" in proc.stdout + proc.stderr  # the log's line, not only its path
