"""Every method of the table in one place: what it is, what it needs, and how its runs are named.

A method is one of four kinds:

- ``mask``: an offline mask over the pool, made once by ``tokenclean select`` before training, from the base
  and reference losses, the ground truth or chance (full, random, rho, fixed, the ground-truth rows);
- ``online``: per-token weights computed by the trainer from the model being trained (rho1, sstoken, dft,
  eaft; :mod:`tokenclean.online`), which records what it kept as ``weights.npy`` in the model directory;
- ``data``: every response token of other training data (full+warmup: the pool and the warm-up set);
- ``chain``: rounds over chunks of the pool, each scored by the previous round's model (self_evolving).

What a method may need, besides the pool: ``base_loss`` and ``ref_loss`` (the base and warm-up models' losses on
the pool), ``token_classes`` (the ground truth, embedded world only).

Run names: ``<method>[_r<ratio>]_s<seed>`` (the ratio only for a method that takes one); a chain's rounds
``<run>_t<t>``; masks ``<method>[_r<ratio>][_s<seed>]`` (the seed only where the mask depends on it). These
functions are the only place that builds or reads them: the workflow, the report and the significance use them.

A method of your own is one :func:`register` call in a Python file that the config lists under ``plugins``
(docs/add-a-method.md); the workflow and every ``tokenclean`` command load those files
(``TOKENCLEAN_PLUGINS``).
"""
from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("mask", "online", "data", "chain")
NEEDS = ("base_loss", "ref_loss", "token_classes")
PLUGINS_ENV = "TOKENCLEAN_PLUGINS"
NAME = re.compile(r"^[a-z][a-z0-9+]*(?:_(?![rst][0-9])[a-z0-9+]+)*$")
RUN = re.compile(r"^(?P<method>[a-z][a-z0-9_+]*?)(?:_r(?P<ratio>[0-9.]+))?(?:_s(?P<seed>[0-9]+))?$")
ROUND = re.compile(r"^(?P<row>.+)_t(?P<round>[0-9]+)$")  # round t of a chain's run: <run>_t<t>


@dataclass(frozen=True)
class Selection:
    """What a mask rule reads: the pool's token table, the run's ratio and seed, and what the method needs."""

    table: Any                              # tokenclean.artifacts.TokenTable
    ratio: float = 1.0
    seed: int = 0
    score: np.ndarray | None = None         # loss(base) - loss(reference), NaN outside loss_mask
    token_class: np.ndarray | None = None   # ground-truth class index per token (TokenTable.token_classes)


@dataclass(frozen=True)
class Method:
    """One row kind of the table. ``rule`` (kind mask) returns a subset of the table's ``loss_mask``."""

    name: str
    kind: str
    summary: str
    takes_ratio: bool = False
    seeded: bool = False                    # the mask depends on the run's seed
    needs: tuple[str, ...] = ()
    rule: Callable[[Selection], np.ndarray] | None = None
    online: str | None = None               # the tokenclean.online method the trainer applies (kind online)

    @property
    def ground_truth(self) -> bool:
        """Reads the ground-truth token classes: a reference row of the embedded world, never a method."""
        return "token_classes" in self.needs


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (built-in or a plug-in's); a name may be registered once."""
    if not NAME.match(method.name):
        raise ValueError(f"method name {method.name!r}: lower-case letters, digits, '+' and '_' (not '_r<digit>', "
                         "'_s<digit>' or '_t<digit>', which run names use)")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    if method.kind not in KINDS:
        raise ValueError(f"method {method.name!r}: kind {method.kind!r} is not one of {', '.join(KINDS)}")
    unknown = sorted(set(method.needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"method {method.name!r} needs {', '.join(unknown)}; known inputs: {', '.join(NEEDS)}")
    if (method.kind == "mask") != (method.rule is not None):
        raise ValueError(f"method {method.name!r}: a mask method has a rule, no other kind has one")
    if (method.kind == "online") != (method.online is not None):
        raise ValueError(f"method {method.name!r}: an online method names its tokenclean.online weighting")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    load_plugins()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)}; a method of your own: list its "
                         "file under `plugins` in the config)")
    return METHODS[name]


_loaded: set[str] = set()


def load_plugins(paths: list[str] | None = None) -> None:
    """Run each plug-in file once (its :func:`register` calls); by default the files ``TOKENCLEAN_PLUGINS`` lists."""
    if paths is None:
        paths = [p for p in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if p]
    for path in paths:
        resolved = str(Path(path).resolve())
        if resolved in _loaded:
            continue
        if not Path(resolved).is_file():
            raise FileNotFoundError(f"{path}: method plug-in not found (config key plugins)")
        spec = importlib.util.spec_from_file_location(f"tokenclean_plugin_{len(_loaded)}", resolved)
        module = importlib.util.module_from_spec(spec)
        _loaded.add(resolved)
        spec.loader.exec_module(module)


