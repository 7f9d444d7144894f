"""The slow log: stack dumps written by a worker's dumper thread while its main thread is blocked.

Everything about request_slowlog_timeout and the slowlog file belongs here. Process tests fork a
child that calls install() and then blocks the way a slow request does (in time.sleep, in a
socket read, in a pure-Python loop); the parent plays the master: it sends SLOWLOG_SIGNAL and
reads the slowlog. The child's request must keep running and end normally. The last tests run a
real master instead.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fastfpm import slowlog
from fastfpm.slowlog import SLOWLOG_SIGNAL
from tests.fcgi_helpers import get
from tests.servers import Launcher, wait_until, write_config

HEADER = re.compile(r"^\[\d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d\]  \[pool (?P<pool>\S+)\] pid (?P<pid>\d+)$")
FRAME = re.compile(r"^\[0x[0-9a-f]{16}\] (?P<function>\S+)\(\) (?P<file>.+):(?P<line>\d+)$")
THIS_FILE = os.path.abspath(__file__)
ROUTER = "tests.apps.router:app"
APP = "tests.apps.counters_app:app"


# ---------------------------------------------------------------------------------------------------
# What a slow request does in the child. Each names itself in the innermost frame of the dump.

def blocked_in_sleep(seconds: float) -> None:
    """Blocked in C with the GIL released: time.sleep."""
    time.sleep(seconds)


def blocked_in_recv(sock: socket.socket) -> bytes:
    """Blocked in C with the GIL released: a read on a socket with no data yet."""
    return sock.recv(16)


def busy_in_python(seconds: float) -> int:
    """Holds the GIL in pure Python (the dumper gets it at the next switch interval)."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return n


def nested(levels: int, innermost: Callable[[], object]) -> object:
    """levels more Python frames above innermost."""
    if levels == 0:
        return innermost()
    return nested(levels - 1, innermost)


def line_of(function: Callable[..., object], text: str) -> int:
    """The line number in this file of the first line of function containing text."""
    lines, first = inspect.getsourcelines(function)
    for offset, line in enumerate(lines):
        if text in line:
            return first + offset
    raise AssertionError(f"{text!r} not in {function.__name__}")


# ---------------------------------------------------------------------------------------------------
# Helpers.

def parse_entries(text: str) -> list[dict[str, object]]:
    """The slowlog's entries: each a blank line, the header, script_filename, then frames."""
    assert text.startswith("\n"), repr(text[:80])
    entries = []
    for chunk in text[1:].split("\n\n"):
        lines = chunk.rstrip("\n").split("\n")
        header = HEADER.match(lines[0])
        assert header, lines[0]
        assert lines[1].startswith("script_filename = "), lines[1]
        frames = [FRAME.match(line) for line in lines[2:]]
        assert all(frames), lines[2:]
        entries.append({"pool": header["pool"], "pid": int(header["pid"]),
                        "script": lines[1].removeprefix("script_filename = "),
                        "frames": [(m["function"], m["file"], int(m["line"])) for m in frames if m]})
    return entries


def wait_for_entries(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, object]]:
    """Poll the slowlog until it holds count entries."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if text.count("\nscript_filename = ") >= count:
            return parse_entries(text)
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} slowlog entries expected, file holds:\n{text}")
        time.sleep(0.01)


def wait_blocked(pid: int, timeout: float = 10.0) -> None:
    """Wait until the child's main thread sleeps in the kernel (state S: in time.sleep or recv)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/stat") as stat:
            if stat.read().rpartition(")")[2].split()[0] == "S":
                return
        time.sleep(0.005)
    raise AssertionError("child never blocked")


def still_running(pid: int) -> bool:
    """Whether the child has not exited (nor been killed) yet."""
    return os.waitpid(pid, os.WNOHANG) == (0, 0)


