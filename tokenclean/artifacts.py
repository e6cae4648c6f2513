"""On-disk artifacts: atomic writes, JSON sidecars, fingerprints, and the flat ragged token table.

Every artifact is written to a temporary name in the same directory and renamed when complete, so an
interrupted step never leaves something a later step could mistake for finished output. Each array artifact
has a JSON sidecar (``X.loss.npy`` -> ``X.loss.json``) recording what made it (its ``kind`` and fingerprints);
every reader of a per-token array goes through :func:`load_array`, which refuses an array of another kind or one
made on another token table. Errors about an input or output name the file in their first words (``<file>:
<what>``), so the command line can print them as its one-line error.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenclean import __version__
from tokenclean.data import TOKEN_CLASSES


class ArtifactError(RuntimeError):
    """An artifact is missing, malformed, or does not belong with the others it is combined with."""


# ---------------------------------------------------------------------------------------------------------
# write faults: the one place where a machine's refusal to store an output becomes a one-line error
# ---------------------------------------------------------------------------------------------------------
REMEDY_ELSEWHERE = "or write to another file system (another results_dir)"
# errno -> (the cause in words, what to do); the faults of the machine, not of the command's input
WRITE_FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", f"free space there {REMEDY_ELSEWHERE}"),
    errno.EDQUOT: ("disk quota exceeded", f"free space within your quota {REMEDY_ELSEWHERE}"),
    errno.EFBIG: ("the file grew beyond the size this file system or the process limit (ulimit -f) allows",
                  f"raise the limit {REMEDY_ELSEWHERE}"),
    errno.EROFS: ("the file system is read-only", f"remount it read-write {REMEDY_ELSEWHERE}"),
    errno.EACCES: ("permission denied", f"grant write permission there {REMEDY_ELSEWHERE}"),
    errno.EPERM: ("operation not permitted", f"grant write permission there {REMEDY_ELSEWHERE}"),
    errno.EIO: ("input/output error (the device failed)", f"check the disk (dmesg) {REMEDY_ELSEWHERE}"),
}
# faults that only a write gives: whatever file an error of these names, it was being written
ONLY_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_ERRNO_IN_TEXT = re.compile(r"(?:os error|\[errno|errno[:= ]) *(\d+)", re.IGNORECASE)
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


class WriteError(ArtifactError):
    """An output could not be stored (full disk, quota, read-only file system, permission, I/O error).

    ``path``: the output (never a temporary); ``code``: the errno, None for a short write whose cause the
    writer did not say."""

    def __init__(self, path: str | os.PathLike, code: int | None, cause: str, remedy: str) -> None:
        self.path, self.code, self.cause, self.remedy = Path(path), code, cause, remedy
        name = f" ({errno.errorcode.get(code, code)})" if code is not None else ""
        super().__init__(f"{path}: cannot be written: {cause}{name}; {remedy}")

    def at(self, path: str | os.PathLike) -> WriteError:
        return WriteError(path, self.code, self.cause, self.remedy)


def _free_bytes(path: Path) -> int | None:
    for directory in (path, *path.parents):
        with contextlib.suppress(OSError):
            st = os.statvfs(directory)
            return st.f_bavail * st.f_frsize
    return None


def write_fault(error: BaseException, path: str | os.PathLike) -> WriteError | None:
    """``error``, raised while writing ``path``, as a :class:`WriteError` naming ``path``; None when it is no
    fault of the machine (a bug, bad input: left as it is).

    Writers say the same fault in several ways: an OSError with its errno; safetensors and tokenizers an
    exception whose text holds ``os error 28``; numpy's ``N requested and M written`` (a short write, no errno):
    the disk's free space then tells a full disk from another failure."""
    path = Path(path)
    code = error.errno if isinstance(error, OSError) and isinstance(error.errno, int) else None
    text = str(error)
    if code is None and not isinstance(error, (ArtifactError, KeyError)):
        found = _ERRNO_IN_TEXT.search(text)
        code = int(found[1]) if found else next((c for c in WRITE_FAULTS if os.strerror(c) in text), None)
    if code in WRITE_FAULTS:
        cause, remedy = WRITE_FAULTS[code]
        return WriteError(path, code, cause, remedy)
    short = _SHORT_WRITE.search(text) if isinstance(error, OSError) else None
    if short:
        free = _free_bytes(path.parent)
        if free is not None and free < int(short[1]):
            return WriteError(path, errno.ENOSPC, *WRITE_FAULTS[errno.ENOSPC])
        return WriteError(path, None, f"the write was cut short ({short[2]} of {short[1]} bytes stored): the disk "
                          "or your quota is full, or the device failed", WRITE_FAULTS[errno.ENOSPC][1])
    return None


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _named_output(error: BaseException, targets: list[Path], temporaries: dict[Path, Path]) -> Path | None:
    """The output an error of a write block is about: the target of the temporary it names (a file inside a
    temporary directory: that file inside the target), the file it names itself, or None (it names none)."""
    names = [error.path] if isinstance(error, WriteError) else [
        getattr(error, "filename2", None), getattr(error, "filename", None)]
    for given in names:
        if given is None or not isinstance(given, (str, os.PathLike)):
            continue
        name = Path(os.path.abspath(given))
        for tmp, target in temporaries.items():
            if _inside(name, tmp):
                return target / name.relative_to(tmp) if name != tmp else target
        for target in targets:  # a temporary not yet handed out (its creation failed), or a backup
            if name.parent == Path(os.path.abspath(target)).parent and _temporary_name(target).match(name.name):
                return target
        return Path(given)
    return None


