"""Faults an attacker or a careless operator causes, under load (issue 11): slow and silent clients, a
stalled body, a master killed with SIGKILL, workers killed one after another.

Every test counts what was answered, closed or left alive; the deadlines are set small in the servers'
configuration, and a test waits for the state it asserts with a generous limit.
"""

from __future__ import annotations

import os
import random
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfpm import protocol as p
from fastfpm.client import build_params
from tests.fcgi_helpers import closed_by_peer, get, read_records, request_bytes
from tests.servers import FastFPMServer, Launcher, process_gone, wait_until

APP = "tests.apps.gate_app:app"
ROUTER = "tests.apps.router:app"
WORKERS = 4


class HeldConnections:
    """count connections to server held open, each sending payload one byte per second (nothing when
    payload is empty); `closed` holds those the server closed."""

    def __init__(self, server: FastFPMServer, count: int, payload: bytes = b"") -> None:
        self.socks = [server.connect() for _ in range(count)]
        self.payload = payload
        self.sent = [0] * count
        self.closed: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            for i, sock in enumerate(self.socks):
                if i not in self.closed and self.sent[i] < len(self.payload):
                    try:
                        sock.send(self.payload[self.sent[i]:self.sent[i] + 1])
                        self.sent[i] += 1
                    except OSError:
                        self.closed.add(i)
            # A second until the next byte, noticing closes meanwhile.
            open_socks = [s for i, s in enumerate(self.socks) if i not in self.closed]
            readable, _, _ = select.select(open_socks, [], [], 1.0) if open_socks else ([], [], [])
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.closed.add(self.socks.index(sock))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.socks:
            sock.close()


@pytest.fixture
def held() -> Iterator[list[HeldConnections]]:
    """HeldConnections a test opens, closed at its end."""
    opened: list[HeldConnections] = []
    yield opened
    for connections in opened:
        connections.close()


def normal_requests(server: FastFPMServer, count: int, timeout: float) -> list[int]:
    """The statuses of count GETs sent one after another, each with a client timeout (0: no answer)."""
    statuses = []
    for _ in range(count):
        try:
            statuses.append(get(server.address, "/", timeout=timeout).status)
        except Exception:  # a timeout or a reset is what this counts
            statuses.append(0)
    return statuses


def a_request_head() -> bytes:
    """BEGIN_REQUEST and the PARAMS through the empty record of a plain GET (no STDIN)."""
    whole = request_bytes(1, build_params("GET", "/", "", {"Host": "example"}, None, {}))
    return whole[:-8]  # the empty STDIN record is not part of the head


# --- slow clients: the head's deadline ---------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_tricklers_are_closed_after_the_head_deadline_while_normal_requests_are_served(
        launcher: Launcher, held: list[HeldConnections], transport: str) -> None:
    server = launcher.fastfpm(APP, transport, max_children=WORKERS,
                              extra_args=["--request-header-timeout", "2s"])
    mark = server.log_size()
    tricklers = HeldConnections(server, 2 * WORKERS, a_request_head())
    held.append(tricklers)
    # Eight connections sending a request a byte a second held all four workers before: 0 of 5 answered.
    assert normal_requests(server, 5, timeout=2) == [200] * 5
    wait_until(lambda: len(tricklers.closed) == 2 * WORKERS, 15, message="every trickler closed")
    assert max(tricklers.sent) < len(a_request_head())  # cut before their heads were complete
    log = server.wait_for_log("request_header_timeout", mark)
    # Eight closes in one burst, one line: the rest are counted into the pool's next such line.
    assert log.count("the request head did not arrive within request_header_timeout (2s)") == 1, log
    assert normal_requests(server, 1, timeout=5) == [200]


