"""Applications that let a test watch a response's life: streamed chunks and the iterable's close().

The file named by `?closed=PATH` gets one line when the server calls close() on the iterable, so a
test can prove close() runs after an abort as well as after a normal end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs


class Tracked:
    """A response iterable that yields `chunks` chunks `pause` seconds apart and records close()."""

    def __init__(self, chunks: int, pause: float, closed_path: str | None) -> None:
        self.chunks = chunks
        self.pause = pause
        self.closed_path = closed_path

    def __iter__(self) -> Iterator[bytes]:
        for index in range(self.chunks):
            if index:
                time.sleep(self.pause)
            yield f"chunk {index}\n".encode()

    def close(self) -> None:
        """Record that the server closed the iterable."""
        if self.closed_path:
            with open(self.closed_path, "a") as f:
                f.write("closed\n")


def stream(environ: dict[str, Any], start_response: Callable[..., Any]) -> Tracked:
    """`?chunks=N&pause=S&closed=PATH`: N chunks, S seconds apart, close() recorded in PATH."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Tracked(int(query.get("chunks", ["3"])[0]), float(query.get("pause", ["0"])[0]),
                   query.get("closed", [None])[0])


def write_then_iterate(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Use the legacy write() callable for the first part of the body, then return the rest."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written, ")
    return [b"then ", b"returned"]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    """The router's applications plus /stream, /write-then-iterate and /exit."""
    from tests.apps import router

    path = environ.get("PATH_INFO", "")
    if path == "/stream":
        return stream(environ, start_response)
    if path == "/write-then-iterate":
        return write_then_iterate(environ, start_response)
    if path == "/exit":
        raise SystemExit(3)  # an app that calls sys.exit() inside a request
    return router.app(environ, start_response)
