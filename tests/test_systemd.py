"""systemd integration: sd_notify datagrams, the watchdog, status reports, socket activation.

Everything goes through real sockets: a datagram socket owned by the test plays systemd's
NOTIFY_SOCKET, and socket activation is exercised the way systemd does it (fork, move the listening
sockets to fds 3, 4, ..., set LISTEN_PID to the child's own pid, exec).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfpm.address import parse_address
from fastfpm.systemd import (
    SD_LISTEN_FDS_START,
    Heartbeat,
    Notifier,
    listen_fds,
    listen_fds_with_names,
    match_socket,
    status_line,
    watchdog_interval,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def ipv6_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_works(), reason="no IPv6 loopback here")


# ----------------------------------------------------------------------------------- NOTIFY_SOCKET


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """systemd's side of NOTIFY_SOCKET at a path: (receiving socket, the variable's value)."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(5.0)
        yield receiver, path


@pytest.fixture
def notify_abstract() -> Iterator[tuple[socket.socket, str]]:
    """systemd's side of NOTIFY_SOCKET in the abstract namespace, written with '@'."""
    name = f"fastfpm-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5.0)
        yield receiver, "@" + name


def received(receiver: socket.socket) -> bytes:
    return receiver.recv(65536)


def test_from_environ_path(notify_path: tuple[socket.socket, str]) -> None:
    _, value = notify_path
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert notifier is not None
    assert notifier.address == value


def test_from_environ_abstract_name_starts_with_nul(notify_abstract: tuple[socket.socket, str]) -> None:
    _, value = notify_abstract
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert notifier is not None
    assert notifier.address == "\0" + value[1:]
    assert repr(notifier) == f"Notifier({value!r})"


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "@"},
                                     {"NOTIFY_SOCKET": "run/notify"}, {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_from_environ_without_a_usable_socket_is_none(environ: dict[str, str]) -> None:
    assert Notifier.from_environ(environ) is None


def test_from_environ_unset_removes_the_variable() -> None:
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "OTHER": "x"}
    assert Notifier.from_environ(environ, unset=True) is not None
    assert environ == {"OTHER": "x"}
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    Notifier.from_environ(environ)
    assert environ == {"NOTIFY_SOCKET": "/run/systemd/notify"}


def test_from_environ_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch,
                                                  notify_path: tuple[socket.socket, str]) -> None:
    receiver, value = notify_path
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    with Notifier.from_environ() as notifier:  # type: ignore[union-attr]
        assert notifier.watchdog()
    assert received(receiver) == b"WATCHDOG=1"


def test_ready_datagram_as_php_fpm_sends_it(notify_path: tuple[socket.socket, str]) -> None:
    receiver, value = notify_path
    with Notifier(value) as notifier:
        assert notifier.ready()
        assert notifier.ready("Serving 2 pools")
    pid = os.getpid()
    assert received(receiver) == f"READY=1\nSTATUS=Ready to handle connections\nMAINPID={pid}".encode()
    assert received(receiver) == f"READY=1\nSTATUS=Serving 2 pools\nMAINPID={pid}".encode()
    assert notifier.last_error is None


def test_abstract_socket_receives_every_message(notify_abstract: tuple[socket.socket, str]) -> None:
    receiver, value = notify_abstract
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert notifier is not None
    with notifier:
        assert notifier.ready("up")
        assert notifier.status("Processes active: 0, idle: 2, Requests: 0, slow: 0, Traffic: 0req/sec")
        assert notifier.watchdog()
        assert notifier.stopping()
    assert received(receiver) == f"READY=1\nSTATUS=up\nMAINPID={os.getpid()}".encode()
    assert received(receiver) == (b"STATUS=Processes active: 0, idle: 2, Requests: 0, slow: 0, "
                                  b"Traffic: 0req/sec")
    assert received(receiver) == b"WATCHDOG=1"
    assert received(receiver) == b"STOPPING=1"


def test_status_watchdog_stopping(notify_path: tuple[socket.socket, str]) -> None:
    receiver, value = notify_path
    with Notifier(value) as notifier:
        assert notifier.status("Reloading in progress ...")
        assert notifier.watchdog()
        assert notifier.stopping()
        assert notifier.stopping("Finishing ...")
        assert notifier.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=still starting")
    assert received(receiver) == b"STATUS=Reloading in progress ..."
    assert received(receiver) == b"WATCHDOG=1"
    assert received(receiver) == b"STOPPING=1"
    assert received(receiver) == b"STOPPING=1\nSTATUS=Finishing ..."
    assert received(receiver) == b"EXTEND_TIMEOUT_USEC=5000000\nSTATUS=still starting"