def test_a_head_larger_than_the_buffer_is_still_cut_at_the_deadline(launcher: Launcher) -> None:
    # A head too large to wait for whole among the worker's connections is read as it comes, and the
    # deadline still holds: the worker is given back after request_header_timeout.
    server = launcher.fastfpm(APP, max_children=1, extra_args=[
        "--request-header-timeout", "1s", "--max-params-size", "512K"])
    mark = server.log_size()
    pairs = p.encode_pairs([(b"HTTP_X_BIG", b"x" * 150_000)])
    with server.connect(timeout=10) as sock:
        sock.sendall(p.encode_begin_request(1) + p.encode_stream(p.PARAMS, 1, pairs)[:140_000])
        assert closed_by_peer(sock, timeout=10)
    server.wait_for_log("the request head did not arrive within request_header_timeout (1s)", mark)
    assert normal_requests(server, 1, timeout=5) == [200]


def test_a_body_that_stalls_is_closed_after_the_body_deadline(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--request-body-timeout", "1s"])
    mark = server.log_size()
    whole = request_bytes(1, build_params("POST", "/upload", "", {}, 100, {}), body=b"0123456789" * 10)
    # Without the empty STDIN record, the padding and the last 90 bytes: the body stops 10 bytes in.
    head_and_some_body = whole[:len(whole) - 8 - 4 - 90]
    with server.connect(timeout=10) as sock:
        sock.sendall(head_and_some_body)
        assert read_records(sock, timeout=10) == []  # closed without an answer: the app saw an abort
    server.wait_for_log("no more of the request body within request_body_timeout (1s)", mark)
    assert normal_requests(server, 1, timeout=5) == [200]


# --- silent connections ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_silent_connections_do_not_stall_the_pool(launcher: Launcher, held: list[HeldConnections],
                                                  transport: str) -> None:
    # Before: each worker sat on a silent connection for idle_timeout, eight of them froze four
    # workers for two idle timeouts. Here the client's timeout is one idle timeout.
    server = launcher.fastfpm(APP, transport, max_children=WORKERS, extra_args=["--idle-timeout", "1s"])
    mark = server.log_size()
    silent = HeldConnections(server, 2 * WORKERS)
    held.append(silent)
    assert normal_requests(server, 2 * WORKERS, timeout=1) == [200] * (2 * WORKERS)
    # Unix: closed after idle_timeout among the worker's connections. TCP: the kernel does not hand
    # them to accept() before TCP_DEFER_ACCEPT runs out (a second), then the same.
    wait_until(lambda: len(silent.closed) == 2 * WORKERS, 15, message="every silent connection closed")
    log = server.wait_for_log("nothing arrived", mark)
    assert log.count("nothing arrived within idle_timeout (1s) of accepting it") == 1, log
    assert len(server.worker_pids()) == WORKERS  # no worker was lost on the way


def test_a_silent_connection_does_not_delay_the_one_accepted_after_it(launcher: Launcher,
                                                                      held: list[HeldConnections]) -> None:
    # One worker: it must go on accepting while a silent connection waits, not sit on it.
    server = launcher.fastfpm(APP, max_children=1)
    held.append(HeldConnections(server, 3))
    assert normal_requests(server, 3, timeout=2) == [200] * 3


# --- the master dies ---------------------------------------------------------------------------


class Load:
    """clients threads sending GETs in a loop until stopped (or the server is gone); counts outcomes."""

    def __init__(self, server: FastFPMServer, clients: int) -> None:
        self.server = server
        self.ok = self.failed = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                ok = get(self.server.address, "/", timeout=10).status == 200
            except Exception:  # refused, reset or cut: counted
                ok = False
            with self.lock:
                self.ok += ok
                self.failed += not ok

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


