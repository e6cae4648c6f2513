"""Pinned CPU numerics (tokenclean/numerics.py, docs/numerics.md): the levels, the variables they set, the warning
when a pin cannot hold, and the pin test: a short pretrain and scoring at the pinned kernels must give the bits
recorded in tests/data/pinned_weights.json, whatever the CPU's vector width.

Re-record (after a deliberate change of training or scoring): ``python -m tests.test_numerics``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenclean import numerics
from tokenclean.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "data" / "pinned_weights.json"
# The pin run: a tiny base pretrained on a fixed corpus, then its per-token losses on a fixed SFT set.
SETTINGS = {
    "model": {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "vocab_size": 256, "max_length": 64},
    "train": ["--steps", "40", "--batch-size", "16", "--pack-length", "64", "--lr", "0.002", "--seed", "0"],
    "threads": 1,
}
RUN = """
import hashlib, json, sys
import numpy as np
from tokenclean import numerics
from tokenclean.cli import main
work, settings = sys.argv[1], json.loads(sys.argv[2])
threads = ["--threads", str(settings["threads"])]
steps = [["pretrain", *threads, "--corpus", f"{work}/corpus.jsonl", "--model-params", json.dumps(settings["model"]),
          *settings["train"], "--out", f"{work}/model"],
         ["tokenize", "--data", f"{work}/sft.jsonl", "--tokenizer", f"{work}/model", "--max-length", "64",
          "--out", f"{work}/sft.tokens.npz"],
         ["loss", *threads, "--model", f"{work}/model", "--tokens", f"{work}/sft.tokens.npz",
          "--out", f"{work}/sft.loss.npy"]]
for argv in steps:
    if main(argv) != 0:
        sys.exit(f"tokenclean {argv[0]} failed")
described = numerics.describe(numerics.current())
print(json.dumps({"weights_sha256": numerics.weights_sha256(f"{work}/model"),
                  "losses_sha256": hashlib.sha256(np.load(f"{work}/sft.loss.npy").tobytes()).hexdigest(),
                  **{k: described[k] for k in ("torch", "cpu_capability", "cpu", "flags")}}))
