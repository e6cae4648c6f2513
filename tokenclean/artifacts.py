"""On-disk artifacts: atomic writes, JSON sidecars, fingerprints, and the flat ragged token table.

Every artifact is written to a temporary name in the same directory and renamed when complete, so an
interrupted step never leaves something a later step could mistake for finished output. Each array artifact
has a JSON sidecar (``X.loss.npy`` -> ``X.loss.json``) recording what made it; combining artifacts whose
fingerprints disagree is an error (:func:`require_same`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tokenclean import __version__


class ArtifactError(RuntimeError):
    """An artifact is missing, malformed, or does not belong with the others it is combined with."""


# ---------------------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(path: Path) -> None:
    """Delete what an earlier, killed write of ``path`` left beside it (``.<name>.<8 random chars>.tmp*``).

    Only this exact target's temporaries match (a name is never a prefix of another's pattern), and snakemake
    never runs two jobs for one output, so nothing in progress is removed.
    """
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    for stale in path.parent.iterdir():
        if pattern.match(stale.name):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


# ---------------------------------------------------------------------------------------------------------
# fingerprints and sidecars
# ---------------------------------------------------------------------------------------------------------
def fingerprint_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return h.hexdigest()[:16]


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    return fingerprint_bytes(*(np.ascontiguousarray(a).tobytes() + str(a.dtype).encode() for a in arrays))


def sha256_file(path: str | os.PathLike) -> str:
    """The full sha256 of a file (hex), as ``sha256sum`` prints it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_file(path: str | os.PathLike) -> str:
    return sha256_file(path)[:16]


def sidecar_path(path: str | os.PathLike) -> Path:
    """``a/b.loss.npy`` -> ``a/b.loss.json``; ``a/b.tokens.npz`` -> ``a/b.tokens.json``."""
    path = Path(path)
    return path.with_suffix(".json")