@contextlib.contextmanager
def writing(*targets: str | os.PathLike, temporaries: dict[Path, Path] | None = None) -> Iterator[None]:
    """Turn a fault of the machine inside the block (which writes ``targets``) into one :class:`WriteError`
    naming the output: the one place where every writer's failures (ours, safetensors, numpy, tokenizers,
    transformers, matplotlib, datasets) get a cause in words and a remedy. ``temporaries``: temporary path ->
    its target, so an error never names a hidden temporary. A permission or I/O error naming a file that is
    no output and no temporary (an input read inside the block) is left as it is."""
    temporaries = {Path(os.path.abspath(k)): Path(v) for k, v in (temporaries or {}).items()}
    try:
        yield
    except Exception as e:
        named = _named_output(e, [Path(t) for t in targets], temporaries)
        if isinstance(e, WriteError):
            if named is not None and os.path.abspath(named) != os.path.abspath(e.path):
                raise e.at(named) from e.__cause__
            raise
        if named is not None and isinstance(e, OSError) and e.errno not in ONLY_WRITES and not any(
                _inside(Path(os.path.abspath(named)), Path(os.path.abspath(t))) for t in targets):
            raise  # an input's permission or I/O error: the reader's message says it
        fault = write_fault(e, named or Path(targets[-1]))
        if fault is None:
            raise
        raise fault from e


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
    pattern = _temporary_name(path)
    for stale in path.parent.iterdir():
        if pattern.match(stale.name):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _temporary_name(path: Path) -> re.Pattern[str]:
    """The names of ``path``'s temporaries (and of the backups of its previous output): ``.<name>.<8>.tmp*``."""
    return re.compile(rf"^\.{re.escape(Path(path).name)}\.[a-z0-9_]{{8}}\.tmp")


