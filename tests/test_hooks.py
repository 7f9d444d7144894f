"""on_worker_start / on_worker_exit through real masters and workers (tests/apps/hooks.py).

The hooks write `event pid` lines to a file, so each test reads which worker ran which hook and in
what order with its requests; the master's log says how each worker exited.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from tests.fcgi_helpers import get
from tests.servers import ConfiguredServer, run_cli, wait_until, write_config

HOOKED_POOL = """
[www]
listen = {{dir}}/fpm.sock
app = tests.apps.hooks:app
on_worker_start = tests.apps.hooks:on_start
on_worker_exit = tests.apps.hooks:on_exit
env[HOOKS_LOG] = {{dir}}/hooks.log
env[HOOKS_START_FAIL] = {{dir}}/start-fails
env[HOOKS_EXIT_FAIL] = {{dir}}/exit-fails
pm = static
pm.max_children = {children}
{extra}
"""


def hooked(children: int = 2, extra: str = "") -> str:
    """The pool section of a hooked app (`{dir}` left for the harness)."""
    return HOOKED_POOL.format(children=children, extra=extra)


def events(server: ConfiguredServer) -> list[tuple[str, int]]:
    """(event, pid) for each line the hooks and the app wrote so far, in order."""
    path = server.workdir / "hooks.log"
    if not path.exists():
        return []
    return [(event, int(pid)) for event, pid in
            (line.split() for line in path.read_text().splitlines())]


def served_by(server: ConfiguredServer) -> tuple[int, bool]:
    """One request: the pid that answered and whether on_worker_start had run in it."""
    response = get(server.address, "/")
    assert response.status == 200
    pid, started = response.body.decode().split()
    return int(pid), started == "True"


def test_start_runs_in_each_worker_before_its_first_request_and_exit_on_graceful_stop(
        configured: Callable[..., ConfiguredServer]) -> None:
    server = configured(hooked(children=2))
    workers = set(server.worker_pids())
    # Ready means every worker is accepting, which it does only after its start hook.
    assert sorted(events(server)) == sorted(("start:www", pid) for pid in workers)
    answers = {served_by(server) for _ in range(6)}
    assert {pid for pid, _ in answers} <= workers
    assert all(started for _, started in answers)
    server.signal(signal.SIGQUIT)
    assert server.proc is not None and server.proc.wait(timeout=10) == 0
    seen = events(server)
    for pid in workers:
        mine = [event for event, who in seen if who == pid]
        assert mine[0] == "start:www" and mine[-1] == "exit:www"
        assert mine.count("start:www") == 1 and mine.count("exit:www") == 1
        assert set(mine[1:-1]) <= {"request"}
    log = server.log_text()
    assert all(f"child {pid} exited with code 0" in log for pid in workers)


def test_a_worker_recycled_by_max_requests_runs_its_exit_hook_and_its_successor_starts(
        configured: Callable[..., ConfiguredServer]) -> None:
    server = configured(hooked(children=1, extra="pm.max_requests = 2"))
    (first,) = server.worker_pids()
    assert [served_by(server), served_by(server)] == [(first, True), (first, True)]
    second = wait_until(lambda: (pids := server.worker_pids()) and pids[0] != first and pids[0], 10,
                        message="the recycled worker's successor")
    wait_until(lambda: ("start:www", second) in events(server), 10, message="the successor's start hook")
    assert served_by(server) == (second, True)
    assert events(server)[:4] == [("start:www", first), ("request", first), ("request", first),
                                  ("exit:www", first)]
    assert f"child {first} exited with code 0" in server.log_text()


def test_a_reload_runs_the_old_workers_exit_hooks_and_the_new_workers_start_hooks(
        configured: Callable[..., ConfiguredServer]) -> None:
    server = configured(hooked(children=2))
    old = set(server.worker_pids())
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    server.wait_for_log("reloaded: generation 2", mark, timeout=10)
    new = wait_until(lambda: (pids := set(server.worker_pids())) and not pids & old and len(pids) == 2
                     and pids, 10, message="the new generation only")
    wait_until(lambda: {pid for event, pid in events(server) if event == "exit:www"} == old, 10,
               message="an exit line from each old worker")
    assert {pid for event, pid in events(server) if event == "start:www"} == old | new
    assert {served_by(server) for _ in range(4)} <= {(pid, True) for pid in new}


def test_a_raising_exit_hook_is_logged_and_the_worker_still_exits_cleanly(
        configured: Callable[..., ConfiguredServer]) -> None:
    server = configured(hooked(children=1, extra="pm.max_requests = 1"))
    (server.workdir / "exit-fails").touch()
    (first,) = server.worker_pids()
    mark = server.log_size()
    assert served_by(server) == (first, True)
    log = server.wait_for_log(f"child {first} exited with code 0", mark, timeout=10)
    assert f"child {first}: on_worker_exit 'tests.apps.hooks:on_exit' raised" in log
    assert "Traceback (most recent call last)" in log and "RuntimeError: closing the pool failed" in log
    # An ordinary exit: the master replaces the worker and serves on.
    wait_until(lambda: (pids := server.worker_pids()) and pids[0] != first, 10, message="a successor")
    assert served_by(server)[1] is True


def start_failing_config(tmp_path: Path) -> Path:
    """A config whose workers' start hook raises from the start (the marker file exists)."""
    (tmp_path / "start-fails").touch()
    return write_config(tmp_path / "fpm.conf", hooked(children=2).replace("{dir}", str(tmp_path)))


