"""The pins live in one place, requirements.lock: the conda route (envs/*.yaml), the package's ranges
(pyproject.toml) and the installed environment must all agree with it."""
from __future__ import annotations

import re
import tomllib
from importlib.metadata import distribution, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.pinned  # the pinned environment itself (make test-node runs another: envs/node-image.lock)

ROOT = Path(__file__).resolve().parents[1]


def lock_pins() -> dict[str, str]:
    """requirements.lock as {canonical name: version}; every line must be an exact pin."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"requirements.lock: '{line}' is not an exact pin"
            pins[canonicalize_name(name)] = pinned
    return pins


def release(pinned: str) -> str:
    """The version without a local build tag (torch's `+cpu`), as specifiers compare it."""
    return re.sub(r"\+.*", "", pinned)


def test_the_lock_satisfies_the_package_requirements():
    """Every dependency pyproject.toml declares (torch, transformers, snakemake, lm-eval, ...) is locked, at a
    version its range accepts: the ranges say what works, the lock says what is installed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock_pins()
    for text in project["dependencies"]:
        req = Requirement(text)
        pinned = pins.get(canonicalize_name(req.name))
        assert pinned is not None, f"pyproject.toml needs {text}; requirements.lock does not pin it"
        assert req.specifier.contains(release(pinned), prereleases=True), f"{text}: the lock has {pinned}"


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
            name, _, pinned = line.partition("==")
            env_pins[canonicalize_name(name)] = pinned
        assert env_pins == pins, f"{env.name} disagrees with requirements.lock"


def test_installed_versions_match_lock():
    """The environment the tests run in is the locked one, package for package."""
    wrong = {name: (version(name), pinned) for name, pinned in lock_pins().items()
             if release(version(name)) != release(pinned)}
    assert not wrong, f"installed vs locked: {wrong}"


def test_the_lock_is_complete_so_make_install_can_skip_dependency_resolution():
    """`make install` runs `pip install --no-deps -r requirements.lock`: every requirement of every locked package
    (for this platform and Python, without extras) must itself be locked, at a version it accepts."""
    pins = lock_pins()
    missing = []
    for name in pins:
        for text in distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            pinned = pins.get(canonicalize_name(req.name))
            if pinned is None or not req.specifier.contains(release(pinned), prereleases=True):
                missing.append(f"{name} needs {text}, the lock has {pinned}")
    assert not missing, "\n".join(missing)
