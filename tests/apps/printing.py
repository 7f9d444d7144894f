"""An application that prints to stdout and stderr, for catch_workers_output."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Print one line to each stream, then answer."""
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"printed"]
