"""An application that takes two seconds to import, so its workers stay "Starting" that long."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

time.sleep(2.0)  # a heavy framework's import, as the master sees it


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Reply with the worker's pid."""
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
