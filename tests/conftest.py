"""Shared fixtures: launchers for real fastfpm and nginx processes, and their logs on failure."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # `tests.servers` and `tests.apps.*` import the same way here as in the servers' workers.
    sys.path.insert(0, str(REPO_ROOT))

from tests.servers import RUNNING, ConfiguredServer, Launcher  # noqa: E402


@pytest.fixture
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """Start fastfpm/nginx processes for one test; all are stopped when it ends."""
    with Launcher(tmp_path_factory.mktemp) as started:
        yield started


@pytest.fixture
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ConfiguredServer]]:
    """Start servers from a config text whose `{dir}` is their own directory; stopped at the end."""
    started: list[ConfiguredServer] = []

    def start(body: str, allow_root: bool = True, extra_args: tuple[str, ...] = ()) -> ConfiguredServer:
        workdir = tmp_path_factory.mktemp("fpm")
        server = ConfiguredServer(workdir, workdir / "fastfpm.conf", allow_root, extra_args)
        server.rewrite(body)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the logs of every server still running to a failed test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for server in RUNNING:
            report.sections.append((f"log of {server.describe()}", server.report_text()))