# ---------------------------------------------------------------------------------------------------------
# run names
# ---------------------------------------------------------------------------------------------------------
def ratio_tag(ratio: float | str) -> str:
    """A keep ratio as it appears in run and mask names (``fixed_r0.6``): short, and read back by the rules."""
    return f"{float(ratio):g}"


def run_name(method: str, ratio: float | str | None, seed: int) -> str:
    m = get(method)
    return f"{method}_r{ratio_tag(ratio)}_s{seed}" if m.takes_ratio else f"{method}_s{seed}"


def parse_run(name: str) -> tuple[str, str | None, int | None]:
    """(method, ratio tag or None, seed or None) of a run, a model or an evaluation file's name (``base``,
    ``warmup``, ``rho_r0.6_s1``); the inverse of :func:`run_name`."""
    m = RUN.match(Path(name).name.removesuffix(".json"))
    if not m:
        raise ValueError(f"{name}: not a run name (<method>[_r<ratio>][_s<seed>])")
    return m["method"], m["ratio"], int(m["seed"]) if m["seed"] else None


def round_name(run: str, t: int) -> str:
    """Round ``t`` of a chain's run (its model directory and evaluation under ``rounds/``)."""
    return f"{run}_t{int(t)}"


def mask_name(method: str, ratio: float | str | None, seed: int) -> str:
    """A mask method's mask for a run: shared by the seeds unless it depends on them (random)."""
    m = get(method)
    name = f"{method}_r{ratio_tag(ratio)}" if m.takes_ratio else method
    return f"{name}_s{seed}" if m.seeded else name


def parse_mask(name: str) -> tuple[str, str | None, int]:
    """(method, ratio tag or None, seed; 0 where the mask does not depend on one) of a mask's name."""
    method, ratio, seed = parse_run(name)
    return method, ratio, seed or 0


def runs(methods: list[str], ratios: list[float], seeds: list[int]) -> list[str]:
    """The table's runs, method by method, in the config's order."""
    return [run_name(m, r, s) for m in methods for s in seeds
            for r in (ratios if get(m).takes_ratio else [None])]


# ---------------------------------------------------------------------------------------------------------
# the built-in methods
# ---------------------------------------------------------------------------------------------------------
def _builtins() -> None:
    from tokenclean import selection as sel
    from tokenclean.data import TRUTH_METHODS

    def scored(s: Selection, name: str) -> np.ndarray:
        if s.score is None:
            raise ValueError(f"method {name!r} needs --base-loss and --ref-loss")
        return s.score

    register(Method("full", "mask", "every response token (full-token SFT)",
                    rule=lambda s: sel.select_full(s.table.loss_mask)))
    register(Method("random", "mask", "a uniform random fraction of the response tokens", takes_ratio=True,
                    seeded=True, rule=lambda s: sel.select_random(s.table.loss_mask, s.ratio, s.seed)))
    register(Method("rho", "mask", "the top fraction of each sample by loss(base) - loss(reference) (RHO)",
                    takes_ratio=True, needs=("base_loss", "ref_loss"),
                    rule=lambda s: sel.select_rho(scored(s, "rho"), s.table.loss_mask, s.table.offsets, s.ratio)))
    register(Method("fixed", "mask", "the global top fraction of the pool by loss(base) - loss(reference) "
                    "(Fixed-Model Cleaning)", takes_ratio=True, needs=("base_loss", "ref_loss"),
                    rule=lambda s: sel.select_fixed(scored(s, "fixed"), s.table.loss_mask, s.ratio)))
    summaries = {"truth_drop_noisy": "every response token but the corrupted and garbage ones (ground truth)",
                 "truth_keep_informative": "the informative and novel response tokens only (ground truth)"}
    for name in TRUTH_METHODS:
        register(Method(name, "mask", summaries[name], needs=("token_classes",),
                        rule=lambda s, name=name: sel.select_truth(name, s.table.loss_mask, s.token_class)))
    register(Method("full+warmup", "data", "every response token of the pool and the warm-up set"))
    register(Method("self_evolving", "chain", "rounds over chunks of the pool, each scored by the previous "
                    "round's model (Self-Evolving Cleaning)", takes_ratio=True))
    register(Method("rho1", "online", "per micro-batch, the top fraction by loss(current) - loss(reference) "
                    "(Rho-1 / SLM)", takes_ratio=True, needs=("ref_loss",), online="rho1"))
    register(Method("sstoken", "online", "per sample, the top fraction by a mix of loss(base) - loss(current) and "
                    "attention to the prompt (ssToken)", takes_ratio=True, needs=("base_loss",), online="sstoken"))
    register(Method("dft", "online", "every token weighted by its probability (DFT)", online="dft"))
    register(Method("eaft", "online", "every token weighted by its normalised predictive entropy (EAFT)",
                    online="eaft"))


_builtins()
