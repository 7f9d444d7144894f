"""The scoreboard as the master sees it: slots written by a real forked worker, read through cffi."""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path

import pytest

from fastfpm.client import FastCGIClient, build_params
from fastfpm.scoreboard import STAGE_IDLE, STAGE_STARTING, Scoreboard
from fastfpm.wake import WakePipe
from tests.servers import forked_slot_worker, wait_until


def blocking_app(environ, start_response):
    """Hold the request until the file named by QUERY_STRING exists (the test's go signal)."""
    while not os.path.exists(environ["QUERY_STRING"]):
        time.sleep(0.01)
    start_response("201 Created", [("Content-Type", "text/plain")])
    return [b"done"]


class PoolStub:
    """The pool settings a worker reads (what fastfpm.config provides in the server)."""

    name = "sb"
    python_path: list[str] = []
    idle_timeout = 5.0
    read_timeout = 60.0
    max_params_size = 65536
    mount = ""
    pm_max_children = 2
    pm_max_requests = 0


@pytest.fixture
def forked_worker(tmp_path: Path):
    """A real worker process serving blocking_app from slot 1 of a fresh scoreboard."""
    with forked_slot_worker(tmp_path / "sb.sock", blocking_app, PoolStub, "sb") as worker:
        yield worker


def test_new_scoreboard_header_and_free_slots() -> None:
    board = Scoreboard(3, "www")
    assert board.pool_name == "www"
    assert board.snapshot() == []
    assert board.free_index() == 0
    board.claim(0, 0)
    assert board.free_index() == 1
    board.set_pid(0, 1234)
    (slot,) = board.snapshot()
    assert (slot.index, slot.pid, slot.stage) == (0, 1234, STAGE_STARTING)
    board.release(0)
    assert board.snapshot() == [] and board.free_index() == 0


def test_worker_writes_each_stage_and_the_request(forked_worker, tmp_path: Path) -> None:
    board, address, pid = forked_worker
    wait_until(lambda: board.read(1).stage == STAGE_IDLE, 10, message="the worker to reach accept()")
    go = tmp_path / "go"
    result = []
    params = build_params("PUT", "/things/7", str(go), {"Host": "h"}, 3,
                          {"SCRIPT_FILENAME": "/srv/things.py"})
    thread = threading.Thread(target=lambda: result.append(
        FastCGIClient(str(address), timeout=10).request(params, b"abc")))
    thread.start()
    running = wait_until(lambda: (s := board.read(1)).stage_name == "Running" and s, 10,
                         message="the Running stage")
    assert running.busy and running.pid == pid
    assert running.method == "PUT"
    assert running.request_uri == "/things/7?" + str(go)
    assert running.query_string == str(go)
    assert running.script_filename == "/srv/things.py"
    assert running.content_length == 3
    assert running.requests == 0 and running.accepted_conn == 1
    assert running.request_start_wall_us / 1e6 == pytest.approx(time.time(), abs=30)
    go.touch()
    thread.join(10)
    assert result and result[0].status == 201
    done = wait_until(lambda: (s := board.read(1)).requests == 1 and s.stage == STAGE_IDLE and s, 10,
                      message="the request to be counted")
    assert done.status == 201
    assert not done.busy
    assert done.last_request_ns > 0
    assert done.idle_since_ns >= done.request_start_ns


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_the_last_idle_worker_turning_busy_wakes_the_master(tmp_path: Path) -> None:
    # issue 12: the worker counts itself idle in the pool header (an atomic op) and, taking the
    # count to 0, writes the wake pipe the master watches; only on that transition.
    pipes: list[WakePipe] = []
    with forked_slot_worker(tmp_path / "w.sock", blocking_app, PoolStub, "sb",
                            before_fork=lambda board: pipes.append(WakePipe(board.header))) as worker:
        board, address, _ = worker
        wake = pipes[0]
        wait_until(lambda: board.read(1).stage == STAGE_IDLE, 10, message="the worker to reach accept()")
        assert board.header.idle_workers == 1 and not readable(wake.read_fd)
        go = tmp_path / "go"
        thread = threading.Thread(target=lambda: FastCGIClient(address, timeout=10).request(
            build_params("GET", "/", str(go), {}, None, {})))
        thread.start()
        wait_until(lambda: board.read(1).busy, 10, message="the request to start")
        assert board.header.idle_workers == 0
        assert readable(wake.read_fd)
        wake.drain()
        assert not readable(wake.read_fd)
        go.touch()
        thread.join(10)
        wait_until(lambda: board.read(1).stage == STAGE_IDLE and board.read(1).requests == 1, 10,
                   message="the worker idle again")
        assert board.header.idle_workers == 1 and not readable(wake.read_fd)
    # SIGKILLed while idle: freeing its slot takes it out of the count, without a wake-up.
    board.release(1)
    assert board.header.idle_workers == 0 and not readable(wake.read_fd)
    wake.close()
    assert board.header.wake_fd == 0


