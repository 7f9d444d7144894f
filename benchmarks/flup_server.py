"""Serve a WSGI app with flup's pre-forking FastCGI server (``flup.server.fcgi_fork``).

Usage: ``python benchmarks/flup_server.py ADDRESS MODULE:CALLABLE CHILDREN``, where ADDRESS is a unix
socket path or ``HOST:PORT``. The pool is static (minSpare = maxSpare = maxChildren = CHILDREN). SIGHUP
makes flup's server return from ``run()``; we then start it again, which is flup's notion of a reload.
"""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str]) -> int:
    """Parse the arguments and run flup's fcgi_fork server until it is stopped."""
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    address, spec, children_arg = argv
    from flup.server.fcgi_fork import WSGIServer

    module_name, _, attr = spec.partition(":")
    app = getattr(importlib.import_module(module_name), attr or "application")
    bind: str | tuple[str, int]
    if address.startswith("/"):
        bind = address
    else:
        host, _, port = address.rpartition(":")
        bind = (host or "0.0.0.0", int(port))
    children = int(children_arg)
    print(f"flup fcgi_fork: {children} children on {address}", file=sys.stderr, flush=True)
    while True:
        server = WSGIServer(
            app,
            bindAddress=bind,
            umask=0,
            minSpare=children,
            maxSpare=children,
            maxChildren=children,
            maxRequests=0,
            debug=False,
        )
        if not server.run():
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
