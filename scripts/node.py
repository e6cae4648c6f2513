"""Offline GPU nodes: the suite on a node's own PyTorch stack, with nothing downloaded there (docs/gpu-check.md).

    python3 scripts/node.py wheels                 # a machine with an index: wheels/node/, checked <= 64 MiB
    python3 scripts/node.py install                # the node: wheels/node/ -> .node/site, no index, no deps
    python3 scripts/node.py check --out DIR        # the node: install, then the GPU check; everything into DIR

(``make node-wheels``, ``make node-install``, ``make node-check OUT=DIR``.) The node's image brings Python 3.12,
torch, transformers, peft, accelerate and the like (envs/node-image.lock is the rehearsal's copy of one); the
wheels (envs/node-wheels.lock) are what it lacks: snakemake, lm-eval, datasets, jsonschema and their own
dependencies, every one named, installed with ``--no-deps`` into a target directory that goes first on
``PYTHONPATH``. The image's torch and transformers are never replaced: a wheel of either is refused, and after
the install :func:`verify` checks that both still import from the image and that every requirement of every
installed wheel is met.

``check`` runs scripts/gpu_check.py with that ``PYTHONPATH``, prints the workflow's progress, and writes into
``--out``: ``gpu-check.json`` (the check's JSON line plus the versions, the device, the commit, the elapsed time
and ``complete``), ``snakemake.log``, ``logs/`` (the jobs' logs), ``progress.log`` and ``results/`` (the
experiment). Cut short (``--budget-s`` spent, SIGTERM, SIGINT), it stops the workflow and still writes the JSON
line, with the figures the finished jobs recorded and null for the others.

This file needs only the standard library until the wheels are on the path.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "envs" / "node-wheels.lock"
WHEELS = ROOT / "wheels" / "node"
TARGET = ROOT / ".node" / "site"
LIMIT_MIB = 64            # what a node session may carry beside the working tree
PYTHON_VERSION = "3.12"   # the node image's
# glibc 2.28 or newer (torch 2.11's own wheel is manylinux_2_28): every manylinux tag it runs, named one by one
# (pip before 24 does not widen a --platform to the older tags)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")
PROTECTED = ("torch", "transformers")  # the image's; never shadowed by a wheel
MANIFEST = "manifest.json"
# The versions the JSON line records (distribution names), where each was imported from.
VERSIONS = ("torch", "transformers", "peft", "accelerate", "tokenizers", "snakemake", "lm_eval", "datasets",
            "numpy", "packaging")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> list[dict[str, Any]]:
    """The lock's pins: [{name, version, build}], ``build`` for a ``# build`` line (no wheel on the index)."""
    pins = []
    for raw in path.read_text().splitlines():
        if raw.startswith("# omit:"):
            continue
        line, _, comment = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"node: {path.name}: '{line}' is not an exact pin")
        pins.append({"name": name.strip(), "version": version.strip(), "build": comment.strip() == "build"})
    return pins


def omitted(path: Path = LOCK) -> dict[str, str]:
    """The lock's ``# omit: name==version  (why)`` lines: {canonical name: why}, dependencies left out on purpose."""
    out = {}
    for raw in path.read_text().splitlines():
        if raw.startswith("# omit:"):
            pin, _, why = raw.removeprefix("# omit:").strip().partition(" ")
            out[canonical(pin.partition("==")[0])] = why.strip().removeprefix("(").removesuffix(")")
    return out


def wheel_project(filename: str) -> tuple[str, str]:
    """(canonical project name, version) of a wheel file name (PEP 427: name-version-...)."""
    name, version = filename.split("-")[:2]
    return canonical(name), version


