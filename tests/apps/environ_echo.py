"""Echo the environ as JSON: every str-valued entry, the wsgi.* facts, the body and this process.

Query options (several may be combined):
  errors=TEXT    write TEXT and a newline to wsgi.errors (it must reach the server's log)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

WSGI_FACTS = ("wsgi.version", "wsgi.url_scheme", "wsgi.multithread", "wsgi.multiprocess",
              "wsgi.run_once")


def socket_inodes() -> list[int]:
    """Inodes of every socket this process has open (the listen socket and any connections)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.append(int(target[8:-1]))
    return sorted(found)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Reply with a JSON description of the request as this application saw it."""
    body = environ["wsgi.input"].read()
    query = parse_qs(environ.get("QUERY_STRING", ""))
    for text in query.get("errors", []):
        environ["wsgi.errors"].write(text + "\n")
        environ["wsgi.errors"].flush()
    reply = {
        "environ": {k: v for k, v in environ.items() if isinstance(v, str)},
        "wsgi": {k: environ[k] for k in WSGI_FACTS if k in environ},
        "has": {k: k in environ for k in ("wsgi.input", "wsgi.errors", "wsgi.file_wrapper")},
        "body_length": len(body),
        "body_head": body[:64].decode("latin-1"),
        "pid": os.getpid(),
        "sockets": socket_inodes(),
    }
    data = json.dumps(reply).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]