def test_a_raising_start_hook_stops_the_master_as_an_import_failure_does(tmp_path: Path) -> None:
    conf = start_failing_config(tmp_path)
    result = run_cli("serve", "-c", str(conf), "-R")
    assert result.returncode == 1
    log = result.stderr
    assert "on_worker_start 'tests.apps.hooks:on_start' raised: this worker will not serve" in log
    assert "Traceback (most recent call last)" in log
    assert "RuntimeError: the database is unreachable" in log
    assert "exited with code 3" in log and "could not start" in log
    assert "ready to handle connections" not in log
    # No respawn loop: at most the two initial workers ever started, none served.
    starts = (tmp_path / "hooks.log").read_text().splitlines()
    assert 1 <= len(starts) <= 2 and all(line.startswith("start:www ") for line in starts)


def test_a_start_hook_that_raises_later_in_the_masters_life_stops_it_too(
        configured: Callable[..., ConfiguredServer]) -> None:
    # A replacement worker that cannot initialise does not serve either, and is not retried in a loop
    # (gunicorn halts on WORKER_BOOT_ERROR at any time too).
    server = configured(hooked(children=1, extra="pm.max_requests = 1"))
    (server.workdir / "start-fails").touch()
    (first,) = server.worker_pids()
    served_by(server)
    assert server.proc is not None and server.proc.wait(timeout=10) == 1
    starts = [pid for event, pid in events(server) if event == "start:www"]
    assert len(starts) == 2 and starts[0] == first
    assert "RuntimeError: the database is unreachable" in server.log_text()


def test_a_reload_whose_start_hook_raises_rolls_back_to_the_old_generation(
        configured: Callable[..., ConfiguredServer]) -> None:
    server = configured(hooked(children=2))
    old = set(server.worker_pids())
    (server.workdir / "start-fails").touch()
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    log = server.wait_for_log("reload failed", mark, timeout=10)
    assert "generation 1 keeps serving" in log and "RuntimeError: the database is unreachable" in log
    assert server.proc is not None and server.proc.poll() is None
    wait_until(lambda: set(server.worker_pids()) == old, 5, message="only the old generation left")
    assert {served_by(server) for _ in range(4)} <= {(pid, True) for pid in old}
    # The old workers were never stopped: none of them ran its exit hook.
    assert not [pid for event, pid in events(server) if event == "exit:www"]


def test_a_misspelt_hook_fails_the_worker_as_a_misspelt_app_does(tmp_path: Path) -> None:
    text = hooked(children=1).replace("{dir}", str(tmp_path)).replace(":on_exit", ":on_exitt")
    result = run_cli("serve", "-c", str(write_config(tmp_path / "fpm.conf", text)), "-R")
    assert result.returncode == 1
    assert "on_worker_exit 'tests.apps.hooks:on_exitt': module 'tests.apps.hooks' has no attribute " \
           "'on_exitt'" in result.stderr


def test_the_check_accepts_hooks_and_shows_them_in_tt(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "fpm.conf", hooked(children=1).replace("{dir}", str(tmp_path)))
    result = run_cli("serve", "-c", str(conf), "-R", "-tt")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "on_worker_start = tests.apps.hooks:on_start" in out
    assert "on_worker_exit = tests.apps.hooks:on_exit" in out
