"""A FastCGI client: what the tests, `python -m fastfpm request` and health checks talk to servers with.

It speaks to a responder the way nginx does (BEGIN_REQUEST, PARAMS, STDIN, then read STDOUT/STDERR
up to END_REQUEST), one request at a time per connection, and reads while it writes so a server
that answers before it has read the whole body never deadlocks against it.
"""

from __future__ import annotations

import select
import socket
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from fastfpm import protocol
from fastfpm.address import Address, connect, parse_address

__all__ = ["FastCGIClient", "FastCGIError", "FastCGITimeout", "Response", "build_params",
           "parse_cgi_response"]

Params = Mapping[str, str] | Iterable[tuple[bytes, bytes]]
Body = bytes | bytearray | memoryview | Iterable[bytes] | BinaryIO

_RECV_SIZE = 262144
_SEND_BATCH = 262144  # a bytes body goes out in sends of about this size
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


class FastCGIError(Exception):
    """The server broke off or spoke nonsense; what arrived before that is attached for inspection."""

    def __init__(self, message: str, *, stdout: bytes = b"", stderr: bytes = b"", unparsed: bytes = b"",
                 records: list[protocol.Record] | None = None) -> None:
        super().__init__(message)
        self.stdout = stdout        # STDOUT content received so far
        self.stderr = stderr        # STDERR content received so far
        self.unparsed = unparsed    # trailing bytes that did not make a whole record
        self.records = records if records is not None else []  # every record received for the request


class FastCGITimeout(FastCGIError, TimeoutError):
    """No complete answer within the client's timeout."""


