"""What warm start saves a job (tokenclean/warm.py): the same commands as fresh processes and as forks of a warm
server, in turn, on a tiny model (the job's own compute is small, as on the embedded worlds).

Each round runs a short `tokenclean train`, a `tokenclean loss` and a `tokenclean evaluate` on one of the world's
tasks, fresh then forked (the machine is shared: the figures to quote are the medians of rounds taken side by
side). Figures: each command's median wall seconds both ways, the seconds saved per job, the ratio fresh/forked,
and whether the forked commands wrote the same bits (weights, losses, metrics). Ends with one JSON line.

    python benchmarks/warm_start.py --repeats 3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenclean import numerics, warm

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "vocab_size": 200, "max_length": 64}


def run(argv: list[str], socket: str | None) -> float:
    """One `tokenclean` command, through the warm server when ``socket`` is named: wall seconds."""
    env = {k: v for k, v in os.environ.items() if k != warm.ENV}
    if socket:
        env[warm.ENV] = socket
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tokenclean.cli", *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0 or "warm start not used" in proc.stderr:
        sys.exit(f"tokenclean {argv[0]} failed or ran fresh:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def setup(work: Path) -> None:
    """A tiny world, its base model and its tokens: what the timed commands read."""
    from tokenclean.cli import main

    settings = {"seed": 0, "pretrain_docs": 300, "warmup_samples": 40, "pool_samples": 120, "eval_samples": 10,
                "families": ["add", "max"], "phrasings": 4}
    steps = [["world", "--out", f"{work}/world", "--params", json.dumps(settings)],
             ["pretrain", "--threads", "1", "--corpus", f"{work}/world/corpus.jsonl", "--model-params",
              json.dumps(MODEL), "--steps", "5", "--batch-size", "8", "--out", f"{work}/base"],
             ["tokenize", "--data", f"{work}/world/pool.jsonl", "--tokenizer", f"{work}/base", "--max-length", "64",
              "--out", f"{work}/pool.tokens.npz"]]
    for argv in steps:
        if main(argv) != 0:
            sys.exit(f"setup: tokenclean {argv[0]} failed")


def commands(work: Path, tag: str) -> dict[str, list[str]]:
    return {
        "train": ["train", "--threads", "1", "--model", f"{work}/base", "--tokens", f"{work}/pool.tokens.npz",
                  "--steps", "5", "--batch-size", "8", "--seed", "0", "--out", f"{work}/sft-{tag}"],
        "loss": ["loss", "--threads", "1", "--model", f"{work}/base", "--tokens", f"{work}/pool.tokens.npz",
                 "--out", f"{work}/loss-{tag}.npy"],
        "evaluate": ["evaluate", "--threads", "1", "--model", f"{work}/base", "--tasks-dir",
                     f"{work}/world/tasks", "--tasks", "add", "--device", "cpu", "--out", f"{work}/eval-{tag}.json"],
    }


def digest(work: Path, tag: str) -> str:
    metrics = json.loads((work / f"eval-{tag}.json").read_text())
    metrics = {k: v for k, v in metrics.items() if k not in ("provenance", "seconds", "date")}
    return hashlib.sha256(json.dumps([numerics.weights_sha256(work / f"sft-{tag}"),
                                      (work / f"loss-{tag}.npy").read_bytes().hex()[-4096:],
                                      metrics.get("results", metrics)], sort_keys=True,
                                     default=str).encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup(work)
        socket = warm.start(str(work), sys.executable, str(work / "warm.log"))
        deadline = time.monotonic() + 300
        while not os.path.exists(socket):
            if time.monotonic() > deadline:
                sys.exit((work / "warm.log").read_text())
            time.sleep(0.2)
        times: dict[str, dict[str, list[float]]] = {}
        try:
            for _ in range(args.repeats):
                for how, sock in (("fresh", None), ("forked", socket)):
                    for name, argv in commands(work, how).items():
                        times.setdefault(name, {}).setdefault(how, []).append(run(argv, sock))
            same = digest(work, "fresh") == digest(work, "forked")
        finally:
            warm.stop(socket)
    figures: dict[str, object] = {"repeats": args.repeats, "same_bits": same}
    for name, by in times.items():
        fresh, forked = statistics.median(by["fresh"]), statistics.median(by["forked"])
        figures.update({f"{name}_fresh_s": round(fresh, 2), f"{name}_forked_s": round(forked, 2),
                        f"{name}_saved_s": round(fresh - forked, 2),
                        f"{name}_fresh_over_forked": round(fresh / forked, 2)})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
