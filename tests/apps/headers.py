"""Response headers and status lines.

`headers_app` replies with custom headers (three Set-Cookie among them, and a latin-1 value) and a
JSON body holding the request's HTTP_* variables. `status_app` replies with `?code=` and `?reason=`
(and a Location for 3xx). `write_app` uses the legacy write() callable before returning an iterable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

COOKIES = ["a=1; Path=/", "b=two; HttpOnly", "c=3; Max-Age=60; SameSite=Lax"]
NO_BODY = {204, 304}


def headers_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Reply with custom headers and the request headers the application was given."""
    data = json.dumps({k: v for k, v in environ.items() if k.startswith("HTTP_")}).encode()
    start_response("200 OK", [
        ("Content-Type", "application/json"),
        ("X-Custom", "custom value"),
        *(("Set-Cookie", cookie) for cookie in COOKIES),
        ("X-Latin1", "caf\xe9"),
        ("Cache-Control", "no-store"),
        ("Content-Length", str(len(data))),
    ])
    return [data]


def status_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Reply with the status line `?code= ?reason=`."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    code = int(query.get("code", ["200"])[0])
    reason = query.get("reason", ["OK"])[0]
    headers = [("Content-Type", "text/plain")]
    if 300 <= code < 400 and code != 304:
        headers.append(("Location", "/moved/here"))
    body = b"" if code in NO_BODY or environ["REQUEST_METHOD"] == "HEAD" else f"status {code}\n".encode()
    if code not in NO_BODY:
        headers.append(("Content-Length", str(len(body))))
    start_response(f"{code} {reason}", headers)
    return [body] if body else []


def write_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Send part of the body through write(), the rest as the returned iterable."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written with write(); ")
    write(b"")
    return [b"then ", b"returned"]
