"""Reply with the pid of the worker's master (os.getppid()), after a short pause so that requests
are in flight whenever a master is stopped (the hand-over tests, benchmarks/handover.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

PAUSE_SECONDS = 0.002


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The master's pid as the body."""
    time.sleep(PAUSE_SECONDS)
    body = str(os.getppid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