def pip(python: str, *args: str) -> None:
    command = [python, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(command, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"node: pip failed (exit {proc.returncode}): {' '.join(command)}")


def download(lock: Path, dest: Path, limit_mib: float, python: str = sys.executable) -> dict[str, Any]:
    """Exactly the lock's wheels for the node (Python 3.12, manylinux x86-64) into ``dest``, replacing what was
    there; the sdist-only ones built here (pure Python). Writes ``dest/manifest.json``; fails over the limit."""
    pins = read_lock(lock)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    binary = [f"{p['name']}=={p['version']}" for p in pins if not p["build"]]
    built = [f"{p['name']}=={p['version']}" for p in pins if p["build"]]
    pip(python, "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
        "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(dest), *binary)
    if built:
        pip(python, "wheel", "--no-deps", "--no-binary=:all:", "-w", str(dest), *built)
    files = sorted(dest.glob("*.whl"))
    stray = sorted(set(dest.iterdir()) - set(files))
    for path in stray:   # sdists pip wheel left behind
        path.unlink()
    manifest = check_wheels(pins, files)
    for name in [canonical(p["name"]) for p in pins if p["build"]]:
        tag = manifest["wheels"][name]["file"]
        if not tag.endswith("-none-any.whl"):
            raise SystemExit(f"node: {tag} was built for this machine, not pure Python: it will not run on the node")
    manifest.update(limit_mib=limit_mib, commit=git_commit())
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for w in sorted(manifest["wheels"].values(), key=lambda w: -w["bytes"]):
        print(f"{w['bytes'] / 2**20:8.2f} MiB  {w['file']}")
    total = manifest["total_bytes"] / 2**20
    print(f"{len(files)} wheels, {total:.2f} MiB in {dest} (limit {limit_mib} MiB)")
    if total > limit_mib:
        raise SystemExit(f"node: the wheels take {total:.2f} MiB, over the {limit_mib} MiB limit")
    return manifest


def check_wheels(pins: list[dict[str, Any]], files: list[Path]) -> dict[str, Any]:
    """One wheel per pin at the pinned version, nothing else, neither torch nor transformers."""
    wanted = {canonical(p["name"]): p["version"] for p in pins}
    found: dict[str, dict[str, Any]] = {}
    for path in files:
        name, version = wheel_project(path.name)
        if name in PROTECTED:
            raise SystemExit(f"node: {path.name}: the node's own {name} is used, never a wheel of it")
        if name not in wanted or name in found:
            raise SystemExit(f"node: {path.name} is not one of the lock's wheels (or is there twice)")
        if canonical(version) != canonical(wanted[name]):
            raise SystemExit(f"node: {path.name}: the lock pins {name}=={wanted[name]}")
        found[name] = {"file": path.name, "version": version, "bytes": path.stat().st_size,
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SystemExit(f"node: no wheel for {', '.join(missing)} (run `make node-wheels` on a machine with an index)")
    return {"wheels": found, "total_bytes": sum(w["bytes"] for w in found.values())}


def install(wheels: Path, target: Path, lock: Path = LOCK, python: str = sys.executable) -> Path:
    """The wheels into ``target`` with no index and no dependency resolution (skipped when the same wheels are
    there already), then :func:`verify` under ``PYTHONPATH=target``. Returns ``target``."""
    files = sorted(wheels.glob("*.whl"))
    manifest = check_wheels(read_lock(lock), files)
    stamp = target / ".tokenclean-wheels.json"
    digest = {name: w["sha256"] for name, w in manifest["wheels"].items()}
    if stamp.exists() and json.loads(stamp.read_text()) == digest:
        print(f"node: the {len(files)} wheels are already in {target}", flush=True)
    else:
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        pip(python, "install", "--no-index", "--no-deps", "--no-compile", "--quiet", "--target", str(target),
            *map(str, files))
        stamp.write_text(json.dumps(digest, sort_keys=True))
        print(f"node: installed {len(files)} wheels ({manifest['total_bytes'] / 2**20:.1f} MiB) into {target}",
              flush=True)
    proc = subprocess.run([python, __file__, "verify", "--target", str(target), "--lock", str(lock)],
                          env=node_env(target), check=False)
    if proc.returncode != 0:
        raise SystemExit("node: the installed wheels do not fit this Python (above)")
    return target


def node_env(target: Path | None) -> dict[str, str]:
    """The environment with ``target`` (if any) first on PYTHONPATH, then the user's; the hub switched off."""
    path = os.pathsep.join(p for p in (str(target) if target else "", os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def unmet_requirements(target: Path, left_out: dict[str, str] | None = None) -> list[str]:
    """Every requirement of every distribution in ``target`` that what this Python imports does not meet (run
    with ``target`` first on ``sys.path``), and every protected package imported from ``target``. A requirement
    on a project in ``left_out`` (the lock's ``# omit`` lines) is no problem when that project is absent."""
    left_out = left_out or {}
    from importlib.metadata import PackageNotFoundError, distribution, distributions

    from packaging.requirements import Requirement

    problems = []
    for dist in distributions(path=[str(target)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = distribution(req.name).version
            except PackageNotFoundError:
                if canonical(req.name) not in left_out:
                    problems.append(f"{dist.metadata['Name']} needs {text}: not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {text}: {have} is installed")
    for name in PROTECTED:
        spec = importlib.util.find_spec(name)
        if spec is None:
            problems.append(f"{name} is not installed: the node image must bring it")
        elif spec.origin and Path(spec.origin).resolve().is_relative_to(target.resolve()):
            problems.append(f"{name} is imported from {target}, not from the image")
    return problems


def verify(target: Path, lock: Path = LOCK) -> int:
    left_out = omitted(lock)
    problems = unmet_requirements(target, left_out)
    for name, why in left_out.items():
        print(f"node: left out on purpose: {name} ({why})", flush=True)
    for problem in problems:
        print(f"node: {problem}", file=sys.stderr)
    if not problems:
        print("node: every wheel's requirements are met; " + ", ".join(
            f"{v['name']} {v['version']} ({v['from']})" for v in versions(target) if v["name"] in PROTECTED),
            flush=True)
    return 1 if problems else 0


def versions(target: Path | None = None) -> list[dict[str, str]]:
    """Installed version of each of :data:`VERSIONS` and whether it comes from the wheels or the image."""
    from importlib.metadata import PackageNotFoundError, distribution

    out = []
    for name in VERSIONS:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        where = str(dist.locate_file(""))
        origin = "wheels" if target is not None and Path(where).resolve() == target.resolve() else "image"
        out.append({"name": name, "version": dist.version, "from": origin})
    return out


def git_commit() -> str | None:
    proc = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=40"],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


# ---- the check ------------------------------------------------------------------------------------------------

def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROGRESS = re.compile(r"^(rule |localrule |checkpoint )|steps \(\d+%\) done|^Error|Exiting because|^Finished")


class Progress:
    """Prints the Snakemake log's rule starts and step counts as they are written, with the elapsed time, to the
    console and ``progress.log``."""

    def __init__(self, out: Path, start: float, budget_s: float = 0.0):
        self.file = open(out / "progress.log", "a")   # noqa: SIM115  (closed by close())
        self.start, self.budget_s = start, budget_s

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.0f} s] {text}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def follow(self, log: Path, stop: threading.Event) -> None:
        at = 0
        while True:
            done = stop.is_set()
            if log.exists():
                with open(log, errors="replace") as f:
                    f.seek(at)
                    chunk = f.read()
                    at = f.tell()
                for line in chunk.splitlines():
                    if PROGRESS.search(line.strip()):
                        self.say(line.strip().rstrip(":"))
            if done:
                return
            stop.wait(2.0)

    def close(self) -> None:
        self.file.close()


def probe(env: dict[str, str], target: Path | None) -> dict[str, Any]:
    """Versions, device and CUDA of the Python that runs the check (a subprocess: the same environment)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import node, torch; "
            "print(json.dumps({'versions': node.versions(None if sys.argv[2] == '-' else node.Path(sys.argv[2])), "
            "'python': sys.version.split()[0], 'cuda': torch.version.cuda, "
            "'device_name': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts"), str(target) if target else "-"],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"node: this Python cannot import torch:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(out: Path, preset: str, cores: str, budget_s: float, wheels: Path, target: Path | None) -> int:
    """Install (unless ``target`` is None: this environment has everything), run the GPU check into ``out``,
    and end with its JSON line, complete or not: cut short (SIGTERM, SIGINT, the budget) or failed, at any stage."""
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(out, start, budget_s)
    state: dict[str, Any] = {"why": None, "proc": None, "error": None}

    def cut(signum, _frame):
        state["why"] = signal.Signals(signum).name
        if state["proc"] is not None:
            stop_group(state["proc"])

    previous = {s: signal.signal(s, cut) for s in (signal.SIGTERM, signal.SIGINT)}
    info: dict[str, Any] = {"versions": [], "python": sys.version.split()[0], "cuda": None, "device_name": None}
    estimate: dict[str, Any] = {"seconds": None}
    gc = load_gpu_check()
    try:
        if target is not None:
            install(wheels, target)
        env = node_env(target)
        info = probe(env, target)
        preset = preset if preset != "auto" else ("tiny" if info["device_name"] == "cpu" else "llama-3.2-1b")
        estimate = gc.estimate(preset, info["device_name"])
        progress.say(f"{preset} on {info['device_name']}: " + ", ".join(f"{v['name']} {v['version']}"
                                                                         for v in info["versions"]))
        if estimate["seconds"] is not None:
            progress.say(f"estimate: {estimate['seconds'] / 60:.1f} min ({gc.describe_estimate(estimate)}); "
                         f"budget {budget_s / 60:.1f} min")
        if state["why"] is None:
            run_check(out, preset, cores, budget_s - (time.monotonic() - start), env, state, progress)
    except SystemExit as e:   # the install or the probe failed: still a line, saying so
        state["error"] = str(e.code)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    experiment = out / "results" / preset
    complete = state["proc"] is not None and state["proc"].returncode == 0 and state["why"] is None
    lines = (out / "gpu_check.stdout").read_text().strip().splitlines() if complete else []
    if lines:
        line = json.loads(lines[-1])
    else:
        line = gc.partial_figures(experiment, preset, info["device_name"] or "unknown")
        err = out / "gpu_check.stderr"
        tail = state["error"] or ((err.read_text().strip().splitlines() or [""])[-1] if err.exists() else "")
        progress.say(f"stopped: {state['why'] or 'the check failed'}" + (f": {tail}" if tail else ""))
    collect_logs(experiment, out)
    line.update(complete=bool(lines), stopped=state["why"], error=state["error"],
                elapsed_s=round(time.monotonic() - start, 1), estimate_s=estimate["seconds"], python=info["python"],
                cuda=info["cuda"], versions={v["name"]: v["version"] + ("" if v["from"] == "image" else " (wheel)")
                                             for v in info["versions"]},
                commit=git_commit() or wheels_commit(wheels))
    text = json.dumps(line, sort_keys=True)
    (out / "gpu-check.json").write_text(text + "\n")
    progress.say(f"wrote {out / 'gpu-check.json'}, {out / 'snakemake.log'} and {out / 'logs'}")
    progress.close()
    print(text, flush=True)
    return 0 if lines else 3


def run_check(out: Path, preset: str, cores: str, budget_s: float, env: dict[str, str], state: dict[str, Any],
              progress: Progress) -> None:
    """scripts/gpu_check.py into ``out/results``, its progress followed, stopped when ``budget_s`` is spent."""
    experiment = out / "results" / preset
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--preset", preset, "--out",
               str(out / "results"), "--cores", cores]
    stop = threading.Event()
    follower = threading.Thread(target=progress.follow, args=(experiment / "snakemake.log", stop), daemon=True)
    with open(out / "gpu_check.stdout", "w") as stdout, open(out / "gpu_check.stderr", "w") as stderr:
        state["proc"] = proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=ROOT,
                                                start_new_session=True)
        follower.start()
        try:
            proc.wait(timeout=max(budget_s, 0))
        except subprocess.TimeoutExpired:
            state["why"] = f"budget of {progress.budget_s:g} s spent"
            stop_group(proc)
        finally:
            proc.wait()
            stop.set()
            follower.join()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the check's process group (the check, Snakemake and its jobs), SIGKILL 20 s later."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def collect_logs(experiment: Path, out: Path) -> None:
    """Snakemake's log and the jobs' logs beside the JSON line (they also stay in the experiment)."""
    if (experiment / "snakemake.log").exists():
        shutil.copyfile(experiment / "snakemake.log", out / "snakemake.log")
    if (experiment / "logs").is_dir():
        shutil.copytree(experiment / "logs", out / "logs", dirs_exist_ok=True)


def wheels_commit(wheels: Path) -> str | None:
    """Without git (a copied working tree), the commit the wheels were downloaded at."""
    manifest = wheels / MANIFEST
    return json.loads(manifest.read_text()).get("commit") if manifest.exists() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheels", help="download the node's wheels (a machine with an index)")
    w.add_argument("--lock", type=Path, default=LOCK)
    w.add_argument("--dest", type=Path, default=WHEELS)
    w.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    i = sub.add_parser("install", help="install the wheels into a target directory (no index)")
    v = sub.add_parser("verify", help="check the installed wheels' requirements (PYTHONPATH=target)")
    c = sub.add_parser("check", help="install, then run the GPU check into --out")
    for s in (i, c):
        s.add_argument("--wheels", type=Path, default=WHEELS)
    for s in (i, v, c):
        s.add_argument("--target", type=Path, default=TARGET)
    for s in (i, v):
        s.add_argument("--lock", type=Path, default=LOCK)
    c.add_argument("--out", type=Path, required=True, help="the output folder: JSON line, logs, results")
    c.add_argument("--preset", default="auto", help="llama-3.2-1b (default on CUDA), llama-3.2-3b, tiny")
    c.add_argument("--cores", default="all")
    c.add_argument("--budget-s", type=float, default=660.0,
                   help="stop the check after this many seconds and report what finished (default 11 min)")
    c.add_argument("--no-install", action="store_true",
                   help="run in this environment as it is (it has the suite's packages already)")
    a = p.parse_args(argv)
    if a.command == "wheels":
        download(a.lock, a.dest.resolve(), a.limit_mib)
        return 0
    if a.command == "install":
        install(a.wheels.resolve(), a.target.resolve(), a.lock.resolve())
        print(f"export PYTHONPATH={a.target.resolve()}${{PYTHONPATH:+:$PYTHONPATH}}")
        return 0
    if a.command == "verify":
        return verify(a.target.resolve(), a.lock.resolve())
    return check(a.out.resolve(), a.preset, a.cores, a.budget_s, a.wheels.resolve(),
                 None if a.no_install else a.target.resolve())


if __name__ == "__main__":
    sys.exit(main())
