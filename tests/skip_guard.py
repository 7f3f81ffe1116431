"""A pytest plugin: the run fails when a test skipped for any reason but "no GPU" (the `gpu` marker).

A skip that depends on history, files outside the repository or the network switches a test off
silently on some machine; here it turns the run red and names the test and its reason.
"""

from __future__ import annotations

import pytest


class SkipGuard:
    def __init__(self):
        self.unexpected: list[tuple[str, str]] = []

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report):
        if report.skipped and not hasattr(report, "wasxfail") and "gpu" not in report.keywords:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.unexpected.append((report.nodeid, reason.removeprefix("Skipped: ")))

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter):
        if self.unexpected:
            terminalreporter.section("skips other than 'no GPU' (skip_guard: the run fails)", red=True)
            for nodeid, reason in self.unexpected:
                terminalreporter.line(f"{nodeid}: {reason}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.unexpected and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    config.pluginmanager.register(SkipGuard(), "skip_guard")
