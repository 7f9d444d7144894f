"""Micro-benchmark: the worker's environ build for nginx's params (Worker.environ_for, no I/O).

Run with `python -m pytest benchmarks/micro --benchmark-enable`. The same params are built twice in
a row in a real worker too (the key cache and value sharing are warm after the first request), so
the measured number is the steady state; a cold first build is measured separately. The response
path is test_response_bench.py; the whole request over a socket, test_request_bench.py.
"""

from __future__ import annotations

import socket

import pytest

from benchmarks.micro.nginx_request import NGINX_PARAMS
from fastfpm import protocol
from fastfpm.log import ErrorLog

core = pytest.importorskip("fastfpm._core", reason="fastfpm's compiled core is not built (pip install -e .)")
Worker = core.Worker
from fastfpm.worker import environ_template  # noqa: E402 - needs the compiled core too

PARAMS_BLOCK = protocol.encode_pairs(NGINX_PARAMS)


class _Pool:
    name = "bench"


def _worker() -> tuple[Worker, socket.socket]:
    sock = socket.socket(socket.AF_UNIX)
    log = ErrorLog(None, "alert")
    return Worker(sock.fileno(), lambda e, s: [], environ_template=environ_template(_Pool),
                  log=log.log, log_exception=log.exception), sock


def test_environ_steady_state(benchmark) -> None:
    worker, sock = _worker()
    worker.environ_for(PARAMS_BLOCK)  # warm the key and value caches, as after one request
    env = benchmark(worker.environ_for, PARAMS_BLOCK)
    assert env["PATH_INFO"] == "/articles/list"
    sock.close()


def test_environ_first_request(benchmark) -> None:
    def cold() -> dict:
        worker, sock = _worker()
        try:
            return worker.environ_for(PARAMS_BLOCK)
        finally:
            sock.close()

    env = benchmark(cold)
    assert env["QUERY_STRING"] == "page=2&sort=name"


def test_python_baseline_dict_of_decoded_pairs(benchmark) -> None:
    """What a straightforward Python build costs: parse with the reference codec, decode, dict."""
    template = environ_template(_Pool)

    def naive() -> dict:
        env = dict(template)
        for name, value in protocol.parse_pairs(PARAMS_BLOCK):
            env[name.decode("latin-1")] = value.decode("latin-1")
        return env

    assert benchmark(naive)["REQUEST_METHOD"] == "GET"
