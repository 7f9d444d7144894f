"""The built-in demo: what `python -m fastfpm serve` serves when no application is named.

An info page in the spirit of phpinfo(): the fastfpm version, the worker's pid and request count,
and the environ the request arrived with, so a newcomer can see at once what nginx passes through.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Iterable

from fastfpm import __version__
from fastfpm.address import Address

_requests_served = 0


def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """Answer every request with the info page."""
    global _requests_served
    _requests_served += 1
    body_length = len(environ["wsgi.input"].read())
    rows = "\n".join(
        f"<tr><th>{html.escape(key)}</th>"
        f"<td>{html.escape(value if isinstance(value, str) else repr(value))}</td></tr>"
        for key, value in sorted(environ.items())
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fastfpm {__version__}</title>
<style>body{{font-family:sans-serif;margin:2em}}th{{text-align:left;padding-right:1em;vertical-align:top}}
td{{font-family:monospace;word-break:break-all}}</style></head>
<body><h1>fastfpm {__version__}</h1>
<p>It works: this page comes from worker pid {os.getpid()}, which has now served {_requests_served}
request(s). Name your own WSGI application to serve it instead:
<code>python -m fastfpm serve myapp:application</code>.</p>
<p>Request body: {body_length} bytes.</p>
<h2>environ</h2>
<table>
{rows}
</table></body></html>
"""
    data = page.encode("utf-8")
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(data)))])
    return [data]


def nginx_snippet(address: Address) -> str:
    """A server block for nginx that passes every request to fastfpm at address."""
    target = f"unix:{address.path}" if address.path else str(address)
    if not address.path and address.host in ("", "::", "0.0.0.0"):
        target = f"127.0.0.1:{address.port}"
    return f"""# nginx: put this in /etc/nginx/sites-enabled/fastfpm.conf, then `nginx -s reload`
server {{
    listen 8080;
    location / {{
        include fastcgi_params;
        fastcgi_pass {target};
    }}
}}
"""