def test_workers_finish_the_request_in_hand_and_exit_when_the_master_is_killed(
        launcher: Launcher, tmp_path: Path) -> None:
    server = launcher.fastfpm(APP, max_children=WORKERS)
    workers = server.settled_workers()
    started, gate = tmp_path / "started", tmp_path / "gate"
    slow: list = []

    def in_flight() -> None:
        try:
            slow.append(get(server.address, "/", f"gate={gate}&started={started}", timeout=30))
        except Exception as exc:  # reported by the assertion on slow
            slow.append(exc)

    slow_thread = threading.Thread(target=in_flight, daemon=True)
    slow_thread.start()
    wait_until(started.exists, 10, message="the slow request to reach the app")
    load = Load(server, WORKERS)  # more clients than free workers: none is ever idle long
    try:
        wait_until(lambda: load.ok >= 50, 20, message="the load to be served")
        server.signal(signal.SIGKILL)
        # The workers not holding the slow request finish what they serve and go, under load.
        wait_until(lambda: sum(not process_gone(pid) for pid in workers) == 1, 10,
                   message="every worker but the busy one gone")
        load.stop.set()
        (busy,) = [pid for pid in workers if not process_gone(pid)]
        gate.touch()
        slow_thread.join(30)
        assert [getattr(r, "body", r) for r in slow] == [f"done in {busy}\n".encode()]  # all of it
        wait_until(lambda: process_gone(busy), 10, message="the last worker gone after its request")
    finally:
        gate.touch()
        load.end()


def test_workers_running_as_the_pool_user_also_exit_when_the_master_is_killed(
        launcher: Launcher, tmp_path: Path) -> None:
    # setuid() clears the kernel's parent-death signal: it must be asked for after the switch.
    if os.geteuid() != 0:
        pytest.skip("switching workers to another user needs the master to run as root")
    os.chmod(tmp_path, 0o755)
    conf = tmp_path / "u.conf"
    conf.write_text(f"""
[www]
user = nobody
listen = {tmp_path}/u.sock
app = {APP}
chdir = /tmp
pm.max_children = {WORKERS}
""")
    server = launcher.fastfpm("", max_children=WORKERS, extra_args=["-c", str(conf)])
    server.address = str(tmp_path / "u.sock")
    workers = server.settled_workers()
    load = Load(server, 2 * WORKERS)
    try:
        wait_until(lambda: load.ok >= 50, 20, message="the load to be served")
        server.signal(signal.SIGKILL)
        wait_until(lambda: all(map(process_gone, workers)), 10, message="every worker gone")
    finally:
        load.end()


# --- workers die under load --------------------------------------------------------------------


def test_killing_workers_under_load_fails_at_most_the_requests_they_held(launcher: Launcher) -> None:
    server = launcher.fastfpm(APP, max_children=WORKERS)
    server.settled_workers()
    load = Load(server, WORKERS)
    kills = 0
    rng = random.Random(11)
    try:
        for _ in range(30):  # one SIGKILL every 100 ms for three seconds
            pids = server.worker_pids()
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
    finally:
        load.end()
    assert load.ok > 0
    assert load.failed <= kills, (load.failed, kills)
    assert len(server.settled_workers()) == WORKERS  # the pool is back to full
    assert normal_requests(server, WORKERS, timeout=5) == [200] * WORKERS


# --- the log limiter ---------------------------------------------------------------------------


def test_the_deadline_log_limiter_lets_one_line_through_per_interval_and_counts_the_rest() -> None:
    from fastfpm._scoreboard_cffi import ffi, lib

    header = ffi.new("ffpm_pool_header *")
    second = 1_000_000_000
    permits = [lib.ffpm_log_permit(header, now * second, 10 * second) for now in (1, 2, 3, 10, 11, 12, 30)]
    # The first goes through; those at 2, 3 and 10 s are counted into the line at 11 s; the one at
    # 12 s into the line at 30 s.
    assert permits == [0, -1, -1, -1, 3, -1, 1]


def test_a_slow_client_line_is_one_warning_in_the_workers_log(launcher: Launcher) -> None:
    server = launcher.fastfpm(APP, max_children=1, extra_args=["--request-header-timeout", "1s"])
    mark = server.log_size()
    with server.connect() as sock:
        sock.sendall(a_request_head()[:20])
        assert closed_by_peer(sock, timeout=10)
    log = server.wait_for_log("request_header_timeout", mark)
    (line,) = [line for line in log.splitlines() if "request_header_timeout" in line]
    assert "WARNING: [pool www] child" in line and line.endswith(
        "closing a FastCGI connection: the request head did not arrive within request_header_timeout (1s)")
