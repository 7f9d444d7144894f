"""The pool counters php-fpm's status page shows, through real processes: a running master's
scoreboard is copied out of its memory (as a status page in another process would map it) and read
with fastfpm.scoreboard.read_pool_counters; and where else operators read them (the systemd STATUS
line, the error log).

Each counter has one home, the pool header, written by the master where it changes: the listen
queue sampled once a second, max active processes, max children reached and slow requests when pm
decides them, and accepted conn / requests kept across worker restarts.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from tests.fcgi_helpers import get
from tests.servers import (
    Launcher,
    free_port,
    missing_requirement,
    notified_master,
    wait_until,
    write_config,
)

APP = "tests.apps.gate_app:app"
COUNTERS_APP = "tests.apps.counters_app:app"


def master_counters(pid: int, pool: str):
    """PoolCounters of `pool`, from a copy of its scoreboard in process pid's memory (/proc/PID/mem).

    The scoreboard is a shared anonymous mapping ("/dev/zero (deleted)" in /proc/PID/maps); the one
    whose header has the scoreboard's magic and the pool's name is the pool's.
    """
    from fastfpm.scoreboard import ffi, lib, read_pool_counters

    with open(f"/proc/{pid}/maps") as maps:
        ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps
                  if line.rstrip().endswith("/dev/zero (deleted)") and line.split()[1].endswith("s")]
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for start, end in ranges:
                mem.seek(start)
                data = bytearray(mem.read(end - start))
                header = ffi.cast("ffpm_pool_header *", ffi.from_buffer(data))
                if header.magic == lib.FFPM_SB_MAGIC and ffi.string(header.pool_name).decode() == pool:
                    return read_pool_counters(data)
    except PermissionError as exc:  # ptrace rules (Yama, no CAP_SYS_PTRACE) can forbid it
        missing_requirement(f"cannot read the master's memory: {exc}")
    raise AssertionError(f"no scoreboard of pool {pool!r} among the shared mappings of {pid}")


def background_get(address: str, query: str, results: list) -> threading.Thread:
    """One GET in a thread; its response (or exception) lands in results."""
    def run() -> None:
        try:
            results.append(get(address, "/", query, timeout=30))
        except Exception as exc:  # reported by the assertion on results
            results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_release_folds_a_slot_into_the_pool_totals() -> None:
    # No processes: the master's side of a worker's end, on a fresh scoreboard.
    from fastfpm.scoreboard import Scoreboard

    board = Scoreboard(2, "www")
    board.claim(0, 0)
    board.set_pid(0, 111)
    slot = board._slots[0]
    slot.accepted_conn, slot.requests = 4, 3
    slot.duration_buckets[0], slot.duration_buckets[6], slot.duration_sum_ns = 2, 1, 300_000_000
    assert (board.counters().accepted_conn, board.counters().requests) == (4, 3)
    board.release(0)
    after = board.counters()
    assert (after.accepted_conn, after.requests, after.total_processes) == (4, 3, 0)
    assert dict(after.duration_buckets)[0.005] == 2 and dict(after.duration_buckets)[0.5] == 1
    assert after.duration_sum_ns == 300_000_000
    assert board.header.seq % 2 == 0 and board.header.seq > 0
    board.claim(0, 0)  # a new worker's slot starts from zero; the pool's totals stay
    board.set_pid(0, 222)
    board._slots[0].accepted_conn = 1
    board._slots[0].duration_buckets[0] = 1
    assert board.counters().accepted_conn == 5
    assert [n for _, n in board.counters().duration_buckets] == [3, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    # A slot without a worker (pid 0) adds nothing, whatever it holds.
    board._slots[1].duration_buckets[11] = 9
    assert sum(n for _, n in board.counters().duration_buckets) == 4
    board.close()
    with pytest.raises(AttributeError):
        board.header.slow_requests  # noqa: B018 - the view refuses to touch the unmapped header


def test_accepted_conn_and_requests_survive_worker_restarts(launcher: Launcher, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "r.conf", f"""
[www]
listen = {tmp_path}/r.sock
app = {APP}
pm = static
pm.max_children = 1
pm.max_requests = 2
""")
    server = launcher.fastfpm("", max_children=1, extra_args=["-c", str(conf)])
    address = str(tmp_path / "r.sock")
    seen = []
    for _ in range(5):
        assert get(address, "/").status == 200
        seen.append(master_counters(server.pid, "www").accepted_conn)
    server.wait_for_log("exited with code 0", timeout=10)
    # Two workers ended after their second request; what they counted is still the pool's.
    final = wait_until(lambda: (c := master_counters(server.pid, "www")).requests == 5 and c, 10,
                       message="five requests counted")
    assert final.accepted_conn == 5
    assert seen == sorted(seen) and seen[-1] == 5
    assert server.log_text().count("exited with code 0") >= 2


def cumulative(counters, bound: float) -> int:
    """Requests of the pool's duration histogram that took at most bound seconds."""
    return sum(n for le, n in counters.duration_buckets if le <= bound)


