"""The error log's format and level filter (fastfpm.log), without processes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastfpm.log import ErrorLog, WsgiErrors

LINE = re.compile(r"^\[\d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d\] (ALERT|ERROR|WARNING|NOTICE|DEBUG): ")


def test_lines_are_php_fpm_shaped_and_filtered_by_level(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    log = ErrorLog(str(path), "warning")
    log.notice("not written")
    log.warning("written")
    log.error("two\nlines")
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(LINE.match(line) for line in lines)
    assert lines[0].endswith("WARNING: written")
    assert lines[1].endswith("ERROR: two") and lines[2].endswith("ERROR: lines")


def test_log_limit_cuts_long_lines(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    ErrorLog(str(path), "notice", limit=20).notice("x" * 100)
    assert path.read_text().rstrip("\n").endswith("NOTICE: " + "x" * 20)


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        ErrorLog(None, "verbose")


def test_reopen_follows_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    log = ErrorLog(str(path), "notice")
    log.notice("before")
    path.rename(tmp_path / "error.log.1")
    log.open()
    log.notice("after")
    assert "after" in path.read_text() and "after" not in (tmp_path / "error.log.1").read_text()


def test_wsgi_errors_writes_whole_lines_to_the_log(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    errors = WsgiErrors(ErrorLog(str(path), "notice"))
    errors.write("part one, ")
    assert not path.exists() or "part one" not in path.read_text()  # a line is logged once complete
    errors.writelines(["part two\n", "tail without newline"])
    errors.flush()
    text = path.read_text()
    assert "WARNING: part one, part two" in text and "WARNING: tail without newline" in text