def test_reloading_carries_the_monotonic_time(notify_path: tuple[socket.socket, str]) -> None:
    receiver, value = notify_path
    with Notifier(value) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        assert notifier.reloading("Reloading in progress ...")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = received(receiver).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert len(lines) == 2 and lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after
    lines = received(receiver).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after
    assert lines[2:] == ["STATUS=Reloading in progress ..."]


def test_a_newline_cannot_smuggle_an_assignment(notify_path: tuple[socket.socket, str]) -> None:
    receiver, value = notify_path
    with Notifier(value) as notifier:
        notifier.status("line one\nREADY=1\r\nline three")
        notifier.ready("a\nb")
    assert received(receiver) == b"STATUS=line one READY=1 line three"
    assert received(receiver) == f"READY=1\nSTATUS=a b\nMAINPID={os.getpid()}".encode()


def test_text_is_sent_as_utf8(notify_path: tuple[socket.socket, str]) -> None:
    receiver, value = notify_path
    with Notifier(value) as notifier:
        notifier.status("pool café: ready")
    assert received(receiver) == "STATUS=pool café: ready".encode()


def test_datagrams_carry_the_sender_pid(notify_path: tuple[socket.socket, str]) -> None:
    """systemd checks the sender (NotifyAccess=main) with SCM_CREDENTIALS; they must be ours."""
    receiver, value = notify_path
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    with Notifier(value) as notifier:
        assert notifier.watchdog()
    ucred = struct.calcsize("3i")
    data, ancdata, _, _ = receiver.recvmsg(4096, socket.CMSG_SPACE(ucred))
    assert data == b"WATCHDOG=1"
    (level, kind, cred), = ancdata
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    pid, uid, gid = struct.unpack("3i", cred[:ucred])
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


def test_send_errors_are_returned_not_raised(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    notifier = Notifier(path)
    assert notifier.ready() is False
    assert isinstance(notifier.last_error, FileNotFoundError)
    assert notifier.watchdog() is False
    # systemd (re-executed) makes its socket again: the same notifier reaches it.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(5.0)
        assert notifier.watchdog() is True
        assert received(receiver) == b"WATCHDOG=1"
    # Bound once, now gone: the file is left without a listener.
    assert notifier.watchdog() is False
    assert isinstance(notifier.last_error, ConnectionRefusedError)
    notifier.close()
    notifier.close()


def test_a_full_queue_costs_at_most_the_timeout(notify_path: tuple[socket.socket, str]) -> None:
    """A service manager that stopped reading must not hang the master."""
    _, value = notify_path
    with Notifier(value, timeout=0.05) as notifier:
        results = []
        while len(results) < 1000 and (not results or results[-1]):
            results.append(notifier.watchdog())
        started = time.monotonic()
        assert notifier.watchdog() is False
        elapsed = time.monotonic() - started
    assert results[0] is True
    assert results[-1] is False
    assert isinstance(notifier.last_error, (TimeoutError, BlockingIOError))
    assert 0.04 <= elapsed < 2.0


def test_notifier_socket_is_close_on_exec(notify_path: tuple[socket.socket, str]) -> None:
    _, value = notify_path
    with Notifier(value) as notifier:
        notifier.watchdog()
        assert notifier._socket is not None
        assert fcntl.fcntl(notifier._socket.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


# ----------------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1000000"}, 0.5),
    ({"WATCHDOG_USEC": "3"}, 1.5e-6),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<other>"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "30s"}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_PID": "<self>"}, None),
    ({}, None),
])
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    replaced = {"<self>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    environ = {key: replaced.get(value, value) for key, value in environ.items()}
    assert watchdog_interval(environ) == expected


def test_watchdog_interval_unset() -> None:
    environ = {"WATCHDOG_USEC": "8000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    assert watchdog_interval(environ) == 4.0
    assert "WATCHDOG_USEC" in environ
    assert watchdog_interval(environ, unset=True) == 4.0
    assert environ == {"PATH": "/bin"}


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 10.0


# ----------------------------------------------------------------------------------- status reports


@pytest.mark.parametrize(("args", "expected"), [
    ((0, 5, 0, 0, 0.0), "Processes active: 0, idle: 5, Requests: 0, slow: 0, Traffic: 0req/sec"),
    ((3, 2, 1500, 4, 12.3456), "Processes active: 3, idle: 2, Requests: 1500, slow: 4, Traffic: 12.3req/sec"),
    ((1, 1, 10, 0, 0.5), "Processes active: 1, idle: 1, Requests: 10, slow: 0, Traffic: 0.5req/sec"),
    ((8, 0, 10**9, 7, 1234.5), "Processes active: 8, idle: 0, Requests: 1000000000, slow: 7, "
                               "Traffic: 1.23e+03req/sec"),
])
def test_status_line_is_php_fpms(args: tuple[int, int, int, int, float], expected: str) -> None:
    assert status_line(*args) == expected


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.0001234, 1.0, 2.5, 99.95, 100.0, 999.4, 999.6, 12345.0, 1e7])
def test_traffic_is_formatted_as_c_printf_does(rate: float) -> None:
    """php-fpm formats Traffic with C's %.3g; compare with the C library's own snprintf."""
    libc = ctypes.CDLL(None)
    buffer = ctypes.create_string_buffer(64)
    libc.snprintf(buffer, len(buffer), b"%.3g", ctypes.c_double(rate))
    assert status_line(0, 0, 0, 0, rate).endswith(f"Traffic: {buffer.value.decode()}req/sec")