def test_the_duration_histogram_counts_every_request_across_worker_restarts(launcher: Launcher,
                                                                            tmp_path: Path) -> None:
    conf = write_config(tmp_path / "h.conf", f"""
[www]
listen = {tmp_path}/h.sock
app = {COUNTERS_APP}
pm = static
pm.max_children = 1
pm.max_requests = 3
""")
    server = launcher.fastfpm("", max_children=1, extra_args=["-c", str(conf)])
    address = str(tmp_path / "h.sock")
    # Four requests answered at once and two that sleep 0.3 s, over three workers' lives.
    for query in ("", "do=sleep&seconds=0.3", "", "", "do=sleep&seconds=0.3", ""):
        assert get(address, "/", query).status == 200
    final = wait_until(lambda: (c := master_counters(server.pid, "www")).requests == 6
                       and server.log_text().count("exited with code 0") >= 2 and c, 10,
                       message="six requests counted and two workers replaced")
    # Every request is in the histogram once, the retired workers' ones too.
    assert sum(n for _, n in final.duration_buckets) == final.requests == 6
    assert [le for le, _ in final.duration_buckets][-1] == float("inf")
    assert cumulative(final, 0.25) == 4          # the sleeps take at least 0.3 s
    assert cumulative(final, 1.0) == 6
    assert cumulative(final, 0.005) >= 1         # an immediate answer takes well under 5 ms
    assert final.duration_sum_ns >= 600_000_000


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_listen_queue_max_children_and_slow_requests(launcher: Launcher, tmp_path: Path,
                                                     transport: str) -> None:
    address = str(tmp_path / "q.sock") if transport == "unix" else f"127.0.0.1:{free_port()}"
    conf = write_config(tmp_path / "q.conf", f"""
[www]
listen = {address}
listen.backlog = 37
app = {APP}
pm = dynamic
pm.max_children = 1
pm.start_servers = 1
pm.min_spare_servers = 1
pm.max_spare_servers = 1
request_slowlog_timeout = 1s
slowlog = {tmp_path}/slow.log
""")
    server = launcher.fastfpm("", max_children=1, extra_args=["-c", str(conf)])
    start = master_counters(server.pid, "www")
    assert (start.listen_queue, start.max_listen_queue, start.idle_processes, start.total_processes) \
        == (0, 0, 1, 1)
    assert start.start_time == pytest.approx(time.time(), abs=60)
    gate = tmp_path / "gate"
    results: list = []
    threads = [background_get(address, f"gate={gate}", results)]
    wait_until(lambda: master_counters(server.pid, "www").active_processes == 1, 10,
               message="the only worker to be busy")
    # Three more connections wait in the accept queue for the busy worker.
    threads += [background_get(address, "", results) for _ in range(3)]
    busy = wait_until(lambda: (c := master_counters(server.pid, "www")).listen_queue == 3 and c, 10,
                      message="the master's sample to see three waiting connections")
    assert (busy.max_listen_queue, busy.listen_queue_len) == (3, 37)
    assert (busy.active_processes, busy.idle_processes, busy.max_active_processes) == (1, 0, 1)
    # The only worker busy and none idle: pm.max_children stopped a spawn (once per episode), and the
    # request held at the gate runs past request_slowlog_timeout.
    held = wait_until(lambda: (c := master_counters(server.pid, "www")).slow_requests == 1
                      and c.max_children_reached == 1 and c, 10, message="the slow and max_children counts")
    assert held.listen_queue == 3
    gate.touch()
    for thread in threads:
        thread.join(30)
    assert [getattr(r, "status", r) for r in results] == [200] * 4
    after = wait_until(lambda: (c := master_counters(server.pid, "www")).listen_queue == 0
                       and c.requests == 4 and c, 10, message="the queue to drain")
    assert (after.max_listen_queue, after.listen_queue_len) == (3, 37)  # the max stays
    assert (after.accepted_conn, after.active_processes, after.idle_processes) == (4, 0, 1)
    assert (after.max_children_reached, after.slow_requests) == (1, 1)


