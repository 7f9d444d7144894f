"""Sleep `?seconds=S` (default 1) or `?ms=N` before replying with this worker's pid (for signal
and status tests: a worker held Running for as long as the test needs)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Sleep, then reply `slept S in PID`."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if "ms" in query:
        seconds = int(query["ms"][0]) / 1000
    else:
        seconds = float(query.get("seconds", ["1"])[0])
    time.sleep(seconds)
    body = f"slept {seconds} in {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def sleep_or_404(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """/sleep is app; every other path is a 404, as php-fpm answers a script that is not there
    (the status tests' pool: its status page is the worker's route, the rest must not be a page)."""
    if environ.get("PATH_INFO") == "/sleep":
        return app(environ, start_response)
    body = b"not found\n"
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
