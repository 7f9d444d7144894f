"""php-fpm's process management through real processes: pm modes, timeouts, logs, config."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from tests.fcgi_helpers import get
from tests.servers import Launcher, run_cli, wait_until, write_config

ROUTER = "tests.apps.router:app"


def background_gets(address: str, count: int, seconds: float) -> list[threading.Thread]:
    """count concurrent slow requests, each holding a worker for `seconds`."""
    threads = [threading.Thread(target=get, args=(address, "/slow", f"seconds={seconds}"))
               for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_dynamic_starts_start_servers_spawns_under_load_and_trims_idle(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=6, extra_args=[
        "--pm", "dynamic", "--start-servers", "2", "--min-spare-servers", "1", "--max-spare-servers", "2"])
    assert len(server.worker_pids()) == 2
    threads = background_gets(server.address, 4, 3.0)
    # Busy workers leave fewer than min_spare idle: the master spawns (1, 2, 4 ... per second).
    wait_until(lambda: len(server.worker_pids()) >= 5, 8, message="dynamic spawning under load")
    for thread in threads:
        thread.join(15)
    # Idle above max_spare: one idle worker stopped per second, down to max_spare_servers.
    wait_until(lambda: len(server.worker_pids()) == 2, 15, message="idle workers trimmed to max_spare")
    log = server.log_text()
    assert "exited with code 0" in log


def test_dynamic_warns_once_when_max_children_is_reached(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=2, extra_args=[
        "--pm", "dynamic", "--start-servers", "1", "--min-spare-servers", "1", "--max-spare-servers", "1"])
    threads = background_gets(server.address, 3, 3.0)
    log = server.wait_for_log("reached pm.max_children setting (2)", timeout=10)
    for thread in threads:
        thread.join(15)
    assert log.count("reached pm.max_children") == 1
    assert len(server.worker_pids()) <= 2


def test_ondemand_starts_none_spawns_on_connection_and_stops_idle(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=3, extra_args=[
        "--pm", "ondemand", "--process-idle-timeout", "1s"])
    assert server.worker_pids() == []
    response = get(server.address, "/env")
    assert response.status == 200
    assert len(server.worker_pids()) == 1
    wait_until(lambda: server.worker_pids() == [], 10, message="the idle ondemand worker to stop")


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_ondemand_forks_for_a_whole_burst_at_once(launcher: Launcher, transport: str) -> None:
    # Six requests arrive together, each holding a worker for two seconds. Forking one worker per
    # wake-up (php-fpm) or per second would leave the later ones to reuse the first workers once
    # they are done; forking for the whole accept queue gives each request a worker of its own.
    server = launcher.fastfpm("tests.apps.slow:app", transport=transport, max_children=6,
                              extra_args=["--pm", "ondemand"])
    assert server.worker_pids() == []
    answers: list[bytes] = []
    threads = [threading.Thread(target=lambda: answers.append(get(server.address, "/", "seconds=2").body))
               for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 6
    pids = {answer.split()[-1] for answer in answers}
    assert len(pids) == 6, f"the burst shared workers: {sorted(pids)}"


def test_pid_file_is_written_and_removed(launcher: Launcher, tmp_path: Path) -> None:
    pid_path = tmp_path / "fastfpm.pid"
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--pid", str(pid_path)])
    assert pid_path.read_text().strip() == str(server.pid)
    server.stop()
    assert not pid_path.exists()


def test_config_file_with_two_pools(launcher: Launcher, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "fastfpm.conf", f"""
[alpha]
listen = {tmp_path}/alpha.sock
app = {ROUTER}
pm = static
pm.max_children = 1

[beta]
listen = {tmp_path}/beta.sock
app = tests.apps.slow:app
pm = static
pm.max_children = 2
""")
    result = run_cli("check", "-R", "-c", str(conf))  # the tests run as root: -R, as for serve
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    server = launcher.fastfpm("", max_children=1, extra_args=["-c", str(conf)])
    assert get(str(tmp_path / "alpha.sock"), "/env").status == 200
    assert get(str(tmp_path / "beta.sock"), "/", "seconds=0").body.startswith(b"slept")
    assert len(server.worker_pids()) == 3


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


def test_process_max_caps_all_pools_together(launcher: Launcher, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "m.conf", f"""
[global]
process.max = 3

