"""The pins of the pip route (requirements.lock) and the conda route (envs/*.yaml) must agree."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: '{line}' is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_lock_pins_torch_cpu_build_in_the_same_install():
    pins = lock_pins()
    assert pins["torch"] == "2.13.0"
    assert pins["transformers"].startswith("5.") and pins["snakemake"].startswith("9.")
    assert pins["lm-eval"] == "0.4.13"


def test_conda_envs_match_lock():
    pins = lock_pins()
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
        assert "python=3.11" in spec["dependencies"]
        env_pins = {}
        for line in pip:
            name, _, version = line.partition("==")
            env_pins[name.lower().replace("_", "-")] = version
        assert env_pins == pins, f"{env.name} disagrees with requirements.lock"


def test_installed_versions_match_lock():
    from importlib.metadata import version

    pins = lock_pins()
    for name in ("torch", "transformers", "snakemake", "lm-eval", "numpy", "tokenizers", "peft"):
        assert version(name).split("+")[0] == pins[name], name
