"""The master's own life through real processes: start-up, refusals, respawn, stopping, exit lines."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from fastfpm import __version__, master
from tests.fcgi_helpers import get
from tests.servers import (
    REPO_ROOT,
    ConfiguredServer,
    Launcher,
    run_cli,
    server_busy,
    wait_until,
    write_config,
)

ROUTER = "tests.apps.router:app"


def test_ready_line_comes_after_every_worker_started(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=3)
    log = server.log_text()
    assert log.count("started") == 3
    assert log.index("ready to handle connections") > log.rindex("started")
    assert len(server.worker_pids()) == 3


def test_worker_killed_with_sigkill_is_replaced(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=2)
    before = server.worker_pids()
    mark = server.log_size()
    os.kill(before[0], signal.SIGKILL)
    log = server.wait_for_log("started", mark)
    assert f"child {before[0]} exited on signal 9 (SIGKILL)" in log
    after = wait_until(lambda: len(server.worker_pids()) == 2 and server.worker_pids(), 5,
                       message="two workers again")
    assert before[0] not in after and before[1] in after
    assert get(server.address, "/env").status == 200


def test_sigquit_lets_the_request_in_flight_finish(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1)
    results = []
    thread = threading.Thread(target=lambda: results.append(get(server.address, "/slow", "seconds=1.5")))
    thread.start()
    # Wait until the worker is inside the request before asking it to stop.
    wait_until(lambda: server_busy(server), 5, message="the slow request to start")
    server.signal(signal.SIGQUIT)
    thread.join(10)
    assert results and results[0].status == 200 and results[0].body.startswith(b"slept 1.5")
    assert server.proc is not None and server.proc.wait(10) == 0
    log = server.log_text()
    assert "Finishing ..." in log and "exited with code 0" in log and "exiting, bye-bye!" in log


def test_sigterm_stops_at_once_and_cuts_requests(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1)
    errors = []

    def slow() -> None:
        try:
            errors.append(get(server.address, "/slow", "seconds=30", timeout=20))
        except Exception as exc:  # the cut request is the point of this test
            errors.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    wait_until(lambda: server_busy(server), 5, message="the slow request to start")
    workers = server.worker_pids()
    server.signal(signal.SIGTERM)
    assert server.proc is not None and server.proc.wait(10) == 0
    thread.join(10)
    assert errors and isinstance(errors[0], Exception)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    assert "Terminating ..." in server.log_text()
    assert server.socket_path is not None and not server.socket_path.exists()  # socket file removed


def test_unix_socket_mode_defaults_to_0660_and_can_be_set(launcher: Launcher) -> None:
    default = launcher.fastfpm(ROUTER, max_children=1)
    assert stat.S_IMODE(os.stat(default.socket_path).st_mode) == 0o660
    relaxed = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--listen-mode", "0666"])
    assert stat.S_IMODE(os.stat(relaxed.socket_path).st_mode) == 0o666


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the socket to another user needs root")
def test_listen_owner_on_the_command_line_gives_the_socket_to_that_user(launcher: Launcher) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--listen-owner", "nobody"])
    st = os.stat(server.socket_path)
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    # With the default mode 0660 that user (nginx's, in real life) may now connect.
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_tcp_listen(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, transport="tcp", max_children=1)
    assert get(server.address, "/env").status == 200


def test_application_import_error_stops_the_master(tmp_path) -> None:
    result = run_cli("serve", "no_such_module_here:app", "--listen", str(tmp_path / "s.sock"),
                     "--max-children", "2", "-R")
    assert result.returncode == 1
    assert "no module named 'no_such_module_here'" in result.stderr
    assert "could not start" in result.stderr


def test_address_in_use_is_reported(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, transport="tcp", max_children=1)
    result = run_cli("serve", ROUTER, "--listen", server.address, "-R")
    assert result.returncode == 1
    assert f"'{server.address}': Address already in use" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal applies only when started as root")
def test_refuses_to_run_workers_as_root_without_R(tmp_path) -> None:
    result = run_cli("serve", ROUTER, "--listen", str(tmp_path / "s.sock"))
    assert result.returncode == 2
    assert "--allow-to-run-as-root" in result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_demo_app_is_served_without_an_app(launcher: Launcher) -> None:
    demo = launcher.fastfpm("", max_children=1)
    response = get(demo.address, "/hello/world", "a=b")
    assert response.status == 200
    assert f"fastfpm {__version__}".encode() in response.body
    assert b"PATH_INFO" in response.body and b"/hello/world" in response.body
    assert b"request(s)" in response.body
    assert f"fastcgi_pass unix:{demo.address}" in demo.log_text()


def test_an_unbuilt_source_copy_says_how_to_build_it(tmp_path) -> None:
    # `pip install .` then `python -m fastfpm` in the checkout imports the unbuilt package in the
    # current directory: that must say what to run, not end in a traceback.
    package = tmp_path / "fastfpm"
    package.mkdir()
    for source in (REPO_ROOT / "fastfpm").glob("*.py"):
        (package / source.name).write_bytes(source.read_bytes())
    # -S: no site-packages, so neither an installed nor an editable copy can fill the gap.
    result = subprocess.run([sys.executable, "-S", "-m", "fastfpm", "serve", "--listen",
                             str(tmp_path / "demo.sock")], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "compiled module fastfpm._" in result.stderr and "pip install -e ." in result.stderr


def test_pid_file_is_written_and_removed(launcher: Launcher, tmp_path: Path) -> None:
    pid_path = tmp_path / "fastfpm.pid"
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--pid", str(pid_path)])
    assert pid_path.read_text().strip() == str(server.pid)
    server.stop()
    assert not pid_path.exists()


def test_daemonize_returns_once_ready_and_the_master_serves_in_the_background(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "d.conf", f"""
[global]
daemonize = yes
pid = {tmp_path}/d.pid
error_log = {tmp_path}/d.log

[www]
listen = {tmp_path}/d.sock
app = {ROUTER}
pm.max_children = 1
""")
    result = run_cli("serve", "-c", str(conf), "-R")
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "d.pid").read_text())
    try:
        assert "ready to handle connections" in (tmp_path / "d.log").read_text()
        assert get(str(tmp_path / "d.sock"), "/env").status == 200
        assert os.getsid(pid) != os.getsid(0)  # detached: a session of its own, not ours
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, message="the daemon to exit")


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
