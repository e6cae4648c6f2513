"""Pinned CPU numerics: which vector kernels torch, MKL and oneDNN may use (docs/numerics.md).

The same commit gives other weights, and so another table, on a CPU of another vector width: ATen picks its
kernels by the CPU's capability (AVX2 or AVX-512) and MKL its GEMM code path, and their sums round differently.
Pinning every library to the AVX2 level that any x86-64 CPU of the last decade has makes the embedded
experiments' bits the same on AVX2 and AVX-512 machines. The pin is a few environment variables, which the
libraries read when they first run a kernel; the level travels to every job in one variable (:data:`ENV`), which
``tokenclean``'s CLI applies before anything imports torch.

Pure Python (no torch) except :func:`describe`: the workflow calls :func:`problem` while planning.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
from collections.abc import Mapping, MutableMapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# The variable that carries the level to every job (rules/common.smk sets it from the config's cpu_kernels).
ENV = "TOKENCLEAN_CPU_KERNELS"
# What each level sets. avx2: ATen's vector kernels, MKL's code path (conditional numerical reproducibility;
# STRICT also makes its GEMMs' bits independent of the thread count, measured in docs/numerics.md) and oneDNN's
# instruction set, all at AVX2. MKL offers its AVX2 path on Intel CPUs only (elsewhere it silently keeps its own
# choice), so avx2 holds on Intel CPUs. portable: the same ATen and oneDNN kernels with MKL's COMPATIBLE path,
# which MKL keeps on every x86-64 CPU, one MKL thread (COMPATIBLE has no thread-independent STRICT mode): it holds
# on AMD as well, at about 1.5 times the time. native: nothing, each library chooses by the CPU.
LEVELS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "portable": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "MKL_NUM_THREADS": "1",
                 "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "native": {},
}
# Every variable some level sets: what provenance records and what a clean environment leaves out.
VARIABLES = tuple(dict.fromkeys(name for values in LEVELS.values() for name in values))
# The CPU flags a pinned level needs (ATen's AVX2 kernels need FMA as well) and the ones provenance records.
NEEDS = {"avx2": ("avx2", "fma"), "portable": ("avx2", "fma")}
# Levels whose MKL path exists on Intel CPUs only (MKL's documentation of conditional numerical reproducibility).
INTEL_ONLY = {"avx2": "GenuineIntel"}
FLAGS = ("avx2", "fma", "avx512f")
X86_64 = ("x86_64", "amd64")
LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def level_of(config: Mapping[str, Any]) -> str:
    """The level a config asks for: its ``cpu_kernels``, where ``auto`` (the default) is avx2 for an embedded
    experiment (CPU-sized, its table documented to the last digit) and native otherwise (GPU runs at paper scale,
    where CPU kernels do not make the model)."""
    chosen = config.get("cpu_kernels", "auto")
    if chosen == "auto":
        return "avx2" if "world" in config else "native"
    if chosen not in LEVELS:
        raise ValueError(f"cpu_kernels: unknown level {chosen!r} (one of auto, {', '.join(LEVELS)})")
    return chosen


def apply(level: str, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``level``'s variables in ``environ`` (default: os.environ), overriding any already there, and return
    them. Must run before torch runs its first kernel: ATen reads its capability once, at the first dispatch."""
    if level not in LEVELS:
        raise ValueError(f"{ENV}={level!r}: unknown level (one of {', '.join(LEVELS)})")
    environ = os.environ if environ is None else environ
    environ.update(LEVELS[level])
    return dict(LEVELS[level])


def current(environ: Mapping[str, str] | None = None) -> str:
    """The level this process runs at: the one :data:`ENV` names (unset or empty: native)."""
    return (os.environ if environ is None else environ).get(ENV) or "native"


def apply_from_env(environ: MutableMapping[str, str] | None = None) -> str:
    """The CLI's first step: apply the level :data:`ENV` names and return it."""
    environ = os.environ if environ is None else environ
    level = current(environ)
    apply(level, environ)
    return level


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> tuple[str | None, set[str] | None]:
    """The CPU's model name and flags from ``cpuinfo`` (None, None where it cannot be read: not Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, None
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return (model.group(1).strip() if model else None), (set(flags.group(1).split()) if flags else None)


def cpu_vendor(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, ...) from ``cpuinfo``; None where it cannot be read."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.MULTILINE)
    return found.group(1) if found else None


def pinned_torch(lock: str | os.PathLike = LOCK) -> str | None:
    """The torch version requirements.lock pins (the one place of pins), None where the lock is not there."""
    try:
        text = Path(lock).read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r"^torch==(\S+)", text, re.MULTILINE)
    return found.group(1) if found else None


def installed_torch() -> str | None:
    """The installed torch's version without its build tag (``2.13.0+cpu`` -> ``2.13.0``); None: not installed.
    Read from the package metadata, so that the planning-time check does not import torch."""
    try:
        return re.sub(r"\+.*", "", version("torch"))
    except PackageNotFoundError:
        return None


def problem(level: str) -> str | None:
    """Why ``level`` cannot give the documented bits on this machine (None: it holds, or nothing is pinned)."""
    if level not in NEEDS:
        return None
    arch = platform.machine()
    if arch.lower() not in X86_64:
        return f"this machine is {arch or 'of unknown architecture'}, not x86-64"
    _, flags = cpu_flags()
    if flags is None:
        return "this machine's CPU flags cannot be read (no /proc/cpuinfo)"
    missing = [f for f in NEEDS[level] if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    vendor = cpu_vendor()
    if level in INTEL_ONLY and vendor != INTEL_ONLY[level]:
        return (f"this CPU is {vendor or 'of an unknown vendor'}: MKL's AVX2 path is Intel-only and MKL keeps its own "
                "choice here; cpu_kernels: portable holds on any x86-64 CPU with AVX2, about 1.5 times slower")
    pinned, installed = pinned_torch(), installed_torch()
    if pinned is None or installed != re.sub(r"\+.*", "", pinned):
        return f"torch is {installed or 'not installed'}, not the pinned {pinned or '(requirements.lock not found)'}"
    return None


def warning(level: str) -> str | None:
    """The one line a job prints to stderr when its pin cannot hold (None: it holds)."""
    why = problem(level)
    if why is None:
        return None
    return (f"tokenclean: warning: {ENV}={level} cannot hold here ({why}); the kernels differ from those of the "
            "documented tables, which will not reproduce to the last digit (docs/numerics.md)")


def describe(level: str) -> dict[str, Any]:
    """The machine and the pin, for provenance: CPU, flags, architecture, torch and the capability ATen uses
    (imports torch: call it after :func:`apply`), the variables' values and whether the pin holds."""
    import torch

    model, flags = cpu_flags()
    why = problem(level)
    return {
        "level": level,
        "holds": why is None,
        "problem": why,
        "cpu": model,
        "arch": platform.machine(),
        "flags": None if flags is None else {f: f in flags for f in FLAGS},
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "vendor": cpu_vendor(),
        "env": {name: os.environ.get(name) for name in VARIABLES},
    }


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 of a model directory's tensors (name, dtype, shape and bytes, in name order): the weights' identity,
    free of the safetensors file's metadata and layout."""
    from safetensors.numpy import load_file

    h = hashlib.sha256()
    tensors: dict[str, Any] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(path))
    if not tensors:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{t.shape}\0".encode())
        h.update(t.tobytes())
    return h.hexdigest()
