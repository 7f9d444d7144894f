"""pm.status_listen (fastfpm.statuslisten): the master answers status and ping on its own address.

Everything here runs a real `fastfpm serve -c` master (tests/servers.py) whose pool holds its
workers in tests/apps/gate_app.py until a gate file exists, so "every worker is busy" is a state the
test sets up and releases, not a sleep. The listener is spoken to with the project's client, with
raw records (tests/fcgi_helpers.py) and through nginx with its stock fastcgi_params.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastfpm import config as cfg
from fastfpm import protocol as p
from fastfpm.client import FastCGIClient, FastCGIError, Response, build_params, parse_cgi_response
from fastfpm.statuslisten import MAX_CONNECTIONS
from tests.fcgi_helpers import closed_by_peer, read_records, request_bytes
from tests.servers import ConfiguredServer, Nginx, free_port, http_request, nginx_binary, wait_until
from tests.test_status import SHAPES, fetch

Start = Callable[..., ConfiguredServer]

POOL = """
[www]
listen = {{dir}}/fpm.sock
app = {app}
pm = static
pm.max_children = 2
pm.status_path = /status
ping.path = /ping
ping.response = alive
pm.status_listen = {status_listen}
{extra}
"""


def pool_conf(status_listen: str, app: str = "tests.apps.gate_app:app", extra: str = "") -> str:
    """The pool every test runs: 2 static workers, status and ping paths, a status listener."""
    return POOL.format(app=app, status_listen=status_listen, extra=extra)


def listen_address(transport: str) -> str:
    """A status_listen address: a unix socket in the server's directory ({dir}) or a free TCP port."""
    return "{dir}/status.sock" if transport == "unix" else f"127.0.0.1:{free_port()}"


def started(configured: Start, transport: str = "unix", **conf: Any) -> tuple[ConfiguredServer, str]:
    """A server with a status listener, its workers settled; (server, the listener's address)."""
    listen = listen_address(transport)
    server = configured(pool_conf(listen, **conf))
    server.settled_workers()
    return server, listen.replace("{dir}", str(server.workdir))


def page(address: str, query: str = "json") -> dict[str, Any]:
    """The status page as JSON, read over address."""
    response = fetch(address, "/status", query)
    assert response.status == 200, response
    return json.loads(response.body)


def page_when(address: str, predicate: Callable[[dict[str, Any]], bool], what: str,
              query: str = "json&full", timeout: float = 15) -> dict[str, Any]:
    """Poll the page until predicate holds; the page that satisfied it."""
    def check() -> dict[str, Any] | None:
        current = page(address, query)
        return current if predicate(current) else None

    return wait_until(check, timeout, message=what)


