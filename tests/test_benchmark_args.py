"""What `tokenclean evaluate --benchmarks` hands to lm-eval's model: the hub revision and the dtype (recorded)."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture()
def captured(monkeypatch) -> list[dict]:
    """Model construction and lm-eval runs replaced by fakes that record their arguments (nothing is loaded)."""

    import tokenclean.evaluation as ev
    import tokenclean.models as models

    made: list[dict] = []

    class FakeLM:
        def __init__(self, **kwargs):
            made.append(kwargs)
            self.model = torch.nn.Linear(2, 2)  # HFLM's loaded model, whose weights the loader checks

    def fake_run(lm, tm, tasks, **_):
        return {"results": {t: {"acc,none": 0.5} for t in tasks}, "samples": {}, "n-samples": {}}

    monkeypatch.setattr(ev, "_benchmark_hflm_class", lambda: FakeLM)
    monkeypatch.setattr(ev, "run_lm_eval", fake_run)
    monkeypatch.setattr(models, "pick_device", lambda device=None: torch.device("cuda"))
    return made


@pytest.mark.slow  # lm-eval's task index: ~10 s
def test_hub_model_loads_the_pinned_revision_in_bfloat16_and_both_are_recorded(captured, tmp_path):
    from tokenclean.cli import main

    bench = json.dumps([{"task": "tc_logiqa", "num_fewshot": 0, "metric": "acc"}])
    out = tmp_path / "base.json"
    assert main(["evaluate", "--model", "meta-llama/Llama-3.2-3B",
                 "--revision", "13afe5124825b4f3751f836b40dafda64c1ed062",
                 "--benchmarks", bench, "--batch-size", "auto", "--out", str(out)]) == 0
    assert captured[0]["pretrained"] == "meta-llama/Llama-3.2-3B"
    assert captured[0]["revision"] == "13afe5124825b4f3751f836b40dafda64c1ed062"
    assert captured[0]["dtype"] == "bfloat16"  # the paper's lm-eval runs: dtype=bfloat16
    result = json.loads(out.read_text())
    assert result["revision"] == "13afe5124825b4f3751f836b40dafda64c1ed062"
    assert result["model_args"]["tc_logiqa"]["dtype"] == "bfloat16"
    # a model directory is what it is: no revision
    captured.clear()
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    assert main(["evaluate", "--model", str(model_dir), "--revision", "abc", "--benchmarks", bench,
                 "--out", str(tmp_path / "dir.json")]) == 0
    assert "revision" not in captured[0]
    assert json.loads((tmp_path / "dir.json").read_text())["revision"] is None


@pytest.mark.slow  # lm-eval's task index: ~10 s
def test_each_set_of_model_arguments_is_loaded_once(captured, tmp_path):
    from tokenclean.evaluation import evaluate_benchmarks

    bench = [{"task": "tc_logiqa", "num_fewshot": 0, "metric": "acc"},
             {"task": "tc_tydiqa_goldp", "num_fewshot": 1, "metric": "acc", "model_args": {"dtype": "auto"}},
             {"task": "tc_tydiqa_goldp_en", "num_fewshot": 1, "metric": "acc"}]  # same set as the first: reused
    result = evaluate_benchmarks("org/model", bench, tmp_path / "r.json", model_args={"add_bos_token": False})
    assert sorted(m["dtype"] for m in captured) == ["auto", "bfloat16"]
    assert all(m["add_bos_token"] is False for m in captured)
    assert result["model_args"]["tc_tydiqa_goldp"]["dtype"] == "auto"
