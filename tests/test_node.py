"""Offline GPU nodes (scripts/node.py, docs/gpu-check.md): the wheels' lock is complete and never shadows the
image's torch or transformers, the install refuses what it must and reports every unmet requirement, the node
command still writes its JSON line and the logs when it is cut short, the sizes' time estimate is its arithmetic,
and every torch, transformers and peft name the code imports exists in the installed versions (under
`make test-node`: the node image's torch 2.11 and transformers 5.17)."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NODE_MARKERS = {"extra": "", "python_version": "3.12", "python_full_version": "3.12.1", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "os_name": "posix"}


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.partition("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version
    return out


WHEELS = pins(ROOT / "envs" / "node-wheels.lock")
IMAGE = pins(ROOT / "envs" / "node-image.lock")
LOCK = pins(ROOT / "requirements.lock")


def test_the_wheels_never_shadow_torch_or_transformers_and_name_every_other_shadow():
    """No wheel of torch or transformers; a wheel of something the image has only where the lock says why."""
    node = load("node")
    assert not set(WHEELS) & set(node.PROTECTED)
    explained = {canonicalize_name(line.split("==")[0]) for line in
                 (ROOT / "envs" / "node-wheels.lock").read_text().splitlines() if "shadows it" in line}
    assert set(WHEELS) & set(IMAGE) == explained == {"packaging"}


@pytest.mark.pinned  # reads the requirements of the pinned environment's distributions
def test_the_node_gets_the_pinned_versions_and_the_wheels_with_the_image_meet_every_requirement():
    """Each wheel is requirements.lock's version (the node runs the same snakemake, lm-eval and datasets), and
    every requirement of every wheel (as Python 3.12 on Linux reads its markers) is met by the image or the
    wheels, or names a dependency the lock leaves out on purpose; each left-out one is a real requirement."""
    node = load("node")
    omitted = node.omitted()
    assert {name: LOCK.get(name) for name in WHEELS} == WHEELS
    have = {**IMAGE, **WHEELS}
    unmet, needed = [], set()
    for name in [*WHEELS, *omitted]:   # a left-out package's own requirements may be left out with it
        for text in distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(NODE_MARKERS):
                continue
            key = canonicalize_name(req.name)
            needed.add(key)
            if (key in omitted and key not in have) or name in omitted:
                continue
            if key not in have or not req.specifier.contains(have[key], prereleases=True):
                unmet.append(f"{name} needs {text}; the node has {have.get(key)}")
    assert not unmet, "\n".join(unmet)
    assert set(omitted) <= needed and not set(omitted) & set(have)


def fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel: one module and its dist-info."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                        *[f"Requires-Dist: {r}\n" for r in requires]])
    files = {f"{name}.py": "VALUE = 1\n", f"{info}/METADATA": metadata,
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
        z.writestr(f"{info}/RECORD", "".join(f"{arc},,\n" for arc in files) + f"{info}/RECORD,,\n")
    return path


def test_check_wheels_refuses_torch_a_missing_a_stray_and_a_wrong_version(tmp_path):
    node = load("node")
    lock = [{"name": "alpha", "version": "1.0", "build": False}, {"name": "beta_pkg", "version": "2.0", "build": False}]
    good = [fake_wheel(tmp_path, "alpha", "1.0"), fake_wheel(tmp_path, "beta_pkg", "2.0")]
    assert set(node.check_wheels(lock, good)["wheels"]) == {"alpha", "beta-pkg"}
    cases = {"torch": [*good, fake_wheel(tmp_path, "torch", "2.11.0")],
             "no wheel for beta-pkg": good[:1],
             "not one of the lock's wheels": [*good, fake_wheel(tmp_path, "gamma", "1.0")],
             "the lock pins alpha==1.0": [fake_wheel(tmp_path, "alpha", "1.1"), good[1]]}
    for message, files in cases.items():
        with pytest.raises(SystemExit, match=message):
            node.check_wheels(lock, files)


@pytest.mark.slow  # two pip installs
def test_install_puts_the_wheels_in_the_target_and_reports_each_unmet_requirement(tmp_path):
    """`node.py install`: no index, the wheels in the target; its verification fails on a requirement the
    target and this Python do not meet, names it, and passes over a dependency the lock leaves out."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "alpha", "1.0", ("beta>=2", "gone>=1"))
    fake_wheel(wheels, "beta", "1.0")
    lock = tmp_path / "node-wheels.lock"
    lock.write_text("alpha==1.0\nbeta==1.0\n# omit: gone==1.0  (never imported)\n")
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "scripts/node.py", "install", "--wheels", str(wheels), "--target",
                           str(target), "--lock", str(lock)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert (target / "alpha.py").exists() and (target / "beta.py").exists()
    assert "alpha needs beta>=2: 1.0 is installed" in proc.stderr and "gone" not in proc.stderr
    assert "left out on purpose: gone (never imported)" in proc.stdout
    fake_wheel(wheels, "beta", "1.0").unlink()
    fake_wheel(wheels, "beta", "2.0")
    lock.write_text("alpha==1.0\nbeta==2.0\n# omit: gone==1.0  (never imported)\n")
    proc = subprocess.run([sys.executable, "scripts/node.py", "install", "--wheels", str(wheels), "--target",
                           str(target), "--lock", str(lock)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "every wheel's requirements are met" in proc.stdout and f"export PYTHONPATH={target}" in proc.stdout


@pytest.mark.slow  # starts the tiny check's workflow and stops it
def test_the_node_command_cut_short_still_writes_its_json_line_and_the_logs(tmp_path):
    """`node.py check` stopped by SIGTERM once the workflow's first job has started: it stops the workflow, and
    the output folder holds the JSON line (complete false, why it stopped, the versions), Snakemake's log and the
    jobs' logs."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "scripts/node.py", "check", "--no-install", "--preset", "tiny",
                             "--cores", "1", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    logs = out / "results" / "tiny" / "logs"
    deadline = time.monotonic() + 180
    while not any(logs.rglob("*.log")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    line = json.loads(stdout.strip().splitlines()[-1])
    assert json.loads((out / "gpu-check.json").read_text()) == line
    assert line["complete"] is False and line["stopped"] == "SIGTERM" and line["eval_score"] is None
    assert line["preset"] == "tiny" and line["versions"]["torch"].startswith(distribution("torch").version)
    assert (out / "snakemake.log").read_text() and any((out / "logs").rglob("*.log"))
    assert "stopped: SIGTERM" in (out / "progress.log").read_text()


@pytest.mark.slow  # starts torch to read the versions
def test_the_node_command_out_of_budget_still_writes_its_json_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "scripts/node.py", "check", "--no-install", "--preset", "tiny",
                           "--budget-s", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["complete"] is False and line["stopped"] == "budget of 1 s spent"
    assert line["score_tokens_per_s"] is None and json.loads((out / "gpu-check.json").read_text()) == line


def test_the_paper_presets_are_estimated_at_about_8_minutes_on_an_h100_from_their_flops():
    """The sizes' contract, and the estimate is its stated arithmetic: 6N per training token and 2N per scored
    token at the assumed MFU of the H100 SXM's 989 TFLOP/s, plus the fixed, disk and CPU parts."""
    gc = load("gpu_check")
    for preset in ("llama-3.2-1b", "llama-3.2-3b"):
        e = gc.estimate(preset)
        assert 7 * 60 <= e["seconds"] <= 9 * 60, (preset, e["seconds"])
        run, n = gc.run_of(preset), gc.shape_flop_params(gc.SHAPES[preset])
        train = (run["pool"] + run["warmup"]) * 2048 * 6 * n
        assert e["parts"]["train_s"] == pytest.approx(train / (gc.ASSUMED_MFU["train"] * 989e12))
        score = 2 * run["pool"] * 2048 * 2 * n
        assert e["parts"]["score_s"] == pytest.approx(score / (gc.ASSUMED_MFU["score"] * 989e12))
        assert run["pool"] % 48 == 0 and run["warmup"] % 48 == 0   # whole optimiser steps
    e = gc.estimate("llama-3.2-1b")
    assert e["train_flops"] == pytest.approx(4.88e16, rel=0.01) and e["score_flops"] == pytest.approx(2.96e16, rel=0.01)
    assert gc.estimate("tiny", "cpu")["seconds"] is None


def test_the_shape_count_is_the_models_own():
    from transformers import LlamaConfig, LlamaForCausalLM

    gc = load("gpu_check")
    shape = gc.SHAPES["tiny"]
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"], tie_word_embeddings=True))
    assert gc.shape_flop_params(shape) == gc.model_flop_params(model)


# ---- API age: what the node's older stack must have --------------------------------------------------------------
# The code that runs on a node (the package and the scripts; the benchmarks guard torch's newer
# F.linear_cross_entropy with hasattr and do not run there). Under `make test-node` the installed versions are the
# node image's (torch 2.11, transformers 5.17, peft 0.20): a name the code uses that is newer fails here.
LIBRARIES = ("torch", "transformers", "peft", "accelerate")


def used_names() -> set[str]:
    """Every `from LIB[.x] import y` and every dotted `torch.a.b` attribute chain in the node's code."""
    names = set()
    for path in sorted([*(ROOT / "tokenclean").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.split(".")[0] in LIBRARIES)
            elif isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Store):
                parts, inner = [], node
                while isinstance(inner, ast.Attribute):
                    parts.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "torch":
                    names.add(".".join(["torch", *reversed(parts)]))
    return names


def resolves(dotted: str) -> bool:
    """The name exists: the longest importable module prefix, then attributes. A chain that reaches an object's
    method (torch.cuda.max_memory_allocated(...).x) is fine once a prefix names a callable or a class."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return callable(obj) and not isinstance(obj, type(importlib))
            obj = getattr(obj, attr)
        return True
    return False


def test_every_torch_transformers_and_peft_name_the_code_uses_exists_in_the_installed_versions():
    names = used_names()
    assert {"torch.utils.checkpoint.checkpoint", "torch.distributed.fsdp.fully_shard",
            "torch.cuda.max_memory_allocated", "transformers.LlamaForCausalLM"} <= names   # the scan sees them
    missing = sorted(n for n in names if not resolves(n))
    assert not missing, f"absent from the installed versions: {missing}"


def test_the_api_check_catches_a_name_that_is_not_there():
    assert not resolves("torch.nn.NoSuchLayer") and not resolves("transformers.NoSuchModel")
    assert resolves("torch.nn.functional.cross_entropy")


def test_the_node_command_writes_its_json_line_when_the_install_fails(tmp_path):
    """No wheels copied to the node: the install fails, and the output folder still gets the line, saying why."""
    (tmp_path / "wheels").mkdir()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "scripts/node.py", "check", "--wheels", str(tmp_path / "wheels"),
                           "--target", str(tmp_path / "site"), "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["complete"] is False and "no wheel for" in line["error"] and line["stopped"] is None
    assert json.loads((out / "gpu-check.json").read_text()) == line and not (tmp_path / "site").exists()
