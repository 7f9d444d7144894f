"""An application whose worker dies of SIGSEGV on /crash (for emergency_restart_threshold)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """/crash: the worker dies as a crashing C extension would; anything else: its pid."""
    if environ.get("PATH_INFO") == "/crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
