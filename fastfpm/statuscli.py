"""`python -m fastfpm status`: fetch a pool's status page over FastCGI, as a web server would, and print it.

The page is php-fpm's (fastfpm serves the same at pm.status_path): text by default, `?json`, `?xml`,
`?html`, `?openmetrics`, and `?full` for a row per process. It works against php-fpm itself too.
`fetch_document` is what `top` reads: the JSON format with every process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

FORMATS = ("text", "json", "xml", "html", "openmetrics")
DEFAULT_PATH = "/status"


class StatusError(Exception):
    """No status page: nothing answered, the answer was not 200, or it was not what was asked for."""


def status_query(fmt: str = "text", full: bool = False) -> str:
    """The query string that asks for a format (text needs none) and, with full, every process."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown status format {fmt!r} (one of {', '.join(FORMATS)})")
    words = ([] if fmt == "text" else [fmt]) + (["full"] if full else [])
    return "&".join(words)


def fetch_status(address: str, path: str = DEFAULT_PATH, query: str = "", timeout: float = 10.0) -> bytes:
    """The status page's body; StatusError says why there is none."""
    from fastfpm.address import parse_address
    from fastfpm.client import FastCGIClient, FastCGIError, build_params

    try:
        with FastCGIClient(parse_address(address), timeout=timeout) as client:
            response = client.request(build_params("GET", path, query))
    except OSError as exc:
        raise StatusError(f"cannot reach {address}: {exc.strerror or exc}") from None
    except (FastCGIError, ValueError) as exc:
        raise StatusError(f"no status page from {address}: {exc}") from None
    if response.status != 200:
        first_line = response.text.strip().splitlines()[0][:200] if response.body.strip() else ""
        said = f" ({first_line})" if first_line else ""
        raise StatusError(f"{address} answered {path} with {response.status} {response.reason}{said}: "
                          f"is {path} the pool's pm.status_path?")
    return response.body


def fetch_document(address: str, path: str = DEFAULT_PATH, timeout: float = 10.0) -> dict[str, Any]:
    """The JSON format with every process (`?json&full`), parsed."""
    body = fetch_status(address, path, status_query("json", full=True), timeout)
    try:
        document = json.loads(body)
    except ValueError:
        raise StatusError(f"{address} answered {path} with something other than JSON: "
                          f"{body[:80]!r}") from None
    if not isinstance(document, dict):
        raise StatusError(f"{address} answered {path} with JSON that is not an object")
    return document


def run_status(address: str, path: str, fmt: str, full: bool, timeout: float) -> int:
    """The `status` command: the page on stdout, exit 0; or a message on stderr, exit 1."""
    try:
        body = fetch_status(address, path, status_query(fmt, full), timeout)
    except StatusError as exc:
        print(f"fastfpm: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(body)
    if body and not body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")  # php-fpm's json and xml end without one; a shell prompt would follow
    sys.stdout.flush()
    return 0
