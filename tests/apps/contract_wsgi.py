"""Applications that exercise the corners of PEP 3333 a server must get right, picked by PATH_INFO.

Every observation an application makes (a file closed, an iterable closed) is written to the file
named by `?closed=PATH`, one line each, so a test can wait for it across the process boundary.
`?marker=TEXT` goes into exception messages, so a test can find its own traceback in the log.

  /exc-info-before   start_response 200, then (no body yet) an exception and start_response 502
                     with exc_info: the second status and headers must win
  /exc-info-after    a generator: first chunk, then start_response with exc_info, which must re-raise
                     (`?length=N`: with a Content-Length)
  /second-call       start_response twice without exc_info: the server must refuse (AssertionError)
  /file-wrapper      wsgi.file_wrapper(open(?path=FILE), 4096); the file's close() is recorded
  /raise-mid         an iterable with close() that yields one chunk, then raises
  /stream            `?chunks=N&pause=S`: N chunks S seconds apart from an iterable with close()
  /slow              `?seconds=S&started=PATH`: note the start in PATH, sleep S s, then answer
  /log               write ?text=TEXT to wsgi.errors (a sentinel: everything logged before it is in)
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

FIRST_CHUNK = b"the first chunk went out\n"
FILE_BLOCK = 4096


class ContractError(RuntimeError):
    """What these applications raise on purpose."""


def _query(environ: dict[str, Any]) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _record(path: str | None, line: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def exc_info_before(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Change one's mind before any body byte: PEP 3333 lets exc_info replace status and headers."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-First", "yes")])
    try:
        raise ContractError(f"changed my mind {_query(environ).get('marker', '')}")
    except ContractError:
        start_response("502 Bad Gateway", [("Content-Type", "text/plain"), ("X-Second", "yes")],
                       sys.exc_info())
    return [b"replaced by the error page"]


def exc_info_after(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """After the headers went out, start_response(..., exc_info) must re-raise the exception.

    `?length=N` announces a Content-Length of N, so an HTTP client behind nginx can tell the
    cut-off body from a whole one (without it, nginx ends the chunked body as if complete).
    """
    query = _query(environ)
    marker = query.get("marker", "")
    headers = [("Content-Type", "text/plain")]
    if "length" in query:
        headers.append(("Content-Length", query["length"]))
    start_response("200 OK", headers)

    def body() -> Iterator[bytes]:
        yield FIRST_CHUNK
        try:
            raise ContractError(f"failed after the headers {marker}")
        except ContractError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
        yield b"start_response did not re-raise the exception\n"

    return body()


def second_call(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Call start_response a second time without exc_info (the server must raise AssertionError)."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    start_response("201 Created", [("Content-Type", "text/plain")])
    return [b"the second start_response was accepted\n"]


class TrackedFile(io.FileIO):
    """A file that records its close() in a marker file."""

    def __init__(self, path: str, closed_path: str | None) -> None:
        super().__init__(path, "r")
        self.closed_path = closed_path

    def close(self) -> None:
        if not self.closed:
            _record(self.closed_path, "file closed")
        super().close()


def file_wrapper(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Serve ?path= through the server's wsgi.file_wrapper in blocks of 4096 bytes."""
    query = _query(environ)
    path = query["path"]
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(os.path.getsize(path)))])
    return environ["wsgi.file_wrapper"](TrackedFile(path, query.get("closed")), FILE_BLOCK)


class Tracked:
    """A response iterable that records close(): `chunks` chunks `pause` s apart, or a failure."""

    def __init__(self, chunks: int, pause: float, closed_path: str | None, fail: str | None = None) -> None:
        self.chunks = chunks
        self.pause = pause
        self.closed_path = closed_path
        self.fail = fail

    def __iter__(self) -> Iterator[bytes]:
        yield FIRST_CHUNK
        if self.fail is not None:
            raise ContractError(f"failed in the middle of the body {self.fail}")
        for index in range(1, self.chunks):
            time.sleep(self.pause)
            yield f"chunk {index}\n".encode()

    def close(self) -> None:
        _record(self.closed_path, "iterable closed")


def raise_mid(environ: dict[str, Any], start_response: Callable[..., Any]) -> Tracked:
    """One chunk, then an exception, from an iterable whose close() is recorded."""
    query = _query(environ)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Tracked(2, 0, query.get("closed"), fail=query.get("marker", ""))


def stream(environ: dict[str, Any], start_response: Callable[..., Any]) -> Tracked:
    """`?chunks=N&pause=S&closed=PATH`: a long streamed body whose close() is recorded."""
    query = _query(environ)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Tracked(int(query.get("chunks", "3")), float(query.get("pause", "0")), query.get("closed"))


def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """`?seconds=S&started=PATH`: record the start in PATH, sleep S seconds, answer with the pid."""
    query = _query(environ)
    _record(query.get("started"), "started")
    time.sleep(float(query.get("seconds", "1")))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def log(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Write ?text= to wsgi.errors and answer with this worker's pid."""
    errors = environ["wsgi.errors"]
    errors.write(_query(environ).get("text", "") + "\n")
    errors.flush()
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


ROUTES: dict[str, Callable[..., Iterable[bytes]]] = {
    "/exc-info-before": exc_info_before,
    "/exc-info-after": exc_info_after,
    "/second-call": second_call,
    "/file-wrapper": file_wrapper,
    "/raise-mid": raise_mid,
    "/stream": stream,
    "/slow": slow,
    "/log": log,
}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Dispatch on PATH_INFO; anything else is a 404."""
    route = ROUTES.get(environ.get("PATH_INFO", ""))
    if route is None:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "10")])
        return [b"no route\n\n"]
    return route(environ, start_response)