[one]
listen = {tmp_path}/one.sock
app = {ROUTER}
pm.max_children = 2

[two]
listen = {tmp_path}/two.sock
app = {ROUTER}
pm.max_children = 2
""")
    server = launcher.fastfpm("", extra_args=["-c", str(conf)])
    log = server.wait_for_log("process.max")
    assert "The maximum number of processes has been reached" in log
    assert len(server.worker_pids()) == 3
    # Only the first pool got all it asked for; the second still serves with what was left.
    assert get(str(tmp_path / "one.sock"), "/env").status == 200
    assert get(str(tmp_path / "two.sock"), "/env").status == 200


def test_listen_owner_group_and_mode_of_the_unix_socket(launcher: Launcher, tmp_path: Path) -> None:
    import grp
    import pwd
    import stat

    conf = write_config(tmp_path / "o.conf", f"""
[www]
listen = {tmp_path}/o.sock
listen.owner = nobody
listen.group = nogroup
listen.mode = 0600
app = {ROUTER}
pm.max_children = 1
""")
    launcher.fastfpm("", extra_args=["-c", str(conf)])
    info = os.stat(tmp_path / "o.sock")
    assert pwd.getpwuid(info.st_uid).pw_name == "nobody"
    assert grp.getgrgid(info.st_gid).gr_name == "nogroup"
    assert stat.S_IMODE(info.st_mode) == 0o600


def test_max_requests_jitter_spreads_recycling(launcher: Launcher, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "j.conf", f"""
[www]
listen = {tmp_path}/j.sock
app = tests.apps.crash:app
pm.max_children = 1
pm.max_requests = 2
pm.max_requests_jitter = 3
""")
    launcher.fastfpm("", extra_args=["-c", str(conf)])
    pids = [get(str(tmp_path / "j.sock"), "/").body for _ in range(40)]
    runs = []
    for pid in pids:
        if runs and runs[-1][0] == pid:
            runs[-1][1] += 1
        else:
            runs.append([pid, 1])
    quotas = [count for _, count in runs[:-1]]  # the last worker may not have reached its quota
    assert quotas and all(2 <= q <= 5 for q in quotas)
    assert len(set(quotas)) > 1  # not every worker got the same quota


def test_workers_switch_to_the_pool_user_with_its_env(launcher: Launcher, tmp_path: Path) -> None:
    import ast
    import pwd

    nobody = pwd.getpwnam("nobody")
    if os.geteuid() != 0:
        import pytest

        pytest.skip("switching workers to another user needs the master to run as root")
    os.chmod(tmp_path, 0o755)
    conf = write_config(tmp_path / "u.conf", f"""
[www]
user = nobody
listen = {tmp_path}/u.sock
listen.owner = nobody
app = tests.apps.whoami:app
chdir = /tmp
pm.max_children = 1
clear_env = yes
env[FROM_POOL] = yes
""")
    server = launcher.fastfpm("", extra_args=["-c", str(conf)])
    seen = ast.literal_eval(get(str(tmp_path / "u.sock"), "/").body.decode())
    assert (seen["uid"], seen["gid"]) == (nobody.pw_uid, nobody.pw_gid)
    assert seen["cwd"] == "/tmp"
    assert seen["FROM_POOL"] == "yes" and seen["PATH"] is None  # clear_env: only env[] is passed
    assert seen["HOME"] == nobody.pw_dir
    worker = server.worker_pids()[0]
    assert os.stat(f"/proc/{worker}").st_uid == nobody.pw_uid
    assert os.stat(f"/proc/{server.pid}").st_uid == 0  # the master stays root, as php-fpm's


def test_listen_allowed_clients_drops_others(launcher: Launcher, tmp_path: Path) -> None:
    import socket

    from tests.servers import free_port

    port = free_port()
    conf = write_config(tmp_path / "a.conf", f"""
[www]
listen = 127.0.0.1:{port}
listen.allowed_clients = 10.1.2.3
app = {ROUTER}
pm.max_children = 1
""")
    server = launcher.fastfpm("", extra_args=["-c", str(conf)])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert sock.recv(10) == b""  # closed before anything is read
    log = server.wait_for_log("Connection disallowed")
    assert "IP address '127.0.0.1' has been dropped." in log