def test_slot_reads_are_consistent_while_the_worker_writes(forked_worker, tmp_path: Path) -> None:
    board, address, _ = forked_worker
    wait_until(lambda: board.read(1).stage == STAGE_IDLE, 10, message="the worker to reach accept()")
    go = tmp_path / "go"
    go.touch()  # blocking_app answers at once
    params = build_params("GET", "/x", str(go), {}, None, {})
    stop = threading.Event()

    def load() -> None:
        with FastCGIClient(str(address), timeout=10, keep_conn=True) as client:
            while not stop.is_set():
                client.request(params)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        # The worker rewrites the slot several times per request. Every copy must be whole (the
        # seqlock retries torn reads): "Running" always comes with the request's method and URI,
        # and the request counter never goes back.
        last_requests, running_seen = 0, 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            slot = board.read(1)
            if slot.stage_name == "Running":
                running_seen += 1
                assert slot.method == "GET" and slot.request_uri.startswith("/x?")
            assert slot.requests >= last_requests
            last_requests = slot.requests
    finally:
        stop.set()
        thread.join(10)
    assert last_requests > 10
    assert board.read(1).accepted_conn == 1  # one kept-alive connection carried them all


@pytest.fixture
def work_worker(tmp_path: Path):
    """A real worker process serving tests.apps.work from slot 1 of a fresh scoreboard."""
    from tests.apps import work

    with forked_slot_worker(tmp_path / "work.sock", work.app, PoolStub, "sb") as worker:
        yield worker


def served(board: Scoreboard, address: str, query: str, done: int):
    """GET /?query, then the slot once it has counted `done` requests and is idle again."""
    response = FastCGIClient(address, timeout=30).request(build_params("GET", "/", query, {}, None, {}))
    assert response.status == 200
    return wait_until(lambda: (s := board.read(1)).requests == done and s.stage == STAGE_IDLE and s, 10,
                      message=f"request {done} to be counted")


def test_a_request_s_cpu_and_the_worker_s_peak_memory_reach_the_slot(work_worker) -> None:
    board, address, _ = work_worker
    # Burning 0.2 s of CPU: at least that much is counted, whatever the load (which only stretches
    # the duration), and never more CPU than time for this single-threaded request.
    burn = served(board, address, "do=burn&seconds=0.2", 1)
    cpu_us = burn.last_request_utime_us + burn.last_request_stime_us
    assert cpu_us >= 190_000
    # (How it splits into user and system time is the kernel's tick-sampled estimate: the loop's
    # own clock reads are system calls, so no split is asserted.)
    assert burn.last_request_utime_us >= 0 and burn.last_request_stime_us >= 0
    assert 0 < burn.last_request_cpu <= 101
    assert burn.last_request_cpu == pytest.approx(cpu_us * 1000 / burn.last_request_ns * 100, abs=0.0051)
    # Sleeping 0.3 s costs next to no CPU.
    sleep = served(board, address, "do=sleep&seconds=0.3", 2)
    assert sleep.last_request_ns >= 300_000_000
    assert sleep.last_request_utime_us + sleep.last_request_stime_us < 50_000
    assert sleep.last_request_cpu < 15
    # The memory is the worker's peak resident set at the request's end: 50 MiB filled and freed
    # raise it by at least that, and it stays (a high-water mark, not the request's own use).
    before = sleep.last_request_memory
    assert 1 << 20 < before < 1 << 30
    alloc = served(board, address, "do=alloc&mb=50", 3)
    assert alloc.last_request_memory >= 50 << 20
    assert alloc.last_request_memory >= before + (45 << 20)
    after = served(board, address, "", 4)
    assert after.last_request_memory >= alloc.last_request_memory


def test_cpu_percent_is_rounded_once_for_the_page_and_the_log() -> None:
    """ffpm_cpu_hundredths: cpu / duration * 100 in hundredths, half up, exact past 2^63 µs x 10^7."""
    from fastfpm.scoreboard import lib

    assert lib.ffpm_cpu_hundredths(1, 2_000_000) == 5            # 1 µs of 2 ms: 0.05 %
    assert lib.ffpm_cpu_hundredths(1, 4_000_000) == 3            # 2.5 hundredths: up
    assert lib.ffpm_cpu_hundredths(1, 4_000_001) == 2
    assert lib.ffpm_cpu_hundredths(10**13, 10**16) == 10_000     # 115 days of CPU in as long: 100 %
    assert lib.ffpm_cpu_hundredths(5, 0) == lib.ffpm_cpu_hundredths(-5, 10) == 0