def require_file(path: str | os.PathLike) -> Path:
    """``path`` as a readable regular file, or an :class:`ArtifactError` saying in one line why it is not."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path}: is a directory, expected a file")
    if not path.exists():
        raise ArtifactError(f"{path}: file not found")
    if not os.access(path, os.R_OK):
        raise ArtifactError(f"{path}: cannot be read (permission denied)")
    return path


# Which workflow rule makes each file that a later rule reads back (rules/*.smk; tests/test_integrity.py checks this
# list against the workflow's plan), and so what re-creates a damaged one. Searched in order; group ``out`` plus the
# third entry is the rule's declared output, what to delete: a model directory for the files inside it, the array
# for its sidecar.
_MADE_BY = [(re.compile(pattern), rule, suffix) for pattern, rule, suffix in (
    (r"(?:^|/)(?P<out>tokens/pool\+warmup\.tokens)\.(?:npz|json)$", "concat_tokens", ".npz"),
    (r"(?:^|/)(?P<out>tokens/[^/]+\.c\d+of\d+\.tokens)\.(?:npz|json)$", "chunk_tokens", ".npz"),
    (r"(?:^|/)(?P<out>tokens/[^/]+\.tokens)\.(?:npz|json)$", "tokenize", ".npz"),
    (r"(?:^|/)(?P<out>losses/rounds/[^/]+/[^/]+\.loss)\.(?:npy|json)$", "token_loss", ".npy"),
    (r"(?:^|/)(?P<out>losses/[^/]+/[^/]+\.c\d+of\d+\.loss)\.(?:npy|json)$", "chunk_loss", ".npy"),
    (r"(?:^|/)(?P<out>losses/[^/]+/[^/]+\.loss)\.(?:npy|json)$", "token_loss", ".npy"),
    (r"(?:^|/)(?P<out>masks/rounds/[^/]+\.mask)\.(?:npy|json)$", "select_round", ".npy"),
    (r"(?:^|/)(?P<out>masks/[^/]+\.mask)\.(?:npy|json)$", "select", ".npy"),
    (r"(?:^|/)(?P<out>eval/(?:rounds/)?[^/]+\.(?:json|samples\.jsonl))$", "evaluate", ""),
    (r"(?:^|/)(?P<out>models/base)(?:/[^/]+)?$", "pretrain_base", ""),
    (r"(?:^|/)(?P<out>models/warmup)(?:/[^/]+)?$", "warmup", ""),
    (r"(?:^|/)(?P<out>models/sft/[^/]+)(?:/[^/]+)?$", "sft", ""),
    (r"(?:^|/)(?P<out>models/rounds/[^/]+)(?:/[^/]+)?$", "self_evolve", ""),
    (r"(?:^|/)(?P<out>table(?:_[a-z0-9_]+)?\.csv)$", "report", ""),
    (r"(?:^|/)(?P<out>significance\.csv)$", "significance", ""),
    (r"(?:^|/)(?P<out>cleaning_quality\.csv)$", "cleaning_quality", ""),
    (r"(?:^|/)(?P<out>score_separation\.csv)$", "score_separation", ""),
    (r"(?:^|/)(?P<out>rounds\.csv)$", "rounds_report", ""),
    (r"(?:^|/)(?P<out>provenance\.json)$", "provenance", ""),
    (r"(?:^|/)(?P<out>world)(?:/(?:world\.json|[a-z_]+\.jsonl|eval/.+|tasks/.+))?$", "world", ""),
    (r"(?:^|/)(?P<out>data)(?:/(?:data\.json|pool\.jsonl|warmup\.jsonl))?$", "data", ""),
)]


def made_by(path: str | os.PathLike) -> tuple[str, Path] | None:
    """The workflow rule that makes ``path`` and the output of that rule to delete so that it runs again (the model
    directory of a file inside one, the array of a sidecar), or None for a file outside the workflow's layout."""
    text = Path(path).as_posix()
    for pattern, rule, suffix in _MADE_BY:
        found = pattern.search(text)
        if found:
            return rule, Path(text[: found.end("out")] + suffix)
    return None


def remedy(path: str | os.PathLike) -> str:
    """What re-creates ``path``: the workflow rule that makes it (delete its output, or ``--forcerun`` the rule)."""
    made = made_by(path)
    if made is None:
        return "re-create it with the tokenclean command that made it"
    rule, out = made
    return f"re-create it: delete {out} and run snakemake again, or run snakemake with --forcerun {rule}"


def damaged(path: str | os.PathLike, what: str) -> ArtifactError:
    """The one-line error for a file whose bytes are not those written (cut short, emptied, bit-flipped: its
    recorded checksum says so), naming it, what is wrong and what re-creates it."""
    return ArtifactError(f"{path}: damaged ({what}); {remedy(path)}")


def require_writable(path: str | os.PathLike, directory: bool = False) -> None:
    """Fail before any work when ``path`` could not be written as a file (``directory``: as a directory).

    Checked up front because the writers run last: an unwritable output found after hours of scoring or
    training would waste the run.
    """
    path = Path(path)
    if path.is_dir() and not directory:
        raise ArtifactError(f"{path}: is a directory, expected a file path to write")
    if path.exists() and not path.is_dir() and directory:
        raise ArtifactError(f"{path}: exists and is not a directory, expected a directory to write")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # atomic_file creates the missing ones
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"{path}: cannot be written: {parent} is not a directory")
    if read_only(parent):
        raise WriteError(path, errno.EROFS, *WRITE_FAULTS[errno.EROFS])
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"{path}: cannot be written: no permission to write in {parent}; grant write "
                            f"permission there {REMEDY_ELSEWHERE}")


