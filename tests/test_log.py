"""The error log: its format and level filter (fastfpm.log), then through real processes.

The first tests need no process; the later ones run a master and check what reaches its log:
SIGUSR1 reopening, the workers' stdout and stderr (catch_workers_output, log_limit), log_level
and syslog.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from fastfpm.log import ErrorLog, Throttle, WsgiErrors, truncate, wrap
from tests.apps.counters_app import payload
from tests.fcgi_helpers import get
from tests.servers import Launcher, wait_until, write_config

LINE = re.compile(r"^\[\d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d\] (ALERT|ERROR|WARNING|NOTICE|DEBUG): ")
ROUTER = "tests.apps.router:app"
APP = "tests.apps.counters_app:app"


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


# --- through real processes: reopening, workers' output, log_level, syslog -------------------


def test_throttle_lets_a_burst_through_per_window_and_counts_the_rest() -> None:
    lines: list[tuple[str, str]] = []
    now = [100.0]
    throttle = Throttle(lambda level, message: lines.append((level, message)), "bad things", burst=3,
                        window=60, clock=lambda: now[0])
    for i in range(5):
        throttle("warning", f"bad {i}")
    assert lines == [("warning", "bad 0"), ("warning", "bad 1"), ("warning", "bad 2")]
    now[0] += 59.9
    throttle("warning", "still the same window")
    assert len(lines) == 3 and throttle.held == 3
    now[0] += 0.1  # a new window: first the count, then the line
    throttle("warning", "bad 6")
    assert lines[3:] == [("warning", "3 more bad things were not logged (at most 3 per 60 s)"),
                         ("warning", "bad 6")]
    now[0] += 120  # nothing was held back in the last window: no count
    throttle("error", "bad 7")
    assert lines[5:] == [("error", "bad 7")]


def test_sigusr1_reopens_the_error_log(launcher: Launcher, tmp_path: Path) -> None:
    log_path = tmp_path / "error.log"
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--error-log", str(log_path)])
    wait_until(lambda: log_path.exists() and "ready to handle" in log_path.read_text(), 5,
               message="the error log file")
    rotated = tmp_path / "error.log.1"
    log_path.rename(rotated)
    server.signal(signal.SIGUSR1)
    wait_until(log_path.exists, 5, message="the reopened log")
    get(server.address, "/raise-before", "marker=after-rotation")
    wait_until(lambda: "after-rotation" in log_path.read_text(), 5, message="the traceback in the new log")
    assert "after-rotation" not in rotated.read_text()


def test_failed_log_reopen_keeps_serving_and_logs_the_error(launcher: Launcher, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--error-log", str(logs / "error.log")])
    gone = tmp_path / "logs.gone"
    logs.rename(gone)  # the directory went away: reopening must fail
    server.signal(signal.SIGUSR1)
    old_file = gone / "error.log"
    wait_until(lambda: "unable to re-opened error log file" in old_file.read_text(), 5,
               message="the reopen error in the old file")
    text = old_file.read_text()
    assert f"ERROR: failed to open error_log ({logs / 'error.log'}): No such file or directory" in text
    assert server.proc is not None and server.proc.poll() is None
    assert get(server.address, "/env").status == 200
    # The old file is still the log, and a later reopen that can succeed does.
    get(server.address, "/raise-before", "marker=still-in-old-file")
    wait_until(lambda: "still-in-old-file" in old_file.read_text(), 5,
               message="the traceback in the old file")
    logs.mkdir()
    server.signal(signal.SIGUSR1)
    wait_until(lambda: (logs / "error.log").exists()
               and "NOTICE: error log file re-opened" in (logs / "error.log").read_text(), 5,
               message="php-fpm's success line in the new file")


def test_catch_workers_output_logs_stdout_and_stderr(launcher: Launcher) -> None:
    server = launcher.fastfpm("tests.apps.printing:app", max_children=1,
                              extra_args=["--catch-workers-output"])
    get(server.address, "/")
    log = server.wait_for_log('said into stderr: "to stderr"')
    assert 'said into stdout: "to stdout"' in server.wait_for_log("said into stdout")
    assert f"child {server.worker_pids()[0]} said into stderr" in log


def test_worker_output_is_dropped_without_catch_workers_output(launcher: Launcher) -> None:
    server = launcher.fastfpm("tests.apps.printing:app", max_children=1)
    assert get(server.address, "/").status == 200
    time.sleep(0.3)
    assert "to stderr" not in server.log_text() and "to stdout" not in server.log_text()


def test_undecorated_worker_output_is_logged_as_is(launcher: Launcher, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "d.conf", f"""
[www]
listen = {tmp_path}/d.sock
app = tests.apps.printing:app
pm.max_children = 1
catch_workers_output = yes
decorate_workers_output = no
""")
    server = launcher.fastfpm("", extra_args=["-c", str(conf)])
    get(str(tmp_path / "d.sock"), "/")
    log = server.wait_for_log("to stderr")
    assert "\nto stderr\n" in log and "said into" not in log


def test_long_undecorated_worker_output_is_split_at_log_limit(launcher: Launcher, tmp_path: Path) -> None:
    # php-fpm wraps worker output (it never drops any): lines of at most log_limit characters,
    # newline included, which put back together give what the application printed.
    conf = write_config(tmp_path / "o.conf", f"""
