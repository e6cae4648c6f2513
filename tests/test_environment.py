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


def test_the_lock_is_complete_so_make_install_can_skip_dependency_resolution():
    """`make install` runs `pip install --no-deps -r requirements.lock`: every requirement of every locked package
    (for this platform and Python, without extras) must itself be locked, at a version it accepts."""
    import re
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {canonicalize_name(name): version for name, version in lock_pins().items()}
    missing = []
    for name in pins:
        for text in distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            pinned = pins.get(canonicalize_name(req.name))
            if pinned is None or not req.specifier.contains(re.sub(r"\+.*", "", pinned), prereleases=True):
                missing.append(f"{name} needs {text}, the lock has {pinned}")
    assert not missing, "\n".join(missing)
