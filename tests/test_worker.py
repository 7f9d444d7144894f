"""The worker's FastCGI behaviour, through real sockets to a real `fastfpm serve` process.

Every rule of issue 2's protocol list has a test here: roles, FCGI_KEEP_CONN, GET_VALUES,
CANT_MPX_CONN, ABORT_REQUEST, UNKNOWN_TYPE, malformed input and the limits. A worker that
survives a bad connection is shown by a good request afterwards, on the only worker there is.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from fastfpm import protocol as p
from fastfpm.client import FastCGIClient, build_params
from tests.fcgi_helpers import closed_by_peer, read_records, request_bytes, truncated_params_request
from tests.servers import Launcher, forked_slot_worker, wait_until

ROUTER = "tests.apps.lifecycle:app"


def stdout_of(records: list[p.Record], request_id: int = 1) -> bytes:
    """The STDOUT stream of one request."""
    return b"".join(r.content for r in records if r.type == p.STDOUT and r.request_id == request_id)


def env_params(path: str = "/env", query: str = "") -> dict[str, str]:
    """Params for the router app, nginx-shaped."""
    return build_params("GET", path, query, {"Host": "example.test"}, None, {})


@pytest.fixture
def server(launcher: Launcher):
    """One worker, so 'the worker serves on' means the very worker that saw the bad input."""
    return launcher.fastfpm(ROUTER, max_children=1, extra_args=["--idle-timeout", "1"])


def assert_still_serving(server) -> None:
    """A normal request on a new connection succeeds."""
    with FastCGIClient(server.address, timeout=5) as client:
        response = client.request(env_params())
    assert response.status == 200
    assert json.loads(response.body)["environ"]["PATH_INFO"] == "/env"


def test_responder_without_keep_conn_closes_after_end_request(server) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes(1, env_params()))
        records = read_records(sock)
        assert records[-1].type == p.END_REQUEST
        assert p.parse_end_request(records[-1].content) == (0, p.REQUEST_COMPLETE)
        assert b"Status: 200 OK" in stdout_of(records)
        # The empty STDOUT record closes the stream before END_REQUEST.
        assert any(r.type == p.STDOUT and r.content == b"" for r in records)
        assert closed_by_peer(sock)


def test_keep_conn_serves_several_requests_on_one_connection(server) -> None:
    with FastCGIClient(server.address, keep_conn=True) as client:
        seen = [json.loads(client.request(env_params(query=f"n={n}")).body) for n in range(5)]
    assert [s["environ"]["QUERY_STRING"] for s in seen] == [f"n={n}" for n in range(5)]
    # The same worker, and the same socket inode set: one connection carried all five.
    assert len({s["pid"] for s in seen}) == 1
    assert len({tuple(s["sockets"]) for s in seen}) == 1


def test_keep_conn_connection_stays_open_after_end_request(server) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes(1, env_params(), flags=p.KEEP_CONN))
        assert read_records(sock)[-1].type == p.END_REQUEST
        sock.sendall(request_bytes(2, env_params(query="second")))
        records = read_records(sock)
        seen = json.loads(stdout_of(records, 2).split(b"\r\n\r\n", 1)[1])
        assert seen["environ"]["QUERY_STRING"] == "second"


@pytest.mark.parametrize("role", [p.AUTHORIZER, p.FILTER])
def test_other_roles_get_unknown_role(server, role: int) -> None:
    with server.connect() as sock:
        sock.sendall(p.encode_begin_request(1, role, 0))
        records = read_records(sock)
        assert records[-1].type == p.END_REQUEST
        assert p.parse_end_request(records[-1].content)[1] == p.UNKNOWN_ROLE
        assert closed_by_peer(sock)
    assert_still_serving(server)


def test_get_values_answers_pool_limits(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=3)
    with FastCGIClient(server.address) as client:
        values = client.get_values([b"FCGI_MAX_CONNS", b"FCGI_MAX_REQS", b"FCGI_MPXS_CONNS", b"UNKNOWN_NAME"])
    assert values == {b"FCGI_MAX_CONNS": b"3", b"FCGI_MAX_REQS": b"3", b"FCGI_MPXS_CONNS": b"0"}


def test_unknown_management_record_gets_unknown_type(server) -> None:
    with server.connect() as sock:
        sock.sendall(p.encode_record(42, 0, b"whatever"))
        records = read_records(sock, until_type=p.UNKNOWN_TYPE)
        assert records[-1].type == p.UNKNOWN_TYPE
        assert records[-1].content[0] == 42
        # The connection is still usable for a request.
        sock.sendall(request_bytes(1, env_params()))
        assert read_records(sock)[-1].type == p.END_REQUEST


def test_second_begin_request_gets_cant_mpx_conn(server) -> None:
    params = p.encode_pairs([(k.encode(), v.encode()) for k, v in env_params().items()])
    with server.connect() as sock:
        sock.sendall(p.encode_begin_request(1, p.RESPONDER, 0) + p.encode_stream(p.PARAMS, 1, params))
        sock.sendall(p.encode_begin_request(2, p.RESPONDER, 0))
        sock.sendall(p.encode_record(p.PARAMS, 1) + p.encode_record(p.STDIN, 1))
        records = read_records(sock)
        refusals = [r for r in records if r.type == p.END_REQUEST and r.request_id == 2]
        assert refusals and p.parse_end_request(refusals[0].content)[1] == p.CANT_MPX_CONN
        ends = [r for r in read_records(sock) + records if r.type == p.END_REQUEST and r.request_id == 1]
        assert ends and p.parse_end_request(ends[0].content)[1] == p.REQUEST_COMPLETE


def test_a_whole_second_request_is_refused_and_the_first_still_served(server) -> None:
    # A multiplexing client sends request 2 complete (BEGIN, PARAMS, STDIN) before request 1's
    # PARAMS end: request 2 hears CANT_MPX_CONN, its records are dropped, request 1 is answered.
    pairs = p.encode_pairs([(k.encode(), v.encode()) for k, v in env_params(query="first").items()])
    with server.connect() as sock:
        sock.sendall(p.encode_begin_request(1, p.RESPONDER, p.KEEP_CONN)
                     + p.encode_stream(p.PARAMS, 1, pairs))
        sock.sendall(request_bytes(2, env_params(query="second")))
        sock.sendall(p.encode_record(p.PARAMS, 1) + p.encode_record(p.STDIN, 1))
        records = read_records(sock)
        while not any(r.type == p.END_REQUEST and r.request_id == 1 for r in records):
            more = read_records(sock)
            assert more, "the connection closed before request 1 was answered"
            records += more
        refusals = [r for r in records if r.type == p.END_REQUEST and r.request_id == 2]
        assert [p.parse_end_request(r.content)[1] for r in refusals] == [p.CANT_MPX_CONN]
        seen = json.loads(stdout_of(records, 1).split(b"\r\n\r\n", 1)[1])
        assert seen["environ"]["QUERY_STRING"] == "first"
        assert stdout_of(records, 2) == b""
        # The connection is still good: the refused id may be used again for a real request.
        sock.sendall(request_bytes(2, env_params(query="again")))
        again = read_records(sock)
        assert json.loads(stdout_of(again, 2).split(b"\r\n\r\n", 1)[1])["environ"]["QUERY_STRING"] == "again"


def test_a_request_queued_behind_one_without_keep_conn_is_refused_before_closing(server) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes(1, env_params()) + request_bytes(2, env_params()))
        records = read_records(sock, until_type=-1)  # everything until the worker closes
        ends = {r.request_id: p.parse_end_request(r.content)[1] for r in records if r.type == p.END_REQUEST}
        assert ends == {1: p.REQUEST_COMPLETE, 2: p.CANT_MPX_CONN}
    assert_still_serving(server)


@pytest.mark.parametrize("role", [p.AUTHORIZER, p.FILTER])
def test_a_refused_role_on_a_kept_connection_does_not_spoil_the_next_request(server, role: int) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes(1, env_params(), flags=p.KEEP_CONN, role=role))
        if role == p.FILTER:
            sock.sendall(p.encode_record(p.DATA, 1, b"filter data") + p.encode_record(p.DATA, 1))
        records = read_records(sock)
        assert p.parse_end_request(records[-1].content)[1] == p.UNKNOWN_ROLE
        sock.sendall(request_bytes(1, env_params(query="next")))
        records = read_records(sock)
        assert p.parse_end_request(records[-1].content) == (0, p.REQUEST_COMPLETE)
        assert json.loads(stdout_of(records).split(b"\r\n\r\n", 1)[1])["environ"]["QUERY_STRING"] == "next"


def test_an_app_calling_sys_exit_gets_a_500_and_the_worker_serves_on(server) -> None:
    pids = server.worker_pids()
    mark = server.log_size()
    with FastCGIClient(server.address, timeout=5) as client:
        response = client.request(env_params(path="/exit"))
    assert response.status == 500
    # Waiting for the traceback's last line: "SystemExit" alone is already in its source line.
    assert "SystemExit: 3" in server.wait_for_log("SystemExit: 3", mark)
    assert_still_serving(server)
    assert server.worker_pids() == pids


def test_abort_request_ends_request_and_closes_iterable(server, tmp_path: Path) -> None:
    closed = tmp_path / "closed.txt"
    params = build_params("GET", "/stream", f"chunks=50&pause=0.1&closed={closed}", {}, None, {})
    with server.connect() as sock:
        sock.sendall(request_bytes(1, params, flags=p.KEEP_CONN))
        first = read_records(sock, until_type=p.STDOUT)
        assert b"chunk 0" in b"".join(r.content for r in first)
        sock.sendall(p.encode_record(p.ABORT_REQUEST, 1))
        records = read_records(sock)
        assert records[-1].type == p.END_REQUEST
        body = stdout_of(first + records)
        assert body.count(b"chunk ") < 50  # the app was stopped early
    wait_until(closed.exists, 5, message="close() of the aborted iterable")
    assert closed.read_text() == "closed\n"
    assert_still_serving(server)


def test_abort_before_params_end_is_acknowledged(server) -> None:
    with server.connect() as sock:
        sock.sendall(p.encode_begin_request(1, p.RESPONDER, 0) + p.encode_record(p.ABORT_REQUEST, 1))
        records = read_records(sock)
        assert records[-1].type == p.END_REQUEST and records[-1].request_id == 1
        assert stdout_of(records) == b""


MALFORMED = {
    "bad version": b"\x02" + p.encode_begin_request(1)[1:],
    "content past the end": p.encode_begin_request(1) + b"\x01\x04\x00\x01\xff\xf0\x00\x00" + b"x" * 10,
    "truncated pairs": truncated_params_request(1),
    "unknown request id": p.encode_begin_request(1) + p.encode_record(p.PARAMS, 7, b""),
    "params before begin": p.encode_record(p.PARAMS, 1, b""),
    "begin body too short": p.encode_record(p.BEGIN_REQUEST, 1, b"\x00\x01"),
    "management record with a request id": p.encode_get_values([b"FCGI_MAX_CONNS"])[:2] + b"\x00\x05"
    + p.encode_get_values([b"FCGI_MAX_CONNS"])[4:],
    "a second begin for the same id": (p.encode_begin_request(1) + p.encode_begin_request(1)),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_closes_connection_logs_once_and_worker_serves_on(server, name: str) -> None:
    mark = server.log_size()
    pid_before = server.worker_pids()
    with server.connect() as sock:
        sock.sendall(MALFORMED[name])
        if name == "content past the end":
            sock.shutdown(socket.SHUT_WR)  # EOF in the middle of the record
        assert closed_by_peer(sock)
    log = server.wait_for_log("closing a FastCGI connection", mark)
    assert log.count("closing a FastCGI connection") == 1
    assert_still_serving(server)
    assert server.worker_pids() == pid_before  # the same worker, not a respawn


def test_body_longer_than_content_length_closes_connection(server) -> None:
    params = build_params("POST", "/upload", "", {}, 4, {})
    mark = server.log_size()
    with server.connect() as sock:
        sock.sendall(request_bytes(1, params, body=b"0123456789"))
        records = read_records(sock)
        assert not any(r.type == p.END_REQUEST for r in records)
    assert "longer than CONTENT_LENGTH" in server.wait_for_log("CONTENT_LENGTH", mark)
    assert_still_serving(server)


def test_params_over_the_limit_are_refused(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--max-params-size", "4096"])
    params = env_params()
    params["HTTP_X_BIG"] = "y" * 5000
    mark = server.log_size()
    with server.connect() as sock:
        sock.sendall(request_bytes(1, params))
        assert closed_by_peer(sock)
    assert "4096-byte limit" in server.wait_for_log("limit", mark)
    assert_still_serving(server)


def test_silent_connection_is_closed_after_idle_timeout(server) -> None:
    started = time.monotonic()
    with server.connect() as sock:
        assert closed_by_peer(sock, timeout=10)
    waited = time.monotonic() - started
    assert waited >= 0.9  # --idle-timeout 1: not before the second is up
    assert_still_serving(server)


def test_idle_connection_does_not_hold_the_only_worker_forever(server) -> None:
    with server.connect() as silent:
        # While the silent connection holds the worker, this request waits; after the idle
        # timeout closes the silent one, it is served.
        assert_still_serving(server)
        assert closed_by_peer(silent, timeout=1)


def test_streamed_response_arrives_before_the_app_finishes(server) -> None:
    params = build_params("GET", "/stream", "chunks=3&pause=1", {}, None, {})
    with server.connect() as sock:
        sock.sendall(request_bytes(1, params))
        started = time.monotonic()
        first = read_records(sock, until_type=p.STDOUT)
        assert b"chunk 0" in b"".join(r.content for r in first)
        assert time.monotonic() - started < 0.9  # before the second chunk was even produced
        rest = read_records(sock)
        assert b"chunk 2" in stdout_of(first + rest)


def test_write_callable_and_iterable_are_both_sent(server) -> None:
    params = build_params("GET", "/write-then-iterate", "", {}, None, {})
    with FastCGIClient(server.address) as client:
        response = client.request(params)
    assert response.body == b"written, then returned"


def test_large_stdout_is_split_into_records_of_at_most_65535(server) -> None:
    params = build_params("GET", "/download", "mb=2", {}, None, {})
    with server.connect() as sock:
        sock.sendall(request_bytes(1, params))
        records = read_records(sock, timeout=20)
    sizes = [len(r.content) for r in records if r.type == p.STDOUT]
    assert max(sizes) <= 65535
    assert sum(sizes) > 2 * 1024 * 1024
    assert all(r.size % 8 == 0 for r in records)  # every record padded to 8 bytes


def test_idle_kept_connection_does_not_pin_the_only_worker(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--idle-timeout", "30"])
    with FastCGIClient(server.address, keep_conn=True) as kept:
        first = json.loads(kept.request(env_params(query="kept")).body)
        kept_socket = kept.sock
        started = time.monotonic()
        with FastCGIClient(server.address, timeout=5) as other:
            second = json.loads(other.request(env_params(query="other")).body)
        # Served at once by the same (only) worker, not after the 30 s idle timeout.
        assert time.monotonic() - started < 3
        assert second["pid"] == first["pid"]
        # ...and the kept connection is still open and still served (the client would quietly
        # reconnect if the server had closed it, so the socket object must be the same one).
        again = json.loads(kept.request(env_params(query="kept-again")).body)
        assert kept.sock is kept_socket
        assert again["environ"]["QUERY_STRING"] == "kept-again"


def test_idle_kept_connection_is_closed_after_idle_timeout(server) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes(1, env_params(), flags=p.KEEP_CONN))
        assert read_records(sock)[-1].type == p.END_REQUEST
        started = time.monotonic()
        assert closed_by_peer(sock, timeout=10)
        assert 0.9 <= time.monotonic() - started < 5  # --idle-timeout 1


def test_kept_connections_are_closed_after_idle_timeout_once_the_accept_queue_drains(server) -> None:
    # The worker holds `first` kept; `second` then arrives through its epoll set and is accepted
    # there, after which the worker finds the accept queue empty. Its next wait must still end at
    # the kept connections' idle deadline (it once waited without one, holding both open).
    with server.connect() as first, server.connect() as second:
        first.sendall(request_bytes(1, env_params(), flags=p.KEEP_CONN))
        assert read_records(first)[-1].type == p.END_REQUEST
        second.sendall(request_bytes(1, env_params(), flags=p.KEEP_CONN))
        assert read_records(second)[-1].type == p.END_REQUEST
        started = time.monotonic()
        assert closed_by_peer(second, timeout=10) and closed_by_peer(first, timeout=10)
        assert time.monotonic() - started < 5  # --idle-timeout 1


class _RoutesPool:
    """The pool settings forked_slot_worker's environ template reads."""

    name = "routes"


def test_routes_serve_their_paths_instead_of_the_app(tmp_path: Path) -> None:
    def pool_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"app " + environ["PATH_INFO"].encode()]

    def status_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"status " + environ["QUERY_STRING"].encode()]

    def failing_app(environ, start_response):
        raise RuntimeError("route failed")

    routes = {"/status": status_app, "/fail": failing_app}
    with forked_slot_worker(tmp_path / "r.sock", pool_app, _RoutesPool, routes=routes) as (_, address, _):
        def get_body(path: str, query: str = "") -> tuple[int, bytes]:
            with FastCGIClient(address, timeout=5) as client:
                response = client.request(build_params("GET", path, query, {}, None, {}))
            return response.status, response.body

        assert get_body("/status", "full") == (200, b"status full")
        assert get_body("/st%61tus") == (200, b"status ")      # the decoded path is compared
        assert get_body("/statusx") == (200, b"app /statusx")  # a whole path, not a prefix
        assert get_body("/status/") == (200, b"app /status/")
        assert get_body("/other") == (200, b"app /other")
        assert get_body("/fail")[0] == 500                      # a route's failure is the app's
        assert get_body("/status", "again") == (200, b"status again")