def wait_exit(pid: int, timeout: float = 15.0) -> int:
    """The child's exit status; fails if it was killed by a signal or does not end in time."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status), f"child ended by signal {os.WTERMSIG(status)}"
            return os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("child did not finish")
        time.sleep(0.01)


@contextmanager
def child_process(body: Callable[[Callable[[], None]], None]) -> Iterator[int]:
    """Fork a child that runs body(ready) and exits 0 (1 on an exception); yield its pid once it
    has called ready(). The child is killed if the test leaves early."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(ready_r)

            def ready() -> None:
                os.write(ready_w, b"r")
                os.close(ready_w)

            body(ready)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        with os.fdopen(ready_r, "rb") as pipe:
            assert pipe.read(1) == b"r", "child failed before it was ready"
        yield pid
    finally:
        try:
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def worker_start(path: Path, depth: int = 20, script: str = "/srv/app.py") -> slowlog.StackDumper:
    """What a worker does after fork: reset the signal mask, then install."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    return slowlog.install("www", str(path), depth, lambda: (script, "GET"))


def assert_innermost(entry: dict[str, object], function: Callable[..., object], call: str) -> None:
    """The entry's first frame is function, at the line where it calls into C."""
    frames = entry["frames"]
    assert isinstance(frames, list) and frames
    assert frames[0] == (function.__qualname__, THIS_FILE, line_of(function, call)), frames[:3]


# ---------------------------------------------------------------------------------------------------
# Real processes.

def test_dump_while_blocked_in_sleep(tmp_path: Path) -> None:
    log = tmp_path / "slow.log"

    def body(ready: Callable[[], None]) -> None:
        worker_start(log)
        ready()
        blocked_in_sleep(2.0)

    with child_process(body) as pid:
        wait_blocked(pid)
        os.kill(pid, SLOWLOG_SIGNAL)
        [entry] = wait_for_entries(log, 1)
        assert still_running(pid), "the request must keep running after the dump"
        assert entry["pool"] == "www" and entry["pid"] == pid and entry["script"] == "/srv/app.py"
        assert_innermost(entry, blocked_in_sleep, "time.sleep(")
        assert len(entry["frames"]) <= 20  # type: ignore[arg-type]
        assert wait_exit(pid) == 0


def test_dump_while_blocked_in_socket_read_twice(tmp_path: Path) -> None:
    log = tmp_path / "slow.log"
    ours, theirs = socket.socketpair()

    def body(ready: Callable[[], None]) -> None:
        ours.close()
        worker_start(log, script="/index")
        ready()
        assert blocked_in_recv(theirs) == b"go on"

    with child_process(body) as pid:
        theirs.close()
        wait_blocked(pid)
        os.kill(pid, SLOWLOG_SIGNAL)
        wait_for_entries(log, 1)
        os.kill(pid, SLOWLOG_SIGNAL)
        first, second = wait_for_entries(log, 2)
        assert still_running(pid)
        for entry in (first, second):
            assert entry["pid"] == pid and entry["script"] == "/index"
            assert_innermost(entry, blocked_in_recv, "sock.recv(")
        ours.sendall(b"go on")  # the request's data arrives: it finishes normally
        assert wait_exit(pid) == 0
    ours.close()
    assert len(parse_entries(log.read_text())) == 2  # two entries, nothing in between


def test_dump_while_busy_in_python(tmp_path: Path) -> None:
    log = tmp_path / "slow.log"

    def body(ready: Callable[[], None]) -> None:
        worker_start(log)
        ready()
        busy_in_python(2.0)

    with child_process(body) as pid:
        time.sleep(0.3)  # into the loop (it never sleeps, so there is no state to wait for)
        os.kill(pid, SLOWLOG_SIGNAL)
        [entry] = wait_for_entries(log, 1)
        assert still_running(pid)
        frames = entry["frames"]
        assert isinstance(frames, list)
        assert frames[0][0] == "busy_in_python" and frames[0][1] == THIS_FILE
        assert wait_exit(pid) == 0


