"""TCP keepalive on a pool's accepted connections (listen.keepalive*), seen in a real worker.

The options are set once on the master's listen socket and the kernel copies them to every
connection accept() returns, so these tests look at the worker's own end of a connection: the
worker's fd is duplicated into the test with pidfd_getfd(2) and its socket options read back,
and /proc/net/tcp shows the keepalive timer running on it. A peer that vanishes without a FIN is
made with TCP_REPAIR (a socket in repair mode closes silently, and loopback answers the probe with
a reset, as a host that rebooted does), and one that never answers (a host powered off) by taking
the loopback interface down inside a network namespace of the test's own.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import textwrap
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastfpm import protocol as p
from fastfpm.client import build_params
from tests.fcgi_helpers import read_records, request_bytes
from tests.servers import (
    ConfiguredServer,
    child_pids,
    free_port,
    read_until_ready,
    serve_socket_activated,
    wait_until,
    write_config,
)

_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (syscall table since 5.6)
_TCP_REPAIR = 19  # linux/tcp.h; Python's socket module does not name it
_LIBC = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000  # sched.h; os.unshare arrives in Python 3.12
_TIMER_KEEPALIVE = 2  # /proc/net/tcp "tr" column: 1 retransmit, 2 keepalive (sk_timer), 4 zero window

APP = "fastfpm.demo:application"


def pool_section(name: str, port: int, keepalive: str) -> str:
    """A one-worker pool on 127.0.0.1:port whose kept connections stay a minute (idle_timeout), so
    only keepalive can end one."""
    return textwrap.dedent(f"""\
        [{name}]
        listen = 127.0.0.1:{port}
        app = {APP}
        pm = static
        pm.max_children = 1
        idle_timeout = 60s
        """) + textwrap.dedent(keepalive)


@pytest.fixture
def start(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """start(config text) -> a running ConfiguredServer (stopped at the end)."""
    started: list[ConfiguredServer] = []

    def run(body: str) -> ConfiguredServer:
        workdir = tmp_path_factory.mktemp("fpm")
        server = ConfiguredServer(workdir, workdir / "fastfpm.conf", transport="tcp")
        server.rewrite(body)
        started.append(server)
        return server.start()

    yield run
    for server in started:
        server.stop()


def kept_connection(port: int) -> socket.socket:
    """A connection to the pool on port that has had one request answered with KEEP_CONN: the worker
    holds it, idle, among its kept connections."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(request_bytes(1, build_params("GET", "/"), flags=p.KEEP_CONN))
    records = read_records(client)
    assert records and records[-1].type == p.END_REQUEST, records
    return client


def worker_end(worker_pids: list[int], client: socket.socket) -> tuple[int, int, socket.socket]:
    """(pid, socket inode, a duplicate) of the worker's end of client's connection: the worker's
    fds are duplicated one by one (pidfd_getfd) until one's peer is the client."""
    wanted = client.getsockname()
    for pid in worker_pids:
        pidfd = os.pidfd_open(pid)
        try:
            for name in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{name}")
                except FileNotFoundError:
                    continue
                if not link.startswith("socket:"):
                    continue
                fd = _LIBC.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
                if fd < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"pidfd_getfd on {pid}'s fd {name}: {os.strerror(err)}")
                sock = socket.socket(fileno=fd)
                try:
                    if sock.family == socket.AF_INET and sock.getpeername() == wanted:
                        return pid, int(link[len("socket:["):-1]), sock
                except OSError:  # a listen socket, a unix socket's unnamed peer: not ours
                    pass
                sock.close()
        finally:
            os.close(pidfd)
    raise AssertionError(f"no worker of {worker_pids} holds the connection from {wanted}")


def holds(pid: int, inode: int) -> bool:
    """Whether process pid still has the socket with this inode open."""
    target = f"socket:[{inode}]"
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                return True
        except FileNotFoundError:
            continue
    return False


