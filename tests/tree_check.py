"""A pytest plugin: a test session leaves the source tree as it found it.

Tests write under their temporary directories only. `git status` of the checkout is read before and after
the session; a path that is new afterwards (a run directory, a log, any untracked or ignored file) fails the
session and is named. Caches that tools keep in the tree anyway are left out, and so are edits to tracked
files: tests write files, they do not edit the source, while people working in the same checkout do, and
their edits must not fail a test session. Outside a git checkout the check does nothing. tests/conftest.py
imports the fixture; other sessions can load it with `-p tree_check`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache")  # folders tools write into the tree on every run
SHOWN = 20  # new entries named in the failure


def is_cache(path: str) -> bool:
    parts = path.strip('"').rstrip("/").split("/")
    return any(part in CACHES or part.endswith(".egg-info") for part in parts)


def tree_state(root: Path) -> set[str] | None:
    """The untracked and ignored paths of `git status --porcelain --ignored` under root, caches aside.

    None when root is not in a git checkout (an installed copy of the tests, a source archive).
    """
    # --untracked-files=all lists each file inside an ignored or untracked folder, so a new file in an
    # existing runs/ folder is new too; --no-optional-locks: never touch the index another process may hold.
    command = ["git", "--no-optional-locks", "status", "--porcelain", "--ignored", "--untracked-files=all"]
    try:
        out = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!") and not is_cache(line[3:])}


def new_paths(before: set[str], after: set[str]) -> list[str]:
    return sorted(after - before)


@pytest.fixture(scope="session", autouse=True)
def source_tree_unchanged(request):
    root = Path(request.config.rootpath)
    before = tree_state(root)
    yield
    after = tree_state(root)
    if before is None or after is None:
        return
    new = new_paths(before, after)
    if new:
        named = ", ".join(new[:SHOWN]) + (f" and {len(new) - SHOWN} more" if len(new) > SHOWN else "")
        pytest.fail(
            f"the test session left {len(new)} new path(s) in the source tree {root}: {named}; "
            "tests must write only under their temporary directories (tmp_path)",
            pytrace=False,
        )
