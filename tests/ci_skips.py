"""A pytest plugin: under CI (``CI`` set and not ``0``/``false``), a skip for any reason but CUDA fails the session.

CI installs every extra the tests use (``.ci/run``); a test that skips there for a missing
package, a missing file or a missing server is a feature nobody checks. Only the tests that
need a GPU may skip. ``tests/conftest.py`` loads this plugin.
"""

from __future__ import annotations

import os

import pytest

ALLOWED = "cuda"  # a skip reason naming CUDA ("needs CUDA") is the one allowed


def ci_enabled() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def forbidden_skips(reports: list[pytest.TestReport]) -> list[str]:
    """``nodeid: reason`` of each skip whose reason does not name CUDA."""
    return [f"{r.nodeid}: {_reason(r)}" for r in reports if ALLOWED not in _reason(r).lower()]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not ci_enabled():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = list(reporter.stats.get("skipped", [])) if reporter is not None else []
    bad = forbidden_skips(skipped)
    if bad:
        lines = "\n  ".join(bad)
        message = f"CI: {len(bad)} test(s) skipped for a reason other than CUDA (install what they need):\n  {lines}"
        if reporter is not None:
            reporter.write_line(message, red=True)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