@contextlib.contextmanager
def busy_pool(server: ConfiguredServer, workers: int = 2) -> Iterator[list[Response]]:
    """`workers` requests held inside the app (gate_app) until the block ends; their responses."""
    gate = server.workdir / "gate"
    with contextlib.suppress(FileNotFoundError):
        gate.unlink()
    results: list[Response] = []

    def held() -> None:
        with contextlib.suppress(OSError, FastCGIError), FastCGIClient(server.address, timeout=40) as client:
            results.append(client.request(build_params("GET", "/", f"gate={gate}", {}, None, {})))

    threads = [threading.Thread(target=held, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        yield results
    finally:
        gate.touch()
        for thread in threads:
            thread.join(40)


def answer(records: list[p.Record], request_id: int) -> tuple[int, list[tuple[str, str]], bytes, int]:
    """(status, headers, body, protocol status) of one request's records."""
    stdout = b"".join(r.content for r in records if r.type == p.STDOUT and r.request_id == request_id)
    end = next(r for r in records if r.type == p.END_REQUEST and r.request_id == request_id)
    status, _, headers, body = parse_cgi_response(stdout)
    return status, headers, body, p.parse_end_request(end.content)[1]


def ends(records: list[p.Record]) -> dict[int, int]:
    """request id -> protocol status of each END_REQUEST."""
    return {r.request_id: p.parse_end_request(r.content)[1] for r in records if r.type == p.END_REQUEST}


def connect(address: str) -> socket.socket:
    """A raw client connection to a listener address."""
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
    else:
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
    sock.settimeout(10)
    return sock


def still_open(sock: socket.socket) -> bool:
    """True when the peer has neither closed nor sent anything (a non-blocking read would block)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)  # with a timeout set, recv would wait for it first
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)
    return bool(data)


# --- the point of it: status while every worker is busy -----------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_status_listen_answers_while_every_worker_is_busy(configured: Start, transport: str) -> None:
    server, listen = started(configured, transport)
    queued: list[Response] = []
    with busy_pool(server) as held:
        saturated = page_when(listen, lambda pg: pg["active processes"] == 2, "both workers held")
        # The pool's own status page, asked for on its own socket, waits in the accept queue.
        thread = threading.Thread(target=lambda: queued.append(fetch(server.address, "/status", "json")),
                                  daemon=True)
        thread.start()
        queue = page_when(listen, lambda pg: pg["listen queue"] == 1, "the master's queue sample")
        assert not queued, "a worker answered although both were held"
        for current in (saturated, queue):
            assert (current["idle processes"], current["active processes"], current["total processes"]) \
                == (0, 2, 2)
            assert {row["state"] for row in current["processes"]} == {"Running"}
            assert {row["request uri"].split("?")[0] for row in current["processes"]} == {"/"}
        assert queue["max listen queue"] >= 1 and queue["listen queue len"] == 511
        assert queue["max active processes"] == 2
    thread.join(20)
    assert [r.status for r in held] == [200, 200]
    # Once a worker came free it answered the queued request: the page a worker serves.
    assert queued and queued[0].status == 200 and json.loads(queued[0].body)["pool"] == "www"


# --- every format, ping, HEAD, unknown paths ----------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_every_format_parses_and_has_the_worker_pages_keys(configured: Start, transport: str) -> None:
    server, listen = started(configured, transport)
    for fmt in ("text", "json", "xml", "html"):
        for full in (False, True):
            query = "&".join(part for part in ("" if fmt == "text" else fmt, "full" if full else "") if part)
            ours, workers = fetch(listen, "/status", query), fetch(server.address, "/status", query)
            assert (ours.status, workers.status) == (200, 200), query
            for name in ("Content-Type", "Expires", "Cache-Control"):
                assert ours.header(name) == workers.header(name), (query, name)
            our_shape, their_shape = SHAPES[fmt](ours.text), SHAPES[fmt](workers.text)
            assert our_shape == their_shape, query   # keys, order and value types, row by row
            assert len(our_shape) == (3 if full else 1)
            if fmt == "xml":
                ET.fromstring(ours.body)
    workers = page(server.address, "json&full")
    # No worker renders the master's page: once the last worker request is over (its worker may
    # still be Finishing when the client has the answer), both are idle.
    ours = page_when(listen, lambda pg: pg["idle processes"] == 2, "both workers idle")
    assert ours["active processes"] == 0
    assert list(ours) == list(workers)
    assert [list(row) for row in ours["processes"]] == [list(row) for row in workers["processes"]]
    assert {row["state"] for row in ours["processes"]} == {"Idle"}


def test_openmetrics_via_status_listen_is_valid_with_the_worker_pages_families(configured: Start) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    server, listen = started(configured)
    ours, workers = fetch(listen, "/status", "openmetrics"), fetch(server.address, "/status", "openmetrics")
    assert ours.header("Content-Type") == workers.header("Content-Type")
    our_families = [(f.name, f.type) for f in text_string_to_metric_families(ours.text)]
    assert our_families == [(f.name, f.type) for f in text_string_to_metric_families(workers.text)]
    processes = next(f for f in text_string_to_metric_families(ours.text) if f.name == "fastfpm_processes")
    assert {s.labels["state"]: s.value for s in processes.samples}["Idle"] == 2


def test_ping_head_and_unknown_paths(configured: Start) -> None:
    _, listen = started(configured)
    ping = fetch(listen, "/ping")
    assert (ping.status, ping.body) == (200, b"alive")
    assert ping.header("Content-Type") == "text/plain;charset=UTF-8"
    assert ping.header("Cache-Control") == "no-cache, no-store, must-revalidate, max-age=0"
    head = fetch(listen, "/ping", method="HEAD")
    assert (head.status, head.body) == (200, b"")
    head = fetch(listen, "/status", "json", method="HEAD")
    assert (head.status, head.body, head.header("Content-Type")) == (200, b"", "application/json")
    assert fetch(listen, "/st%61tus").status == 200   # the path percent-decoded, as the workers match it
    for path in ("/", "/nope", "/status/more", "/pingx"):
        missing = fetch(listen, path)
        assert (missing.status, missing.body) == (404, b"File not found.\n"), path
        assert missing.header("Content-Type") == "text/html; charset=UTF-8"   # php-fpm's


# --- the FastCGI rules: keep-alive, management records, one request at a time ----------------------


def test_keep_conn_serves_requests_one_after_another_and_pipelined(configured: Start) -> None:
    _, listen = started(configured)
    with connect(listen) as sock:
        sock.sendall(request_bytes(1, {"REQUEST_URI": "/ping"}, flags=p.KEEP_CONN))
        status, _, body, protocol_status = answer(read_records(sock), 1)
        assert (status, body, protocol_status) == (200, b"alive", p.REQUEST_COMPLETE)
        sock.sendall(request_bytes(2, {"REQUEST_URI": "/status", "QUERY_STRING": "json"}, flags=p.KEEP_CONN))
        status, _, body, _ = answer(read_records(sock), 2)
        assert status == 200 and json.loads(body)["pool"] == "www"
        # Pipelined, and with a body (STDIN content is read past, never looked at).
        sock.sendall(request_bytes(3, {"REQUEST_URI": "/ping"}, b"x" * 200_000, flags=p.KEEP_CONN)
                     + request_bytes(4, {"REQUEST_URI": "/nope"}, flags=p.KEEP_CONN))
        records = read_records(sock, count=2)
        assert (answer(records, 3)[2], answer(records, 4)[0]) == (b"alive", 404)
        sock.sendall(p.encode_get_values([p.FCGI_MAX_CONNS, p.FCGI_MPXS_CONNS, b"OTHER"]))
        result = read_records(sock, p.GET_VALUES_RESULT)[-1]
        assert dict(p.parse_pairs(result.content)) == {p.FCGI_MAX_CONNS: str(MAX_CONNECTIONS).encode(),
                                                       p.FCGI_MPXS_CONNS: b"0"}
        sock.sendall(p.encode_record(20, 0, b"\0" * 8))
        assert read_records(sock, p.UNKNOWN_TYPE)[-1].content[0] == 20
        assert still_open(sock)


def test_one_request_at_a_time_as_the_workers(configured: Start) -> None:
    _, listen = started(configured)
    ping = p.encode_pairs([(b"REQUEST_URI", b"/ping")])
    with connect(listen) as sock:
        # A second request id while the first is in flight: CANT_MPX_CONN; the first is answered.
        sock.sendall(p.encode_begin_request(1, flags=p.KEEP_CONN) + p.encode_record(p.PARAMS, 1, ping)
                     + request_bytes(2, {"REQUEST_URI": "/ping"})
                     + p.encode_record(p.PARAMS, 1) + p.encode_record(p.STDIN, 1))
        records = read_records(sock, count=2)
        assert ends(records) == {2: p.CANT_MPX_CONN, 1: p.REQUEST_COMPLETE}
        assert answer(records, 1)[2] == b"alive"
        # A role other than RESPONDER: UNKNOWN_ROLE.
        sock.sendall(request_bytes(3, {}, role=p.AUTHORIZER, flags=p.KEEP_CONN))
        assert ends(read_records(sock)) == {3: p.UNKNOWN_ROLE}
    with connect(listen) as sock:
        # Without FCGI_KEEP_CONN: answered, what is queued behind refused, then closed.
        sock.sendall(request_bytes(1, {"REQUEST_URI": "/ping"}) + request_bytes(5, {"REQUEST_URI": "/ping"}))
        records = read_records(sock, count=2)
        assert ends(records) == {1: p.REQUEST_COMPLETE, 5: p.CANT_MPX_CONN}
        assert closed_by_peer(sock)
    with connect(listen) as sock:
        # An abort before the params are complete ends the request; nothing else is sent.
        sock.sendall(p.encode_begin_request(7) + p.encode_record(p.ABORT_REQUEST, 7))
        records = read_records(sock)
        assert ends(records) == {7: p.REQUEST_COMPLETE} and not [r for r in records if r.type == p.STDOUT]
        assert closed_by_peer(sock)


# --- through nginx -------------------------------------------------------------------------------


@pytest.mark.nginx
def test_through_nginx_while_the_pool_is_saturated(configured: Start, tmp_path: Path) -> None:
    binary = nginx_binary()
    server, listen = started(configured)
    web = Nginx(binary, tmp_path, f"unix:{listen}").start()
    try:
        with busy_pool(server):
            page_when(listen, lambda pg: pg["active processes"] == 2, "both workers held")
            result = http_request(web.port, "GET", "/status?json&full")
            assert result.status == 200 and result.header("Content-Type") == "application/json"
            page_seen = result.json()
            assert (page_seen["active processes"], page_seen["idle processes"]) == (2, 0)
            assert len(page_seen["processes"]) == 2
            text = http_request(web.port, "GET", "/status")
            assert text.body.decode().splitlines()[0] == "pool:                 www"
            ping = http_request(web.port, "GET", "/ping")
            assert (ping.status, ping.body) == (200, b"alive")
            missing = http_request(web.port, "GET", "/index.php")
            assert (missing.status, missing.body) == (404, b"File not found.\n")
            # fastcgi_keep_conn on, from an upstream keepalive pool: several requests, kept connections.
            for _ in range(3):
                kept = http_request(web.keepalive_port, "GET", "/status?json")
                assert kept.status == 200 and kept.json()["active processes"] == 2
    finally:
        web.stop()
    assert "[error]" not in web.error_log_text()


# --- hostile clients do not stall the master --------------------------------------------------


def test_hostile_clients_are_closed_and_logged_while_everyone_else_is_served(configured: Start) -> None:
    server, listen = started(configured)
    mark = server.log_size()
    silent = connect(listen)            # connects and sends nothing
    greedy = connect(listen)            # a megabyte of params
    broken = connect(listen)            # a record of FastCGI version 2
    deaf = connect(listen)              # asks and asks, never reads an answer
    with silent, greedy, broken, deaf:
        with contextlib.suppress(OSError):  # closed under it, mid-send
            greedy.sendall(p.encode_begin_request(1) + p.encode_stream(
                p.PARAMS, 1, p.encode_pairs([(b"HTTP_X", b"a" * (1 << 20))])))
        broken.sendall(b"\x02" + bytes(15))
        deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = request_bytes(1, {"REQUEST_URI": "/status", "QUERY_STRING": "full&html"}, flags=p.KEEP_CONN)
        with contextlib.suppress(OSError):
            deaf.settimeout(2)
            for _ in range(2000):   # far more answers than the socket buffers hold
                deaf.sendall(request)
        # Meanwhile: the status page, ping, and the pool's own requests are answered.
        assert page(listen)["pool"] == "www"
        assert fetch(listen, "/ping").body == b"alive"
        assert fetch(server.address, "/").body.startswith(b"done in")
        assert still_open(silent)   # answered while it was still waiting for its first byte
        assert closed_by_peer(greedy) and closed_by_peer(broken)
        log = server.wait_for_log("request params over the 65536-byte limit", mark)
        assert "unsupported FastCGI version 2" in log
        # The silent and the deaf ones are closed at their deadline (idle_timeout, 5s by default).
        assert closed_by_peer(silent, timeout=15)
        log = server.wait_for_log("nothing received within 5s (idle_timeout)", mark)
        server.wait_for_log("did not complete within 5s", mark)
        assert closed_by_peer(deaf, timeout=15)
    assert server.proc is not None and server.proc.poll() is None
    assert page(listen)["pool"] == "www"
    assert fetch(server.address, "/").status == 200


def test_connections_over_the_cap_wait_in_the_backlog(configured: Start) -> None:
    server, listen = started(configured, extra="idle_timeout = 1")
    mark = server.log_size()
    silent = [connect(listen) for _ in range(MAX_CONNECTIONS + 3)]
    try:
        server.wait_for_log(f"{MAX_CONNECTIONS} connections open; more wait in the backlog", mark)
        # Answered once the silent ones are closed at their deadline.
        assert page(listen)["pool"] == "www"
        assert all(closed_by_peer(sock, timeout=15) for sock in silent)
    finally:
        for sock in silent:
            sock.close()
    wait_until(lambda: server.log_since(mark).count("nothing received within 1s") == MAX_CONNECTIONS + 3,
               10, message="every silent connection logged")
    assert server.proc is not None and server.proc.poll() is None


def test_listen_allowed_clients_applies_to_a_tcp_status_listen(configured: Start) -> None:
    server, listen = started(configured, "tcp", extra="listen.allowed_clients = 127.0.0.2")
    mark = server.log_size()
    with pytest.raises((FastCGIError, OSError)):
        fetch(listen, "/ping")
    server.wait_for_log("Connection disallowed: IP address '127.0.0.1' has been dropped.", mark)


# --- reloads and stopping ------------------------------------------------------------------------


def test_a_reload_keeps_the_listener_and_reports_the_generation_that_serves(configured: Start) -> None:
    server, listen = started(configured)
    inode = os.stat(listen).st_ino
    old = set(server.worker_pids())
    with connect(listen) as kept:
        kept.sendall(request_bytes(1, {"REQUEST_URI": "/status", "QUERY_STRING": "json"}, flags=p.KEEP_CONN))
        assert json.loads(answer(read_records(kept), 1)[2])["reloads"] == 0
        # The next generation takes two seconds to import its app: meanwhile the first one serves,
        # and the listener reports it.
        server.rewrite(pool_conf("{dir}/status.sock", app="tests.apps.lifecycle_slow_start:app",
                                 extra="ping.response = alive again"))
        mark = server.log_size()
        server.signal(signal.SIGUSR2)
        server.wait_for_log("reloading: generation 2 starting", mark)
        during = page(listen, "json&full")
        assert during["reloads"] == 0 and {row["pid"] for row in during["processes"]} == old
        assert fetch(listen, "/ping").body == b"alive"
        server.wait_for_log("reloaded: generation 2", mark, timeout=15)
        # The connection kept from before the reload is still served, now for generation 2.
        kept.sendall(request_bytes(2, {"REQUEST_URI": "/status", "QUERY_STRING": "json&full"},
                                   flags=p.KEEP_CONN))
        after = json.loads(answer(read_records(kept), 2)[2])
    assert after["reloads"] == 1
    assert not {row["pid"] for row in after["processes"]} & old and len(after["processes"]) == 2
    assert fetch(listen, "/ping").body == b"alive again"
    assert os.stat(listen).st_ino == inode   # the very socket, never closed


def test_a_reload_opens_and_closes_changed_addresses_and_a_failed_one_changes_nothing(
        configured: Start) -> None:
    server, first = started(configured)
    port = free_port()
    second = f"127.0.0.1:{port}"
    # A config with an error: nothing changes.
    server.rewrite(pool_conf("{dir}/status.sock", extra="pm.max_children = nope"))
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    server.wait_for_log("reload aborted", mark)
    assert page(first)["reloads"] == 0
    # An application that cannot be loaded: rolled back, the listener as it was, the new one closed.
    (server.workdir / "broken_app.py").write_text("def app(environ, start_response):\n    return [b'x'\n")
    server.rewrite(pool_conf(second, app="broken_app:app", extra="chdir = {dir}"))
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    server.wait_for_log("reload failed", mark, timeout=15)
    assert page(first)["reloads"] == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # A good one moves the listener: the new address answers, the old socket file is gone.
    server.rewrite(pool_conf(second))
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    server.wait_for_log("reloaded: generation 2", mark, timeout=15)   # the failed one took no number
    assert page(second)["reloads"] == 1
    assert not os.path.exists(first)
    # Stopping closes it too.
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_stopping_removes_the_unix_socket_with_the_owner_and_mode_of_listen(configured: Start) -> None:
    owner = "listen.owner = nobody\n" if os.geteuid() == 0 else ""
    server, listen = started(configured, extra=owner + "listen.mode = 0600")
    info, pools = os.stat(listen), os.stat(server.address)
    assert (oct(info.st_mode & 0o777), info.st_uid, info.st_gid) == ("0o600", pools.st_uid, pools.st_gid)
    if owner:
        assert info.st_uid == pwd.getpwnam("nobody").pw_uid
    server.stop()
    assert not os.path.exists(listen) and not os.path.exists(server.address)


# --- configuration -------------------------------------------------------------------------------


def config_errors(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "fpm.conf"
    path.write_text(body)
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(path))
    return caught.value.errors


BASE = "[www]\nlisten = 127.0.0.1:9000\napp = a:app\npm.status_path = /status\n"


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "[::1", "1.2.3:9001", "host:port"])
def test_a_bad_address_is_a_config_error_at_its_line(tmp_path: Path, address: str) -> None:
    errors = config_errors(tmp_path, BASE + f"pm.status_listen = {address}\n")
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path / 'fpm.conf'}:5: ")
    assert "pm.status_listen" in errors[0]


def test_status_listen_needs_a_status_or_ping_path(tmp_path: Path) -> None:
    body = "[www]\nlisten = 127.0.0.1:9000\napp = a:app\npm.status_listen = 127.0.0.1:9001\n"
    errors = config_errors(tmp_path, body)
    assert errors == [f"{tmp_path / 'fpm.conf'}:4: [pool www] pm.status_listen answers only "
                      "pm.status_path and ping.path, and this pool sets neither: add pm.status_path = "
                      "/status (or ping.path)"]
    path = tmp_path / "ping.conf"
    path.write_text(body + "ping.path = /ping\n")
    assert cfg.load(str(path)).pools[0].pm_status_listen == "127.0.0.1:9001"


def test_status_listen_may_not_share_an_address(tmp_path: Path) -> None:
    errors = config_errors(tmp_path, BASE + "pm.status_listen = 9000\n")
    assert errors == [f"{tmp_path / 'fpm.conf'}:5: [pool www] pm.status_listen address 9000 is already used "
                      f"by pool 'www' ({tmp_path / 'fpm.conf'}:2)"]
    errors = config_errors(tmp_path, BASE + "pm.status_listen = /tmp/s.sock\n[b]\nlisten = /tmp/s.sock\n"
                                            "app = b:app\n")
    assert errors == [f"{tmp_path / 'fpm.conf'}:7: [pool b] listen address /tmp/s.sock is already used by "
                      f"pool 'www' for pm.status_listen ({tmp_path / 'fpm.conf'}:5)"]


def test_a_relative_unix_path_is_taken_from_the_prefix_and_owner_settings_are_not_warned(
        tmp_path: Path) -> None:
    path = tmp_path / "fpm.conf"
    path.write_text(BASE + "pm.status_listen = run/status.sock\nlisten.mode = 0600\n")
    config = cfg.load(str(path))
    assert config.pools[0].pm_status_listen == str(tmp_path / "run" / "status.sock")
    assert not [w for w in config.warnings if "listen.mode" in w]   # it applies to the status socket


def test_check_reports_the_error_from_the_command_line(tmp_path: Path) -> None:
    from tests.servers import run_cli

    path = tmp_path / "fpm.conf"
    path.write_text(BASE + "pm.status_listen = 127.0.0.1:70000\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode != 0
    assert f"{path}:5:" in result.stdout + result.stderr