def test_max_active_processes_is_the_most_busy_at_once(launcher: Launcher, tmp_path: Path) -> None:
    server = launcher.fastfpm(APP, max_children=3)
    gate = tmp_path / "gate"
    results: list = []
    threads = [background_get(server.address, f"gate={gate}", results) for _ in range(3)]
    wait_until(lambda: master_counters(server.pid, "www").active_processes == 3, 10,
               message="three busy workers")
    time.sleep(1.5)  # at least one maintenance tick with all three busy
    gate.touch()
    for thread in threads:
        thread.join(30)
    assert [getattr(r, "status", r) for r in results] == [200] * 3
    after = wait_until(lambda: (c := master_counters(server.pid, "www")).active_processes == 0 and c, 10,
                       message="the workers to be idle again")
    assert (after.max_active_processes, after.total_processes, after.idle_processes) == (3, 3, 3)


def test_slow_and_max_children_counters_reach_status_and_scoreboard(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "c.conf", f"""
[global]
error_log = {tmp_path}/error.log
systemd_interval = 1s

[www]
listen = {tmp_path}/c.sock
app = {COUNTERS_APP}
pm = dynamic
pm.max_children = 1
pm.start_servers = 1
pm.min_spare_servers = 1
pm.max_spare_servers = 1
request_slowlog_timeout = 1s
slowlog = {tmp_path}/slow.log
""")
    with notified_master(conf, tmp_path / "notify") as (proc, notify):
        assert "READY=1" in notify.recv(4096).decode()
        # nginx percent-decodes the path into SCRIPT_FILENAME: %0A becomes a newline there.
        response = get(str(tmp_path / "c.sock"), "/counters%0A[01-Jan-2026 00:00:00] ALERT: forged",
                       "do=sleep&seconds=2")
        assert response.status == 200
        # One slow request (2 s, well past the 1 s timeout: the check runs every third of it and a
        # loaded machine may run it late), and one max_children episode: the only worker was busy
        # with nobody idle for a maintenance tick. STATUS= carries the slow figure, php-fpm's words.
        deadline = time.monotonic() + 10
        while "slow: 1," not in (status := notify.recv(4096).decode()):
            assert "slow: 0," in status and time.monotonic() < deadline, status
        counters = master_counters(proc.pid, "www")
        assert (counters.max_children_reached, counters.slow_requests) == (1, 1)
        log = (tmp_path / "error.log").read_text()
        assert log.count("server reached pm.max_children setting (1)") == 1
        (warning,) = [line for line in log.splitlines() if "executing too slow" in line]
        assert "script '/var/www/html/counters.[01-Jan-2026 00:00:00] ALERT: forged'" in warning
        assert [line for line in log.splitlines() if "forged" in line] == [warning]  # one line, not two
        entry = wait_until(lambda: "script_filename" in (text := (tmp_path / "slow.log").read_text())
                           and text, 5, message="the slowlog entry")
        assert "script_filename = /var/www/html/counters.[01-Jan-2026 00:00:00] ALERT: forged\n" in entry
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(10) == 0
