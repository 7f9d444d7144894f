"""Sub-applications each wrapped in wsgiref.validate.validator, picked by PATH_INFO.

The validator's warnings are errors here, so a breach of PEP 3333 on either side becomes an
exception, which the server answers with a 500. What the validator can only print (an iterable
garbage-collected without close()) goes to stderr, which the tests read from the log with
catch_workers_output on; /probe writes a known line there so a test knows the channel works and
that everything printed before it has arrived.

  /write       the legacy write() callable, then an iterable
  /file        wsgi.file_wrapper over ?path=FILE
  /stream      a generator of ?chunks=N chunks
  /lines       `for line in wsgi.input`, answered as JSON
  /readlines   wsgi.input.readlines(), answered as JSON
  /head        a GET/HEAD resource: HEAD gets the same headers and an empty body
  /no-content  204 with no body and no Content-Type
  /probe       ?text=TEXT to stderr (not validated: the probe must not depend on the validator)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs
from wsgiref.validate import WSGIWarning, validator

warnings.simplefilter("error", WSGIWarning)

HEAD_BODY = b"a body that HEAD leaves out\n"


def _query(environ: dict[str, Any]) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _json(start_response: Callable[..., Any], value: Any) -> list[bytes]:
    data = json.dumps(value).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def write_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written first; ")
    write(b"written second; ")
    return [b"then ", b"returned"]


def file_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = _query(environ)["path"]
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(os.path.getsize(path)))])
    return environ["wsgi.file_wrapper"](open(path, "rb"), 8192)


def stream_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    chunks = int(_query(environ).get("chunks", "5"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    for index in range(chunks):
        yield f"chunk {index}\n".encode()


def _describe_lines(lines: list[bytes]) -> dict[str, Any]:
    return {"count": len(lines), "lengths": [len(line) for line in lines],
            "sha256": hashlib.sha256(b"".join(lines)).hexdigest(),
            "all_end_in_newline": all(line.endswith(b"\n") for line in lines[:-1])}


def lines_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    return _json(start_response, _describe_lines(list(environ["wsgi.input"])))


def readlines_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    return _json(start_response, _describe_lines(environ["wsgi.input"].readlines()))


def head_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(HEAD_BODY)))])
    return [] if environ["REQUEST_METHOD"] == "HEAD" else [HEAD_BODY]


def no_content_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("204 No Content", [("X-Done", "yes")])
    return []


def probe(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    sys.stderr.write(_query(environ).get("text", "") + "\n")
    sys.stderr.flush()
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


ROUTES: dict[str, Callable[..., Iterable[bytes]]] = {
    "/write": validator(write_app),
    "/file": validator(file_app),
    "/stream": validator(stream_app),
    "/lines": validator(lines_app),
    "/readlines": validator(readlines_app),
    "/head": validator(head_app),
    "/no-content": validator(no_content_app),
    "/probe": probe,
}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Dispatch on PATH_INFO; anything else is a 404."""
    route = ROUTES.get(environ.get("PATH_INFO", ""))
    if route is None:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
        return [b"no route\n"]
    return route(environ, start_response)