def read_only(directory: Path) -> bool:
    """Whether ``directory`` lies on a file system mounted read-only (``os.access`` only says "no")."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _temporary_beside(path: Path, suffix: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the usual permissions
    os.close(fd)
    return Path(tmp)


def _backup(path: Path) -> Path | None:
    """A hard link to the output already at ``path`` (None if there is none), so a failed replacement can put
    it back: the previous output stays untouched until the whole new set is in place."""
    if not path.is_file() or path.is_symlink():
        return None
    backup = Path(tempfile.mktemp(prefix=f".{path.name}.", suffix=".tmp.old", dir=path.parent))
    os.link(path, backup)
    return backup


def _put_in_place(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each temporary onto its target, in order; if one fails, every target gets its previous
    content back (or is removed, where there was none) before the error goes on."""
    backups: dict[Path, Path | None] = {}
    renamed: list[Path] = []
    try:
        for _, path in pairs:
            backups[path] = _backup(path)
        for tmp, path in pairs:
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException:
        for path in renamed:
            with contextlib.suppress(OSError):
                if backups[path] is not None:
                    os.replace(backups.pop(path), path)
                else:
                    path.unlink()
        raise
    finally:
        for backup in backups.values():
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()


def _discard(temporary: Path) -> None:
    """Remove a temporary, whatever is left of it; on a file system that failed, as much as it allows."""
    with contextlib.suppress(OSError):
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists() or temporary.is_symlink():
            temporary.unlink()


@contextlib.contextmanager
def atomic_files(*targets: str | os.PathLike | tuple[str | os.PathLike, str]) -> Iterator[list[Path]]:
    """Yield one temporary path beside each target (a path, or ``(path, suffix)``); when the block succeeds,
    rename them onto their targets in the order given, so the last target is the commit point.

    Nothing is renamed until every file is complete, so a failure or a kill inside the block leaves only hidden
    temporaries (cleared by the next write of the same targets). If a rename fails, the targets already renamed
    get their previous content back: a set of outputs appears whole or not at all, and a failed write leaves
    the previous set as it was. Only a kill between two renames (a few microseconds after all the data is
    written) can leave the earlier targets without the last one; writers put the file a later step names (an
    array, a table) last, so that it never appears without the others. A fault of the machine (full disk,
    quota, read-only file system, ...) ends in one :class:`WriteError` naming the target (:func:`writing`).
    """
    paths = [Path(t[0]) if isinstance(t, tuple) else Path(t) for t in targets]
    suffixes = [t[1] if isinstance(t, tuple) else "" for t in targets]
    temporaries: list[Path] = []
    try:
        with writing(*paths):
            for path, suffix in zip(paths, suffixes):
                temporaries.append(_temporary_beside(path, suffix))
        with writing(*paths, temporaries=dict(zip(temporaries, paths))):
            yield temporaries
            _put_in_place(list(zip(temporaries, paths)))
    finally:
        for tmp in temporaries:
            _discard(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    with atomic_files((path, suffix)) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; it replaces ``path`` only if the block succeeds.

    The previous directory is renamed aside first and only removed once the new one is in place; if that
    fails, it is renamed back. Faults of the machine end in one :class:`WriteError` (:func:`writing`)."""
    path = Path(path)
    tmp: Path | None = None
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(path)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        with writing(path, temporaries={tmp: path}):
            yield tmp
            if (path.exists() or path.is_symlink()) and not (path.is_dir() and not path.is_symlink()):
                raise ArtifactError(f"{path}: exists and is not a directory, expected a directory to write")
            _replace_dir(tmp, path)
    finally:
        if tmp is not None:
            _discard(tmp)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put directory ``tmp`` at ``path``, the previous one aside until then and back if that fails."""
    old = None
    if path.is_dir():
        old = Path(tempfile.mktemp(prefix=f".{path.name}.", suffix=".tmp.old", dir=path.parent))
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Errors raised while interpreting the contents of ``path`` are that file's fault: name it.

    This is the boundary between bad input and bugs: a KeyError, TypeError, ... inside ``with reading(path)``
    means the file lacks a field or holds a value of the wrong type and becomes a one-line error; the same
    errors anywhere else are programming errors and keep their traceback.
    """
    try:
        yield
    except (ArtifactError, KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, ArtifactError) or (isinstance(e, ValueError) and str(path) in str(e)):
            raise  # already names a file
        if isinstance(e, KeyError):
            raise ArtifactError(f"{path}: field {e} missing") from None
        raise ArtifactError(f"{path}: unexpected content ({type(e).__name__}: {e})") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_texts(files: dict[str | os.PathLike, str]) -> None:
    """Write several text outputs of one step, all or none (:func:`atomic_files`; the last one is renamed last)."""
    with atomic_files(*files) as temporaries:
        for tmp, text in zip(temporaries, files.values()):
            tmp.write_text(text, encoding="utf-8")


def csv_text(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """The project's one CSV dialect: a header of ``columns`` (default: the first row's keys), ``\\n`` line ends,
    floats with four decimals, a blank where a row lacks a column. Every CSV tokenclean writes goes through here,
    so they all read back alike (:func:`read_csv_rows`)."""
    columns = list(rows[0]) if columns is None else columns
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.4f}" if isinstance(row.get(k), float) else row.get(k, "")) for k in columns})
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Write ``rows`` atomically as :func:`csv_text` (several outputs of one step: :func:`write_texts`)."""
    write_texts({path: csv_text(rows, columns)})


