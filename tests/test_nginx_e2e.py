"""End to end: HTTP client -> real nginx (Debian's stock fastcgi_params) -> fastfpm -> WSGI apps.

Most tests run twice, with fastfpm on a unix socket and on a TCP port. The applications live in
tests/apps/ and are served together by tests.apps.router, which picks one by the first path segment
without touching the environ.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fastfpm import protocol
from tests.apps import download, errors
from tests.servers import (
    Launcher,
    Stack,
    http_connection,
    http_download,
    http_get,
    http_request,
    http_upload,
    peak_rss_kib,
    random_chunks,
)

pytestmark = pytest.mark.nginx

ROUTER = "tests.apps.router:app"
TRANSPORTS = ["unix", "tcp"]
MIB = 1024 * 1024
# How much a worker's peak RSS may grow while it streams a body 50-100 MiB long.
STREAMING_RSS_SLACK_KIB = 24 * 1024


@pytest.fixture(scope="module", params=TRANSPORTS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """nginx -> fastfpm (2 workers) serving every test app, on a unix socket or TCP."""
    with Launcher(tmp_path_factory.mktemp) as launcher:
        yield launcher.stack(ROUTER, request.param, max_children=2)


@pytest.fixture(scope="module", params=TRANSPORTS)
def ka_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A separate stack for the keep-alive tests, so kept-alive connections affect nothing else."""
    with Launcher(tmp_path_factory.mktemp) as launcher:
        yield launcher.stack(ROUTER, request.param, max_children=2)


def error_lines(text: str) -> list[str]:
    """The lines of a fastfpm log at WARNING or worse."""
    return [line for line in text.splitlines() if any(
        level in line for level in ("WARNING:", "ERROR:", "ALERT:"))]


def nginx_errors(stack: Stack) -> list[str]:
    """nginx error-log lines at [error] or worse."""
    return [line for line in stack.nginx.error_log_text().splitlines()
            if any(f"[{level}]" in line for level in ("error", "crit", "alert", "emerg"))]


def assert_serving(stack: Stack, workers: list[int] | None = None) -> None:
    """A normal request through nginx succeeds, and (if given) the same workers are still there."""
    reply = http_get(stack.port, "/env/still-serving")
    assert reply.status == 200, reply.body
    assert reply.json()["environ"]["PATH_INFO"] == "/env/still-serving"
    if workers is not None:
        assert stack.fpm.worker_pids() == workers, "a worker died or was replaced"


# --- request environ --------------------------------------------------------------------------


def test_get_environ(stack: Stack) -> None:
    """A GET with a query string and headers arrives as PEP 3333 wants it."""
    reply = http_get(stack.port, "/env/some/path?a=1&b=two%20words&c", headers={
        "X-Custom-Header": "hello there", "User-Agent": "fastfpm-tests/1.0", "Accept": "text/plain"})
    assert reply.status == 200, reply.body
    seen = reply.json()
    env = seen["environ"]
    assert env["REQUEST_METHOD"] == "GET"
    assert env["QUERY_STRING"] == "a=1&b=two%20words&c"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/env/some/path"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["SERVER_PORT"] == str(stack.port)
    assert env["SERVER_NAME"] == "localhost"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert env["HTTP_X_CUSTOM_HEADER"] == "hello there"
    assert env["HTTP_USER_AGENT"] == "fastfpm-tests/1.0"
    assert env["HTTP_ACCEPT"] == "text/plain"
    assert env["HTTP_HOST"].startswith("127.0.0.1")
    # PEP 3333: absent rather than empty on a request without a body (nginx sends both empty).
    assert "CONTENT_TYPE" not in env
    assert "CONTENT_LENGTH" not in env
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert seen["wsgi"] == {"wsgi.version": [1, 0], "wsgi.url_scheme": "http", "wsgi.multithread": False,
                            "wsgi.multiprocess": True, "wsgi.run_once": False}
    assert seen["has"] == {"wsgi.input": True, "wsgi.errors": True, "wsgi.file_wrapper": True}
    assert seen["body_length"] == 0
    assert seen["pid"] in stack.fpm.worker_pids()


