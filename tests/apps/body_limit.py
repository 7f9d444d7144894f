"""The body limit's app: counts its calls, then hashes the body as tests.apps.upload does.

Every call appends its REQUEST_URI to the file named by $CALLS_FILE, so a test can tell the app
was never called. With `?catch=1` it reads wsgi.input itself in 256-byte reads and reports how many
bytes it got and the error the stream raised, if any, instead of letting it propagate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from tests.apps import upload


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Count the call, then hash the body (or, with ?catch=1, report what reading it gave)."""
    with open(os.environ["CALLS_FILE"], "a") as calls:
        calls.write(environ.get("REQUEST_URI", "") + "\n")
    if "catch=1" not in environ.get("QUERY_STRING", ""):
        return upload.app(environ, start_response)
    got, error = 0, None
    try:
        while chunk := environ["wsgi.input"].read(256):
            got += len(chunk)
    except OSError as exc:
        error = [type(exc).__name__, str(exc)]
    data = json.dumps({"read": got, "error": error}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
