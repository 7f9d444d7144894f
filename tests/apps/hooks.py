"""An app with worker hooks that leave pid-stamped lines in $HOOKS_LOG, so a test can see which
worker ran which hook, and in what order with its requests.

HOOKS_START_FAIL / HOOKS_EXIT_FAIL (set through the pool's env[]) name a file: while it exists, that
hook raises after writing its line (a test can make a worker's start fail later in a master's life).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# Set by on_start in this process: what an app would keep its connection pool in.
started_in: int | None = None


def record(event: str) -> None:
    """Append `event pid` to $HOOKS_LOG (one write: lines from several workers do not interleave)."""
    with open(os.environ["HOOKS_LOG"], "a") as f:
        f.write(f"{event} {os.getpid()}\n")


def on_start(pool: str) -> None:
    """on_worker_start: open 'the pool' (remember this pid), or fail as an unreachable database would."""
    global started_in
    record(f"start:{pool}")
    if os.path.exists(os.environ.get("HOOKS_START_FAIL", "")):
        raise RuntimeError("the database is unreachable")
    started_in = os.getpid()


def on_exit(pool: str) -> None:
    """on_worker_exit: close it, or fail doing so."""
    record(f"exit:{pool}")
    if os.path.exists(os.environ.get("HOOKS_EXIT_FAIL", "")):
        raise RuntimeError("closing the pool failed")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Answer `PID STARTED` (STARTED: on_start ran in this very process first), and record the request."""
    record("request")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{os.getpid()} {started_in == os.getpid()}".encode()]
