"""An application wrapped in wsgiref.validate.validator, with its warnings turned into errors.

Any breach of PEP 3333 by the server (a missing environ key, a wrong type, a read() past the rules,
an iterable that is never closed ...) makes the validator raise, which the server turns into a
500 and a traceback in its log. The inner iterable counts, per process, the responses that were
created and those that were closed, and reports the counts as they stood when the request began,
so the next request served by the same worker shows whether the previous one was closed.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.validate import WSGIWarning, validator

warnings.simplefilter("error", WSGIWarning)

COUNTS = {"created": 0, "closed": 0}


class Body:
    """A response iterable with close(), counting both."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        COUNTS["created"] += 1

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.parts)

    def close(self) -> None:
        COUNTS["closed"] += 1


def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Read the body by the rules, then describe what was seen."""
    stream = environ["wsgi.input"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    first = stream.readline()
    rest = stream.read(max(0, length - len(first)))
    environ["wsgi.errors"].write("")
    data = json.dumps({
        "pid": os.getpid(),
        "before": dict(COUNTS),
        "body_length": len(first) + len(rest),
        "path_info": environ["PATH_INFO"],
        "script_name": environ["SCRIPT_NAME"],
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return Body([data[:10], data[10:]])


app = validator(inner)
