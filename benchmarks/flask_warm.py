"""The Flask hello of benchmarks/flask_hello.py, warmed at import: it serves itself 20 requests
before the template forks (benchmarks/preload.py's "warmed" case).

With preload, what a worker's first request runs for the first time (Flask's and Werkzeug's request
path: Python 3.11 specialises that bytecode in place, caches fill, objects are allocated) is written
into pages shared with the template, and each worker pays for its own copy. Done in the template,
the workers share the result.
"""

from __future__ import annotations

from werkzeug.test import EnvironBuilder

from benchmarks.flask_hello import app


def warm(rounds: int = 20) -> None:
    """Call the app on a plain GET / rounds times, as a server would, and drop the answers."""
    environ = EnvironBuilder(path="/").get_environ()
    for _ in range(rounds):
        body = app(dict(environ), lambda status, headers, exc_info=None: None)
        try:
            b"".join(body)
        finally:
            getattr(body, "close", lambda: None)()


warm()

__all__ = ["app"]