def test_post_environ(stack: Stack) -> None:
    """A POST has CONTENT_TYPE and CONTENT_LENGTH, and its body on wsgi.input."""
    body = b"name=value&other=%C3%A9t%C3%A9"
    reply = http_request(stack.port, "POST", "/env/form", body=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 200, reply.body
    seen = reply.json()
    env = seen["environ"]
    assert env["REQUEST_METHOD"] == "POST"
    assert env["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert env["CONTENT_LENGTH"] == str(len(body))
    assert seen["body_length"] == len(body)
    assert seen["body_head"] == body.decode("latin-1")
    assert env["QUERY_STRING"] == ""
    # nginx also passes the Content-Type and Content-Length headers as HTTP_*; PEP 3333 (and
    # wsgiref.validate) forbid those two keys.
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env


PATHS = [
    # (request target, PATH_INFO as a WSGI str, QUERY_STRING)
    ("/env/plain/path", "/env/plain/path", ""),
    ("/env/a%20b/c", "/env/a b/c", ""),
    ("/env/caf%C3%A9", "/env/caf\u00e9".encode().decode("latin-1"), ""),
    ("/env/100%25/x+y", "/env/100%/x+y", ""),
    ("/env/double%2525", "/env/double%25", ""),
    ("/env/q%3Fnot-a-query?real=1", "/env/q?not-a-query", "real=1"),
    ("/env/semi;colon/%7Euser", "/env/semi;colon/~user", ""),
]


@pytest.mark.parametrize(("target", "path_info", "query"), PATHS, ids=[p[0] for p in PATHS])
def test_percent_encoded_paths(stack: Stack, target: str, path_info: str, query: str) -> None:
    """PATH_INFO is the request path decoded once (as latin-1 bytes), the query left as sent."""
    env = http_get(stack.port, target).json()["environ"]
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == path_info
    assert env["QUERY_STRING"] == query
    assert env["REQUEST_URI"] == target


def test_wsgi_errors_reach_the_log(stack: Stack) -> None:
    """What an application writes to wsgi.errors ends up in fastfpm's error log."""
    marker = f"wsgi-errors-{uuid.uuid4().hex}"
    mark = stack.fpm.log_size()
    assert http_get(stack.port, f"/env/errors?errors={marker}").status == 200
    stack.fpm.wait_for_log(marker, mark)


# --- responses --------------------------------------------------------------------------------


def test_response_headers(stack: Stack) -> None:
    """Custom headers, three Set-Cookie headers and a latin-1 value reach the client intact."""
    reply = http_get(stack.port, "/headers", headers={"X-Request-Thing": "abc", "Cookie": "k=v; k2=v2"})
    assert reply.status == 200, reply.body
    assert reply.headers.get_all("Set-Cookie") == ["a=1; Path=/", "b=two; HttpOnly",
                                                   "c=3; Max-Age=60; SameSite=Lax"]
    assert reply.header("X-Custom") == "custom value"
    assert reply.header("X-Latin1") == "caf\u00e9"
    assert reply.header("Cache-Control") == "no-store"
    assert reply.header("Content-Type") == "application/json"
    seen = reply.json()
    assert seen["HTTP_X_REQUEST_THING"] == "abc"
    assert seen["HTTP_COOKIE"] == "k=v; k2=v2"


STATUSES = [(200, "OK"), (201, "Created"), (204, "No Content"), (302, "Found"), (404, "Not Found"),
            (418, "I'm a teapot"), (299, "Custom Reason Phrase"), (503, "Service Unavailable")]


@pytest.mark.parametrize(("code", "reason"), STATUSES, ids=[str(s[0]) for s in STATUSES])
def test_status_lines(stack: Stack, code: int, reason: str) -> None:
    """The application's status code and reason phrase become nginx's status line."""
    query = urllib.parse.urlencode({"code": code, "reason": reason})
    reply = http_get(stack.port, f"/status?{query}")
    assert (reply.status, reply.reason) == (code, reason)
    if code == 204:
        assert reply.body == b""
    else:
        assert reply.body == f"status {code}\n".encode()
    if code == 302:
        assert reply.header("Location") in ("/moved/here", f"http://127.0.0.1:{stack.port}/moved/here")


def test_head_request(stack: Stack) -> None:
    """HEAD gets the headers and no body."""
    reply = http_request(stack.port, "HEAD", "/status?code=200&reason=OK")
    assert reply.status == 200
    assert reply.body == b""


def test_write_callable(stack: Stack) -> None:
    """Data passed to write() comes before the returned iterable's."""
    reply = http_get(stack.port, "/write")
    assert reply.status == 200
    assert reply.body == b"written with write(); then returned"


# --- large bodies -----------------------------------------------------------------------------


def worker_peaks(stack: Stack) -> dict[int, int]:
    """Each worker's peak RSS in KiB."""
    return {pid: peak_rss_kib(pid) for pid in stack.fpm.settled_workers()}


def assert_streamed(before: dict[int, int], after: dict[int, int], what: str) -> None:
    """No worker's peak RSS grew by anything near the size of a large body."""
    assert before.keys() == after.keys(), "a worker died during the transfer"
    growth = {pid: after[pid] - before[pid] for pid in before}
    assert max(growth.values()) < STREAMING_RSS_SLACK_KIB, (
        f"{what}: a worker's peak RSS grew by {max(growth.values())} KiB: the body was buffered ({growth})")


def test_upload_50mb(stack: Stack) -> None:
    """A 50 MB body streamed from the client is read in chunks and hashed by the app."""
    size = 50 * 1000 * 1000
    digest = hashlib.sha256()
    before = worker_peaks(stack)
    reply = http_upload(stack.port, "/upload?mode=read", random_chunks(size, digest), size,
                        headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 200, reply.body[:2000]
    seen = reply.json()
    assert seen["bytes"] == size
    assert seen["sha256"] == digest.hexdigest()
    assert seen["content_length"] == str(size)
    assert_streamed(before, worker_peaks(stack), "50 MB upload")


@pytest.mark.parametrize("mode", ["readline", "readline-sized", "iter", "readlines", "read-all"])
def test_upload_read_modes(stack: Stack, mode: str) -> None:
    """readline(), readline(n), iteration, readlines() and read() all see the exact body."""
    size = 3 * MIB + 12345  # random bytes: a newline every 256 bytes on average
    digest = hashlib.sha256()
    body = b"".join(random_chunks(size, digest))
    reply = http_request(stack.port, "POST", f"/upload?mode={mode}", body=body)
    assert reply.status == 200, reply.body[:2000]
    seen = reply.json()
    assert (seen["bytes"], seen["sha256"]) == (size, digest.hexdigest())
    assert seen["bad_lines"] == 0
    if mode in ("readline", "iter", "readlines"):
        assert seen["pieces"] == body.count(b"\n") + (not body.endswith(b"\n"))


def test_large_body_the_app_does_not_read(stack: Stack, ka_stack: Stack) -> None:
    """An app that answers without reading a 6 MiB body: the answer arrives, nothing is logged.

    nginx stops sending a body once it has passed the response on, and without keep-alive waits
    for the connection's end: the worker half-closes before it waits for the rest (as php-fpm
    does), or both would sit until nginx's fastcgi_read_timeout (the harness's 20 s; a 504).
    """
    body = b"u" * (6 * MIB)
    for port, web in ((stack.port, stack), (ka_stack.nginx.keepalive_port, ka_stack)):
        mark, web_mark = web.fpm.log_size(), len(nginx_errors(web))
        for _ in range(3):
            reply = http_request(port, "POST", "/headers", body=body)
            assert reply.status == 200, reply.body[:2000]
        assert http_get(port, "/env/after").status == 200
        assert error_lines(web.fpm.log_since(mark)) == []
        assert nginx_errors(web)[web_mark:] == []


@functools.cache
def expected_download(mib: int) -> str:
    """sha256 of the download app's body for `mib` MiB (computed once)."""
    return download.expected_sha256(mib)


def test_download_100mb(stack: Stack) -> None:
    """100 MiB yielded by a generator streams through nginx intact, without the worker holding it."""
    before = worker_peaks(stack)
    got = http_download(stack.port, "/download?mb=100")
    assert got.status == 200
    assert got.headers.get("Content-Length") == str(100 * MIB)
    assert got.size == 100 * MIB
    assert got.sha256 == expected_download(100)
    assert_streamed(before, worker_peaks(stack), "100 MiB download")


def test_download_without_content_length(stack: Stack) -> None:
    """Without Content-Length, nginx relays the streamed body chunked, intact."""
    got = http_download(stack.port, "/download?mb=8&length=0")
    assert got.status == 200
    assert got.headers.get("Content-Length") is None
    assert got.size == 8 * MIB
    assert got.sha256 == expected_download(8)


# --- application errors -----------------------------------------------------------------------


def test_exception_before_headers(stack: Stack) -> None:
    """An exception before start_response: a short 500, the traceback in the log, the worker serves on."""
    workers = stack.fpm.settled_workers()
    marker = f"before-{uuid.uuid4().hex}"
    mark = stack.fpm.log_size()
    reply = http_get(stack.port, f"/raise-before?marker={marker}")
    assert reply.status == 500
    assert len(reply.body) < 1000
    assert marker.encode() not in reply.body and b"Traceback" not in reply.body  # nothing leaks
    # The marker is in the traceback's first line (the request URI), so wait for its last line.
    log = stack.fpm.wait_for_log(f"AppFailure: raised before start_response {marker}", mark)
    assert "Traceback" in log
    assert f"AppFailure: raised before start_response {marker}" in log
    assert_serving(stack, workers)


def raw_request(path: str, query: str = "", body: bytes = b"", request_id: int = 1,
                flags: int = 0, method: str = "GET") -> bytes:
    """The records nginx would send for one request (SCRIPT_NAME the whole path, as stock nginx does)."""
    uri = path + ("?" + query if query else "")
    params = [(b"REQUEST_METHOD", method.encode()), (b"QUERY_STRING", query.encode()),
              (b"SCRIPT_NAME", path.encode()), (b"REQUEST_URI", uri.encode()),
              (b"DOCUMENT_URI", path.encode()), (b"SERVER_PROTOCOL", b"HTTP/1.1"),
              (b"GATEWAY_INTERFACE", b"CGI/1.1"), (b"REMOTE_ADDR", b"127.0.0.1"),
              (b"SERVER_NAME", b"localhost"), (b"SERVER_PORT", b"80"), (b"HTTP_HOST", b"localhost")]
    if body:
        params.append((b"CONTENT_LENGTH", str(len(body)).encode()))
    return (protocol.encode_begin_request(request_id, protocol.RESPONDER, flags)
            + protocol.encode_record(protocol.PARAMS, request_id, protocol.encode_pairs(params))
            + protocol.encode_record(protocol.PARAMS, request_id)
            + protocol.encode_stream(protocol.STDIN, request_id, body)
            + protocol.encode_record(protocol.STDIN, request_id))


def parse_records(data: bytes) -> list[protocol.Record]:
    """The whole records in data (anything unparsable at the end is ignored)."""
    records, offset = [], 0
    while offset < len(data):
        try:
            record = protocol.parse_record(data, offset)
        except protocol.ProtocolError:
            break
        if record is None:
            break
        records.append(record)
        offset += record.size
    return records


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (failing on the socket timeout)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open; it sent "
                                 f"{parse_records(b''.join(chunks))}") from None
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def read_until_end_request(sock: socket.socket) -> list[protocol.Record]:
    """Records up to and including END_REQUEST."""
    data = b""
    while True:
        records = parse_records(data)
        if records and records[-1].type == protocol.END_REQUEST:
            return records
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before END_REQUEST; got {records}"
        data += chunk


def test_exception_after_headers(stack: Stack) -> None:
    """An exception after the first chunk aborts the response (no END_REQUEST); the worker serves on."""
    workers = stack.fpm.settled_workers()
    marker = f"after-{uuid.uuid4().hex}"
    mark = stack.fpm.log_size()
    # Through nginx: the headers and the first chunk arrive before the failure.
    conn = http_connection(stack.port, timeout=10)
    try:
        conn.request("GET", f"/raise-after?marker={marker}")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read(len(errors.FIRST_CHUNK)) == errors.FIRST_CHUNK
    finally:
        conn.close()
    log = stack.fpm.wait_for_log(f"raised after the first chunk {marker}", mark)
    assert "Traceback" in log
    # Straight to fastfpm: the response is cut off, not ended as if it were complete.
    with stack.fpm.connect(timeout=5) as sock:
        sock.sendall(raw_request("/raise-after", f"marker={marker}-raw"))
        records = parse_records(read_until_closed(sock))
    stdout = b"".join(r.content for r in records if r.type == protocol.STDOUT)
    assert errors.FIRST_CHUNK in stdout
    assert not [r for r in records if r.type == protocol.END_REQUEST], \
        "an aborted response must not end with END_REQUEST (the web server would take it as complete)"
    stack.fpm.wait_for_log(f"{marker}-raw", mark)
    assert_serving(stack, workers)


# --- malformed input sent straight to the fastfpm socket ----------------------------------------


def _bad_version() -> bytes:
    data = bytearray(raw_request("/env/raw", flags=protocol.KEEP_CONN))
    data[0] = 2
    return bytes(data)


def _length_past_end() -> bytes:
    params = protocol.encode_record(protocol.PARAMS, 1, b"\x0e\x03REQUEST_METHODGET" * 50)
    return protocol.encode_begin_request(1, protocol.RESPONDER, protocol.KEEP_CONN) + params[:8 + 100]


def _truncated_pairs() -> bytes:
    # A pair that announces a 10-byte name and a 5-byte value but carries 3 bytes, then the end of PARAMS.
    return (protocol.encode_begin_request(1, protocol.RESPONDER, protocol.KEEP_CONN)
            + protocol.encode_record(protocol.PARAMS, 1, b"\x0a\x05abc")
            + protocol.encode_record(protocol.PARAMS, 1)
            + protocol.encode_record(protocol.STDIN, 1))


def _unknown_request_id() -> bytes:
    begin = protocol.encode_begin_request(1, protocol.RESPONDER, protocol.KEEP_CONN)
    other = raw_request("/env/raw", request_id=2)
    return begin + other[len(begin):]


def _no_begin_request() -> bytes:
    data = raw_request("/env/raw", flags=protocol.KEEP_CONN)
    return data[len(protocol.encode_begin_request(1)):]


def _body_past_content_length() -> bytes:
    data = raw_request("/upload", body=b"01234", method="POST", flags=protocol.KEEP_CONN)
    # Replace the STDIN stream (5 bytes + end) by 10 bytes + end, CONTENT_LENGTH still saying 5.
    tail = protocol.encode_stream(protocol.STDIN, 1, b"01234") + protocol.encode_record(protocol.STDIN, 1)
    assert data.endswith(tail)
    return (data[:-len(tail)] + protocol.encode_stream(protocol.STDIN, 1, b"0123456789")
            + protocol.encode_record(protocol.STDIN, 1))


# (builder, shut the write side after sending, the request was complete enough to be answered)
MALFORMED: dict[str, tuple[Callable[[], bytes], bool, bool]] = {
    "bad-version": (_bad_version, False, False),
    "length-past-end-then-eof": (_length_past_end, True, False),
    "truncated-pairs": (_truncated_pairs, False, False),
    "unknown-request-id": (_unknown_request_id, False, False),
    "no-begin-request": (_no_begin_request, False, False),
    "body-past-content-length": (_body_past_content_length, False, True),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_records(stack: Stack, case: str) -> None:
    """Malformed input closes that connection with one log line; the worker serves on."""
    build, shut_write, may_answer = MALFORMED[case]
    workers = stack.fpm.settled_workers()
    mark = stack.fpm.log_size()
    # KEEP_CONN is set, so a server that let the input pass would keep the connection open
    # (the read then times out well before fastfpm's 5 s idle timeout could close it).
    with stack.fpm.connect(timeout=3) as sock:
        sock.sendall(build())
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        records = parse_records(read_until_closed(sock))
    if not may_answer:
        assert not [r for r in records if r.type in (protocol.STDOUT, protocol.END_REQUEST)], \
            f"a malformed request was answered: {records}"
    stack.fpm.wait_for_log("\n", mark)  # the log line
    assert_serving(stack, workers)
    logged = stack.fpm.log_since(mark)
    assert len(error_lines(logged)) == 1, f"expected one log line for {case}, got:\n{logged}"
    assert "Traceback" not in logged


def test_raw_keep_conn_control(stack: Stack) -> None:
    """The control for the malformed cases: well-formed requests with KEEP_CONN share one connection."""
    mark = stack.fpm.log_size()
    with stack.fpm.connect(timeout=5) as sock:
        for n in range(3):
            sock.sendall(raw_request(f"/env/raw/{n}", flags=protocol.KEEP_CONN))
            records = read_until_end_request(sock)
            assert protocol.parse_end_request(records[-1].content) == (0, protocol.REQUEST_COMPLETE)
            stdout = b"".join(r.content for r in records if r.type == protocol.STDOUT)
            head, _, body = stdout.partition(b"\r\n\r\n")
            assert head.startswith(b"Status: 200"), head
            assert json.loads(body)["environ"]["PATH_INFO"] == f"/env/raw/{n}"
    assert error_lines(stack.fpm.log_since(mark)) == []


# --- WSGI conformance ---------------------------------------------------------------------------


def test_wsgiref_validator(stack: Stack) -> None:
    """wsgiref.validate finds nothing wrong, and every response iterable is closed."""
    mark = stack.fpm.log_size()
    seen_pids: set[int] = set()
    repeat = None
    for n in range(20):
        if n % 2:
            reply = http_request(stack.port, "POST", f"/validate/{n}", body=b"line one\nline two\nrest",
                                 headers={"Content-Type": "text/plain"})
            expected_length = 22
        else:
            reply = http_get(stack.port, f"/validate/{n}?q=1")
            expected_length = 0
        assert reply.status == 200, (reply.body, stack.fpm.log_since(mark))
        seen = reply.json()
        assert seen["body_length"] == expected_length
        assert (seen["script_name"], seen["path_info"]) == ("", f"/validate/{n}")
        if seen["pid"] in seen_pids:
            repeat = seen
        seen_pids.add(seen["pid"])
        if repeat is not None and n >= 3:
            break
    assert repeat is not None, "no worker served two requests"
    assert repeat["before"]["created"] >= 1
    assert repeat["before"]["closed"] == repeat["before"]["created"], "a response iterable was not closed"
    log = stack.fpm.log_since(mark)
    for bad in ("Traceback", "AssertionError", "WSGIWarning", "Exception ignored"):
        assert bad not in log, log


# --- fastcgi_keep_conn with an upstream keepalive pool ------------------------------------------


def backend_connections(replies: list[dict[str, Any]]) -> set[int]:
    """Inodes of the FastCGI connections that served the replies.

    A socket a worker had open during every request it served (the listen socket, anything else the
    worker keeps) is left out; what remains are the connections requests arrived on.
    """
    by_pid: dict[int, list[set[int]]] = {}
    for reply in replies:
        by_pid.setdefault(reply["pid"], []).append(set(reply["sockets"]))
    used: set[int] = set()
    for sets in by_pid.values():
        used |= set.union(*sets) - set.intersection(*sets)
    return used


def test_keepalive_reuses_backend_connections(ka_stack: Stack) -> None:
    """Sequential requests through the keepalive pool share one FastCGI connection; without it, not."""
    count = 30
    mark = ka_stack.fpm.log_size()
    kept: list[dict[str, Any]] = []
    conn = http_connection(ka_stack.nginx.keepalive_port, timeout=10)
    try:
        for n in range(count):
            body = os.urandom(n * 997) if n % 3 == 1 else None  # some with bodies, some without
            reply = http_request(conn, "POST" if body else "GET", f"/env/ka/{n}", body=body)
            assert reply.status == 200, reply.body
            seen = reply.json()
            assert seen["environ"]["PATH_INFO"] == f"/env/ka/{n}"
            assert seen["body_length"] == (len(body) if body else 0)
            kept.append(seen)
    finally:
        conn.close()
    plain = [http_get(ka_stack.port, f"/env/plain/{n}").json() for n in range(count)]
    assert len(backend_connections(plain)) >= count // 2, "control failed: plain requests shared connections"
    used = backend_connections(kept)
    assert len(used) <= 2, f"{count} sequential keep-alive requests used {len(used)} FastCGI connections"
    assert error_lines(ka_stack.fpm.log_since(mark)) == []
    assert nginx_errors(ka_stack) == []


def test_keepalive_concurrent(ka_stack: Stack) -> None:
    """More concurrent clients than workers, through the keepalive pool: every request gets its own
    answer promptly. A worker must not sit on an idle kept-alive connection while new connections
    wait for it (php-fpm does; the design says such a worker is idle), so no request may take
    anywhere near the 5 s idle timeout after which fastfpm closes an idle connection."""
    clients, per_client, slowest_allowed = 6, 10, 2.0
    mark = ka_stack.fpm.log_size()
    failures: list[str] = []
    pids: set[int] = set()
    lock = threading.Lock()

    def client(index: int) -> None:
        conn = http_connection(ka_stack.nginx.keepalive_port, timeout=15)
        try:
            for n in range(per_client):
                path = f"/env/client-{index}/request-{n}"
                started = time.monotonic()
                reply = http_get(conn, path)
                took = time.monotonic() - started
                seen = reply.json() if reply.status == 200 else None
                with lock:
                    if seen is None:
                        failures.append(f"{path}: {reply.status} {reply.body[:200]!r}")
                    elif seen["environ"]["PATH_INFO"] != path:
                        failures.append(f"{path}: got the answer for {seen['environ']['PATH_INFO']}")
                    elif took > slowest_allowed:
                        failures.append(f"{path}: took {took:.2f}s")
                    else:
                        pids.add(seen["pid"])
        except Exception as exc:
            with lock:
                failures.append(f"client {index}: {exc!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "clients hung"
    assert failures == []
    assert pids <= set(ka_stack.fpm.worker_pids())
    # nginx now holds idle kept-alive connections; fresh connections must still be served promptly.
    for n in range(5):
        started = time.monotonic()
        reply = http_get(ka_stack.port, f"/env/after-keepalive/{n}")
        assert reply.status == 200
        assert time.monotonic() - started < slowest_allowed, "a plain request waited for a pinned worker"
    assert error_lines(ka_stack.fpm.log_since(mark)) == []
    assert nginx_errors(ka_stack) == []


# --- mounted under a prefix ---------------------------------------------------------------------


def test_mount_prefix(launcher: Launcher) -> None:
    """With --mount /sub, SCRIPT_NAME is /sub and PATH_INFO the rest of the decoded path."""
    stack = launcher.stack(ROUTER, "unix", max_children=1, extra_args=["--mount", "/sub"])
    env = http_get(stack.port, "/sub/env/a%20b/c?x=1").json()["environ"]
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["QUERY_STRING"]) == ("/sub", "/env/a b/c", "x=1")
    env = http_get(stack.port, "/sub/").json()["environ"]
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/sub", "/")
    env = http_get(stack.port, "/sub").json()["environ"]
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/sub", "")
    reply = http_get(stack.port, "/sub/validate/x")
    assert reply.status == 200, (reply.body, stack.fpm.log_text())
    assert (reply.json()["script_name"], reply.json()["path_info"]) == ("/sub", "/validate/x")