def tcp_timer(inode: int) -> tuple[int, int]:
    """(timer kind, ticks until it fires, in USER_HZ) of the TCP socket with this inode (/proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[9]) == inode:
                kind, _, when = fields[5].partition(":")
                return int(kind, 16), int(when, 16)
    raise AssertionError(f"socket {inode} is not in /proc/net/tcp")


def keepalive_of(sock: socket.socket) -> tuple[int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


def vanish(client: socket.socket) -> None:
    """Close client without a FIN or RST: in repair mode the kernel forgets the socket silently."""
    client.setsockopt(socket.IPPROTO_TCP, _TCP_REPAIR, 1)
    client.close()


def test_a_workers_accepted_connection_carries_the_pools_keepalive(start):
    port = free_port()
    server = start(pool_section("www", port, """\
        listen.keepalive_idle = 45s
        listen.keepalive_interval = 7
        listen.keepalive_count = 5
        """))
    with kept_connection(port) as client:
        pid, inode, end = worker_end(server.worker_pids(), client)
        with end:
            assert keepalive_of(end) == (1, 45, 7, 5)
        # What `ss -tio` shows as timer:(keepalive,...): armed, due within keepalive_idle.
        kind, ticks = tcp_timer(inode)
        assert kind == _TIMER_KEEPALIVE
        assert 0 < ticks <= 45 * os.sysconf("SC_CLK_TCK")


def test_keepalive_no_leaves_the_workers_connections_unprobed(start):
    port = free_port()
    server = start(pool_section("www", port, "listen.keepalive = no\n"))
    with kept_connection(port) as client:
        _, inode, end = worker_end(server.worker_pids(), client)
        with end:
            assert keepalive_of(end)[0] == 0
        assert tcp_timer(inode)[0] != _TIMER_KEEPALIVE


def test_a_vanished_web_server_is_dropped_by_keepalive_and_held_without_it(start):
    """Two pools, the same silent loss of their web server: the pool with keepalive (1s:1s:2) probes,
    loopback answers the probe with a reset (no socket there any more) and the worker closes the
    connection; the pool with listen.keepalive = no still holds its connection after that."""
    probed, plain = free_port(), free_port()
    server = start(pool_section("probed", probed, """\
        listen.keepalive_idle = 1
        listen.keepalive_interval = 1
        listen.keepalive_count = 2
        """) + pool_section("plain", plain, "listen.keepalive = no\n"))
    workers = server.worker_pids()  # every initial worker accepts once the master says ready
    clients = [kept_connection(probed), kept_connection(plain)]
    ends = [worker_end(workers, client) for client in clients]
    for _, _, duplicate in ends:
        duplicate.close()  # only the worker's own descriptor may keep the socket alive
    (probed_pid, probed_inode, _), (plain_pid, plain_inode, _) = ends
    for client in clients:
        vanish(client)
    wait_until(lambda: not holds(probed_pid, probed_inode), 15,
               message="the keepalive pool's worker to drop its connection")
    assert holds(plain_pid, plain_inode)
    assert tcp_timer(plain_inode)[0] != _TIMER_KEEPALIVE


def test_a_socket_systemd_passes_gets_the_pools_keepalive(tmp_path: Path) -> None:
    """Socket activation: the pool's values are set on systemd's socket (they override a .socket
    unit's KeepAlive= settings), so its accepted connections carry them as well."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    conf = write_config(tmp_path / "a.conf", pool_section("www", port, """\
        listen.keepalive_idle = 33
        listen.keepalive_interval = 3
        listen.keepalive_count = 4
        """))
    proc = serve_socket_activated(conf, listener)
    try:
        # The test keeps its copy open, as systemd does: one socket in the kernel, seen from both.
        assert b"using the socket systemd passed" in read_until_ready(proc)
        assert keepalive_of(listener) == (1, 33, 3, 4)
        with kept_connection(port) as client:
            _, _, end = worker_end(child_pids(proc.pid), client)
            with end:
                assert keepalive_of(end) == (1, 33, 3, 4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def in_own_network(scenario: Callable[[], dict]) -> dict:
    """scenario() run in a forked child inside a new network namespace (its own loopback, up), so it
    can take that loopback down without touching anyone else's; its result comes back as JSON.
    Skips when namespaces cannot be made here (no CAP_SYS_ADMIN, a seccomp filter)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            if _LIBC.unshare(_CLONE_NEWNET) != 0:
                result: dict = {"skip": f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}"}
            else:
                subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
                result = scenario()
            os.write(write_end, json.dumps(result).encode())
            status = 0
        except BaseException:
            traceback.print_exc()  # os._exit below would lose it
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the scenario in its own namespace failed"
    result = json.loads(data)
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def powered_off_peer(workdir: Path) -> dict:
    """Two pools (keepalive 1s:1s:2 and none) each holding a kept connection, then loopback down:
    nothing answers any more, as when the web server's host loses power. Which still holds its own?"""
    probed, plain = free_port(), free_port()
    server = ConfiguredServer(workdir, workdir / "fastfpm.conf", transport="tcp")
    server.rewrite(pool_section("probed", probed, """\
        listen.keepalive_idle = 1
        listen.keepalive_interval = 1
        listen.keepalive_count = 2
        """) + pool_section("plain", plain, "listen.keepalive = no\n"))
    server.start()
    try:
        clients = [kept_connection(probed), kept_connection(plain)]
        ends = []
        for client in clients:
            pid, inode, duplicate = worker_end(server.worker_pids(), client)
            duplicate.close()
            ends.append((pid, inode))
        subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
        # Unanswered probes: after count of them the kernel fails the socket with ETIMEDOUT.
        wait_until(lambda: not holds(*ends[0]), 15, message="the keepalive pool's worker to drop it")
        return {"probed_held": holds(*ends[0]), "plain_held": holds(*ends[1]),
                "client_still_thinks_open": clients[0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0}
    finally:
        server.stop()


def test_a_powered_off_web_server_is_given_up_after_the_unanswered_probes(tmp_path: Path) -> None:
    result = in_own_network(lambda: powered_off_peer(tmp_path))
    assert result == {"probed_held": False, "plain_held": True, "client_still_thinks_open": True}
