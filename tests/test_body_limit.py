"""client_max_body_size: a body over the pool's limit is answered 413 and never handed to the app.

One master, one worker (so a kept connection that serves on after a 413 is the very worker that
refused), limit 1 KiB. The app (tests.apps.body_limit) counts its calls in a file; the access log
writes `%s %m %{Content-Type}o %r`. Each test uses its own request path, so the counts are its own.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfpm import protocol as p
from fastfpm.client import FastCGIClient, Response, build_params, parse_cgi_response
from tests.fcgi_helpers import closed_by_peer, read_records
from tests.servers import ConfiguredServer, Nginx, http_get, http_request, nginx_binary, wait_until

LIMIT = 1024
MIB = 1024 * 1024

CONF = """\
[global]
error_log = {dir}/fastfpm.log

[limited]
app = tests.apps.body_limit:app
listen = {dir}/fpm.sock
pm.max_children = 1
client_max_body_size = 1K
access.log = {dir}/access.log
access.format = "%s %m %{Content-Type}o %r"
env[CALLS_FILE] = {dir}/calls
"""


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfiguredServer]:
    workdir = tmp_path_factory.mktemp("fpm")
    server = ConfiguredServer(workdir, workdir / "fastfpm.conf")
    server.rewrite(CONF)
    server.start()
    yield server
    server.stop()


def unique_path() -> str:
    return f"/upload/{uuid.uuid4().hex}"


def params(path: str, length: int | None, query: str = "") -> dict[str, str]:
    """nginx-shaped params for a POST; length None: no CONTENT_LENGTH (a streamed body)."""
    return build_params("POST", path, query, {"Content-Type": "application/octet-stream"}, length, {})


def request_records(request_id: int, path: str, body: bytes, *, with_length: bool = True,
                    record_size: int = p.MAX_CONTENT, keep: bool = False, query: str = "") -> bytes:
    """A whole request, its body in STDIN records of record_size bytes."""
    pairs = p.encode_pairs([(k.encode(), v.encode()) for k, v in
                            params(path, len(body) if with_length else None, query).items()])
    stdin = b"".join(p.encode_record(p.STDIN, request_id, body[i:i + record_size])
                     for i in range(0, len(body), record_size))
    return (p.encode_begin_request(request_id, p.RESPONDER, p.KEEP_CONN if keep else 0)
            + p.encode_stream(p.PARAMS, request_id, pairs) + p.encode_record(p.PARAMS, request_id)
            + stdin + p.encode_record(p.STDIN, request_id))


def answer(records: list[p.Record], request_id: int = 1) -> Response:
    """The response one request's records carry (its END_REQUEST must be among them)."""
    ends = [r for r in records if r.type == p.END_REQUEST and r.request_id == request_id]
    assert ends, f"no END_REQUEST in {records!r}"
    app_status, protocol_status = p.parse_end_request(ends[0].content)
    stdout = b"".join(r.content for r in records if r.type == p.STDOUT and r.request_id == request_id)
    status, reason, headers, body = parse_cgi_response(stdout)
    return Response(status, headers, body, app_status=app_status, protocol_status=protocol_status,
                    reason=reason)


def post(master: ConfiguredServer, path: str, body: bytes, *, with_length: bool = True,
         record_size: int = p.MAX_CONTENT, query: str = "") -> Response:
    with master.connect() as sock:
        sock.sendall(request_records(1, path, body, with_length=with_length, record_size=record_size,
                                     query=query))
        return answer(read_records(sock))


def calls(master: ConfiguredServer, path: str) -> int:
    """How many times the app was called for path."""
    try:
        lines = (master.workdir / "calls").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.split("?")[0] == path)


def access_line(master: ConfiguredServer, path: str) -> str:
    """The access log's line for path, once it is written."""
    def find() -> str:
        log = master.workdir / "access.log"
        text = log.read_text() if log.exists() else ""
        return next((line for line in text.splitlines() if line.endswith(f" {path}")), "")

    return wait_until(find, 5, message=f"the access log line for {path}")


def assert_413(response: Response) -> None:
    assert (response.status, response.reason) == (413, "Request Entity Too Large")
    assert response.header("Content-Type") == "text/plain; charset=utf-8"
    assert response.body == b"Request Entity Too Large\n"
    assert int(response.header("Content-Length") or -1) == len(response.body)
    assert (response.app_status, response.protocol_status) == (0, p.REQUEST_COMPLETE)


