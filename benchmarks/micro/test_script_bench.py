"""Micro-benchmark: what script mode adds to a request (ScriptDispatcher's hit path, the cache check)
over the same application served as a fixed app, no I/O.

Run with `python -m pytest benchmarks/micro/test_script_bench.py --benchmark-enable`. Each measured
call serves CALLS requests in a Python loop, each with the environ a script-mode worker builds for
nginx's params (Worker.environ_for, in both twins), so pytest-benchmark's own per-call cost is spread thin;
extra_info["ns_per_request"] is the median divided by CALLS, and script mode's cost per request is
the difference between a `script` benchmark and its `fixed` twin of the same run (BENCHMARKS.md,
"Script mode"). revalidate_freq is the default 2 s, so a run includes the stat and realpath that a
revalidation costs every 2 s, as a worker under load would.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.micro.nginx_request import NGINX_PARAMS
from fastfpm import protocol
from fastfpm.log import ErrorLog
from fastfpm.script import ScriptDispatcher

core = pytest.importorskip("fastfpm._core", reason="fastfpm's compiled core is not built (pip install -e .)")
from fastfpm.worker import environ_template  # noqa: E402 - needs the compiled core too

CALLS = 1000

APP = '''\
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]
'''


class _Pool:
    name = "bench"


def _params(root: Path, tail: str) -> bytes:
    """nginx's params for /app.py<tail> without fastcgi_split_path_info (the stock location)."""
    replaced = {b"SCRIPT_NAME": f"/app.py{tail}".encode(), b"REQUEST_URI": f"/app.py{tail}".encode(),
                b"DOCUMENT_URI": f"/app.py{tail}".encode()}
    pairs = [(name, replaced.get(name, value)) for name, value in NGINX_PARAMS]
    return protocol.encode_pairs([*pairs, (b"SCRIPT_FILENAME", f"{root}/app.py{tail}".encode())])


@pytest.fixture
def environ_for() -> Iterator:
    """A script-mode Worker's environ builder (ScriptPathPolicy), no I/O: the environ a request
    really gets (presized, so the keys script mode adds cost no dict resize)."""
    sock = socket.socket(socket.AF_UNIX)
    log = ErrorLog(None, "alert")
    worker = core.Worker(sock.fileno(), lambda e, s: [], environ_template=environ_template(_Pool),
                         log=log.log, log_exception=log.exception, script_paths=True)
    yield worker.environ_for
    sock.close()


def _start_response(status: str, headers: list, exc_info: object = None) -> None:
    return None


def _serve(app, make_environ, block: bytes) -> None:
    """CALLS requests: each a fresh environ from the worker's builder, then the app."""
    start_response = _start_response
    for _ in range(CALLS):
        app(make_environ(block), start_response)


@pytest.fixture
def dispatcher(tmp_path: Path) -> ScriptDispatcher:
    (tmp_path / "app.py").write_text(APP)
    return ScriptDispatcher(str(tmp_path), 2.0, (".py",), lambda level, message: None, lambda message: None)


def _record(benchmark) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_request"] = round(benchmark.stats.stats.median / CALLS * 1e9, 1)


@pytest.mark.parametrize("tail", ["", "/users/7"], ids=["plain", "path_info"])
def test_fixed(benchmark, dispatcher: ScriptDispatcher, environ_for, tmp_path: Path, tail: str) -> None:
    """The reference: the script's own application, called as a fixed app."""
    block = _params(tmp_path, tail)
    dispatcher(environ_for(block), _start_response)  # import it (the cold path is not measured here)
    app = dispatcher.scripts[f"{tmp_path}/app.py"].app
    benchmark(_serve, app, environ_for, block)
    _record(benchmark)


@pytest.mark.parametrize("tail", ["", "/users/7"], ids=["plain", "path_info"])
def test_script(benchmark, dispatcher: ScriptDispatcher, environ_for, tmp_path: Path, tail: str) -> None:
    """The same application through the dispatcher: route lookup, clock, (path info moved), call."""
    block = _params(tmp_path, tail)
    probe = environ_for(block)
    assert dispatcher(probe, _start_response) == [b"hello"]
    assert (probe["SCRIPT_NAME"], probe["PATH_INFO"]) == ("/app.py", tail)
    benchmark(_serve, dispatcher, environ_for, block)
    _record(benchmark)
