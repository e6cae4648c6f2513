"""What made an experiment's results, in one file: the data's sha256, the token tables' tokenizer and data
fingerprints, the base model's id, pinned revision and the commit actually loaded, the package versions, and the
CPU numerics (tokenclean.numerics: the CPU, its vector flags and the kernel pin) of the machine writing the record.

Everything is read from what the jobs recorded (the data files and the artifacts' sidecars, each checked against
the file it describes), never resolved again: a hub branch may have moved since, and the point is to name what
was used. Commits that disagree between artifacts (an unpinned ``main`` that moved between jobs) are listed as a
warning.
"""
from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tokenclean import numerics
from tokenclean.artifacts import ArtifactError, TokenTable, load_array, read_json, sha256_file, write_texts

# distribution names of the packages whose versions change results
PACKAGES = ("tokenclean", "torch", "transformers", "peft", "lm_eval", "datasets", "tokenizers")
DATA_FILES = ("pool", "warmup")
TOKEN_KEYS = ("data", "data_fingerprint", "tokenizer", "tokenizer_revision", "tokenizer_commit", "chat_format",
              "tokenizer_fingerprint", "max_length", "n_samples", "n_tokens", "fingerprint")
LOSS_KEYS = ("model", "model_revision", "model_commit", "model_fingerprint", "tokens_fingerprint", "dtype", "device")


def package_versions() -> dict[str, str | None]:
    """Installed versions (None: not installed) of the packages that shape the results, and Python's. tokenclean
    run from a checkout without being installed (an offline node puts the checkout on PYTHONPATH) is its own
    ``__version__``."""
    from tokenclean import __version__

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = __version__ if name == "tokenclean" else None
    return versions


def gather(data_dir: str | os.PathLike, tokens: list[str | os.PathLike], losses: list[str | os.PathLike],
           base_model: str, revision: str | None = None) -> dict[str, Any]:
    """The provenance record of one experiment (see the module docstring)."""
    data_dir = Path(data_dir)
    described = read_json(data_dir / "data.json") if (data_dir / "data.json").exists() else {}
    data: dict[str, Any] = {}
    for name in DATA_FILES:
        path = data_dir / f"{name}.jsonl"
        if not path.is_file():
            raise ArtifactError(f"{path}: file not found")
        entry = {"file": str(path), "sha256": sha256_file(path),
                 "records": sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())}
        if name in described:
            entry["source"] = described[name].get("source")
            if described[name].get("sha256") not in (None, entry["sha256"]):
                raise ArtifactError(f"{path}: its sha256 differs from the one in {data_dir / 'data.json'}")
        data[name] = entry
    loaded = {str(p): TokenTable.load(p) for p in tokens}  # each checked against its sidecar: what it describes
    token_tables = {p: {k: meta.get(k) for k in TOKEN_KEYS} for p, (_, meta) in loaded.items()}
    by_fingerprint = {meta["fingerprint"]: (p, table, meta) for p, (table, meta) in loaded.items()}
    loss_files = {}
    for p in losses:
        _, meta = load_array(p, "loss")
        if meta.get("tokens_fingerprint") not in by_fingerprint:
            raise ArtifactError(f"{p}: made on a token table ({meta.get('tokens')}, fingerprint "
                                f"{meta.get('tokens_fingerprint')}) that is none of --tokens ({', '.join(loaded)}); "
                                "give the tables its losses were made on")
        table_path, table, table_meta = by_fingerprint[meta["tokens_fingerprint"]]
        load_array(p, "loss", made_on=(table_path, table_meta, table))
        loss_files[str(p)] = {k: meta.get(k) for k in LOSS_KEYS}
    commits = sorted({t["tokenizer_commit"] for t in token_tables.values() if t["tokenizer_commit"]}
                     | {m["model_commit"] for m in loss_files.values() if m["model_commit"]})
    by_sha = {entry["sha256"][:16]: name for name, entry in data.items()}
    warnings = []
    if len(commits) > 1:
        warnings.append(f"the base model was loaded at {len(commits)} different commits ({', '.join(commits)}); "
                        "pin base_model.revision")
    for path, table in token_tables.items():
        if table["data_fingerprint"] not in by_sha:
            warnings.append(f"{path} was tokenized from data that is not the experiment's current pool or warm-up "
                            "file")
    fingerprints = sorted({m["model_fingerprint"] for m in loss_files.values() if m["model_fingerprint"]})
    kernels = numerics.describe(numerics.current())
    if kernels["problem"]:
        warnings.append(f"the CPU-kernel pin {kernels['level']} does not hold here: {kernels['problem']}")
    return {
        "data": data,
        "base_model": {"name": base_model, "revision": revision or None, "commits": commits,
                       "fingerprints": fingerprints},
        "token_tables": token_tables,
        "losses": loss_files,
        "packages": package_versions(),
        "numerics": kernels,
        "warnings": warnings,
    }