def assert_hashed(response: Response, body: bytes) -> None:
    assert response.status == 200, response.body
    seen = json.loads(response.body)
    assert (seen["bytes"], seen["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


# --- CONTENT_LENGTH over the limit ------------------------------------------------------------


def test_content_length_over_the_limit_is_413_and_the_app_is_not_called(master: ConfiguredServer) -> None:
    path = unique_path()
    mark = master.log_size()
    assert_413(post(master, path, b"x" * (LIMIT + 1)))
    # %o shows the headers of the 413 that went out
    assert access_line(master, path) == f"413 POST text/plain; charset=utf-8 {path}"
    assert calls(master, path) == 0
    log = master.wait_for_log(f"POST {path}: CONTENT_LENGTH {LIMIT + 1} is over the {LIMIT}-byte limit", mark)
    assert "WARNING" in log and "Traceback" not in log


@pytest.mark.parametrize("size", [0, 1, LIMIT - 1, LIMIT])
def test_bodies_up_to_the_limit_reach_the_app(master: ConfiguredServer, size: int) -> None:
    path = unique_path()
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    assert_hashed(post(master, path, body), body)
    assert calls(master, path) == 1
    assert access_line(master, path) == f"200 POST application/json {path}"


# --- a streamed body without CONTENT_LENGTH ---------------------------------------------------


def test_streamed_body_up_to_the_limit_reaches_the_app(master: ConfiguredServer) -> None:
    path = unique_path()
    body = b"s" * LIMIT
    assert_hashed(post(master, path, body, with_length=False, record_size=100), body)
    assert calls(master, path) == 1


def test_streamed_body_over_the_limit_raises_in_wsgi_input_at_the_limit(master: ConfiguredServer) -> None:
    """Reads get every byte up to the limit; the one that would pass it raises (and drops what it
    had gathered, so a truncated body can never pass for a whole one)."""
    path = unique_path()
    reply = post(master, path, b"s" * (3 * LIMIT), with_length=False, record_size=LIMIT // 2, query="catch=1")
    assert reply.status == 200, reply.body  # the app caught it and answered itself
    seen = json.loads(reply.body)
    assert seen["read"] == LIMIT
    assert seen["error"][0] == "RequestBodyTooLarge"
    assert f"over the {LIMIT}-byte limit (client_max_body_size)" in seen["error"][1]
    assert calls(master, path) == 1


def test_streamed_body_over_the_limit_left_uncaught_is_413(master: ConfiguredServer) -> None:
    path = unique_path()
    mark = master.log_size()
    assert_413(post(master, path, b"s" * (3 * LIMIT), with_length=False, record_size=500))
    assert calls(master, path) == 1  # called: nothing said up front that the body was too large
    assert access_line(master, path) == f"413 POST text/plain; charset=utf-8 {path}"
    log = master.wait_for_log(f"POST {path}: request body over the {LIMIT}-byte limit", mark)
    assert "answered 413" in log and "Traceback" not in log


# --- the connection after a 413 ---------------------------------------------------------------


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "streamed"])
def test_kept_connection_serves_on_after_a_413(master: ConfiguredServer, with_length: bool) -> None:
    """A refused body within the drain allowance is read and dropped: the next request follows."""
    refused, served = unique_path(), unique_path()
    with master.connect() as sock:
        sock.sendall(request_records(1, refused, b"r" * (4 * LIMIT), with_length=with_length,
                                     record_size=1000, keep=True))
        assert_413(answer(read_records(sock)))
        sock.sendall(request_records(2, served, b"ok", keep=True))
        assert_hashed(answer(read_records(sock), request_id=2), b"ok")
    assert calls(master, served) == 1
    assert calls(master, refused) == (0 if with_length else 1)


@pytest.mark.parametrize(("with_length", "kept"), [(True, True), (False, False)],
                         ids=["content-length", "streamed"])
def test_a_body_far_over_the_limit(master: ConfiguredServer, with_length: bool, kept: bool) -> None:
    """8 MiB over a 1 KiB limit: drained when CONTENT_LENGTH bounds it (the connection serves on);
    without one, the worker closes the connection after 1 MiB rather than read on."""
    body = b"f" * (8 * MIB)
    with master.connect() as sock:
        head = request_records(1, unique_path(), body, with_length=with_length, keep=True)

        def send() -> None:
            try:
                sock.sendall(head)
            except OSError:
                pass  # the worker closed the connection: what is asserted below

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        assert_413(answer(read_records(sock)))
        if kept:
            sender.join(10)
            sock.sendall(request_records(2, unique_path(), b"ok", keep=True))
            assert_hashed(answer(read_records(sock), request_id=2), b"ok")
        else:
            assert closed_by_peer(sock)
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(10)
    with FastCGIClient(master.address, timeout=10) as client:  # the worker serves on
        assert_hashed(client.request(params(unique_path(), 2), stdin=b"ok"), b"ok")


# --- through nginx ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web(master: ConfiguredServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """nginx (stock fastcgi_params, client_max_body_size 200m) in front of the limited pool."""
    server = Nginx(nginx_binary(), tmp_path_factory.mktemp("nginx"), f"unix:{master.workdir / 'fpm.sock'}")
    server.start()
    yield server
    server.stop()


@pytest.mark.nginx
@pytest.mark.parametrize("size", [2 * LIMIT, 6 * MIB], ids=["small", "6MiB"])
@pytest.mark.parametrize("keep_alive", [False, True], ids=["per-request", "keepalive"])
def test_413_through_nginx(master: ConfiguredServer, web: Nginx, size: int, keep_alive: bool) -> None:
    """The client sees the 413 (not a 502), nginx logs no upstream error, the app is not called."""
    port = web.keepalive_port if keep_alive else web.port
    path = unique_path()
    mark = Path(web.error_log).stat().st_size if Path(web.error_log).exists() else 0
    reply = http_request(port, "POST", path, body=b"n" * size)
    assert (reply.status, reply.body) == (413, b"Request Entity Too Large\n")
    assert calls(master, path) == 0
    assert http_get(port, "/env/after").status == 200
    errors = [line for line in web.error_log_text()[mark:].splitlines()
              if any(f"[{level}]" in line for level in ("error", "crit", "alert"))]
    assert errors == []
