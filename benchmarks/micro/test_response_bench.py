"""Micro-benchmark: the worker's response path (Worker.response_for, no I/O).

start_response's checks, the header block, STDOUT framing and END_REQUEST: what the loop does
between the app's return and send(). Run with `python -m pytest benchmarks/micro --benchmark-enable`.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from fastfpm import protocol

core = pytest.importorskip("fastfpm._core", reason="fastfpm's compiled core is not built (pip install -e .)")

HELLO_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "13")]
# What a framework typically sends: a few more headers than hello world.
APP_HEADERS = HELLO_HEADERS + [("Cache-Control", "no-cache"), ("X-Frame-Options", "DENY"),
                               ("Set-Cookie", "session=0123456789abcdef; Path=/; HttpOnly")]


@pytest.fixture
def worker() -> Iterator[object]:
    sock = socket.socket(socket.AF_UNIX)
    yield core.Worker(sock.fileno(), None, environ_template={}, log=print, log_exception=print)
    sock.close()


def stdout_of(raw: bytes) -> bytes:
    """The STDOUT stream in raw, checking that it ends with the empty record and END_REQUEST."""
    records, offset = [], 0
    while (record := protocol.parse_record(raw, offset)) is not None:
        records.append(record)
        offset += record.size
    assert offset == len(raw)
    assert records[-1].type == protocol.END_REQUEST and records[-2] == (protocol.STDOUT, 1, b"", 8)
    return b"".join(r.content for r in records if r.type == protocol.STDOUT)


def test_response_hello(benchmark, worker) -> None:
    raw = benchmark(worker.response_for, "200 OK", HELLO_HEADERS, [b"Hello, world!"])
    assert stdout_of(raw) == (b"Status: 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n"
                              b"Hello, world!")


def test_response_app_headers(benchmark, worker) -> None:
    raw = benchmark(worker.response_for, "200 OK", APP_HEADERS, [b"Hello, ", b"world!"])
    assert stdout_of(raw).endswith(b"HttpOnly\r\n\r\nHello, world!")


def test_response_100k_body(benchmark, worker) -> None:
    body = [b"x" * 102400]
    raw = benchmark(worker.response_for, "200 OK", HELLO_HEADERS, body)
    assert stdout_of(raw).endswith(b"\r\n\r\n" + body[0])
