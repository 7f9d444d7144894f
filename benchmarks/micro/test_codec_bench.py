"""The FastCGI codec: the C one (fastfpm._core over csrc/fcgi.c) against the Python reference.

Run with ``python -m pytest benchmarks/micro --benchmark-enable``; each group compares the two
implementations on the same bytes (the params block nginx sends with the stock fastcgi_params).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from benchmarks.micro.nginx_request import NGINX_PARAMS, request_bytes
from fastfpm import protocol


def _core() -> ModuleType | None:
    try:
        return importlib.import_module("fastfpm._core")
    except ImportError:
        return None


IMPLEMENTATIONS = [
    pytest.param(protocol, id="python"),
    pytest.param(
        _core(),
        id="c",
        marks=pytest.mark.skipif(_core() is None, reason="fastfpm._core is not built"),
    ),
]

PAIRS_BLOCK = protocol.encode_pairs(NGINX_PARAMS)
REQUEST = request_bytes()
HELLO_RESPONSE = b"Status: 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world!"
BODY_100K = bytes(range(256)) * 400


@pytest.mark.benchmark(group="parse_record: a whole nginx request")
@pytest.mark.parametrize("codec", IMPLEMENTATIONS)
def test_parse_request_records(benchmark, codec: ModuleType) -> None:
    """Parse every record of one request buffer (BEGIN, PARAMS, empty PARAMS, empty STDIN)."""

    def parse_all() -> int:
        offset = 0
        count = 0
        while offset < len(REQUEST):
            record = codec.parse_record(REQUEST, offset)
            offset += record.size
            count += 1
        return count

    assert benchmark(parse_all) == 4


@pytest.mark.benchmark(group="parse_pairs: nginx stock fastcgi_params + browser headers")
@pytest.mark.parametrize("codec", IMPLEMENTATIONS)
def test_parse_pairs(benchmark, codec: ModuleType) -> None:
    """Parse the name/value pairs of a typical nginx PARAMS block (28 pairs, about 1 KB)."""
    pairs = benchmark(codec.parse_pairs, PAIRS_BLOCK)
    assert [tuple(p) for p in pairs] == NGINX_PARAMS


@pytest.mark.benchmark(group="encode_pairs")
@pytest.mark.parametrize("codec", IMPLEMENTATIONS)
def test_encode_pairs(benchmark, codec: ModuleType) -> None:
    """Encode the same 28 pairs (what a client or a GET_VALUES_RESULT does)."""
    assert benchmark(codec.encode_pairs, NGINX_PARAMS) == PAIRS_BLOCK


@pytest.mark.benchmark(group="encode_stream: hello response")
@pytest.mark.parametrize("codec", IMPLEMENTATIONS)
def test_encode_stream_hello(benchmark, codec: ModuleType) -> None:
    """Frame a hello-world response head and body as STDOUT records."""
    out = benchmark(codec.encode_stream, protocol.STDOUT, 1, HELLO_RESPONSE)
    assert out == protocol.encode_stream(protocol.STDOUT, 1, HELLO_RESPONSE)


@pytest.mark.benchmark(group="encode_stream: 100 KB body")
@pytest.mark.parametrize("codec", IMPLEMENTATIONS)
def test_encode_stream_100k(benchmark, codec: ModuleType) -> None:
    """Frame a 100 KB body (two records, split at 65535 bytes)."""
    out = benchmark(codec.encode_stream, protocol.STDOUT, 1, BODY_100K)
    assert out == protocol.encode_stream(protocol.STDOUT, 1, BODY_100K)


@pytest.mark.benchmark(group="encode_end_request")
@pytest.mark.parametrize("codec", IMPLEMENTATIONS)
def test_encode_end_request(benchmark, codec: ModuleType) -> None:
    """The END_REQUEST record every response ends with."""
    out = benchmark(codec.encode_end_request, 1, 0, protocol.REQUEST_COMPLETE)
    assert out == protocol.encode_end_request(1, 0, protocol.REQUEST_COMPLETE)


@pytest.mark.benchmark(group="head_ready: a whole nginx request")
@pytest.mark.parametrize("codec", IMPLEMENTATIONS)
def test_head_ready(benchmark, codec: ModuleType) -> None:
    """The check the worker makes before reading each request's head (BEGIN and PARAMS walked)."""
    assert benchmark(codec.head_ready, REQUEST) is True

