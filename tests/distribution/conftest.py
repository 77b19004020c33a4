"""Shows the units' systemd-analyze security scores in the test summary, also under
pytest-xdist (which does not pass the workers' output through)."""

from __future__ import annotations

import pytest

PROPERTY = "systemd_exposure"  # recorded by test_install.py
_lines: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _lines.extend(str(value) for name, value in report.user_properties if name == PROPERTY)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _lines:
        terminalreporter.write_line(line)