def render_markdown(record: dict[str, Any]) -> str:
    """A short human summary of :func:`gather`'s record."""
    base = record["base_model"]
    lines = ["# Provenance", "", "## Base model", "",
             f"- id: `{base['name']}`",
             f"- revision asked: {base['revision'] or ('(default branch)' if base['commits'] else '-')}",
             f"- commit loaded: {', '.join(f'`{c}`' for c in base['commits']) or '(local directory)'}",
             f"- fingerprint: {', '.join(f'`{f}`' for f in base['fingerprints']) or '-'}",
             "", "## Data", "", "| file | records | sha256 | source |", "|---|---:|---|---|"]
    for name, entry in record["data"].items():
        source = entry.get("source")
        lines.append(f"| {name} | {entry['records']} | `{entry['sha256']}` | {source if source else 'generated'} |")
    lines += ["", "## Token tables", "", "| table | tokenizer | commit | tokenizer fingerprint | data fingerprint |",
              "|---|---|---|---|---|"]
    for path, t in record["token_tables"].items():
        lines.append(f"| {Path(path).name} | `{t['tokenizer']}` | {t['tokenizer_commit'] or '-'} | "
                     f"`{t['tokenizer_fingerprint']}` | `{t['data_fingerprint']}` |")
    lines += ["", "## Packages", "", "| package | version |", "|---|---|"]
    lines += [f"| {name} | {v or 'not installed'} |" for name, v in record["packages"].items()]
    kernels = record["numerics"]
    holds = "holds" if kernels["holds"] else f"does not hold: {kernels['problem']}"
    flags = ", ".join(f"{f} {'yes' if has else 'no'}" for f, has in (kernels["flags"] or {}).items()) or "unknown"
    env = ", ".join(f"{name}={'(unset)' if value is None else value}" for name, value in kernels["env"].items())
    lines += ["", "## CPU numerics", "", f"- kernel pin: {kernels['level']} ({holds})",
              f"- CPU: {kernels['cpu'] or 'unknown'} ({kernels['arch']}); flags: {flags}",
              f"- torch {kernels['torch']}, ATen CPU capability {kernels['cpu_capability']}", f"- {env}"]
    if record["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in record["warnings"]]
    return "\n".join(lines) + "\n"


def write_provenance(data_dir: str | os.PathLike, tokens: list[str | os.PathLike], losses: list[str | os.PathLike],
                     base_model: str, out_json: str | os.PathLike, out_md: str | os.PathLike,
                     revision: str | None = None) -> dict[str, Any]:
    """CLI entry: ``provenance.json`` and ``provenance.md`` of an experiment (nothing written if anything fails)."""
    record = gather(data_dir, tokens, losses, base_model, revision)
    text = render_markdown(record)
    write_texts({out_md: text, out_json: json.dumps(record, indent=2, sort_keys=True) + "\n"})  # both or neither
    return record
