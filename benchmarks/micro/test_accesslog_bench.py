"""Micro-benchmark: formatting one access log line (AccessLog, no I/O), php-fpm's default format and a
rich one, for the params nginx sends (nginx_request.py) and a typical response.

Run with `python -m pytest benchmarks/micro --benchmark-enable`. Each measured call formats LINES lines
in compiled code (AccessLog.bench), so the Python call's own cost is spread thin: divide the time per
call by LINES (the test also records it as extra_info["ns_per_line"]). The write() each line costs in a
worker is not in here: it is in benchmarks/run.py's hello-accesslog scenario.
"""

from __future__ import annotations

import pytest

from benchmarks.micro.nginx_request import NGINX_PARAMS
from fastfpm import accesslog, protocol

core = pytest.importorskip("fastfpm._core", reason="fastfpm's compiled core is not built (pip install -e .)")

PARAMS_BLOCK = protocol.encode_pairs(NGINX_PARAMS)
HEADERS = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", "5120")]
LINES = 1000
# What an operator adds to php-fpm's default: the client, the whole URI, timings, headers.
RICH_FORMAT = ('%{REMOTE_ADDR}e - %u %t "%m %r%Q%q %{SERVER_PROTOCOL}e" %s %{Content-Length}o '
               '"%{HTTP_REFERER}e" "%{HTTP_USER_AGENT}e" %{mili}d %{kilo}M %C%% %n %p '
               '%{%Y-%m-%dT%H:%M:%S%z}T')


def _log(text: str, suppress: tuple[str, ...] = ()) -> object:
    ops = accesslog.worker_ops(accesslog.compile_format(text), pool="www", pid=4242, parent_pid=1,
                               remote_known=False)
    return core.AccessLog(-1, ops, suppress)


def _run(benchmark, text: str) -> bytes:
    log = _log(text)
    benchmark(log.bench, PARAMS_BLOCK, "200 OK", HEADERS, LINES)
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_line"] = round(benchmark.stats.stats.median / LINES * 1e9, 1)
    return log.line_for(PARAMS_BLOCK, "200 OK", HEADERS)


def test_default_format(benchmark) -> None:
    line = _run(benchmark, accesslog.DEFAULT_FORMAT)
    assert line.startswith(b'- -  ') and line.endswith(b'"GET /articles/list" 200')


def test_rich_format(benchmark) -> None:
    line = _run(benchmark, RICH_FORMAT)
    assert line.startswith(b"127.0.0.1 - ")
    assert b'"GET /articles/list?page=2&sort=name HTTP/1.1" 200 5120' in line


def test_suppressed_path(benchmark) -> None:
    """A health check in access.suppress_path: the check, and no line."""
    log = _log(accesslog.DEFAULT_FORMAT, ("/articles/list",))
    params = protocol.encode_pairs([(k, b"" if k == b"QUERY_STRING" else v) for k, v in NGINX_PARAMS])
    benchmark(log.bench, params, "200 OK", HEADERS, LINES)