def test_heartbeat_disabled() -> None:
    beat = Heartbeat(0, None, now=100.0)
    assert not beat.enabled
    assert beat.timeout(100.0) is None
    assert beat.beat(1e9, 1, 1, 1, 1) == ()


def test_heartbeat_status_every_systemd_interval() -> None:
    beat = Heartbeat(10.0, None, now=100.0)
    assert beat.enabled
    assert beat.timeout(100.0) == 10.0
    assert beat.timeout(104.0) == 6.0
    assert beat.beat(104.0, 1, 4, 20, 0) == ()
    assert beat.beat(110.0, 1, 4, 50, 0) == (
        "STATUS=Processes active: 1, idle: 4, Requests: 50, slow: 0, Traffic: 5req/sec",)
    assert beat.timeout(110.0) == 10.0
    # The rate is over the time since the last report, even when the loop is late.
    assert beat.beat(122.5, 2, 3, 75, 1) == (
        "STATUS=Processes active: 2, idle: 3, Requests: 75, slow: 1, Traffic: 2req/sec",)
    # Late by more than one interval: the missed beats are not sent in a burst.
    assert beat.timeout(122.5) == 7.5
    assert beat.beat(151.0, 0, 5, 75, 1) != ()
    assert beat.timeout(151.0) == 10.0
    assert beat.beat(151.5, 0, 5, 75, 1) == ()


def test_heartbeat_counter_reset_by_a_reload() -> None:
    beat = Heartbeat(10.0, None, now=0.0)
    beat.beat(10.0, 0, 2, 1000, 0)
    # New scoreboards count from 0: 30 requests in this interval, not -970.
    assert beat.beat(20.0, 0, 2, 30, 0) == (
        "STATUS=Processes active: 0, idle: 2, Requests: 30, slow: 0, Traffic: 3req/sec",)


def test_heartbeat_watchdog_only() -> None:
    beat = Heartbeat(0, 5.0, now=0.0)
    assert beat.enabled
    assert beat.timeout(0.0) == 5.0
    assert beat.beat(4.9, 0, 0, 0, 0) == ()
    assert beat.beat(5.0, 0, 0, 0, 0) == ("WATCHDOG=1",)
    assert beat.beat(10.2, 0, 0, 0, 0) == ("WATCHDOG=1",)
    assert beat.timeout(10.2) == pytest.approx(4.8)


def test_heartbeat_watchdog_and_status_keep_their_own_pace() -> None:
    beat = Heartbeat(10.0, 4.0, now=0.0)
    sent = {}
    now = 0.0
    while now < 20.0:
        now += beat.timeout(now) or 0.0
        sent[now] = beat.beat(now, 1, 1, int(now), 0)
    assert list(sent) == [4.0, 8.0, 10.0, 12.0, 16.0, 20.0]
    assert sent[4.0] == sent[8.0] == sent[12.0] == sent[16.0] == ("WATCHDOG=1",)
    assert sent[10.0] == ("STATUS=Processes active: 1, idle: 1, Requests: 10, slow: 0, Traffic: 1req/sec",)
    assert sent[20.0] == ("WATCHDOG=1",
                          "STATUS=Processes active: 1, idle: 1, Requests: 20, slow: 0, Traffic: 1req/sec")


