"""What a directory holds, hidden temporaries included: the tests that no failed or finished write leaves a
stray file compare it before and after (a glob for the temporaries' names would miss any it did not foresee)."""
from __future__ import annotations

from pathlib import Path


def all_files(directory: Path) -> list[str]:
    """Every file and directory under ``directory``, relative to it, sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))