def read_json(path: str | os.PathLike, written: bool = False) -> Any:
    """A JSON file's value. One that tokenclean wrote (``written``, or a workflow output: :func:`made_by`) and that no
    longer parses is damaged (tokenclean writes files whole), and the error says what re-creates it."""
    path = require_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        what = (f"invalid UTF-8 at byte {e.start}" if isinstance(e, UnicodeDecodeError)
                else f"invalid JSON at line {e.lineno} ({e.msg})")
        if written or made_by(path):
            raise damaged(path, "empty" if not path.stat().st_size else what) from None
        if isinstance(e, UnicodeDecodeError):
            raise ArtifactError(f"{path}: invalid UTF-8 at byte {e.start}") from None
        raise ArtifactError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


# The number columns of tokenclean's CSVs (per-task means and stds, counts, differences, kept fractions, score
# statistics); other columns hold words (method, mask, task, ...) or are not ours and not read. The measures that
# may not apply (a class the pool lacks) hold "nan" there.
NUMBER_COLUMN = re.compile(r"^(ratio|round|passes|diff|ci_low|ci_high|p_boot|n_seeds_full|n_[a-z_]+|.+_mean|.+_std"
                           r"|kept_[a-z]+|precision_[a-z]+|recall_[a-z]+|mean_[a-z_]+|p[0-9]+_score|median_score"
                           r"|auroc_[a-z_]+)$")
NOT_APPLICABLE_COLUMN = re.compile(r"^(kept_|precision_|recall_|auroc_)")


def read_csv_rows(path: str | os.PathLike, columns: list[str] = ()
                  ) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the rows (each with its line number) of a CSV that tokenclean wrote (:func:`csv_text`): the one
    reader of them. Checked: ``columns`` present, at least one row, every row as long as the header, and every cell
    of a number column (:data:`NUMBER_COLUMN`) empty or a finite number, or "nan" where a measure may not apply.
    A workflow output that fails a check (cut short, emptied, edited) says what re-creates it (:func:`remedy`)."""
    path = require_file(path)
    try:
        return _csv_rows(path, columns)
    except ArtifactError as e:
        if made_by(path) is None:
            raise
        raise ArtifactError(f"{e}; {remedy(path)}") from None


def _csv_rows(path: Path, columns: list[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        header = list(reader.fieldnames or [])
        if not header:
            raise ArtifactError(f"{path}: empty, expected a CSV table with a header (written by tokenclean)")
        missing = [c for c in columns if c not in header]
        if missing:
            raise ArtifactError(f"{path}: column {missing[0]!r} missing (not the table this command reads?)")
        for row in reader:
            if None in row or None in row.values():
                raise ArtifactError(f"{path}:{reader.line_num}: expected {len(header)} fields")
            for column in header:
                if NUMBER_COLUMN.match(column) and row[column].strip():
                    csv_number(path, reader.line_num, row, column,
                               finite=not NOT_APPLICABLE_COLUMN.match(column))
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise ArtifactError(f"{path}:{reader.line_num}: unreadable CSV ({e})") from None
    if not rows:
        raise ArtifactError(f"{path}: no rows")
    return header, rows


def csv_number(path: str | os.PathLike, line: int, row: dict[str, str], column: str, finite: bool = True) -> float:
    """A field as a float, or a one-line error naming the file, the line and the field (``finite``: NaN refused;
    an infinity always is)."""
    text = row[column].strip()
    try:
        value = float(text)
    except ValueError:
        raise ArtifactError(f"{path}:{line}: field {column}: expected a number, got {text!r}") from None
    if math.isinf(value) or (finite and math.isnan(value)):
        raise ArtifactError(f"{path}:{line}: field {column}: expected a finite number, got {text!r}")
    return value


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


def sidecar_text(meta: dict[str, Any]) -> str:
    """The sidecar's JSON (written beside its array by :func:`save_array` and :meth:`TokenTable.save`)."""
    return json.dumps({"tokenclean_version": __version__, **meta}, indent=2, sort_keys=True) + "\n"


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.exists() and not side.is_symlink():
        raise ArtifactError(f"{side}: metadata sidecar of {path} is missing; re-create {path} with tokenclean")
    meta = read_json(side, written=True)
    if not isinstance(meta, dict):
        raise ArtifactError(f"{side}: expected a JSON object (the metadata of {path}), got {type(meta).__name__}")
    return meta