def test_heartbeat_messages_go_out_as_one_datagram(notify_path: tuple[socket.socket, str]) -> None:
    receiver, value = notify_path
    beat = Heartbeat(2.0, 1.0, now=0.0)
    with Notifier(value) as notifier:
        assert notifier.notify(*beat.beat(2.0, 0, 3, 8, 0))
    assert received(receiver) == (b"WATCHDOG=1\n"
                                  b"STATUS=Processes active: 0, idle: 3, Requests: 8, slow: 0, "
                                  b"Traffic: 4req/sec")


# ----------------------------------------------------------------------------------- sd_listen_fds


def test_listen_fds_without_variables() -> None:
    assert listen_fds({}) == []
    assert listen_fds_with_names({"LISTEN_FDS": "2"}) == []


def test_listen_fds_for_another_pid_is_ignored_and_unset() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "X": "1"}
    assert listen_fds(environ, unset=False) == []
    assert len(environ) == 4
    assert listen_fds(environ) == []
    assert environ == {"X": "1"}


@pytest.mark.parametrize("listen_pid", ["", "abc", "-1", "0"])
def test_listen_fds_with_a_bad_listen_pid_is_empty(listen_pid: str) -> None:
    assert listen_fds({"LISTEN_PID": listen_pid, "LISTEN_FDS": "1"}) == []


@pytest.mark.parametrize("count", ["x", "-1", "1.5", ""])
def test_listen_fds_with_a_bad_count_is_an_error(count: str) -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count}
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        listen_fds(environ)
    assert environ == {}


def test_listen_fds_zero_or_missing_count() -> None:
    assert listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []
    assert listen_fds({"LISTEN_PID": str(os.getpid())}) == []


# The activated program: take the sockets over, describe them, match addresses, then serve one
# connection on each socket (answering with the socket's name) when asked to.
ACTIVATED = r"""
import fcntl, json, os, sys
from fastfpm.systemd import listen_fds_with_names, match_socket

names = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
before = {name: os.environ.get(name) for name in names}
found = listen_fds_with_names(unset=sys.argv[1] == "unset")
report = {
    "pid": os.getpid(),
    "before": before,
    "after": {name: os.environ.get(name) for name in names},
    "sockets": [],
    "matches": {},
}
for name, sock in found:
    sockname = sock.getsockname()
    report["sockets"].append({
        "name": name,
        "fd": sock.fileno(),
        "family": sock.family.name,
        "type": sock.type.name,
        "sockname": sockname if isinstance(sockname, str) else list(sockname[:2]),
        "cloexec": bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
    })
for text in json.loads(os.environ.get("TEST_ADDRESSES", "[]")):
    sock = match_socket([s for _, s in found], text)
    report["matches"][text] = None if sock is None else sock.fileno()
print(json.dumps(report), flush=True)
if os.environ.get("TEST_SERVE"):
    for name, sock in found:
        conn, _ = sock.accept()
        conn.sendall(name.encode())
        conn.close()
"""


