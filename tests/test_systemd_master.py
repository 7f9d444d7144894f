"""The master under systemd: readiness notifications, status lines, and socket activation."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from tests.fcgi_helpers import get
from tests.servers import notified_master, read_until_ready, serve_socket_activated, write_config

ROUTER = "tests.apps.router:app"


def test_notify_ready_status_and_stopping(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "n.conf", f"""
[global]
systemd_interval = 1s

[www]
listen = {tmp_path}/n.sock
app = {ROUTER}
pm.max_children = 1
""")
    with notified_master(conf, tmp_path / "notify") as (proc, notify):
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready and f"MAINPID={proc.pid}" in ready
        assert get(str(tmp_path / "n.sock"), "/env").status == 200
        status = notify.recv(4096).decode()  # systemd_interval: php-fpm's status line
        assert status.startswith("STATUS=Processes active: ") and "idle: " in status
        proc.send_signal(signal.SIGQUIT)
        while "STOPPING=1" not in (message := notify.recv(4096).decode()):
            assert "STATUS=" in message
        assert proc.wait(10) == 0


def test_status_requests_count_those_of_recycled_workers(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "m.conf", f"""
[global]
systemd_interval = 1s

[www]
listen = {tmp_path}/m.sock
app = {ROUTER}
pm = static
pm.max_children = 1
pm.max_requests = 1
""")
    with notified_master(conf, tmp_path / "notify") as (proc, notify):
        assert "READY=1" in notify.recv(4096).decode()
        for _ in range(3):  # each request ends its worker (pm.max_requests = 1)
            assert get(str(tmp_path / "m.sock"), "/env").status == 200
        # The pool served three requests although no living worker did more than one.
        deadline = time.monotonic() + 10
        while "Requests: 3," not in (status := notify.recv(4096).decode()):
            assert time.monotonic() < deadline, status
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(10) == 0


def test_watchdog_pings_at_half_of_watchdog_usec(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "w.conf", f"""
[global]
systemd_interval = 0

[www]
listen = {tmp_path}/w.sock
app = {ROUTER}
pm.max_children = 1
""")
    # WatchdogSec=1s: systemd sets WATCHDOG_USEC (WATCHDOG_PID may be left out).
    with notified_master(conf, tmp_path / "notify", {"WATCHDOG_USEC": "1000000"}) as (proc, notify):
        # Pings start with the master, so one may come before READY=1.
        while "READY=1" not in (message := notify.recv(4096).decode()):
            assert message == "WATCHDOG=1", message
        ready = time.monotonic()
        for _ in range(3):
            # systemd_interval = 0: no STATUS lines, only the watchdog's pings.
            assert notify.recv(4096).decode() == "WATCHDOG=1"
        # Every 0.5 s (half the timeout, as sd_watchdog_enabled(3) advises): three take about 1.5 s.
        assert 0.9 <= time.monotonic() - ready < 5
        assert get(str(tmp_path / "w.sock"), "/env").status == 200
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(10) == 0


def test_socket_activation_uses_the_passed_socket_and_keeps_its_file(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    os.chmod(path, 0o600)  # systemd's SocketMode, which fastfpm must not change
    conf = write_config(tmp_path / "a.conf", f"""
[www]
listen = {path}
app = {ROUTER}
pm.max_children = 1
""")
    proc = serve_socket_activated(conf, listener)
    try:
        listener.close()  # from here only fastfpm holds the socket
        log = read_until_ready(proc)
        assert b"using the socket systemd passed" in log
        assert get(str(path), "/env").status == 200
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert path.exists()  # the socket file is systemd's; fastfpm leaves it
    finally:
        if proc.poll() is None:
            proc.kill()
