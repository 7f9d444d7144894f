"""Reply with the worker's uid, gid, cwd and two environment variables (privilege and env tests).

It imports nothing the master has not imported already: a worker that switched to another user
may not be able to read the interpreter's own directories (on this CI machine, /root is 0700).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Who and where the worker is."""
    # repr, not json: json may not be importable after the switch (see above).
    body = repr({"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
                       "FROM_POOL": os.environ.get("FROM_POOL"), "PATH": os.environ.get("PATH"),
                       "HOME": os.environ.get("HOME")}).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
