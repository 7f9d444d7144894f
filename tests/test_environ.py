"""The environ rules, on the worker's own environ builder (Worker.environ_for), without I/O.

One app mounted at `/` must see the same SCRIPT_NAME and PATH_INFO whatever shape the web server
gives the paths in: nginx's stock fastcgi_params (SCRIPT_NAME = the whole path, no PATH_INFO),
a server that splits them, or one that sends only SCRIPT_NAME and PATH_INFO.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from fastfpm import protocol
from fastfpm._core import Worker
from fastfpm.log import ErrorLog
from fastfpm.worker import environ_template

_SOCKETS: list[socket.socket] = []


class PoolStub:
    """The pool values environ_template reads."""

    name = "env"


def make_worker(mount: str = "", keep_http_proxy: bool = False) -> Worker:
    """A worker bound to a throwaway socket; environ_for never touches it."""
    sock = socket.socket(socket.AF_UNIX)
    log = ErrorLog(None, "alert")
    worker = Worker(sock.fileno(), lambda e, s: [], environ_template=environ_template(PoolStub),
                    log=log.log, log_exception=log.exception, mount=mount,
                    keep_http_proxy=keep_http_proxy)
    _SOCKETS.append(sock)  # alive as long as the module: the worker holds only its fd
    return worker


@pytest.fixture
def worker() -> Iterator[Worker]:
    yield make_worker()


def environ(worker: Worker, **params: str) -> dict:
    """The environ for these params (names as keyword arguments)."""
    return worker.environ_for(protocol.encode_pairs([(k.encode(), v.encode("latin-1"))
                                                     for k, v in params.items()]))


@pytest.mark.parametrize("shape", [
    # nginx, stock fastcgi_params: the PHP mapping
    dict(SCRIPT_NAME="/a b/c", REQUEST_URI="/a%20b/c?x=1", DOCUMENT_URI="/a b/c", QUERY_STRING="x=1"),
    # a server that splits the path itself
    dict(SCRIPT_NAME="/a b", PATH_INFO="/c", REQUEST_URI="/a%20b/c?x=1", QUERY_STRING="x=1"),
    # no REQUEST_URI: SCRIPT_NAME + PATH_INFO
    dict(SCRIPT_NAME="/a b", PATH_INFO="/c", QUERY_STRING="x=1"),
    # an absolute-form request target
    dict(SCRIPT_NAME="/a b/c", REQUEST_URI="http://example.test/a%20b/c?x=1", QUERY_STRING="x=1"),
])
def test_app_at_root_sees_the_same_paths_from_every_server_shape(worker: Worker, shape: dict) -> None:
    env = environ(worker, REQUEST_METHOD="GET", **shape)
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/a b/c"
    assert env["QUERY_STRING"] == "x=1"


def test_percent_decoding_happens_once_and_bytes_map_to_latin1(worker: Worker) -> None:
    env = environ(worker, REQUEST_URI="/%2525/%C3%A9/%zz/%")
    # %25 decodes once to %, UTF-8 bytes arrive as latin-1 characters, bad escapes stay as they are.
    assert env["PATH_INFO"] == "/%25/\u00c3\u00a9/%zz/%"


def test_mount_prefix_moves_into_script_name() -> None:
    mounted = make_worker(mount="/sub/")
    env = environ(mounted, REQUEST_URI="/sub/page?q")
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/sub", "/page")
    exact = environ(mounted, REQUEST_URI="/sub")
    assert (exact["SCRIPT_NAME"], exact["PATH_INFO"]) == ("/sub", "")
    other = environ(mounted, REQUEST_URI="/subway")  # not under the prefix
    assert (other["SCRIPT_NAME"], other["PATH_INFO"]) == ("", "/subway")


def test_empty_content_headers_are_absent_and_http_duplicates_dropped(worker: Worker) -> None:
    env = environ(worker, CONTENT_TYPE="", CONTENT_LENGTH="", HTTP_CONTENT_TYPE="text/plain",
                  HTTP_CONTENT_LENGTH="5", HTTP_X_ONE="1")
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH", "HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
        assert key not in env
    assert env["HTTP_X_ONE"] == "1"
    full = environ(worker, CONTENT_TYPE="text/plain", CONTENT_LENGTH="5")
    assert (full["CONTENT_TYPE"], full["CONTENT_LENGTH"]) == ("text/plain", "5")


@pytest.mark.parametrize(("params", "scheme"), [
    ({}, "http"), ({"HTTPS": "on"}, "https"), ({"HTTPS": "off"}, "http"), ({"HTTPS": ""}, "http"),
    ({"REQUEST_SCHEME": "https"}, "https"), ({"REQUEST_SCHEME": "http"}, "http"),
])
def test_url_scheme(worker: Worker, params: dict, scheme: str) -> None:
    assert environ(worker, **params)["wsgi.url_scheme"] == scheme


def test_pep3333_keys_and_defaults(worker: Worker) -> None:
    env = environ(worker)
    assert env["wsgi.version"] == (1, 0) and env["wsgi.multiprocess"] is True
    assert env["wsgi.multithread"] is False and env["wsgi.run_once"] is False
    for key in ("REQUEST_METHOD", "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "QUERY_STRING"):
        assert isinstance(env[key], str)
    assert hasattr(env["wsgi.input"], "read") and hasattr(env["wsgi.errors"], "write")


def test_values_shared_between_requests_are_not_mixed_up(worker: Worker) -> None:
    first = environ(worker, HTTP_HOST="a.test", REMOTE_PORT="1")
    second = environ(worker, HTTP_HOST="a.test", REMOTE_PORT="2")
    third = environ(worker, HTTP_HOST="b.test")
    assert (first["REMOTE_PORT"], second["REMOTE_PORT"]) == ("1", "2")
    assert third["HTTP_HOST"] == "b.test" and "REMOTE_PORT" not in third
    assert first["HTTP_HOST"] == "a.test"  # an environ handed out earlier is never changed


def test_malformed_params_and_content_length_are_refused(worker: Worker) -> None:
    with pytest.raises(protocol.ProtocolError):
        worker.environ_for(b"\x05\x7fAB")
    with pytest.raises(protocol.ProtocolError):
        environ(worker, CONTENT_LENGTH="12x")


def test_http_proxy_is_dropped_by_default(worker: Worker) -> None:
    """httpoxy: the Proxy header's HTTP_PROXY never reaches the app; look-alike names do."""
    for _ in range(2):  # the first sight of each name, then the key cache's entries
        env = environ(worker, HTTP_PROXY="http://evil.test:3128", HTTP_PROXY_AUTHORIZATION="Basic eA==",
                      http_proxy="http://lower.test", HTTP_X_ONE="1")
        assert "HTTP_PROXY" not in env
        assert env["HTTP_PROXY_AUTHORIZATION"] == "Basic eA=="
        assert env["http_proxy"] == "http://lower.test"  # names are case-sensitive; no server makes it
        assert env["HTTP_X_ONE"] == "1"