def write_sidecar(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    write_json(sidecar_path(path), {"tokenclean_version": __version__, **meta})


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.exists():
        raise ArtifactError(f"{side}: metadata sidecar of {path} is missing; re-create {path} with tokenclean")
    return read_json(side)


def require_same(key: str, *named: tuple[str | os.PathLike, dict[str, Any]]) -> None:
    """Fail unless every (path, meta) pair records the same value for ``key``."""
    values = {str(p): m.get(key) for p, m in named}
    if len(set(map(str, values.values()))) > 1 or None in values.values():
        detail = ", ".join(f"{p}: {v}" for p, v in values.items())
        raise ArtifactError(f"artifacts disagree on {key} ({detail}); they were not made from the same data")


# ---------------------------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------------------------
def save_array(path: str | os.PathLike, array: np.ndarray, meta: dict[str, Any]) -> None:
    """Save a per-token array as ``.npy`` with a sidecar; the sidecar is written first, the array last.

    The sidecar records the array's own fingerprint, so a sidecar left by a later, interrupted write never
    passes for the description of an older array (:func:`load_array` checks it).
    """
    if array.dtype == object:
        raise ArtifactError(f"{path}: refusing to save an object array (it could only be read back through pickle)")
    write_sidecar(path, {**meta, "dtype": str(array.dtype), "shape": list(array.shape),
                         "fingerprint": fingerprint_arrays(array)})
    with atomic_file(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def load_array(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: file not found")
    meta = read_sidecar(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path}: not a plain numpy array ({e})") from None
    if "fingerprint" in meta and meta["fingerprint"] != fingerprint_arrays(array):
        raise ArtifactError(f"{path}: contents do not match the fingerprint in {sidecar_path(path)}; "
                            "re-create it with tokenclean")
    return array, meta


# ---------------------------------------------------------------------------------------------------------
# token table
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TokenTable:
    """Flat ragged token table: sample i is ``input_ids[offsets[i]:offsets[i+1]]``.

    ``loss_mask`` is True where full-token SFT trains (response tokens and their end-of-turn token).
    ``extras`` holds further per-token (length N) or per-sample (length S) arrays, e.g. ``sample_index``
    (the source line of each sample) and ``token_class`` (ground truth in the synthetic world).
    """

    input_ids: np.ndarray
    offsets: np.ndarray
    loss_mask: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.loss_mask = np.asarray(self.loss_mask, dtype=bool)
        n = len(self.input_ids)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != n:
            raise ArtifactError("offsets must start at 0 and end at the number of tokens")
        if np.any(np.diff(self.offsets) <= 0):  # an empty sample would break per-sample sums (np.add.reduceat)
            raise ArtifactError("offsets must be increasing: every sample holds at least one token")
        if self.loss_mask.shape != (n,):
            raise ArtifactError("loss_mask must have one entry per token")
        if n and np.any(self.loss_mask[self.offsets[:-1][np.diff(self.offsets) > 0]]):
            raise ArtifactError("position 0 of a sample can never be in loss_mask")

    @property
    def n_samples(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample_ids(self) -> np.ndarray:
        """Per-token sample number (int64[N])."""
        return np.repeat(np.arange(self.n_samples, dtype=np.int64), self.lengths)

    def fingerprint(self) -> str:
        return fingerprint_arrays(self.input_ids, self.offsets, self.loss_mask)

    @classmethod
    def concat(cls, tables: list["TokenTable"]) -> "TokenTable":
        """Samples of ``tables`` back to back; extras kept where every table has them (per-token or per-sample)."""
        if not tables:
            raise ValueError("nothing to concatenate")
        starts = np.cumsum([0] + [t.n_tokens for t in tables])
        offsets = np.concatenate([[0]] + [t.offsets[1:] + s for t, s in zip(tables, starts)])
        extras = {}
        for key in sorted(set.intersection(*(set(t.extras) for t in tables))):  # sorted: set order varies by run
            kinds = {len(t.extras[key]) == t.n_tokens for t in tables}
            if len(kinds) == 1:
                extras[key] = np.concatenate([t.extras[key] for t in tables])
        extras["source"] = np.concatenate([np.full(t.n_samples, i, dtype=np.int64) for i, t in enumerate(tables)])
        return cls(np.concatenate([t.input_ids for t in tables]), offsets,
                   np.concatenate([t.loss_mask for t in tables]), extras)

    def take(self, samples: np.ndarray) -> "TokenTable":
        """The given samples, in the given order; per-token and per-sample extras follow them."""
        samples = np.asarray(samples, dtype=np.int64)
        lengths = self.lengths[samples]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = (np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in samples])
                  if len(samples) else np.zeros(0, dtype=np.int64))
        extras = {}
        for key, values in self.extras.items():
            if len(values) == self.n_tokens:
                extras[key] = values[tokens]
            elif len(values) == self.n_samples:
                extras[key] = values[samples]
        return TokenTable(self.input_ids[tokens], offsets, self.loss_mask[tokens], extras)

    def save(self, path: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Any]:
        meta = {
            **meta,
            "fingerprint": self.fingerprint(),
            "n_samples": self.n_samples,
            "n_tokens": self.n_tokens,
            "n_response_tokens": int(self.loss_mask.sum()),
        }
        write_sidecar(path, meta)
        with atomic_file(path, suffix=".npz") as tmp:
            # members in a fixed order (numpy fixes their zip timestamps), so equal tables give equal bytes
            np.savez(tmp, input_ids=self.input_ids, offsets=self.offsets, loss_mask=self.loss_mask,
                     **{k: self.extras[k] for k in sorted(self.extras)})
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["TokenTable", dict[str, Any]]:
        path = Path(path)
        if not path.exists():
            raise ArtifactError(f"{path}: token table not found")
        meta = read_sidecar(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise ArtifactError(f"{path}: not a token table ({e})") from None
        for key in ("input_ids", "offsets", "loss_mask"):
            if key not in arrays:
                raise ArtifactError(f"{path}: member '{key}' is missing")
        table = cls(arrays.pop("input_ids"), arrays.pop("offsets"), arrays.pop("loss_mask"), arrays)
        if meta.get("fingerprint") != table.fingerprint():
            raise ArtifactError(f"{path}: contents do not match the fingerprint in {sidecar_path(path)}")
        return table, meta