[global]
log_limit = 512

[www]
listen = {tmp_path}/o.sock
app = {APP}
pm.max_children = 1
catch_workers_output = yes
decorate_workers_output = no
""")
    server = launcher.fastfpm("", max_children=1, extra_args=["-c", str(conf)])
    mark = server.log_size()
    assert get(str(tmp_path / "o.sock"), "/", "do=print&n=1500").status == 200
    text = payload(1500)
    log = server.wait_for_log(text[-20:], mark)
    lines = [line for line in log.splitlines(keepends=True) if line.strip("\n") and line[0] in text]
    assert all(len(line) <= 512 for line in lines) and len(lines) >= 3
    assert "".join(line.rstrip("\n") for line in lines) == text


def test_log_level_filters_lines(launcher: Launcher) -> None:
    default = launcher.fastfpm(ROUTER, max_children=1)
    assert "DEBUG: " not in default.log_text()
    chatty = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--log-level", "debug"])
    assert f"DEBUG: [pool www] listening on {chatty.address}" in chatty.log_text()


def test_error_log_to_syslog(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    import pytest

    from tests.servers import REPO_ROOT

    if os.path.exists("/dev/log"):
        pytest.skip("a system syslog owns /dev/log; this test needs to stand in for it")
    conf = write_config(tmp_path / "s.conf", f"""
[global]
error_log = syslog
syslog.ident = ffpm-test
syslog.facility = local3

[www]
listen = {tmp_path}/s.sock
app = {ROUTER}
pm.max_children = 1
""")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as fake_syslog:
        fake_syslog.bind("/dev/log")
        fake_syslog.settimeout(10)
        proc = subprocess.Popen([sys.executable, "-m", "fastfpm", "serve", "-c", str(conf), "-R"],
                                cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
        try:
            messages: list[bytes] = []
            while not any(b"ready to handle connections" in m for m in messages):
                messages.append(fake_syslog.recv(4096))
            text = b"\n".join(messages).decode()
            assert "ffpm-test[" in text and "NOTICE: fpm is running" in text
            assert "<157>" in text  # facility local3 (19) * 8 + notice (5)
            # A worker's line reaches syslog through the master too.
            get(str(tmp_path / "s.sock"), "/raise-before", "marker=via-syslog")
            while not any(b"via-syslog" in m for m in messages):
                messages.append(fake_syslog.recv(4096))
        finally:
            # Stop standing in for syslog first: a full, unread /dev/log would block the master.
            os.unlink("/dev/log")
            fake_syslog.close()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