@dataclass
class Response:
    """One request's outcome: the CGI response split into status, headers and body, plus END_REQUEST."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stderr: bytes = b""
    app_status: int = 0
    protocol_status: int = protocol.REQUEST_COMPLETE
    reason: str = ""
    stdout: bytes = field(default=b"", repr=False)  # the STDOUT stream as received, head included

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first header called name (case-insensitive), or default."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return default

    def header_list(self, name: str) -> list[str]:
        """Every value of the header called name (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (replacing what is not)."""
        return self.body.decode("utf-8", "replace")


def parse_cgi_response(stdout: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """Split a CGI response (RFC 3875 section 6) into status, reason, headers and body.

    Header lines end in CRLF or LF and a blank line ends them; "Status: 404 Not Found" sets the
    status and reason (200 OK without one) and is not repeated among the headers. As nginx does, an
    empty stream counts as 502 Bad Gateway, and a head without its blank line is a ValueError.
    """
    if not stdout:
        return 502, "Bad Gateway", [], b""
    crlf, lf = stdout.find(b"\r\n\r\n"), stdout.find(b"\n\n")
    if crlf < 0 and lf < 0:
        raise ValueError("the CGI headers do not end with a blank line")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        head, body = stdout[:crlf], stdout[crlf + 4:]
    else:
        head, body = stdout[:lf], stdout[lf + 2:]
    status, reason, headers = 200, "OK", []
    for line in head.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"malformed CGI header line {line[:80]!r}")
        key, text = name.decode("latin-1").strip(), value.decode("latin-1").strip()
        if key.lower() == "status":
            code, _, reason = text.partition(" ")
            if not (len(code) == 3 and code.isdigit()):
                raise ValueError(f"malformed Status header {text!r}")
            status = int(code)
            continue  # the status is reported apart, as an HTTP client reports its status line
        headers.append((key, text))
    return status, reason, headers, body


def _pairs(params: Params) -> list[tuple[bytes, bytes]]:
    """Params as bytes pairs: str goes out as UTF-8 (surrogateescape keeps raw bytes raw)."""
    items = params.items() if isinstance(params, Mapping) else params
    out = []
    for name, value in items:
        if isinstance(name, str):
            name = name.encode("utf-8", "surrogateescape")
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogateescape")
        out.append((bytes(name), bytes(value)))
    return out


def _body_chunks(stdin: Iterable[bytes] | BinaryIO) -> Iterator[bytes]:
    """A streamed request body (a binary file or an iterable of bytes) chunk by chunk, never whole."""
    if isinstance(stdin, str):
        raise TypeError("the request body must be bytes, not str")
    read = getattr(stdin, "read", None)
    if read is not None:
        while chunk := read(protocol.MAX_CONTENT):
            yield bytes(chunk)
        return
    for chunk in stdin:
        if isinstance(chunk, str):
            raise TypeError("request body chunks must be bytes, not str")
        yield bytes(chunk)


class FastCGIClient:
    """A FastCGI client for one server; keep_conn=True keeps the connection open between requests."""

    def __init__(self, address: Address | str, timeout: float | None = 10.0, keep_conn: bool = False) -> None:
        self.address = address if isinstance(address, Address) else parse_address(address)
        self.timeout = timeout
        self.keep_conn = keep_conn
        self.sock: socket.socket | None = None
        self._rbuf = bytearray()
        self._rpos = 0
        self._eof = False
        self._deadline: float | None = None

    # ------------------------------------------------------------------ connection

    def __enter__(self) -> FastCGIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._rbuf.clear()
        self._rpos = 0
        self._eof = False

    @property
    def connected(self) -> bool:
        """Whether a connection is open."""
        return self.sock is not None

    def _connect(self, fresh_request: bool = False) -> socket.socket:
        idle = self.sock is not None and self._rpos == len(self._rbuf)
        if fresh_request and idle and self._wait_ready(select.POLLIN, 0):
            # A kept connection the server has closed meanwhile (idle timeout, restart): nothing was
            # sent on it yet, so open a fresh one instead of failing the request.
            self._recv_some()
            if self._eof:
                self.close()
        if self.sock is None:
            remaining = self._remaining()
            sock = connect(self.address, timeout=remaining)
            sock.setblocking(False)
            self.sock = sock
            self._rbuf.clear()
            self._rpos = 0
            self._eof = False
        return self.sock

    def _start(self) -> None:
        self._deadline = None if self.timeout is None else time.monotonic() + self.timeout

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout_error()
        return remaining

    def _timeout_error(self, stdout: bytes = b"", stderr: bytes = b"",
                       records: list[protocol.Record] | None = None) -> FastCGITimeout:
        return FastCGITimeout(f"no complete answer from {self.address} within {self.timeout} s",
                              stdout=stdout, stderr=stderr, unparsed=bytes(self._rbuf[self._rpos:]),
                              records=records)

    def _wait_ready(self, events: int, timeout_ms: int | None) -> int:
        assert self.sock is not None
        poller = select.poll()
        poller.register(self.sock, events)
        ready = poller.poll(timeout_ms)
        return ready[0][1] if ready else 0

    def _wait(self, events: int) -> int:
        """Poll the socket for events until the deadline; returns the events that are ready."""
        remaining = self._remaining()
        ready = self._wait_ready(events, None if remaining is None else max(1, int(remaining * 1000)))
        if not ready:
            raise self._timeout_error()
        return ready

    def _recv_some(self) -> bool:
        """Read what is available into the buffer; False once the server has closed its side."""
        assert self.sock is not None
        if self._eof:
            return False
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except ConnectionResetError:
            data = b""
        if not data:
            self._eof = True
            return False
        if self._rpos == len(self._rbuf) or self._rpos > _RECV_SIZE:
            del self._rbuf[:self._rpos]  # drop what has been parsed before the buffer grows
            self._rpos = 0
        self._rbuf += data
        return True

    def _send(self, data: bytes) -> bool:
        """Send data, reading whatever the server sends meanwhile; False if the server stopped reading
        (closed or reset), which is not an error yet: its answer may already be in the buffer."""
        sock = self.sock
        assert sock is not None
        pos, end = 0, len(data)
        with memoryview(data) as view:
            while pos < end:
                try:
                    pos += sock.send(view[pos:], _SEND_FLAGS)
                except (BlockingIOError, InterruptedError):
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    return False
                if pos == end:
                    break
                # Keep draining the answer meanwhile, so a server that writes before it has read the
                # whole body cannot block against us.
                events = self._wait(select.POLLOUT if self._eof else select.POLLOUT | select.POLLIN)
                if events & select.POLLIN:
                    self._recv_some()
        return True

    def _next_record(self) -> protocol.Record | None:
        """The next whole record, reading as needed; None when the server closed before one arrived."""
        while True:
            try:
                record = protocol.parse_record(self._rbuf, self._rpos)
            except protocol.ProtocolError as exc:
                raise FastCGIError(f"malformed answer from {self.address}: {exc}",
                                   unparsed=bytes(self._rbuf[self._rpos:])) from None
            if record is not None:
                self._rpos += record.size
                return record
            if self._eof:
                return None
            self._wait(select.POLLIN)
            self._recv_some()

    # ------------------------------------------------------------------ requests

    def request(self, params: Params, stdin: Body = b"", request_id: int = 1) -> Response:
        """Send one request and read its answer up to END_REQUEST.

        params is a dict of str (sent as UTF-8) or a list of (name, value) bytes pairs, sent as they
        are; stdin is bytes, a binary file or an iterable of bytes, sent in records of up to 65535
        bytes as it is read. Raises FastCGIError (with what did arrive) if the server closes first.
        """
        if not 1 <= request_id <= 0xFFFF:
            raise ValueError(f"request id {request_id} is out of range (1-65535; 0 is for management)")
        self._start()
        try:
            return self._request(params, stdin, request_id)
        except BaseException:
            # A connection left mid-request cannot carry the next one.
            self.close()
            raise
        finally:
            if not self.keep_conn:
                self.close()

    def _request(self, params: Params, stdin: Body, request_id: int) -> Response:
        if isinstance(stdin, str):
            raise TypeError("the request body must be bytes, not str")
        pairs = protocol.encode_pairs(_pairs(params))
        self._connect(fresh_request=True)
        flags = protocol.KEEP_CONN if self.keep_conn else 0
        out = bytearray(protocol.encode_begin_request(request_id, protocol.RESPONDER, flags))
        out += protocol.encode_stream(protocol.PARAMS, request_id, pairs)
        out += protocol.encode_record(protocol.PARAMS, request_id)  # an empty record ends a stream
        if isinstance(stdin, bytes | bytearray | memoryview):
            # A body in memory: as few sends as possible, the whole request in one when it is small.
            step = protocol.MAX_CONTENT
            with memoryview(stdin) as raw, raw.cast("B") as data:
                for start in range(0, len(data), step):
                    out += protocol.encode_record(protocol.STDIN, request_id, data[start:start + step])
                    if len(out) >= _SEND_BATCH:
                        if not self._send(out):
                            return self._read_response(request_id)
                        out.clear()
        else:
            # A streamed body: each chunk goes out as soon as it is produced, as nginx does with
            # fastcgi_request_buffering off.
            if not self._send(out):
                return self._read_response(request_id)
            out.clear()
            for chunk in _body_chunks(stdin):
                if not self._send(protocol.encode_stream(protocol.STDIN, request_id, chunk)):
                    return self._read_response(request_id)
        out += protocol.encode_record(protocol.STDIN, request_id)
        self._send(out)
        return self._read_response(request_id)

    def _read_response(self, request_id: int) -> Response:
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        records: list[protocol.Record] = []
        while True:
            try:
                record = self._next_record()
            except FastCGITimeout:
                raise self._timeout_error(b"".join(stdout), b"".join(stderr), records) from None
            except FastCGIError as exc:
                exc.stdout, exc.stderr, exc.records = b"".join(stdout), b"".join(stderr), records
                raise
            if record is None:
                raise FastCGIError(f"{self.address} closed the connection before END_REQUEST",
                                   stdout=b"".join(stdout), stderr=b"".join(stderr),
                                   unparsed=bytes(self._rbuf[self._rpos:]), records=records)
            if record.request_id != request_id:
                continue  # management records (request id 0) and strays are not this request's
            records.append(record)
            if record.type == protocol.STDOUT:
                stdout.append(record.content)
            elif record.type == protocol.STDERR:
                stderr.append(record.content)
            elif record.type == protocol.END_REQUEST:
                break
        out = b"".join(stdout)
        try:
            app_status, protocol_status = protocol.parse_end_request(record.content)
            status, reason, headers, body = parse_cgi_response(out)
        except ValueError as exc:
            raise FastCGIError(f"malformed answer from {self.address}: {exc}", stdout=out,
                               stderr=b"".join(stderr), records=records) from None
        return Response(status, headers, body, b"".join(stderr), app_status, protocol_status, reason, out)

    def get_values(self, names: Iterable[bytes | str] = (protocol.FCGI_MAX_CONNS, protocol.FCGI_MAX_REQS,
                                                          protocol.FCGI_MPXS_CONNS)) -> dict[bytes, bytes]:
        """Ask the server for FastCGI variables (FCGI_MAX_CONNS ...) with a GET_VALUES record."""
        wanted = [name.encode("ascii") if isinstance(name, str) else bytes(name) for name in names]
        self._start()
        try:
            self._connect(fresh_request=True)
            self._send(protocol.encode_get_values(wanted))
            while True:
                record = self._next_record()
                if record is None:
                    raise FastCGIError(f"{self.address} closed the connection without GET_VALUES_RESULT",
                                       unparsed=bytes(self._rbuf[self._rpos:]))
                if record.request_id != 0:
                    continue
                if record.type == protocol.GET_VALUES_RESULT:
                    try:
                        return dict(protocol.parse_pairs(record.content))
                    except protocol.ProtocolError as exc:
                        raise FastCGIError(f"malformed GET_VALUES_RESULT: {exc}", records=[record]) from None
                if record.type == protocol.UNKNOWN_TYPE:
                    raise FastCGIError(f"{self.address} does not know GET_VALUES", records=[record])
        except BaseException:
            self.close()
            raise
        finally:
            if not self.keep_conn:
                self.close()

    # ------------------------------------------------------------------ raw access for tests

    def send_raw(self, data: bytes) -> bool:
        """Send bytes as they are (malformed records, half requests), opening a connection if needed.

        Returns False when the server stopped reading (closed or reset) before all of it went out.
        """
        self._start()
        self._connect()
        return self._send(bytes(data))

    def recv_record(self) -> protocol.Record | None:
        """The next record the server sends, or None once it has closed the connection."""
        self._start()
        self._connect()
        return self._next_record()

    def recv_until_closed(self) -> bytes:
        """Everything the server sends until it closes the connection (not yet parsed ones included);
        then the client side is closed too."""
        self._start()
        self._connect()
        try:
            while not self._eof:
                self._wait(select.POLLIN)
                self._recv_some()
            return bytes(self._rbuf[self._rpos:])
        finally:
            self.close()


def build_params(method: str = "GET", path: str = "/", query: str = "",
                 headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 body_len: int | None = None, extra: Mapping[str, str] | None = None, *,
                 document_root: str = "/var/www/html", scheme: str = "http", server_name: str = "localhost",
                 server_port: int = 80, remote_addr: str = "127.0.0.1", remote_port: int = 54321,
                 ) -> dict[str, str]:
    """The CGI params nginx sends with the stock fastcgi_params (plus fastcgi.conf's SCRIPT_FILENAME).

    path is the raw request path (percent-escapes stay in REQUEST_URI, SCRIPT_NAME gets them decoded,
    as nginx's $request_uri and $fastcgi_script_name do); a "?query" in it is split off when query is
    empty. Headers become HTTP_* params; body_len None sends an empty CONTENT_LENGTH, as nginx does
    for a request without a body. extra adds or overrides params last.
    """
    if not query and "?" in path:
        path, _, query = path.partition("?")
    if not path.startswith("/"):
        path = "/" + path
    decoded = urllib.parse.unquote_to_bytes(path).decode("utf-8", "surrogateescape")
    items = list(headers.items() if isinstance(headers, Mapping) else headers or ())
    # nginx (1.23+) joins repeated request headers into one param: cookies with "; ", others with ", ".
    merged: dict[str, str] = {}
    for name, value in items:
        key = "HTTP_" + name.strip().upper().replace("-", "_")
        if key in merged:
            merged[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value.strip()
        else:
            merged[key] = value.strip()
    host_header = merged.get("HTTP_HOST", "")
    # The stock fastcgi_params sends HTTP_HOST as $host: the Host header's name, lowercased, no port.
    host = urllib.parse.urlsplit("//" + host_header).hostname if host_header else None
    params = {
        "SCRIPT_FILENAME": document_root.rstrip("/") + decoded,
        "QUERY_STRING": query,
        "REQUEST_METHOD": method.upper(),
        "CONTENT_TYPE": merged.get("HTTP_CONTENT_TYPE", ""),
        "CONTENT_LENGTH": merged.get("HTTP_CONTENT_LENGTH", "") if body_len is None else str(body_len),
        "SCRIPT_NAME": decoded,
        "REQUEST_URI": path + ("?" + query if query else ""),
        "DOCUMENT_URI": decoded,
        "DOCUMENT_ROOT": document_root,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_SCHEME": scheme,
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "fastfpm-client",
        "REMOTE_ADDR": remote_addr,
        "REMOTE_PORT": str(remote_port),
        "REMOTE_USER": "",
        "SERVER_ADDR": "127.0.0.1",
        "SERVER_PORT": str(server_port),
        "SERVER_NAME": server_name,
        "REDIRECT_STATUS": "200",
    }
    if scheme == "https":
        params["HTTPS"] = "on"  # `$https if_not_empty`: only sent over TLS
    if body_len is not None and "HTTP_CONTENT_LENGTH" not in merged:
        merged["HTTP_CONTENT_LENGTH"] = str(body_len)
    merged["HTTP_HOST"] = host or server_name
    params.update(merged)
    if extra:
        params.update(extra)
    return params
