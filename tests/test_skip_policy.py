"""The skip policy of tests/conftest.py, run for real: an inner pytest loads conftest.py as a plugin.

A test skipped for a missing capability is reported with its reason in the summary; with CI=true it
fails instead, unless MOESHARD_ALLOW_SKIP names the capability; unknown names are errors.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

INNER = '''
import pytest
from conftest import skip_for

def test_found_missing_at_run_time():
    skip_for("harness", "pretend: no network namespaces here")

@pytest.mark.requires("no-such-capability")
def test_unknown_capability():
    pass

def test_plain():
    pass
'''

pytestmark = pytest.mark.timeout(180)


def _inner(tmp_path: Path, env: dict[str, str], *select: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(INNER)
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "MOESHARD_ALLOW_SKIP", "PYTEST_ADDOPTS")}
    clean.update(env, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                           "-o", "addopts=", str(tmp_path / "test_inner.py"), *select],
                          cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=150)


def test_skip_says_why_in_the_summary(tmp_path):
    out = _inner(tmp_path, {}, "-k", "run_time or plain")
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 passed, 1 skipped" in out.stdout
    assert "skipped: capabilities this machine lacks" in out.stdout
    assert "harness: 1 test(s) skipped: pretend: no network namespaces here" in out.stdout


def test_ci_turns_the_skip_into_a_failure(tmp_path):
    out = _inner(tmp_path, {"CI": "true"}, "-k", "run_time or plain")
    assert out.returncode == 1, out.stdout[-3000:]
    assert "1 failed, 1 passed" in out.stdout
    assert "needs harness, which this machine lacks: pretend: no network namespaces here" in out.stdout
    assert "MOESHARD_ALLOW_SKIP=harness" in out.stdout


def test_ci_allows_the_capability_it_is_told_to(tmp_path):
    out = _inner(tmp_path, {"CI": "true", "MOESHARD_ALLOW_SKIP": "cuda, harness"}, "-k", "run_time or plain")
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 passed, 1 skipped" in out.stdout
    assert "harness: 1 test(s) skipped (allowed by MOESHARD_ALLOW_SKIP): pretend" in out.stdout


def test_unknown_names_are_errors(tmp_path):
    out = _inner(tmp_path, {"MOESHARD_ALLOW_SKIP": "harnes"})
    assert out.returncode == 4, out.stdout[-3000:] + out.stderr[-3000:]   # pytest's usage error
    assert "MOESHARD_ALLOW_SKIP names unknown capabilities ['harnes']" in out.stderr
    out = _inner(tmp_path, {}, "-k", "unknown_capability")
    assert out.returncode == 1 and "unknown capability 'no-such-capability'" in out.stdout, out.stdout[-3000:]