def test_http_proxy_sent_twice_is_dropped_both_times(worker: Worker) -> None:
    params = protocol.encode_pairs([(b"HTTP_PROXY", b"http://a.test"), (b"HTTP_HOST", b"h"),
                                    (b"HTTP_PROXY", b"http://b.test")])
    env = worker.environ_for(params)
    assert "HTTP_PROXY" not in env and env["HTTP_HOST"] == "h"


def test_http_proxy_is_dropped_when_the_key_cache_is_full() -> None:
    """A name first seen after the cache filled up takes the uncached path: the same rule holds."""
    full = make_worker()
    names = [f"X{n:05d}" for n in range(4000)]  # names that differ in their first 8 bytes spread
    for start in range(0, len(names), 1000):
        environ(full, **dict.fromkeys(names[start:start + 1000], "v"))
    env = environ(full, HTTP_PROXY="http://evil.test", HTTP_X_AFTER="1")
    assert "HTTP_PROXY" not in env and env["HTTP_X_AFTER"] == "1"


def test_keep_http_proxy_keeps_it() -> None:
    keeping = make_worker(keep_http_proxy=True)
    for _ in range(2):
        env = environ(keeping, HTTP_PROXY="http://proxy.test:3128")
        assert env["HTTP_PROXY"] == "http://proxy.test:3128"
