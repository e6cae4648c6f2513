"""The cost of the pinned CPU kernels: `tokenclean pretrain` at TOKENCLEAN_CPU_KERNELS=avx2 beside native.

Each run is a fresh process (the kernels are chosen once per process), pinned and native in turn (the machine is
shared: the figure to quote is the median ratio of runs taken side by side). The model and corpus are the tiny
base of docs/numerics.md (hidden 64, 2 layers, a 2,000-document world corpus, batch 16, packed rows of 64).
Figures: the training loop's seconds (the run's own `seconds`), the whole process's wall seconds, the ratios
pinned/native, and whether the two levels gave the same weights (on an AVX-512 machine they do not; on an
AVX2-only one they may). Ends with one JSON line.

    python benchmarks/numerics.py --steps 200 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenclean import numerics
from tokenclean.world import generate_world

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "vocab_size": 256, "max_length": 64}


def pretrain(corpus: Path, out: Path, level: str, steps: int, threads: int) -> tuple[float, float, str]:
    """One `tokenclean pretrain` at ``level`` in a fresh process: (loop seconds, wall seconds, weights sha256)."""
    env = {k: v for k, v in os.environ.items() if k not in numerics.LEVELS["avx2"]}
    env.update({numerics.ENV: level, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])})
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tokenclean.cli", "pretrain", "--threads", str(threads), "--corpus",
                    str(corpus), "--model-params", json.dumps(MODEL), "--steps", str(steps), "--batch-size", "16",
                    "--pack-length", "64", "--lr", "0.002", "--seed", "0", "--out", str(out)],
                   env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    seconds = json.loads((out / "tokenclean.json").read_text())["seconds"]
    return seconds, wall, numerics.weights_sha256(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    runs: dict[str, list[tuple[float, float, str]]] = {"avx2": [], "native": []}
    with tempfile.TemporaryDirectory() as work:
        generate_world({"pretrain_docs": 2000, "warmup_samples": 10, "pool_samples": 10, "eval_samples": 5},
                       Path(work) / "world")
        corpus = Path(work) / "world" / "corpus.jsonl"
        for r in range(a.repeats):
            for level in ("avx2", "native") if r % 2 == 0 else ("native", "avx2"):
                runs[level].append(pretrain(corpus, Path(work) / f"{level}-{r}", level, a.steps, a.threads))
    for level, done in runs.items():
        print(f"{level:6} loop s: " + ", ".join(f"{s:.2f}" for s, _, _ in done)
              + "  wall s: " + ", ".join(f"{w:.2f}" for _, w, _ in done) + f"  weights {done[0][2][:12]}")
    pinned, native = runs["avx2"], runs["native"]
    figures = {
        "steps": a.steps, "threads": a.threads, "repeats": a.repeats,
        "pinned_loop_s": round(statistics.median(s for s, _, _ in pinned), 3),
        "native_loop_s": round(statistics.median(s for s, _, _ in native), 3),
        "pinned_over_native_loop": round(statistics.median(p[0] / n[0] for p, n in zip(pinned, native)), 3),
        "pinned_over_native_wall": round(statistics.median(p[1] / n[1] for p, n in zip(pinned, native)), 3),
        "same_bits": pinned[0][2] == native[0][2],
        "repeatable": len({h for _, _, h in pinned}) == 1 and len({h for _, _, h in native}) == 1,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