class Activated:
    """A program started as systemd starts a socket-activated service."""

    def __init__(self, fds: list[int], *, listen_pid: str | None = None, names: str | None = None,
                 mode: str = "unset", addresses: list[str] | None = None, serve: bool = False) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        env["LISTEN_FDS"] = str(len(fds))
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        env["TEST_ADDRESSES"] = json.dumps(addresses or [])
        if serve:
            env["TEST_SERVE"] = "1"
        argv = [sys.executable, "-c", ACTIVATED, mode]
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: what systemd's exec_child does, then exec
            try:
                # Out of the way first: the targets 3, 4, ... may be where these are now.
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
                out = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 100)
                os.dup2(out, 1)
                for index, fd in enumerate(high):
                    os.dup2(fd, SD_LISTEN_FDS_START + index)  # inheritable, as systemd leaves them
                env["LISTEN_PID"] = str(os.getpid()) if listen_pid is None else listen_pid
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        os.close(write_end)
        self.pid = pid
        self.output = os.fdopen(read_end, "rb")

    def report(self, timeout: float = 30.0) -> dict:
        """The child's JSON description of what it inherited."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.output, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise AssertionError("the activated program wrote nothing")
        line = self.output.readline()
        assert line, "the activated program exited without a report"
        return json.loads(line)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.output.close()
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.output.close()
        raise AssertionError("the activated program did not exit")


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


@pytest.fixture
def unix_listener(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "www.sock"))
        sock.listen(16)
        yield sock


def test_activated_program_takes_over_its_sockets(tcp_listener: socket.socket,
                                                  unix_listener: socket.socket) -> None:
    port = tcp_listener.getsockname()[1]
    path = unix_listener.getsockname()
    child = Activated([tcp_listener.fileno(), unix_listener.fileno()], names="web:fastfpm.socket")
    report = child.report()
    assert child.wait() == 0
    assert report["before"] == {"LISTEN_PID": str(report["pid"]), "LISTEN_FDS": "2",
                                "LISTEN_FDNAMES": "web:fastfpm.socket"}
    assert report["after"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    assert report["sockets"] == [
        {"name": "web", "fd": 3, "family": "AF_INET", "type": "SOCK_STREAM",
         "sockname": ["127.0.0.1", port], "cloexec": True},
        {"name": "fastfpm.socket", "fd": 4, "family": "AF_UNIX", "type": "SOCK_STREAM",
         "sockname": path, "cloexec": True},
    ]


def test_activated_program_serves_on_the_inherited_sockets(tcp_listener: socket.socket,
                                                           unix_listener: socket.socket) -> None:
    port = tcp_listener.getsockname()[1]
    path = unix_listener.getsockname()
    addresses = [f"127.0.0.1:{port}", path, f"unix:{path}", f"127.0.0.1:{port + 1 if port < 65535 else 1}",
                 "/elsewhere.sock"]
    child = Activated([unix_listener.fileno(), tcp_listener.fileno()], addresses=addresses, serve=True)
    report = child.report()
    assert [s["name"] for s in report["sockets"]] == ["unknown", "unknown"]
    assert report["matches"] == {addresses[0]: 4, addresses[1]: 3, addresses[2]: 3,
                                 addresses[3]: None, addresses[4]: None}
    # The parent closes its copies: only the child can answer now.
    tcp_listener.close()
    unix_listener.close()
    for family, target in ((socket.AF_UNIX, path), (socket.AF_INET, ("127.0.0.1", port))):
        with socket.socket(family, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(target)
            assert client.recv(100) == b"unknown"
    assert child.wait() == 0


def test_activated_program_with_someone_elses_listen_pid(tcp_listener: socket.socket) -> None:
    child = Activated([tcp_listener.fileno()], listen_pid=str(os.getpid()), names="web")
    report = child.report()
    assert child.wait() == 0
    assert report["before"]["LISTEN_PID"] == str(os.getpid()) != str(report["pid"])
    assert report["sockets"] == []
    assert report["after"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_activated_program_keeps_the_variables_when_asked(tcp_listener: socket.socket) -> None:
    child = Activated([tcp_listener.fileno()], mode="keep")
    report = child.report()
    assert child.wait() == 0
    assert len(report["sockets"]) == 1
    assert report["after"] == report["before"]
    assert report["after"]["LISTEN_FDNAMES"] is None


def test_activated_program_skips_fds_that_are_not_sockets(tcp_listener: socket.socket,
                                                          unix_listener: socket.socket) -> None:
    """A .socket unit may also pass a FIFO (ListenFIFO=): it is no pool's listen socket."""
    fifo_read, fifo_write = os.pipe()
    try:
        child = Activated([tcp_listener.fileno(), fifo_read, unix_listener.fileno()], names="tcp:fifo:")
        report = child.report()
        assert child.wait() == 0
    finally:
        os.close(fifo_read)
        os.close(fifo_write)
    assert [(s["name"], s["fd"]) for s in report["sockets"]] == [("tcp", 3), ("unknown", 5)]


# ----------------------------------------------------------------------------------- match_socket


