"""The error log's format and level filter (fastfpm.log), without processes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fastfpm.log import ErrorLog, WsgiErrors, truncate, wrap

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


def test_log_limit_cuts_a_long_message_line_and_marks_the_cut(tmp_path: Path) -> None:
    # php-fpm's zlog: the whole line, time stamp and newline included, fits in log_limit, and a
    # line that had to be cut ends in "...".
    path = tmp_path / "error.log"
    ErrorLog(str(path), "notice", limit=512).notice("x" * 1000 + "\nshort")
    first, second = path.read_text().splitlines(keepends=True)
    assert LINE.match(first) and len(first) == 512 and first.endswith("x...\n")
    assert second.endswith("NOTICE: short\n")


def test_truncate_only_cuts_what_does_not_fit() -> None:
    assert truncate("a" * 511, 512) == "a" * 511  # 511 characters and the newline: exactly the limit
    assert truncate("a" * 512, 512) == "a" * 508 + "..."
    assert truncate("", 512) == ""


def test_wrap_splits_worker_output_without_losing_any_of_it() -> None:
    head, tail = '[08-Oct-2017 19:53:50] WARNING: [pool unconfined] child 23183 said into stderr: "', '"'
    lines = wrap("a" * 2048, 1050, head, tail)
    assert [len(line) + 1 for line in lines[:-1]] == [1050, 1050]  # full lines fill the limit
    assert all(line.startswith(head) and line.endswith(tail) for line in lines)
    assert "".join(line[len(head):-len(tail)] for line in lines) == "a" * 2048
    assert wrap("short", 512) == ["short"] and wrap("", 512, "<", ">") == ["<>"]


def test_decorated_worker_output_is_wrapped_at_log_limit(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    log = ErrorLog(str(path), "notice", limit=512)
    text = "".join(chr(ord("a") + i % 26) for i in range(1500))
    log.child_said("www", 42, "stderr", text)
    lines = path.read_text().splitlines(keepends=True)
    said = re.compile(r'^\[[^]]+\] WARNING: \[pool www\] child 42 said into stderr: "(.*)"\n$')
    assert len(lines) == 4 and all(len(line) <= 512 for line in lines)
    assert "".join(said.match(line)[1] for line in lines) == text  # type: ignore[index]


def test_decorated_worker_output_follows_the_log_level(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    ErrorLog(str(path), "error").child_said("www", 42, "stdout", "dropped")
    assert "dropped" not in path.read_text()


def test_plain_worker_output_is_wrapped_at_log_limit(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    ErrorLog(str(path), "notice", limit=512).write_line("b" * 1500)
    assert [len(line) for line in path.read_text().splitlines(keepends=True)] == [512, 512, 479]


def test_worker_lines_are_cut_before_they_reach_the_master(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    try:
        log = ErrorLog(None, "notice", limit=512).for_worker("www", write_fd)
        log.warning("y" * 600)
        line = os.read(read_fd, 4096).decode()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert LINE.match(line) and f"WARNING: [pool www] child {os.getpid()}: yyy" in line
    assert len(line) == 512 and line.endswith("y...\n")


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
