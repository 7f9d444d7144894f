"""The master's life through real processes: start-up, respawn, signals, refusals, the CLI."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading

import pytest

from fastfpm import __version__
from tests.fcgi_helpers import get
from tests.servers import REPO_ROOT, Launcher, run_cli, server_busy, wait_until

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


def test_max_requests_recycles_workers(launcher: Launcher) -> None:
    server = launcher.fastfpm("tests.apps.slow:app", max_children=1, extra_args=["--max-requests", "2"])
    pids = [get(server.address, "/", "seconds=0").body.split()[-1] for _ in range(4)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]
    assert "exited with code 0" in server.log_text()


def test_application_import_error_stops_the_master(tmp_path) -> None:
    result = run_cli("serve", "no_such_module_here:app", "--listen", str(tmp_path / "s.sock"),
                     "--max-children", "2", "-R")
    assert result.returncode == 1
    assert "no module named 'no_such_module_here'" in result.stderr
    assert "could not be loaded" in result.stderr


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
