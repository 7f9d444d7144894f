"""Applications that fail: before start_response, after it (nothing sent yet), with a body that is
not bytes, and after the first body chunk went out. The two in between set `X-App: 1`, a header
fastfpm's 500 must not carry.

`?marker=TEXT` puts TEXT in the exception message, so a test can find its own traceback in the log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

FIRST_CHUNK = b"first chunk, then the application fails\n"


class AppFailure(RuntimeError):
    """What the failing applications raise."""


def _marker(environ: dict[str, Any]) -> str:
    return parse_qs(environ.get("QUERY_STRING", "")).get("marker", ["no-marker"])[0]


def raise_before(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Raise before start_response: the server must answer 500."""
    raise AppFailure(f"raised before start_response {_marker(environ)}")


def raise_after_start(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Call start_response, then raise before any body: the server must answer 500."""
    start_response("200 OK", [("Content-Type", "text/html"), ("X-App", "1")])
    raise AppFailure(f"raised after start_response {_marker(environ)}")


def bad_iterable(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[Any]:
    """Call start_response, then return a body of str rather than bytes: a 500."""
    start_response("200 OK", [("Content-Type", "text/html"), ("X-App", "1")])
    return ["not bytes"]


def raise_after(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Send headers and one chunk, then raise while producing the rest of a 1 MiB body.

    `?length=0` leaves out Content-Length, so nginx relays the body chunked.
    """
    marker = _marker(environ)
    headers = [("Content-Type", "text/plain")]
    if "length=0" not in environ.get("QUERY_STRING", ""):
        headers.append(("Content-Length", str(1 << 20)))
    start_response("200 OK", headers)

    def body() -> Iterator[bytes]:
        yield FIRST_CHUNK
        raise AppFailure(f"raised after the first chunk {marker}")

    return body()
