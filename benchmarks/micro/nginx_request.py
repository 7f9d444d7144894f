"""What nginx sends for one request: the params of the stock ``fastcgi_params`` plus browser headers.

Shared by the micro-benchmarks so that every one of them works on the same, realistic bytes.
"""

from __future__ import annotations

from fastfpm import protocol

#: The name/value pairs nginx 1.22 sends with Debian's stock ``include fastcgi_params;`` for a
#: browser's GET, in nginx's order (fastcgi_params first, then the request headers as HTTP_*).
NGINX_PARAMS: list[tuple[bytes, bytes]] = [
    (b"QUERY_STRING", b"page=2&sort=name"),
    (b"REQUEST_METHOD", b"GET"),
    (b"CONTENT_TYPE", b""),
    (b"CONTENT_LENGTH", b""),
    (b"SCRIPT_NAME", b"/articles/list"),
    (b"REQUEST_URI", b"/articles/list?page=2&sort=name"),
    (b"DOCUMENT_URI", b"/articles/list"),
    (b"DOCUMENT_ROOT", b"/usr/share/nginx/html"),
    (b"SERVER_PROTOCOL", b"HTTP/1.1"),
    (b"REQUEST_SCHEME", b"http"),
    (b"GATEWAY_INTERFACE", b"CGI/1.1"),
    (b"SERVER_SOFTWARE", b"nginx/1.22.1"),
    (b"REMOTE_ADDR", b"127.0.0.1"),
    (b"REMOTE_PORT", b"51234"),
    (b"REMOTE_USER", b""),
    (b"SERVER_ADDR", b"127.0.0.1"),
    (b"SERVER_PORT", b"8080"),
    (b"SERVER_NAME", b"localhost"),
    (b"REDIRECT_STATUS", b"200"),
    (b"HTTP_HOST", b"localhost"),
    (b"HTTP_USER_AGENT", b"Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
    (b"HTTP_ACCEPT", b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"),
    (b"HTTP_ACCEPT_LANGUAGE", b"en-US,en;q=0.5"),
    (b"HTTP_ACCEPT_ENCODING", b"gzip, deflate, br"),
    (b"HTTP_CONNECTION", b"keep-alive"),
    (b"HTTP_COOKIE", b"sessionid=3f2a9c1e8b7d4f60a1b2c3d4e5f60718; csrftoken=Zx81kQ2mN4pR7sT9vW0yB3dF6hJ"),
    (b"HTTP_UPGRADE_INSECURE_REQUESTS", b"1"),
    (b"HTTP_CACHE_CONTROL", b"max-age=0"),
]


def request_bytes(request_id: int = 1, keep_conn: bool = False, params=NGINX_PARAMS) -> bytes:
    """BEGIN_REQUEST, PARAMS, empty PARAMS, empty STDIN: one GET as nginx writes it."""
    flags = protocol.KEEP_CONN if keep_conn else 0
    return b"".join(
        [
            protocol.encode_begin_request(request_id, protocol.RESPONDER, flags),
            protocol.encode_stream(protocol.PARAMS, request_id, protocol.encode_pairs(params)),
            protocol.encode_record(protocol.PARAMS, request_id),
            protocol.encode_record(protocol.STDIN, request_id),
        ]
    )
