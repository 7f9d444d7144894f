"""Requests of known cost for the CPU, memory and duration figures, picked by `?do=`.

`do=burn&seconds=S` spins until the process has used S more seconds of CPU (so the request's CPU is
at least S whatever the machine's load); `do=sleep&seconds=S` sleeps (CPU near 0);
`do=alloc&mb=N` fills N MiB, lets it go and answers (the worker's peak resident set grows by N);
anything else answers at once. The reply is `PID`, so a test knows which worker served it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Burn, sleep or allocate as `do=` says, then reply with this worker's pid."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    action = query.get("do", [""])[0]
    seconds = float(query.get("seconds", ["0.2"])[0])
    if action == "burn":
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
    elif action == "sleep":
        time.sleep(seconds)
    elif action == "alloc":
        block = b"x" * (int(query.get("mb", ["50"])[0]) << 20)  # every page written, so resident
        del block
    body = f"{os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