# What each kind of artifact is, for messages; and the dtype its array must have (tokens: an .npz of several).
KINDS = {"tokens": "token table (X.tokens.npz)", "loss": "loss array (X.loss.npy)",
         "mask": "selection mask (X.mask.npy)", "weights": "token weights array (<model>/weights.npy)"}
KIND_DTYPES = {"loss": np.floating, "mask": np.bool_, "weights": np.floating}


def _require_kind(path: Path, meta: dict[str, Any], kind: str) -> None:
    """The sidecar's ``kind``, where it records one, must be ``kind`` (older sidecars without it pass here and
    are judged by their dtype)."""
    recorded = meta.get("kind")
    if recorded is not None and recorded != kind:
        raise ArtifactError(f"{path}: is a {KINDS.get(recorded, repr(recorded))}, expected a {KINDS[kind]}")


def _np_load(path: Path, what: str, recorded: bool = False) -> Any:
    """``numpy.load`` without pickle; any way the file can fail to be one becomes a one-line error: a damaged file
    where its sidecar ``recorded`` a fingerprint (tokenclean wrote it whole, so it no longer holds what was written)."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        reason = ("holds pickled objects or is not a numpy file at all" if "pickle" in str(e)
                  else " ".join(str(e).split()) or type(e).__name__)
        if recorded and "pickle" not in str(e):  # pickled objects: a hostile file, not a damaged one
            raise damaged(path, "empty" if not path.stat().st_size else
                          f"no longer reads as the {what} its sidecar records: {reason}") from None
        raise ArtifactError(f"{path}: not a {what} ({reason})") from None


# ---------------------------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------------------------
def save_array(path: str | os.PathLike, array: np.ndarray, meta: dict[str, Any]) -> None:
    """Save a per-token array as ``.npy`` with its sidecar, both or neither (:func:`atomic_files`; the array
    is renamed last, so it never appears without its sidecar).

    The sidecar records the array's own fingerprint, so a sidecar that does not describe the array beside it
    (e.g. one copied by hand) is refused by :func:`load_array`.
    """
    if array.dtype == object:
        raise ArtifactError(f"{path}: refusing to save an object array (it could only be read back through pickle)")
    side = {**meta, "dtype": str(array.dtype), "shape": list(array.shape), "fingerprint": fingerprint_arrays(array)}
    with atomic_files(sidecar_path(path), (path, ".npy")) as (side_tmp, tmp):
        side_tmp.write_text(sidecar_text(side))
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def load_array(path: str | os.PathLike, kind: str | None = None,
               made_on: tuple[str | os.PathLike, dict[str, Any], TokenTable] | None = None
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """A per-token array and its sidecar; the one place where an array is checked before use.

    ``kind`` (``loss``, ``mask`` or ``weights``): the sidecar's recorded kind and the array's dtype must be that kind's.
    ``made_on`` (the token table's path, sidecar and table): the array must have been computed on that table (its
    recorded ``tokens_fingerprint``), hold one entry per token of it, and hold values its kind can have there
    (:func:`check_values`).
    """
    path = require_file(path)
    meta = read_sidecar(path)
    if kind is not None:
        _require_kind(path, meta, kind)
    array = _np_load(path, "plain numpy array", recorded="fingerprint" in meta)
    if not isinstance(array, np.ndarray):
        array.close()
        raise ArtifactError(f"{path}: is an .npz archive, expected a single array (.npy)")
    if "fingerprint" in meta and meta["fingerprint"] != fingerprint_arrays(array):
        raise damaged(path, f"its contents do not match the fingerprint in {sidecar_path(path)}")
    if kind is not None and not np.issubdtype(array.dtype, KIND_DTYPES[kind]):
        raise ArtifactError(f"{path}: holds {array.dtype} values, expected a {KINDS[kind]}")
    if made_on is not None:
        tokens, tmeta, table = made_on
        if "tokens_fingerprint" not in meta:
            raise ArtifactError(f"{sidecar_path(path)}: field 'tokens_fingerprint' missing, so nothing says which "
                                f"token table {path} was made on; re-create it from {tokens}")
        if meta["tokens_fingerprint"] != tmeta.get("fingerprint"):
            raise ArtifactError(f"{path}: made on {meta.get('tokens')} (fingerprint {meta.get('tokens_fingerprint')}),"
                                f" not on {tokens} ({tmeta.get('fingerprint')}); re-create it from {tokens}")
        if array.shape != (table.n_tokens,):
            raise ArtifactError(f"{path}: holds shape {array.shape}, expected one entry per token of {tokens} "
                                f"({table.n_tokens})")
        if kind is not None:
            check_values(path, kind, array, table, tokens)
    return array, meta


# A loss is -log p >= 0; kernels that fuse the softmax may round a near-certain token's loss a little below zero.
LOSS_ROUNDING = 1e-4


def check_values(path: str | os.PathLike, kind: str, array: np.ndarray, table: TokenTable,
                 tokens: str | os.PathLike) -> None:
    """Refuse values an array of ``kind`` cannot hold on ``table``, naming the first such token: a loss finite and
    at least 0 on every response token (``loss_mask``) and NaN elsewhere; a mask inside ``loss_mask``; a weight
    finite and at least 0, or NaN (never trained), on response tokens and NaN elsewhere."""
    response = table.loss_mask
    if kind == "mask":
        bad, what = array & ~response, "selects a token outside the response tokens (loss_mask)"
    elif kind == "loss":
        inside = ~(np.isfinite(array) & (array >= -LOSS_ROUNDING))
        bad = (response & inside) | (~response & ~np.isnan(array))
        what = "holds a non-finite or negative loss on a response token, or a value outside them (NaN expected)"
    else:
        bad = (response & ~(np.isnan(array) | (np.isfinite(array) & (array >= 0)))) | (~response & ~np.isnan(array))
        what = "holds a negative or infinite weight on a response token, or a value outside them (NaN expected)"
    if np.any(bad):
        first = int(np.argmax(bad))
        sample = int(np.searchsorted(table.offsets, first, side="right")) - 1
        raise ArtifactError(f"{path}: {what}: token {first} (sample {sample}) holds {array[first].item()!r}; "
                            f"re-create it from {tokens}")


# ---------------------------------------------------------------------------------------------------------
# token table
# ---------------------------------------------------------------------------------------------------------
def _table_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What makes the members of a token table file wrong before they are converted (a cast would hide it:
    float token ids truncated, a 0/2 mask read as bool), or None."""
    ids, offsets, loss_mask = arrays["input_ids"], arrays["offsets"], arrays["loss_mask"]
    for key, value, ok in (("input_ids", ids, ids.dtype.kind in "iu"), ("offsets", offsets, offsets.dtype.kind in "iu"),
                           ("loss_mask", loss_mask, loss_mask.dtype == np.bool_)):
        if value.ndim != 1 or not ok:
            want = "bool" if key == "loss_mask" else "integer"
            return f"member '{key}' holds {value.ndim}-d {value.dtype} values, expected 1-d {want}"
    if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        return f"member 'input_ids' holds token id {int(ids.min() if ids.min() < 0 else ids.max())}"
    n_tokens, n_samples = len(ids), len(offsets) - 1
    for key, value in arrays.items():
        if key not in ("input_ids", "offsets", "loss_mask") and (value.ndim != 1 or len(value) not in (n_tokens,
                                                                                                      n_samples)):
            return (f"member '{key}' holds shape {value.shape}, expected one entry per token ({n_tokens}) or per "
                    f"sample ({n_samples})")
    record_id = arrays.get("record_id")
    if record_id is not None and (record_id.dtype.kind != "U" or len(record_id) != n_samples):
        return f"member 'record_id' holds {record_id.dtype} values, expected one text id per sample"
    token_class = arrays.get("token_class")
    if token_class is not None and len(token_class) and (
            token_class.dtype.kind not in "iu" or token_class.min() < -1 or token_class.max() >= len(TOKEN_CLASSES)):
        return f"member 'token_class' holds values outside -1..{len(TOKEN_CLASSES) - 1} (-1: no class)"
    return None