def listening(family: int, host: str | None = None, port: int = 0, *, v6only: bool | None = None,
              reuseport: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((host, port))
    sock.listen(8)
    return sock


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def test_match_ipv4(sockets: list[socket.socket]) -> None:
    loopback = listening(socket.AF_INET, "127.0.0.1")
    port = port_of(loopback)
    # Same port number, but UDP, and a TCP socket that does not listen: neither is a pool's socket.
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    other.bind(("127.0.0.2", port))
    sockets += [udp, other, loopback]
    assert match_socket(sockets, f"127.0.0.1:{port}") is loopback
    assert match_socket(sockets, parse_address(f"127.0.0.1:{port}")) is loopback
    assert match_socket(sockets, f"localhost:{port}") is loopback
    assert match_socket(sockets, f"[::ffff:127.0.0.1]:{port}") is loopback
    assert match_socket(sockets, f"127.0.0.2:{port}") is None
    assert match_socket(sockets, f"127.0.0.1:{port % 65535 + 1}") is None
    assert match_socket(sockets, f"{port}") is None  # a wildcard is not one address
    assert match_socket(sockets, "/run/fastfpm/www.sock") is None
    assert match_socket([], f"127.0.0.1:{port}") is None


@needs_ipv6
def test_match_ipv6(sockets: list[socket.socket]) -> None:
    loopback6 = listening(socket.AF_INET6, "::1")
    port = port_of(loopback6)
    loopback4 = listening(socket.AF_INET, "127.0.0.1", port)
    sockets += [loopback4, loopback6]
    assert match_socket(sockets, f"[::1]:{port}") is loopback6
    assert match_socket(sockets, f"[0:0::1]:{port}") is loopback6
    assert match_socket(sockets, f"127.0.0.1:{port}") is loopback4
    assert match_socket(sockets, f"[::2]:{port}") is None
    assert match_socket(sockets, f"[::]:{port}") is None


@needs_ipv6
def test_match_wildcard_dual_stack(sockets: list[socket.socket]) -> None:
    """What systemd makes of ListenStream=9000 (BindIPv6Only=default): one dual-stack :: socket."""
    dual = listening(socket.AF_INET6, "::", v6only=False)
    port = port_of(dual)
    sockets.append(dual)
    for text in (f"{port}", f"[::]:{port}", f"0.0.0.0:{port}"):
        assert match_socket(sockets, text) is dual, text
    assert match_socket(sockets, f"127.0.0.1:{port}") is None
    assert match_socket(sockets, f"[::1]:{port}") is None
    assert match_socket(sockets, f"{port % 65535 + 1}") is None


def test_match_wildcard_ipv4(sockets: list[socket.socket]) -> None:
    """ListenStream=0.0.0.0:9000."""
    any4 = listening(socket.AF_INET, "0.0.0.0")
    port = port_of(any4)
    sockets.append(any4)
    for text in (f"{port}", f"0.0.0.0:{port}", f"[::]:{port}"):
        assert match_socket(sockets, text) is any4, text
    assert match_socket(sockets, f"127.0.0.1:{port}") is None


@needs_ipv6
def test_match_wildcard_prefers_what_fastfpm_would_bind(sockets: list[socket.socket]) -> None:
    any4 = listening(socket.AF_INET, "0.0.0.0", reuseport=True)
    port = port_of(any4)
    dual = listening(socket.AF_INET6, "::", port, v6only=False, reuseport=True)
    for order in ([any4, dual], [dual, any4]):
        assert match_socket(order, f"{port}") is dual
        assert match_socket(order, f"[::]:{port}") is dual
        assert match_socket(order, f"0.0.0.0:{port}") is any4
    any4.close()
    dual.close()


@needs_ipv6
def test_match_wildcard_with_ipv6_only_socket(sockets: list[socket.socket]) -> None:
    """BindIPv6Only=ipv6-only: [::]:9000 serves no IPv4 client, so 0.0.0.0:9000 never takes it."""
    v6only = listening(socket.AF_INET6, "::", v6only=True)
    port = port_of(v6only)
    sockets.append(v6only)
    assert match_socket(sockets, f"0.0.0.0:{port}") is None
    assert match_socket(sockets, f"[::]:{port}") is v6only
    assert match_socket(sockets, f"{port}") is v6only
    any4 = listening(socket.AF_INET, "0.0.0.0", port)
    sockets.append(any4)
    assert match_socket(sockets, f"0.0.0.0:{port}") is any4
    assert match_socket(sockets, f"{port}") is any4


def test_match_unix(tmp_path: Path, sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "www.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(path))
    unix.listen(8)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0{path}")
    abstract.listen(8)
    tcp = listening(socket.AF_INET, "127.0.0.1")
    sockets += [tcp, abstract, unix]
    assert match_socket(sockets, str(path)) is unix
    assert match_socket(sockets, f"unix:{path}") is unix
    assert match_socket(sockets, f"{tmp_path}//www.sock") is unix
    assert match_socket(sockets, str(tmp_path / "sub" / ".." / "www.sock")) is unix
    monkeypatch.chdir(tmp_path)
    assert match_socket(sockets, "./www.sock") is unix
    assert match_socket(sockets, str(tmp_path / "other.sock")) is None
    assert match_socket(sockets, f"127.0.0.1:{port_of(tcp)}") is tcp


def test_match_skips_closed_sockets(sockets: list[socket.socket]) -> None:
    gone = listening(socket.AF_INET, "127.0.0.1")
    port = port_of(gone)
    gone.close()
    assert match_socket([gone], f"127.0.0.1:{port}") is None
