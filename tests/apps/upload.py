"""Hash the request body: reply with its sha256 and byte count as JSON.

`?mode=` picks how wsgi.input is read: `read` (read(64 KiB) until b"", the default), `readline`
(readline() until b""), `iter` (for line in wsgi.input), `readlines` (readlines()), `readline-sized`
(readline(1000) until b""), `read-all` (one read() with no size).
The reply also carries the CONTENT_LENGTH the app was given.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

CHUNK = 64 * 1024


def _pieces(stream: Any, mode: str) -> Iterator[bytes]:
    if mode == "read":
        while chunk := stream.read(CHUNK):
            yield chunk
    elif mode == "readline":
        while line := stream.readline():
            yield line
    elif mode == "readline-sized":
        while line := stream.readline(1000):
            if len(line) > 1000:
                raise AssertionError(f"readline(1000) returned {len(line)} bytes")
            yield line
    elif mode == "iter":
        yield from stream
    elif mode == "readlines":
        yield from stream.readlines()
    elif mode == "read-all":
        yield stream.read()
    else:
        raise ValueError(f"unknown mode {mode!r}")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Read the whole body the way ?mode= says and reply with its hash."""
    mode = parse_qs(environ.get("QUERY_STRING", "")).get("mode", ["read"])[0]
    digest = hashlib.sha256()
    size = 0
    pieces = 0
    line_modes = ("readline", "iter", "readlines", "readline-sized")
    bad_lines = 0
    for piece in _pieces(environ["wsgi.input"], mode):
        digest.update(piece)
        size += len(piece)
        pieces += 1
        # Every line but the last must end with a newline, and none may hold one inside.
        if mode in line_modes and b"\n" in piece[:-1]:
            bad_lines += 1
    data = json.dumps({"sha256": digest.hexdigest(), "bytes": size, "pieces": pieces,
                       "bad_lines": bad_lines, "mode": mode,
                       "content_length": environ.get("CONTENT_LENGTH")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]
