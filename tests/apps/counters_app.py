"""Requests that trip the pool's timeouts and counters, for the end-to-end tests, picked by `?do=`.

`do=sleep&seconds=S` sleeps; `do=ignore-term&seconds=S` first ignores SIGTERM, as a stuck
extension or a careless signal handler would, so only SIGKILL ends the worker; `do=print&n=N`
prints one line of `payload(N)` to stdout (for log_limit); anything else answers at once.
The path is free for the tests to fill with what they like (control characters).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs


def payload(n: int) -> str:
    """n characters that change along the line, so a lost or repeated piece shows."""
    return "".join(chr(ord("a") + i % 26) for i in range(n))


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Sleep or ignore SIGTERM as `do=` says, then reply `done in PID`."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    action = query.get("do", [""])[0]
    seconds = float(query.get("seconds", ["1"])[0])
    if action == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if action in ("sleep", "ignore-term"):
        time.sleep(seconds)
    elif action == "print":
        print(payload(int(query.get("n", ["100"])[0])), file=sys.stdout, flush=True)
    body = f"done in {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
