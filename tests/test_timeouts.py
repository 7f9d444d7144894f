"""Timeouts the master enforces on workers: request_terminate_timeout and process_control_timeout."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from tests.fcgi_helpers import get
from tests.servers import Launcher, server_busy, wait_until, write_config

ROUTER = "tests.apps.router:app"
APP = "tests.apps.counters_app:app"


def test_request_terminate_timeout_ends_a_stuck_request(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--request-terminate-timeout", "1s"])
    started = time.monotonic()
    try:
        response = get(server.address, "/slow", "seconds=30")
        ended = response.status
    except Exception as exc:  # the connection is cut with the worker
        ended = exc
    assert time.monotonic() - started < 10
    assert not isinstance(ended, int) or ended >= 500
    log = server.wait_for_log("execution timed out")
    assert "terminating" in log
    wait_until(lambda: len(server.worker_pids()) == 1, 5, message="a replacement worker")
    assert get(server.address, "/env").status == 200


def test_request_terminate_timeout_kills_a_worker_that_ignores_sigterm(launcher: Launcher,
                                                                      tmp_path: Path) -> None:
    conf = write_config(tmp_path / "t.conf", f"""
[www]
listen = {tmp_path}/t.sock
app = {APP}
pm = static
pm.max_children = 1
request_terminate_timeout = 1s
""")
    server = launcher.fastfpm("", max_children=1, extra_args=["-c", str(conf)])
    server.address = str(tmp_path / "t.sock")
    (pid,) = server.worker_pids()
    outcome: list[object] = []

    def stuck() -> None:
        try:
            outcome.append(get(server.address, "/", "do=ignore-term&seconds=30"))
        except Exception as exc:  # the connection dies with the worker: what this test expects
            outcome.append(exc)

    thread = threading.Thread(target=stuck)
    thread.start()
    log = server.wait_for_log(f"child {pid} exited on signal 9 (SIGKILL)", timeout=15)
    timed_out = log.index(f"child {pid}, script '/var/www/html/' (request: \"GET /?do=ignore-term")
    assert "execution timed out" in log[timed_out:].splitlines()[0]
    killing = log.index(f"child {pid} still running 1s after SIGTERM, sending SIGKILL")
    assert timed_out < killing < log.index(f"child {pid} exited on signal 9 (SIGKILL)")
    thread.join(10)
    assert outcome and isinstance(outcome[0], Exception)
    (replacement,) = wait_until(lambda: (pids := server.worker_pids()) and pid not in pids and pids, 10,
                                message="a replacement worker")
    assert get(server.address, "/").body == f"done in {replacement}\n".encode()


def test_graceful_stop_terminates_after_process_control_timeout(launcher: Launcher, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "p.conf", f"""
[global]
process_control_timeout = 1s

[www]
listen = {tmp_path}/p.sock
app = {ROUTER}
pm.max_children = 1
""")
    server = launcher.fastfpm("", extra_args=["-c", str(conf)])
    server.address = str(tmp_path / "p.sock")
    outcome: list[object] = []

    def long_request() -> None:
        try:
            outcome.append(get(server.address, "/slow", "seconds=30"))
        except Exception as exc:  # the request is cut: that is what this test expects
            outcome.append(exc)

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_until(lambda: server_busy(server), 5, message="the long request to start")
    started = time.monotonic()
    server.signal(signal.SIGQUIT)
    assert server.proc is not None and server.proc.wait(15) == 0
    assert 0.9 <= time.monotonic() - started < 10
    assert "process_control_timeout passed" in server.log_text()
    thread.join(5)
    assert outcome and isinstance(outcome[0], Exception)  # cut, not answered
