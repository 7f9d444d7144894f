"""Memory for pm.max_memory's tests: `app` keeps 20 MB more after every request (a leak), `steady`
takes 20 MB for each request and lets it go. Both reply `PID N` (N: requests this worker served)
and a 100 KB body, so a cut response shows."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

CHUNK = 20 << 20
PADDING = b"." * 100_000
HELD: list[bytes] = []
served = 0


def reply(start_response: Callable[..., Any]) -> Iterable[bytes]:
    """This worker's pid and request count, then the padding."""
    global served
    served += 1
    body = f"{os.getpid()} {served}\n".encode() + PADDING
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Leak 20 MB: b"x" * n writes every page (bytes(n) would calloc pages never touched, not resident)."""
    HELD.append(b"x" * CHUNK)
    return reply(start_response)


def steady(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Use 20 MB during the request and free it: the peak stays where the first request left it."""
    scratch = b"x" * CHUNK
    del scratch
    return reply(start_response)
