"""The WSGI applications every Python server in the benchmark runs (fastfpm, uWSGI, flup).

Each one is the WSGI twin of a PHP script in ``benchmarks/php/`` and of a mode of the C responders in
``benchmarks/responders/``, so every backend does the same work for the same scenario.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

HELLO = b"Hello, world!"
HELLO_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO)))]

#: The JSON document of the json4k scenario: 62 items, 4124 bytes once encoded compactly.
JSON_DATA = {
    "items": [
        {"id": i, "name": f"item-{i:03d}", "active": i % 2 == 0, "tags": ["alpha", "beta"]} for i in range(62)
    ]
}


def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Answer ``Hello, world!`` (the hello and keepalive scenarios)."""
    start_response("200 OK", HELLO_HEADERS)
    return [HELLO]


def json4k(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Encode a ~4 KB JSON document on every request (the json4k scenario)."""
    body = json.dumps(JSON_DATA, separators=(",", ":")).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def upload(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Read the whole request body in 64 KiB chunks and answer its length (the upload1m scenario)."""
    stream = environ["wsgi.input"]
    total = 0
    while True:
        chunk = stream.read(65536)
        if not chunk:
            break
        total += len(chunk)
    body = str(total).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def sleep10ms(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Wait 10 ms as if for a database, then answer hello (the io10ms scenario)."""
    time.sleep(0.010)
    start_response("200 OK", HELLO_HEADERS)
    return [HELLO]