"""


def pin_run(work: Path, level: str) -> dict:
    """The pin run in a fresh process at ``level`` (a fresh process: the kernels are chosen once, at torch's first
    op): the sha256 of the weights' tensors and of the losses, and what the machine is."""
    pairs = [(a, b) for a in range(20) for b in range(20)]
    work.mkdir(parents=True, exist_ok=True)
    (work / "corpus.jsonl").write_text("".join(
        json.dumps({"text": f"{a} plus {b} makes {a + b} . of {a} and {b} the larger is {max(a, b)} ."}) + "\n"
        for a, b in pairs))
    (work / "sft.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a} plus {b}", "completion": f"makes {a + b} ."}) + "\n" for a, b in pairs[::7]))
    env = {k: v for k, v in os.environ.items() if k not in numerics.VARIABLES}
    env.update({numerics.ENV: level, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])})
    proc = subprocess.run([sys.executable, "-c", RUN, str(work), json.dumps(SETTINGS)], env=env, cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.pinned
@pytest.mark.parametrize("level", ["avx2", "portable"])
def test_the_pinned_kernels_give_the_recorded_weights_and_losses(tmp_path, level):
    """avx2 (the documented tables) holds on Intel CPUs; portable on any x86-64 CPU with AVX2. A level that
    cannot hold here by its documented conditions (an AMD CPU for avx2) is skipped, saying why; any other
    difference fails."""
    recorded = json.loads(RECORD.read_text())
    assert recorded["settings"] == SETTINGS, f"the pin run's settings changed: re-record {RECORD.name}"
    why = numerics.problem(level)
    if why is not None:
        pytest.skip(f"TOKENCLEAN_CPU_KERNELS={level} cannot hold here: {why}")
    got = pin_run(tmp_path, level)
    recorded = {**recorded, **recorded["levels"][level]}
    assert got["torch"].partition("+")[0] == recorded["torch"].partition("+")[0], (
        f"torch is {got['torch']}, the pin was recorded with {recorded['torch']}: other kernels, other bits")
    if (got["weights_sha256"], got["losses_sha256"]) != (recorded["weights_sha256"], recorded["losses_sha256"]):
        pytest.fail(
            f"The pinned CPU kernels (TOKENCLEAN_CPU_KERNELS={level}) gave other bits here than on the machine that "
            f"recorded {RECORD.relative_to(ROOT)} ({recorded['cpu']}): weights {got['weights_sha256']}, losses "
            f"{got['losses_sha256']}. If this commit did not change training or scoring, the pin does not hold on "
            f"this CPU ({got['cpu']}, flags {got['flags']}, ATen capability {got['cpu_capability']}): the "
            f"documented tables will not reproduce here to the last digit (docs/numerics.md). If it did change "
            f"them on purpose, re-record with `python -m tests.test_numerics`.", pytrace=False)


def test_auto_pins_embedded_worlds_and_leaves_other_experiments_native():
    assert numerics.level_of({"world": {}}) == "avx2" and numerics.level_of({"world": {}, "cpu_kernels": "auto"})
    assert numerics.level_of({"data": {}}) == "native"
    assert numerics.level_of({"data": {}, "cpu_kernels": "avx2"}) == "avx2"
    assert numerics.level_of({"world": {}, "cpu_kernels": "native"}) == "native"
    with pytest.raises(ValueError, match="cpu_kernels"):
        numerics.level_of({"cpu_kernels": "avx9"})


def test_a_level_sets_its_variables_over_the_users_and_native_sets_none():
    environ = {"MKL_CBWR": "COMPATIBLE", "OTHER": "x"}
    assert numerics.apply("avx2", environ) == numerics.LEVELS["avx2"]
    assert environ == {**numerics.LEVELS["avx2"], "OTHER": "x"} and environ["ATEN_CPU_CAPABILITY"] == "avx2"
    environ = {"MKL_CBWR": "COMPATIBLE"}
    assert numerics.apply("native", environ) == {} and environ == {"MKL_CBWR": "COMPATIBLE"}
    assert numerics.apply_from_env(environ) == "native" and numerics.apply_from_env({numerics.ENV: ""}) == "native"
    environ = {numerics.ENV: "avx2"}
    assert numerics.apply_from_env(environ) == "avx2" and environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    with pytest.raises(ValueError, match="unknown level"):
        numerics.apply("avx9", {})


def test_the_cpu_flags_and_the_torch_pin_are_read_from_their_files(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\n")
    assert numerics.cpu_flags(cpuinfo) == ("Some CPU", {"fpu", "sse2", "avx2", "fma"})
    assert numerics.cpu_flags(tmp_path / "none") == (None, None)
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.0\ntorch==2.13.0\n")
    assert numerics.pinned_torch(lock) == "2.13.0" and numerics.pinned_torch(tmp_path / "none") is None
    pinned = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line.startswith("torch==")]
    assert pinned == [f"torch=={numerics.pinned_torch()}"]


@pytest.fixture()
def avx2_machine(monkeypatch):
    """This machine as one where the pin holds: x86-64, AVX2 and FMA, the pinned torch."""
    monkeypatch.setattr(numerics.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(numerics, "cpu_flags", lambda: ("Some CPU", {"avx", "avx2", "fma"}))
    monkeypatch.setattr(numerics, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(numerics, "installed_torch", lambda: "2.13.0")
    monkeypatch.setattr(numerics, "pinned_torch", lambda: "2.13.0")
    return monkeypatch


@pytest.mark.parametrize(("change", "why"), [
    (("platform.machine", lambda: "aarch64"), "aarch64, not x86-64"),
    (("cpu_flags", lambda: ("Old CPU", {"avx", "sse4_2"})), "lacks avx2, fma"),
    (("cpu_flags", lambda: ("Some CPU", {"avx2"})), "lacks fma"),
    (("cpu_flags", lambda: (None, None)), "cannot be read"),
    (("installed_torch", lambda: "2.12.1"), "torch is 2.12.1, not the pinned 2.13.0"),
    (("cpu_vendor", lambda: "AuthenticAMD"), "AuthenticAMD: MKL's AVX2 path is Intel-only"),
])
def test_a_pin_that_cannot_hold_is_one_warning_line(avx2_machine, change, why):
    assert numerics.problem("avx2") is None and numerics.warning("avx2") is None
    name, value = change
    target = numerics.platform if name.startswith("platform.") else numerics
    avx2_machine.setattr(target, name.removeprefix("platform."), value)
    line = numerics.warning("avx2")
    assert why in numerics.problem("avx2") and why in line
    assert line.startswith("tokenclean: warning: TOKENCLEAN_CPU_KERNELS=avx2 cannot hold here") and "\n" not in line
    assert numerics.warning("native") is None  # nothing pinned: nothing to hold
    if name == "cpu_vendor":  # the portable level holds there
        assert numerics.problem("portable") is None


def test_the_cli_applies_the_level_warns_in_one_line_and_refuses_an_unknown_one(tmp_path, avx2_machine, capsys):
    world = ["world", "--params", '{"pretrain_docs": 5, "warmup_samples": 2, "pool_samples": 2, "eval_samples": 1}']
    avx2_machine.setenv(numerics.ENV, "avx2")
    avx2_machine.setattr(numerics, "cpu_flags", lambda: ("Old CPU", {"avx"}))
    assert main([*world, "--out", str(tmp_path / "w1")]) == 0  # the job goes on
    assert os.environ["MKL_CBWR"] == numerics.LEVELS["avx2"]["MKL_CBWR"]
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [numerics.warning("avx2")] and "lacks avx2, fma" in warned[0]
    avx2_machine.setenv(numerics.ENV, "avx9")
    assert main([*world, "--out", str(tmp_path / "w2")]) == 2
    assert "tokenclean world: error: TOKENCLEAN_CPU_KERNELS='avx9': unknown level" in capsys.readouterr().err
    assert not (tmp_path / "w2").exists()


def test_the_description_names_the_cpu_the_capability_and_the_pin():
    described = numerics.describe("avx2")
    assert set(described) == {"level", "holds", "problem", "cpu", "arch", "flags", "torch", "cpu_capability",
                              "vendor", "env"}
    assert described["env"] == {name: os.environ.get(name) for name in numerics.VARIABLES}
    if os.environ.get(numerics.ENV) == "avx2" and described["holds"]:  # conftest pinned the tests before torch ran
        assert described["cpu_capability"] == "AVX2" and described["flags"]["avx2"]


def test_the_weights_hash_reads_the_tensors_not_the_file(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, dtype=np.float32)}
    for name, meta in (("one", {"format": "pt"}), ("two", {"saved": "elsewhere"})):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors", metadata=meta)
    assert numerics.weights_sha256(tmp_path / "one") == numerics.weights_sha256(tmp_path / "two")
    (tmp_path / "three").mkdir()
    save_file({**tensors, "a": np.ones(4, dtype=np.float32) * (1 + 2**-23)}, tmp_path / "three" / "model.safetensors")
    assert numerics.weights_sha256(tmp_path / "three") != numerics.weights_sha256(tmp_path / "one")
    with pytest.raises(FileNotFoundError):
        numerics.weights_sha256(tmp_path)


def record() -> None:
    """Write tests/data/pinned_weights.json from this machine's pin run."""
    import tempfile

    levels, machine = {}, {}
    for level in ("avx2", "portable"):
        with tempfile.TemporaryDirectory() as work:
            got = pin_run(Path(work), level)
        levels[level] = {k: got.pop(k) for k in ("weights_sha256", "losses_sha256")}
        machine = got
        print(f"{RECORD}: {level}: weights {levels[level]['weights_sha256']}, losses {levels[level]['losses_sha256']}")
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({"levels": levels, **machine, "settings": SETTINGS}, indent=2) + "\n")


if __name__ == "__main__":
    record()