def _raw_fingerprint(arrays: dict[str, Any]) -> str | None:
    """:meth:`TokenTable.fingerprint` of a table file's members as they were read, or None where they cannot be
    those of a table at all (a member missing or not an array: the format checks say which)."""
    try:
        return fingerprint_arrays(np.asarray(arrays["input_ids"], dtype=np.int32),
                                  np.asarray(arrays["offsets"], dtype=np.int64),
                                  np.asarray(arrays["loss_mask"], dtype=bool))
    except (KeyError, ValueError, TypeError):
        return None


@dataclass
class TokenTable:
    """Flat ragged token table: sample i is ``input_ids[offsets[i]:offsets[i+1]]``.

    ``loss_mask`` is True where full-token SFT trains (response tokens and their end-of-turn token).
    ``extras`` holds further per-token (length N) or per-sample (length S) arrays, e.g. ``sample_index``
    (the source line of each sample), ``record_id`` (the user's id of each sample's record, fixed-width text;
    own data only) and ``token_class`` (ground truth in the synthetic world).
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

    def token_classes(self) -> np.ndarray | None:
        """The ground-truth class of each token (``extras["token_class"]``, -1: none), or None where no response
        token has one: only the embedded world labels its tokens."""
        token_class = self.extras.get("token_class")
        return token_class if token_class is not None and np.any(token_class[self.loss_mask] >= 0) else None

    @classmethod
    def concat(cls, tables: list[TokenTable]) -> TokenTable:
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

    def take(self, samples: np.ndarray) -> TokenTable:
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
            "kind": "tokens",
            "fingerprint": self.fingerprint(),
            "n_samples": self.n_samples,
            "n_tokens": self.n_tokens,
            "n_response_tokens": int(self.loss_mask.sum()),
        }
        with atomic_files(sidecar_path(path), (path, ".npz")) as (side_tmp, tmp):  # the table last: see save_array
            side_tmp.write_text(sidecar_text(meta))
            # members in a fixed order (numpy fixes their zip timestamps), so equal tables give equal bytes
            np.savez(tmp, input_ids=self.input_ids, offsets=self.offsets, loss_mask=self.loss_mask,
                     **{k: self.extras[k] for k in sorted(self.extras)})
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[TokenTable, dict[str, Any]]:
        path = require_file(path)
        meta = read_sidecar(path)
        _require_kind(path, meta, "tokens")
        recorded = "fingerprint" in meta
        z = _np_load(path, "token table", recorded)
        if isinstance(z, np.ndarray):
            raise ArtifactError(f"{path}: is a single array (.npy), expected a {KINDS['tokens']}")
        try:
            with z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            if recorded and "pickle" not in str(e):  # a member cut short or failing its CRC
                raise damaged(path, f"a member no longer reads: {' '.join(str(e).split())}") from None
            raise ArtifactError(f"{path}: not a token table ({' '.join(str(e).split())})") from None
        if recorded and _raw_fingerprint(arrays) not in (None, meta["fingerprint"]):
            # before the format checks: a damaged table breaks them too, but the remedy is to re-create it
            raise damaged(path, f"its contents do not match the fingerprint in {sidecar_path(path)}")
        for key, value in arrays.items():
            if not isinstance(value, np.ndarray):  # numpy returns raw bytes for a member that is no .npy
                raise ArtifactError(f"{path}: member '{key}' is not a numpy array; not a token table")
        for key in ("input_ids", "offsets", "loss_mask"):
            if key not in arrays:
                raise ArtifactError(f"{path}: member '{key}' is missing")
        problem = _table_problem(arrays)
        if problem:
            raise ArtifactError(f"{path}: not a valid token table ({problem})")
        try:
            table = cls(arrays.pop("input_ids"), arrays.pop("offsets"), arrays.pop("loss_mask"), arrays)
        except (ArtifactError, ValueError, TypeError) as e:
            raise ArtifactError(f"{path}: not a valid token table ({e})") from None
        if "fingerprint" not in meta:
            raise ArtifactError(f"{sidecar_path(path)}: field 'fingerprint' missing; re-create {path} with tokenclean")
        if meta["fingerprint"] != table.fingerprint():
            raise damaged(path, f"its contents do not match the fingerprint in {sidecar_path(path)}")
        for key, value in (("n_samples", table.n_samples), ("n_tokens", table.n_tokens),
                           ("n_response_tokens", int(table.loss_mask.sum()))):
            if key in meta and meta[key] != value:
                raise ArtifactError(f"{sidecar_path(path)}: field '{key}' says {meta[key]!r}, but {path} holds "
                                    f"{value}; re-create it with tokenclean")
        if table.n_samples == 0 or not table.loss_mask.any():
            raise ArtifactError(f"{path}: holds no {'sample' if table.n_samples == 0 else 'response token'}, so "
                                "nothing to score or train on; check the data it was made from")
        return table, meta