@pytest.mark.parametrize("depth", [1, 3])
def test_trace_depth_limits_frames(tmp_path: Path, depth: int) -> None:
    log = tmp_path / "slow.log"

    def body(ready: Callable[[], None]) -> None:
        worker_start(log, depth=depth)
        ready()
        nested(10, lambda: blocked_in_sleep(1.5))

    with child_process(body) as pid:
        wait_blocked(pid)
        os.kill(pid, SLOWLOG_SIGNAL)
        [entry] = wait_for_entries(log, 1)
        frames = entry["frames"]
        assert isinstance(frames, list) and len(frames) == depth
        assert [f[0] for f in frames] == ["blocked_in_sleep", "test_trace_depth_limits_frames.<locals>.body"
                                          ".<locals>.<lambda>", "nested"][:depth]
        assert wait_exit(pid) == 0


def test_mask_survives_what_workers_and_apps_do(tmp_path: Path) -> None:
    """Blocking/unblocking other signals, threads and subprocess leave SLOWLOG_SIGNAL blocked in
    every thread but the dumper, so the signal still reaches the dumper."""
    log = tmp_path / "slow.log"
    report_r, report_w = os.pipe()

    def body(ready: Callable[[], None]) -> None:
        os.close(report_r)
        dumper = worker_start(log)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGUSR2})
        subprocess.run(["true"], check=True)
        app_thread = threading.Thread(target=time.sleep, args=(3,), daemon=True)
        app_thread.start()
        time.sleep(0.1)  # the dumper is inside sigwait by now
        unblocked = slowlog.unblocked_threads()
        dumper_tid = dumper._thread.native_id
        os.write(report_w, repr((unblocked, dumper_tid)).encode())
        os.close(report_w)
        ready()
        blocked_in_sleep(1.5)

    with child_process(body) as pid:
        os.close(report_w)
        with os.fdopen(report_r) as report:
            unblocked, dumper_tid = ast.literal_eval(report.read())
        assert unblocked in ([], [dumper_tid])
        wait_blocked(pid)
        os.kill(pid, SLOWLOG_SIGNAL)
        [entry] = wait_for_entries(log, 1)
        assert_innermost(entry, blocked_in_sleep, "time.sleep(")
        assert wait_exit(pid) == 0


def test_stray_signal_is_harmless_without_install() -> None:
    def body(ready: Callable[[], None]) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        signal.signal(SLOWLOG_SIGNAL, signal.SIG_DFL)
        ready()
        time.sleep(0.5)

    with child_process(body) as pid:
        os.kill(pid, SLOWLOG_SIGNAL)
        time.sleep(0.1)
        assert still_running(pid)
        assert wait_exit(pid) == 0


def test_unwritable_slowlog_does_not_kill_the_worker(tmp_path: Path) -> None:
    log = tmp_path / "missing-dir" / "slow.log"
    errors_r, errors_w = os.pipe()

    def body(ready: Callable[[], None]) -> None:
        os.close(errors_r)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        slowlog.install("www", str(log), 20, lambda: ("/x", "GET"),
                        on_error=lambda line: os.write(errors_w, line.encode() + b"\n"))
        ready()
        blocked_in_sleep(1.0)

    with child_process(body) as pid:
        os.close(errors_w)
        wait_blocked(pid)
        os.kill(pid, SLOWLOG_SIGNAL)
        with os.fdopen(errors_r) as errors:
            line = errors.readline()
        assert "cannot write slowlog" in line and str(log) in line
        assert still_running(pid)
        assert wait_exit(pid) == 0


# ---------------------------------------------------------------------------------------------------
# In this process: install, dump the test's own stack, stop.

