"""The CI rule of tests/ci_skips.py, run on a small suite in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def run_suite(tmp_path: Path, reason: str, ci: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_small.py").write_text(
        f"import pytest\n\ndef test_runs():\n    assert 1 + 1 == 2\n\ndef test_skips():\n    pytest.skip({reason!r})\n"
    )
    env = dict(os.environ, CI=ci, PYTHONPATH=str(TESTS))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "ci_skips", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "reason, ci, code",
    [
        ("needs webdataset", "1", 1),  # a missing extra fails CI
        ("needs CUDA", "1", 0),  # the GPU tests may skip
        ("needs webdataset", "", 0),  # outside CI a skip is a skip
        ("needs webdataset", "false", 0),
    ],
)
def test_ci_fails_on_skips_that_are_not_cuda(tmp_path, reason, ci, code):
    result = run_suite(tmp_path, reason, ci)
    assert result.returncode == code, result.stdout + result.stderr
    assert ("1 passed, 1 skipped" in result.stdout) and (
        ("skipped for a reason other than CUDA" in result.stdout) == (code == 1)
    )
    if code == 1:
        assert "test_small.py::test_skips: Skipped: needs webdataset" in result.stdout
