"""Process titles as `ps` shows them: the master with its configuration file (or app), workers with
their pool, and the generation of the workers a reload started while the old ones still finish.

Read from real running servers: /proc/PID/cmdline (what `ps -o args` prints) and `ps` itself.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable
from types import SimpleNamespace

from fastfpm.proctitle import master_title, worker_title
from tests.fcgi_helpers import get
from tests.servers import ConfiguredServer, Launcher, server_busy, wait_until

TWO_POOLS = """
[www]
listen = {dir}/www.sock
app = tests.apps.router:app
pm = static
pm.max_children = 2

[api]
listen = {dir}/api.sock
app = tests.apps.router:app
pm = static
pm.max_children = 1
"""


def cmdline(pid: int) -> str:
    """The process's argv as the kernel shows it, NULs as spaces (how ps prints args)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().rstrip(b"\0").replace(b"\0", b" ").decode()


def ps_args(pid: int) -> str:
    """`ps -o args= -p PID`."""
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True,
                          check=True).stdout.strip()


def titles(pids: list[int]) -> list[str]:
    return sorted(cmdline(pid) for pid in pids)


def test_titles_are_php_fpms_shape() -> None:
    config = SimpleNamespace(pools=[SimpleNamespace(app="myapp:application")])
    assert master_title("/etc/fastfpm.conf", config) == "fastfpm: master process (/etc/fastfpm.conf)"
    assert master_title(None, config) == "fastfpm: master process (myapp:application)"
    assert worker_title("www", 1) == "fastfpm: pool www"
    assert worker_title("www", 2) == "fastfpm: pool www (generation 2)"


def test_master_names_its_file_and_workers_their_pool(configured: Callable[..., ConfiguredServer]) -> None:
    server = configured(TWO_POOLS)
    workers = wait_until(lambda: (pids := server.worker_pids()) and len(pids) == 3 and pids, 10,
                         message="three workers")
    expected_master = f"fastfpm: master process ({server.conf})"
    assert cmdline(server.pid) == expected_master
    assert ps_args(server.pid) == expected_master
    assert titles(workers) == ["fastfpm: pool api", "fastfpm: pool www", "fastfpm: pool www"]
    assert ps_args(workers[0]) in ("fastfpm: pool api", "fastfpm: pool www")


def test_master_without_a_file_names_its_app(launcher: Launcher) -> None:
    server = launcher.fastfpm("tests.apps.router:app", max_children=1)
    assert cmdline(server.pid) == "fastfpm: master process (tests.apps.router:app)"
    assert titles(server.settled_workers()) == ["fastfpm: pool www"]


def test_a_reload_titles_its_workers_with_the_generation(launcher: Launcher) -> None:
    server = launcher.fastfpm("tests.apps.router:app", max_children=1)
    [old] = server.settled_workers()
    # The old worker is kept busy, so both generations are alive at once.
    thread = threading.Thread(target=get, args=(server.address, "/slow", "seconds=3"))
    thread.start()
    try:
        wait_until(lambda: server_busy(server), 5, message="the slow request to start")
        mark = server.log_size()
        server.signal(signal.SIGUSR2)
        server.wait_for_log("reloaded: generation 2", mark, timeout=10)
        overlap = wait_until(lambda: (pids := server.worker_pids()) and len(pids) == 2 and pids, 10,
                             message="both generations")
        by_pid = {pid: cmdline(pid) for pid in overlap}
        assert by_pid.pop(old) == "fastfpm: pool www"
        assert list(by_pid.values()) == ["fastfpm: pool www (generation 2)"]
    finally:
        thread.join(10)