def test_install_and_stop_in_process(tmp_path: Path) -> None:
    log = tmp_path / "slow.log"
    was_blocked = SLOWLOG_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    dumper = slowlog.install("inproc", str(log), 2, lambda: ("", "GET"))
    try:
        with pytest.raises(RuntimeError):
            slowlog.install("inproc", str(log), 2, lambda: ("", "GET"))
        assert SLOWLOG_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        # To the dumper thread itself: the test process has other threads (left by earlier tests)
        # that do not block the signal and could take a process-directed one. Delivery to the
        # process is covered by the forked-worker tests above.
        signal.pthread_kill(dumper._thread.ident, SLOWLOG_SIGNAL)
        deadline = time.monotonic() + 10
        while dumper.dumps == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # the dump shows this frame, blocked in time.sleep
        [entry] = parse_entries(log.read_text())
        assert entry["pool"] == "inproc" and entry["pid"] == os.getpid() and entry["script"] == ""
        frames = entry["frames"]
        assert isinstance(frames, list) and len(frames) == 2
        assert frames[0] == ("test_install_and_stop_in_process", THIS_FILE,
                             line_of(test_install_and_stop_in_process, "# the dump shows this frame"))
        assert dumper.dumps == 1
    finally:
        dumper.stop()
    assert not dumper.alive
    assert (SLOWLOG_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, [])) == was_blocked


# ---------------------------------------------------------------------------------------------------
# Formatting.

def test_entry_layout_matches_php_fpm() -> None:
    frame = sys._getframe()
    when = time.mktime((2026, 11, 22, 10, 0, 0, 0, 0, -1))
    entry = slowlog.format_entry("www", 1234, "/srv/app.py", frame, 1, when)  # the frame's current line
    line = line_of(test_entry_layout_matches_php_fpm, "# the frame's current line")
    assert entry == ("\n[22-Nov-2026 10:00:00]  [pool www] pid 1234\n"
                     "script_filename = /srv/app.py\n"
                     f"[0x{id(frame):016x}] test_entry_layout_matches_php_fpm() {THIS_FILE}:{line}\n")


def test_entry_without_frame_and_with_control_characters() -> None:
    entry = slowlog.format_entry("www", 1, "/a\nb\x7f", None, 5, 0.0)
    assert entry.endswith("script_filename = /a.b.\n+++ dump failed\n")


def test_format_frames_depth_and_qualname() -> None:
    class Handler:
        def method(self) -> list[str]:
            return slowlog.format_frames(sys._getframe(), 2)

    lines = Handler().method()
    assert len(lines) == 2
    assert FRAME.match(lines[0])["function"] == (  # type: ignore[index]
        "test_format_frames_depth_and_qualname.<locals>.Handler.method")
    assert FRAME.match(lines[1])["function"] == "test_format_frames_depth_and_qualname"  # type: ignore[index]


def test_invalid_depth() -> None:
    with pytest.raises(ValueError):
        slowlog.StackDumper("www", "/dev/null", 0, lambda: ("", ""), threading.get_ident())


def test_master_messages_match_php_fpm() -> None:
    assert slowlog.slow_request_message("www", 123, "/x", "GET", "/x", 5.0100009) == (
        "[pool www] child 123, script '/x' (request: \"GET /x\") executing too slow (5.010000 sec), logging")
    assert slowlog.terminate_message("www", 123, "/srv/app.py", "POST", "/api", 30.5,
                                     query_string="a=1&b=2") == (
        "[pool www] child 123, script '/srv/app.py' (request: \"POST /api?a=1&b=2\") "
        "execution timed out (30.500000 sec), terminating")
    assert "script '/caf.'" in slowlog.slow_request_message("www", 1, "/caf\xe9", "GET", "/", 1)


def test_master_messages_stay_on_one_line() -> None:
    # nginx percent-decodes SCRIPT_FILENAME, so /x%0Ay arrives as "/x\ny": php-fpm's
    # str_purify_filename turns it (and anything above 0x7f) into "."; fastfpm does it to the request too.
    message = slowlog.terminate_message("www", 7, "/x\n[01-Jan-2026 00:00:00] ALERT: forged", "GET",
                                        "/x\ny", 2.0000019, query_string="a=\r\x7f")
    assert message == ("[pool www] child 7, script '/x.[01-Jan-2026 00:00:00] ALERT: forged' "
                       "(request: \"GET /x.y?a=.\x7f\") execution timed out (2.000001 sec), terminating")
    assert len(message.splitlines()) == 1


