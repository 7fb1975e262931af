"""tree_check.py, the session check that tests leave the source tree as they found it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tree_check import is_cache, new_paths, tree_state

TESTS = Path(__file__).resolve().parent


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.email=t@example.org", "-c", "user.name=t", *args], cwd=repo, check=True)


@pytest.fixture
def repo(tmp_path):
    """A checkout with one tracked file, an ignored runs/ folder holding an old run, and a cache."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("runs/\n__pycache__/\n")
    (repo / "tracked.py").write_text("x = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "start")
    (repo / "runs" / "old").mkdir(parents=True)
    (repo / "runs" / "old" / "config.yaml").write_text("seed: 0\n")
    return repo


def test_new_files_are_found_even_inside_ignored_folders_and_caches_are_not(repo):
    before = tree_state(repo)
    (repo / "runs" / "new").mkdir()
    (repo / "runs" / "new" / "config.yaml").write_text("seed: 1\n")
    (repo / "stray.txt").write_text("x")
    (repo / "__pycache__").mkdir()
    (repo / "__pycache__" / "tracked.cpython-311.pyc").write_bytes(b"")
    (repo / "tracked.py").write_text("x = 2\n")  # an edit to the source: someone working, not a test
    assert new_paths(before, tree_state(repo)) == ["runs/new/config.yaml", "stray.txt"]


def test_caches_and_non_checkouts(tmp_path):
    assert is_cache("pkg/__pycache__/m.pyc") and is_cache("moe_prefix.egg-info/PKG-INFO") and is_cache(".ruff_cache/")
    assert not is_cache("runs/run-1/config.yaml")
    (tmp_path / "plain").mkdir()
    assert tree_state(tmp_path / "plain") is None  # not a git checkout: nothing to check


def _session(repo, test_body):
    (repo / "test_it.py").write_text(f"from pathlib import Path\n\n\ndef test_it():\n    {test_body}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tree_check", "-p", "no:cacheprovider", "test_it.py"]
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def test_a_session_that_leaves_a_file_in_the_tree_fails_naming_it(repo):
    proc = _session(repo, "Path('runs/run-1').mkdir(); Path('runs/run-1/config.yaml').write_text('seed: 0')")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed, 1 error" in proc.stdout
    assert "the test session left 1 new path(s) in the source tree" in proc.stdout
    assert "runs/run-1/config.yaml; tests must write only under their temporary directories" in proc.stdout


def test_a_session_that_writes_under_tmp_path_passes(repo, tmp_path):
    proc = _session(repo, f"Path({str(tmp_path / 'out.txt')!r}).write_text('fine')")
    assert proc.returncode == 0, proc.stdout + proc.stderr
