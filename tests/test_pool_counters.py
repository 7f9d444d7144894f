"""A pool's counters through real processes (max_children_reached, slow_requests).

The counters are checked where operators read them: the systemd STATUS line (`slow: N`) and the
pool's scoreboard header, which the master fills in (max_children_reached, slow_requests) and
which is read here out of the running master's memory, as a status page would map it.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from tests.fcgi_helpers import get
from tests.servers import missing_requirement, serve_as_systemd, wait_until, write_config

APP = "tests.apps.counters_app:app"


def pool_header(pid: int, pool: str) -> dict[str, int]:
    """The counters in pool's scoreboard header, read from process pid's memory (/proc/PID/mem).

    The scoreboard is a shared anonymous mapping, which /proc/PID/maps shows as "/dev/zero
    (deleted)"; the one whose header has the scoreboard's magic and the pool's name is the pool's.
    """
    from fastfpm.scoreboard import ffi, lib

    size = ffi.sizeof("ffpm_pool_header")
    with open(f"/proc/{pid}/maps") as maps:
        starts = [int(line.split("-", 1)[0], 16) for line in maps
                  if line.rstrip().endswith("/dev/zero (deleted)") and line.split()[1].endswith("s")]
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for start in starts:
                mem.seek(start)
                data = bytearray(mem.read(size))
                header = ffi.cast("ffpm_pool_header *", ffi.from_buffer(data))
                if header.magic == lib.FFPM_SB_MAGIC and ffi.string(header.pool_name).decode() == pool:
                    return {"max_children_reached": int(header.max_children_reached),
                            "slow_requests": int(header.slow_requests)}
    except PermissionError as exc:  # ptrace rules (Yama, no CAP_SYS_PTRACE) can forbid it
        missing_requirement(f"cannot read the master's memory: {exc}")
    raise AssertionError(f"no scoreboard of pool {pool!r} among the shared mappings of {pid}")


def test_slow_and_max_children_counters_reach_status_and_scoreboard(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "c.conf", f"""
[global]
error_log = {tmp_path}/error.log
systemd_interval = 1s

[www]
listen = {tmp_path}/c.sock
app = {APP}
pm = dynamic
pm.max_children = 1
pm.start_servers = 1
pm.min_spare_servers = 1
pm.max_spare_servers = 1
request_slowlog_timeout = 1s
slowlog = {tmp_path}/slow.log
""")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(10)
        proc = serve_as_systemd(["-c", str(conf)], {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        try:
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
            assert pool_header(proc.pid, "www") == {"max_children_reached": 1, "slow_requests": 1}
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
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