def test_request_line_and_seconds_text() -> None:
    assert slowlog.request_line("GET", "/x", "a=1") == "GET /x?a=1"
    assert slowlog.request_line("GET", "/x?a=1", "a=1") == "GET /x?a=1"  # nginx's REQUEST_URI has it
    assert slowlog.request_line("", "/x", "a=1") == ""  # no request line read yet
    assert slowlog.seconds_text(1.9999999) == "1.999999"  # truncated, as a timeval prints
    assert slowlog.seconds_text(1000.0 - (1000.0 - 0.29)) == "0.290000"  # float noise is not a microsecond
    assert slowlog.seconds_text(-0.5) == "0.000000"


# ---------------------------------------------------------------------------------------------------
# Through a real master and its workers: the request_slowlog_timeout warning and the entry.


def test_slowlog_gets_the_traceback_of_a_request_blocked_in_c(launcher: Launcher, tmp_path: Path) -> None:
    slowlog = tmp_path / "slow.log"
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=[
        "--request-slowlog-timeout", "0.5s", "--slowlog", str(slowlog)])
    response = get(server.address, "/slow", "seconds=2")
    # The request kept running and finished normally after its traceback was taken.
    assert response.status == 200 and response.body.startswith(b"slept 2")
    log = server.wait_for_log("executing too slow")
    assert '(request: "GET /slow?seconds=2")' in log
    entry = wait_until(lambda: slowlog.exists() and "pool www" in slowlog.read_text() and slowlog.read_text(),
                       5, message="the slowlog entry")
    pid = response.body.split()[-1].decode()
    assert f"[pool www] pid {pid}" in entry
    assert "script_filename = /var/www/html/slow" in entry  # SCRIPT_FILENAME as the client sent it
    # Innermost frame first: the app blocked in time.sleep (C code), then the router that called it.
    frames = [line for line in entry.splitlines() if line.startswith("[0x")]
    assert frames[0].startswith("[0x") and " app() " in frames[0]
    assert "tests/apps/slow.py:" in frames[0] and "tests/apps/router.py:" in frames[1]


def test_slowlog_entries_follow_a_renamed_file_without_a_signal(launcher: Launcher, tmp_path: Path) -> None:
    # The worker opens the slowlog for each entry (fastfpm.slowlog.append_entry), as php-fpm's
    # fpm_php_trace opens it for each trace, so logrotate's rename is enough: no SIGUSR1 needed.
    slowlog = tmp_path / "slow.log"
    conf = write_config(tmp_path / "s.conf", f"""
[www]
listen = {tmp_path}/s.sock
app = {APP}
pm = static
pm.max_children = 1
request_slowlog_timeout = 0.5s
slowlog = {slowlog}
""")
    server = launcher.fastfpm("", max_children=1, extra_args=["-c", str(conf)])
    server.address = str(tmp_path / "s.sock")
    assert get(server.address, "/first", "do=sleep&seconds=1.2").status == 200
    wait_until(lambda: "/first" in slowlog.read_text(), 5, message="the first entry")
    rotated = tmp_path / "slow.log.1"
    slowlog.rename(rotated)
    assert get(server.address, "/second", "do=sleep&seconds=1.2").status == 200
    wait_until(lambda: slowlog.exists() and "/second" in slowlog.read_text(), 5,
               message="the second entry in a new slow.log")
    assert "/second" not in rotated.read_text() and rotated.read_text().count("[pool www] pid") == 1
    assert "/first" not in slowlog.read_text()
    # Re-created by the worker with the mode the master gives it at start (not world-readable:
    # tracebacks show request data).
    assert slowlog.stat().st_mode & 0o777 == rotated.stat().st_mode & 0o777 == 0o640
