"""The master beyond the first start: ondemand waiting, SIGUSR1, exit lines (reloads: test_reload.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from fastfpm import master
from tests.fcgi_helpers import get
from tests.servers import ConfiguredServer, FastFPMServer, Launcher, server_busy, wait_until

ROUTER = "tests.apps.router:app"
# A master spinning on a waiting connection used 0.5 to 1.2 s of CPU in these windows (on a shared
# 2-core machine); one that sleeps uses next to nothing. A bound against a spin, not a timing.
SPIN_BOUND_SECONDS = 0.2


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def master_cpu_over(server: FastFPMServer, seconds: float) -> float:
    """CPU the master used during the next `seconds` of wall time."""
    before = cpu_seconds(server.pid)
    time.sleep(seconds)
    return cpu_seconds(server.pid) - before


# ------------------------------------------------------------------ ondemand: no busy loop


def test_ondemand_master_sleeps_while_a_connection_waits_for_a_busy_full_pool(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--pm", "ondemand"])
    thread = threading.Thread(target=get, args=(server.address, "/slow", "seconds=4"))
    thread.start()
    waiting = None
    try:
        wait_until(lambda: server_busy(server), 5, message="the slow request to start")
        waiting = server.connect()  # queued behind the only worker pm.max_children allows
        mark = server.log_size()
        used = master_cpu_over(server, 1.5)
        assert used < SPIN_BOUND_SECONDS, f"the master used {used:.2f}s of CPU in 1.5s"
        # The full pool is still noticed (at the once-a-second maintenance), once.
        log = server.wait_for_log("reached pm.max_children setting (1)", mark, timeout=3)
        assert log.count("reached pm.max_children") == 1
    finally:
        if waiting is not None:
            waiting.close()
        thread.join(10)


def test_ondemand_master_sleeps_while_the_worker_for_a_connection_starts(launcher: Launcher) -> None:
    server = launcher.fastfpm("tests.apps.lifecycle_slow_start:app", max_children=2,
                              extra_args=["--pm", "ondemand"])
    waiting = server.connect()
    try:
        wait_until(lambda: server.worker_pids(), 5, message="a worker forked for the connection")
        used = master_cpu_over(server, 1.2)  # the worker imports for 2 s
        assert used < SPIN_BOUND_SECONDS, f"the master used {used:.2f}s of CPU in 1.2s"
        assert len(server.worker_pids()) == 1  # one connection, one worker
    finally:
        waiting.close()
    assert get(server.address, "/").status == 200


# ------------------------------------------------------------------ exit lines


@pytest.mark.parametrize(("status", "expected"), [
    (0, "exited with code 0"),
    (3 << 8, "exited with code 3"),
    (signal.SIGKILL, "exited on signal 9 (SIGKILL)"),
    (signal.SIGSEGV | 0x80, "exited on signal 11 (SIGSEGV - core dumped)"),  # WCOREDUMP's bit
    (40, "exited on signal 40 (SIGRTMIN+6)"),
])
def test_describe_exit(status: int, expected: str) -> None:
    assert master.describe_exit(status) == expected


def core_dumps_land_in_the_cwd() -> bool:
    """Whether a crashing worker's core goes to a file in its directory (not to a crash collector)."""
    try:
        with open("/proc/sys/kernel/core_pattern") as f:
            pattern = f.read().strip()
    except OSError:
        return False
    import resource

    return not pattern.startswith("|") and "/" not in pattern and \
        resource.getrlimit(resource.RLIMIT_CORE)[1] != 0


@pytest.mark.skipif(not core_dumps_land_in_the_cwd(), reason="core dumps do not go to the worker's cwd here")
def test_a_worker_that_dumps_core_is_logged_as_such(configured: Callable[..., ConfiguredServer]) -> None:
    server = configured("""
[www]
listen = {dir}/fpm.sock
app = tests.apps.crash:app
chdir = {dir}
rlimit_core = unlimited
pm = static
pm.max_children = 1
""")
    worker = server.worker_pids()[0]
    mark = server.log_size()
    try:
        with pytest.raises(Exception):  # noqa: B017 - the worker dies mid-request: any client error
            get(server.address, "/crash")
        log = server.wait_for_log(f"child {worker} exited", mark)
        assert f"child {worker} exited on signal 11 (SIGSEGV - core dumped) after" in log
    finally:
        for core in server.workdir.glob("core*"):
            core.unlink()  # some megabytes each


def test_workers_stop_when_the_master_is_killed(launcher: Launcher) -> None:
    # SIGKILL leaves the master no chance to stop its workers: they must notice on their own
    # (gunicorn's workers do the same) rather than serve on with nobody to supervise them.
    server = launcher.fastfpm("tests.apps.router:app", max_children=2)
    workers = server.worker_pids()
    assert len(workers) == 2
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)

    def all_gone() -> bool:
        alive = []
        for pid in workers:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                        alive.append(pid)
            except FileNotFoundError:
                pass
        return not alive

    wait_until(all_gone, 10, message="workers exiting after their master was killed")
