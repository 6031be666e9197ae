"""The linter and the type checker hold the package clean (pyproject.toml configures both:
ruff over fastmtl/, kernels/, tests/ and setup.py; mypy over fastmtl/ with a hint on every
def). Both come with the test extra (a missing tool fails, not skips); they run on the source
tree, as a developer runs them."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tool: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(tool, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean(tmp_path):
    if shutil.which("ruff") is None:
        pytest.fail("ruff is not installed: pip install '.[test]' installs it")
    proc = _run(["ruff", "check", "--no-cache", "--output-format", "concise"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed: pip install '.[test]' installs it")
    proc = _run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy")])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Success: no issues found" in proc.stdout
