"""Hold each request until the file named by `?gate=PATH` exists (for tests/test_pool_counters.py).

Without `gate` it answers at once; `?started=PATH` creates PATH when the request reaches the app.
A request never waits more than 30 s, so a failed test cannot leave a worker stuck. The reply is
`done in PID`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Wait for the gate file, then reply with this worker's pid."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    gate = query.get("gate", [""])[0]
    if "started" in query:
        with open(query["started"][0], "w"):
            pass
    deadline = time.monotonic() + 30
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    body = f"done in {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
