"""`python -m fastfpm status` against a real server's status page, in every format, and when there is none.

The server under test is tests.status_server's status_target: a fastfpm pool whose workers serve
pm.status_path themselves.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfpm.statuscli import StatusError, fetch_document, status_query
from tests.servers import run_cli, wait_until
from tests.status_server import StatusTarget, status_target


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StatusTarget]:
    with status_target(tmp_path_factory.mktemp) as server:
        yield server


def status(target: StatusTarget, *args: str):
    return run_cli("status", target.address, "--path", target.status_path, *args)


def test_query_names_the_format_and_full() -> None:
    assert status_query() == ""
    assert status_query("text", full=True) == "full"
    assert status_query("json") == "json"
    assert status_query("openmetrics", full=True) == "openmetrics&full"
    with pytest.raises(ValueError, match="unknown status format 'yaml'"):
        status_query("yaml")


def test_text_is_the_default(target: StatusTarget) -> None:
    result = status(target)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert lines["pool"].strip() == target.pool
    assert int(lines["accepted conn"]) >= 1
    assert "pid:" not in result.stdout  # no process section without --full


def test_full_text_has_a_section_per_process(target: StatusTarget) -> None:
    result = status(target, "--full")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\npid:") == 2
    assert "request URI:" in result.stdout


def test_json_full_has_php_fpms_fields(target: StatusTarget) -> None:
    result = status(target, "--format", "json", "--full")
    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout)
    assert page["pool"] == target.pool
    for field in ("process manager", "accepted conn", "listen queue", "idle processes", "active processes",
                  "total processes", "max children reached", "slow requests"):
        assert field in page
    assert len(page["processes"]) == 2
    assert {"pid", "state", "requests", "request duration", "request method", "last request cpu",
            "last request memory"} <= set(page["processes"][0])


def test_xml_html_and_openmetrics(target: StatusTarget) -> None:
    xml = status(target, "--format", "xml")
    assert xml.returncode == 0, xml.stderr
    assert ET.fromstring(xml.stdout).findtext("pool") == target.pool
    html = status(target, "--format", "html")
    assert html.returncode == 0 and "<table" in html.stdout
    metrics = status(target, "--format", "openmetrics")
    assert metrics.returncode == 0 and "phpfpm_accepted_connections" in metrics.stdout


def test_a_path_that_is_not_the_status_page_exits_1(target: StatusTarget) -> None:
    result = run_cli("status", target.address, "--path", target.missing_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{target.address} answered {target.missing_path} with 404" in result.stderr
    assert "pm.status_path" in result.stderr


def test_nothing_listening_exits_1_with_the_reason(tmp_path: Path) -> None:
    nobody = tmp_path / "nobody.sock"
    result = run_cli("status", str(nobody))
    assert result.returncode == 1
    assert result.stderr.strip() == f"fastfpm: cannot reach {nobody}: No such file or directory"


def test_an_unknown_format_is_a_usage_error(target: StatusTarget) -> None:
    result = status(target, "--format", "yaml")
    assert result.returncode == 2
    assert "invalid choice: 'yaml'" in result.stderr


def test_fetch_document_sees_a_busy_worker(target: StatusTarget) -> None:
    thread = target.busy(2)

    def busy_row():
        rows = fetch_document(target.address, target.status_path)["processes"]
        # Running once its headers are read (php-fpm shows "Getting request information" before).
        return next((row for row in rows if row["request uri"].startswith(target.busy_path)
                     and row["state"] == "Running"), None)

    row = wait_until(busy_row, 5, message="the busy request Running in the status page")
    assert row["request method"] == "GET"
    assert row["request uri"] == f"{target.busy_path}?ms=2000"
    thread.join(10)
    with pytest.raises(StatusError, match="with 404"):
        fetch_document(target.address, target.missing_path)
