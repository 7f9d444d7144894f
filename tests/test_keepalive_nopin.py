"""Keep-alive with no pinning (issue 12): a request on an idle kept connection of a busy worker.

Two workers. Connections are opened with FastCGI KEEP_CONN until two of them are held by the same
worker (the answer names the pid that served it). That worker is then given a slow request on
one, and a quick request is sent on the other: an idle worker exists, so the quick one must be
answered while the slow one is still running, by the other worker. Today a kept connection
belongs to the worker that accepted it, so the quick request waits for the slow one: the test is
marked xfail(strict) until the shared kept set lands, and flips to a failure (XPASS) the day it
does, so the mark cannot be forgotten.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfpm import protocol as p
from fastfpm.client import build_params
from tests.fcgi_helpers import read_records, request_bytes
from tests.servers import FastFPMServer, wait_until

APP = "tests.apps.contract_wsgi:app"
SLOW_SECONDS = 4.0  # long enough that "answered before the slow one ended" is not a race


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[FastFPMServer]:
    """fastfpm serving contract_wsgi with pm static, two workers, on a unix socket."""
    server = FastFPMServer(APP, tmp_path, transport="unix", max_children=2).start()
    yield server
    server.stop()


def body_of(records: list[p.Record]) -> bytes:
    """The response body (after the head) of one answered request."""
    out = b"".join(r.content for r in records if r.type == p.STDOUT)
    assert records and records[-1].type == p.END_REQUEST, records
    return out.partition(b"\r\n\r\n")[2]


def ask(sock: socket.socket, path: str, query: str = "") -> None:
    """Send one KEEP_CONN request on sock (the answer is read separately)."""
    sock.sendall(request_bytes(1, build_params("GET", path, query), flags=p.KEEP_CONN))


def served_by(sock: socket.socket) -> int:
    """Send a quick request on sock and return the pid of the worker that answered it."""
    ask(sock, "/log", "text=probe")
    return int(body_of(read_records(sock)))


def two_on_one_worker(address: str, tries: int = 40) -> tuple[int, socket.socket, socket.socket, list]:
    """(pid, a, b, every socket opened): two kept connections held by the same worker."""
    opened: list[socket.socket] = []
    by_pid: dict[int, socket.socket] = {}
    for _ in range(tries):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        opened.append(sock)
        pid = served_by(sock)
        if pid in by_pid:
            return pid, by_pid[pid], sock, opened
        by_pid[pid] = sock
    raise AssertionError(f"{tries} connections and never two on one worker: {sorted(by_pid)}")


@pytest.mark.xfail(strict=True, reason="kept connections are pinned to their worker (issue 12, "
                                       "not done yet: docs/architecture.md 'Keep-alive without pinning')")
def test_request_on_a_busy_workers_kept_connection_is_served_by_an_idle_one(
        two_workers: FastFPMServer) -> None:
    owner, slow_conn, quick_conn, opened = two_on_one_worker(two_workers.address)
    try:
        started = two_workers.workdir / "slow-started"
        ask(slow_conn, "/slow", f"seconds={SLOW_SECONDS}&started={started}")
        # Only once the owner runs the slow request is it busy: sent earlier, the quick one could be
        # picked first by the owner itself.
        wait_until(lambda: started.exists(), 10, message="the slow request to start")
        ask(quick_conn, "/log", "text=quick")
        readable, _, _ = select.select([quick_conn, slow_conn], [], [], SLOW_SECONDS * 2)
        assert quick_conn in readable and slow_conn not in readable, (
            "the quick request was not answered before the slow one ended: it waited for its "
            "connection's busy worker although the other worker was idle")
        quick_pid = int(body_of(read_records(quick_conn)))
        assert quick_pid != owner
        assert int(body_of(read_records(slow_conn, timeout=SLOW_SECONDS * 2))) == owner
    finally:
        for sock in opened:
            sock.close()
