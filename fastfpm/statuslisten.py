"""pm.status_listen: the master answers a pool's status page and ping on an address of its own.

php-fpm serves its status page from a worker, so a pool whose workers are all busy cannot say that
it is saturated. Here the master answers from its own event loop (fastfpm.watcher): a StatusListener
per pool is a listen socket and its connections, each a small non-blocking FastCGI responder over
the Python codec (fastfpm.protocol). The page itself is fastfpm.status's: status_app over pool_view
for pm.status_path, ping_app for ping.path, and php-fpm's "File not found." 404 for anything else.

The master must never wait on a client, so every connection is bounded: its unparsed input
(IN_CAP), its params (the pool's max_params_size), the answers it has not read yet (OUT_HIGH: no
more input is read meanwhile), and time: from accept, and again after each request, it has the
pool's idle_timeout to complete its next request, or it is closed. At most MAX_CONNECTIONS are open
per listener; more wait in the listen backlog. The record rules are the worker's (FcgiConnection.rule
in fastfpm/_conn.pxi): management records answered, one request at a time (a second request id is
refused with CANT_MPX_CONN), FCGI_KEEP_CONN honoured, STDIN content ignored.

A listener outlives a reload when its address is unchanged (fastfpm.generation hands it on, as the
pools' sockets) and always answers for the pool that serves: serve(pool) is called whenever a
generation starts serving.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
import urllib.parse
from collections import deque
from typing import Any

from fastfpm import protocol as fcgi
from fastfpm.address import REFUSED_MESSAGE, AllowedClients, create_listen_socket, parse_address
from fastfpm.log import WsgiErrors
from fastfpm.status import WSGIApp, ping_app, pool_view, status_app
from fastfpm.watcher import Watcher

__all__ = ["StatusListener", "MAX_CONNECTIONS", "NOT_FOUND"]

# Connections one listener serves at once; more wait in the backlog until one closes.
MAX_CONNECTIONS = 32
# Unparsed input a connection may hold: the largest record (8 + 65535 + 255 bytes) twice over, so a
# complete record always fits; reads never go past it.
IN_CAP = 2 * (fcgi.HEADER_LEN + fcgi.MAX_CONTENT + 255)
# Unsent output above which a connection's input is left unread until the peer takes its answers.
OUT_HIGH = 256 * 1024
# After accept() fails (EMFILE, ENFILE ...), the listen socket is left alone this long: it stays
# readable, and select() would wake the loop again at once.
ACCEPT_PAUSE_SECONDS = 1.0
# php-fpm's answer to a path it has no script for (its status listener included), its log line aside.
NOT_FOUND = b"Status: 404 Not Found\r\nContent-type: text/html; charset=UTF-8\r\n\r\nFile not found.\n"

# Where a connection is: between requests; reading a request's PARAMS; after the answer, dropping its
# STDIN; done (no FCGI_KEEP_CONN): queued requests are refused, then it closes.
IDLE, PARAMS, BODY, AFTER = "idle", "params", "body", "after"


def request_path(params: dict[bytes, bytes]) -> str:
    """The request path as the worker's route table sees it (EnvironBuilder.request_path):
    REQUEST_URI without its query, an absolute-form target reduced to its path, percent-decoded;
    SCRIPT_NAME + PATH_INFO when there is no REQUEST_URI. Latin-1, as PEP 3333 decodes."""
    raw = params.get(b"REQUEST_URI", b"")
    if not raw:
        return (params.get(b"SCRIPT_NAME", b"") + params.get(b"PATH_INFO", b"")).decode("latin-1")
    uri = raw.split(b"?", 1)[0]
    first = uri.find(b"/")
    if first > 0 and uri[first + 1:first + 2] == b"/":  # http://host/path: the path only
        slash = uri.find(b"/", first + 2)
        uri = uri[slash:] if slash >= 0 else b""
    return urllib.parse.unquote_to_bytes(uri).decode("latin-1")


def call_app(app: WSGIApp, params: dict[bytes, bytes], errors: Any) -> bytes:
    """A CGI response (Status line, headers, blank line, body) from one of status.py's WSGI apps,
    given the little of an environ they read."""
    environ = {"REQUEST_METHOD": params.get(b"REQUEST_METHOD", b"GET").decode("latin-1"),
               "QUERY_STRING": params.get(b"QUERY_STRING", b"").decode("latin-1"), "wsgi.errors": errors}
    started: list[tuple[str, list[tuple[str, str]]]] = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: started.append((status, headers))))
    status, headers = started[-1]
    head = f"Status: {status}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("latin-1") + body


class StatusListener:
    """One pool's pm.status_listen socket and its connections, served from the master's Watcher."""

    def __init__(self, pool: Any, watcher: Watcher) -> None:
        config = pool.config
        self.address = parse_address(config.pm_status_listen)
        self.sock = create_listen_socket(self.address, backlog=config.listen_backlog, mode=config.listen_mode,
                                         owner=config.listen_owner, group=config.listen_group)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.watcher = watcher
        self.connections: dict[int, StatusConnection] = {}
        self.accepting = False           # the listen socket is registered on the watcher
        self.paused_until: float | None = None
        self.full_logged = False
        self.closed = False
        self.accept_handler = self.accept  # one bound method: the watcher compares by identity
        self.serve(pool)
        watcher.add_timer(self.next_deadline, self.expire)
        self.update_accepting()

    def serve(self, pool: Any) -> None:
        """Answer for pool from now on (the pool of the generation that serves)."""
        config = pool.config
        self.pool = pool
        self.log = pool.log
        self.label = f"[pool {pool.name}] pm.status_listen {self.address}"
        self.timeout = config.idle_timeout
        self.max_params = config.max_params_size
        self.allowed = AllowedClients.parse(config.listen_allowed_clients)
        self.errors = WsgiErrors(pool.log, "error")
        self.get_values = {fcgi.FCGI_MAX_CONNS: str(MAX_CONNECTIONS).encode(),
                           fcgi.FCGI_MAX_REQS: str(MAX_CONNECTIONS).encode(), fcgi.FCGI_MPXS_CONNS: b"0"}
        self.routes: dict[str, WSGIApp] = {}
        if config.pm_status_path:
            self.routes[config.pm_status_path] = status_app(lambda: pool_view(pool))
        if config.ping_path:
            self.routes[config.ping_path] = ping_app(config.ping_response)

    def respond(self, params: dict[bytes, bytes]) -> bytes:
        """The CGI response to one request's params."""
        app = self.routes.get(request_path(params))
        return NOT_FOUND if app is None else call_app(app, params, self.errors)

    # ------------------------------------------------------------------ accepting

    def accept(self) -> None:
        """The listen socket is readable: take connections while there is room."""
        now = time.monotonic()
        while not self.closed and len(self.connections) < MAX_CONNECTIONS:
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up before we took it
                self.log.error(f"{self.label}: accept() failed: {exc.strerror or exc}; "
                               f"trying again in {ACCEPT_PAUSE_SECONDS:g}s")
                self.paused_until = now + ACCEPT_PAUSE_SECONDS
                break
            self.take(sock, peer, now)
        if len(self.connections) >= MAX_CONNECTIONS and not self.full_logged:
            self.full_logged = True
            self.log.warning(f"{self.label}: {MAX_CONNECTIONS} connections open; more wait in the "
                             "backlog until one closes")
        self.update_accepting()

    def take(self, sock: socket.socket, peer: Any, now: float) -> None:
        """A new connection: refused if listen.allowed_clients says so, else served."""
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            described = "a unix socket client"
        else:
            described = f"{peer[0]}:{peer[1]}"
            if not self.allowed.allows(peer[0]):
                self.log.error(f"{self.label}: " + REFUSED_MESSAGE.format(peer=peer[0]))
                sock.close()
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers go out whole
        connection = StatusConnection(self, sock, described, now)
        self.connections[connection.fd] = connection
        connection.step()

    def update_accepting(self) -> None:
        """Watch the listen socket only while a connection can be taken (select is level-triggered:
        a socket left unaccepted would wake the loop at once, forever)."""
        want = (not self.closed and len(self.connections) < MAX_CONNECTIONS and self.paused_until is None)
        if want and not self.accepting:
            self.watcher.register(self.fd, self.accept_handler)
        elif not want and self.accepting:
            self.watcher.unregister(self.fd, self.accept_handler)
        self.accepting = want
        if len(self.connections) < MAX_CONNECTIONS // 2:
            self.full_logged = False

    def forget(self, connection: StatusConnection) -> None:
        """A connection closed: its room is free again."""
        if self.connections.get(connection.fd) is connection:
            del self.connections[connection.fd]
        self.update_accepting()

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        """When the watcher must wake for this listener next: a connection's deadline, the end of a pause."""
        times = [c.deadline for c in self.connections.values()]
        if self.paused_until is not None:
            times.append(self.paused_until)
        return min(times) if times else None

    def expire(self, now: float) -> None:
        """Close the connections past their deadline; accept again after a pause."""
        for connection in [c for c in self.connections.values() if c.deadline <= now]:
            connection.expire()
        if self.paused_until is not None and self.paused_until <= now:
            self.paused_until = None
            self.update_accepting()

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Close every connection and the socket (its file too, as a pool's own socket)."""
        if self.closed:
            return
        self.closed = True
        self.watcher.remove_timer(self.next_deadline)
        for connection in list(self.connections.values()):
            connection.close()
        self.update_accepting()
        self.sock.close()
        if self.address.path:
            with contextlib.suppress(OSError):
                os.unlink(self.address.path)


class StatusConnection:
    """One client of a StatusListener: its buffers, record state and deadline, never blocking."""

    def __init__(self, listener: StatusListener, sock: socket.socket, peer: str, now: float) -> None:
        self.listener = listener
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.inbuf = bytearray()
        self.out = bytearray()
        self.params = bytearray()
        self.phase = IDLE
        self.request_id = 0
        self.keep_conn = False
        self.refused: deque[int] = deque(maxlen=8)  # refused request ids whose records are dropped
        self.received = False        # any byte at all arrived
        self.eof = False             # the peer shut its side
        self.finishing = False       # close once the output is sent
        self.closed = False
        self.reading = self.writing = False
        # The watcher tells handlers apart by identity: each bound method is made once.
        self.read_handler, self.write_handler = self.on_readable, self.on_writable
        self.deadline = now + listener.timeout

    # ------------------------------------------------------------------ I/O

    def on_readable(self) -> None:
        """Read what arrived (never more than IN_CAP buffered), then act on it."""
        if self.closed:
            return
        try:
            data = self.sock.recv(min(65536, IN_CAP - len(self.inbuf)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close_quietly(f"reading failed: {exc.strerror or exc}")
            return
        if data:
            self.received = True
            self.inbuf += data
        else:
            self.eof = True
        self.step()

    def on_writable(self) -> None:
        """The peer can take more of its answers."""
        if not self.closed:
            self.step()

    def step(self) -> None:
        """Handle the complete records buffered, send what can be sent, and watch for what is next."""
        try:
            self.handle_records()
            self.flush()
        except Exception:  # a bug here must cost this connection, never the master
            self.listener.log.exception(f"{self.listener.label}: answering {self.peer} failed")
            self.close()
        if self.closed:
            return
        want_read = (not (self.eof or self.finishing) and len(self.inbuf) < IN_CAP
                     and len(self.out) < OUT_HIGH)
        watcher = self.listener.watcher
        if want_read != self.reading:
            if want_read:
                watcher.register(self.fd, self.read_handler)
            else:
                watcher.unregister(self.fd, self.read_handler)
            self.reading = want_read
        want_write = bool(self.out)
        if want_write != self.writing:
            if want_write:
                watcher.register_writable(self.fd, self.write_handler)
            else:
                watcher.unregister_writable(self.fd, self.write_handler)
            self.writing = want_write

    def flush(self) -> None:
        """Send as much output as the socket takes now; close once all is sent if finishing."""
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.close_quietly(f"sending failed: {exc.strerror or exc}")
                return
            del self.out[:sent]
        if self.finishing and not self.closed:
            self.close()

    def handle_records(self) -> None:
        """Act on each complete record in the input, until the output is over OUT_HIGH."""
        offset = 0
        try:
            while not self.closed and self.phase != AFTER and len(self.out) < OUT_HIGH:
                record = fcgi.parse_record(self.inbuf, offset)
                if record is None:
                    break
                offset += record.size
                self.on_record(record)
            while self.phase == AFTER and not self.closed:
                # Served without FCGI_KEEP_CONN: the requests queued behind it hear CANT_MPX_CONN
                # (as the workers' refuse_queued) rather than see the connection vanish.
                record = fcgi.parse_record(self.inbuf, offset)
                if record is None:
                    break
                offset += record.size
                if record.type == fcgi.BEGIN_REQUEST and record.request_id not in self.refused:
                    self.refuse(record.request_id, fcgi.CANT_MPX_CONN)
        except fcgi.ProtocolError as exc:
            self.fail(str(exc))
            return
        del self.inbuf[:offset]
        if self.phase == AFTER:
            self.finishing = True
        elif self.eof and not self.finishing and len(self.out) < OUT_HIGH:
            if self.phase == PARAMS or self.inbuf:
                self.warn("the client closed the connection mid-request")
            self.finishing = True

    # ------------------------------------------------------------------ the record rules

    def on_record(self, record: fcgi.Record) -> None:
        """One record, by the worker's rules (FcgiConnection.rule); ProtocolError closes."""
        kind, rid = record.type, record.request_id
        if rid == fcgi.NULL_REQUEST_ID:
            self.management(record)
            return
        fcgi.check_header(kind, rid, len(record.content))
        current = self.phase != IDLE and rid == self.request_id
        if kind == fcgi.BEGIN_REQUEST:
            if self.phase == IDLE:
                self.begin(rid, record.content)
            elif current:
                raise fcgi.ProtocolError(f"a second BEGIN_REQUEST for request id {rid}")
            else:
                self.refuse(rid, fcgi.CANT_MPX_CONN)  # FCGI_MPXS_CONNS is 0, as the workers'
        elif not current and rid in self.refused:
            pass  # a refused request's PARAMS and STDIN
        elif kind == fcgi.ABORT_REQUEST and (current or self.phase == IDLE):
            if current:
                self.abort()
            # in IDLE: it crossed our END_REQUEST on the wire, which is no error
        elif not current:
            raise fcgi.ProtocolError(f"record type {kind} for unknown request id {rid}")
        elif kind == fcgi.PARAMS and self.phase == PARAMS:
            self.add_params(record.content)
        elif kind == fcgi.STDIN and self.phase == BODY:
            if not record.content:  # the body's end; its content is never looked at
                self.end_request()
        elif self.phase == PARAMS:
            raise fcgi.ProtocolError(f"record type {kind} before the end of PARAMS")
        else:
            raise fcgi.ProtocolError(f"record type {kind} for request id {rid} in the body")

    def management(self, record: fcgi.Record) -> None:
        """A record with request id 0: GET_VALUES answered as the workers answer it, else UNKNOWN_TYPE."""
        if record.type != fcgi.GET_VALUES:
            self.out += fcgi.encode_unknown_type(record.type)
            return
        known = self.listener.get_values
        names = [name for name, _ in fcgi.parse_pairs(record.content)]
        self.out += fcgi.encode_get_values_result([(n, known[n]) for n in names if n in known])

    def begin(self, rid: int, content: bytes) -> None:
        """A BEGIN_REQUEST between requests: a RESPONDER request starts, any other role is refused."""
        role, flags = fcgi.parse_begin_request(content)
        with contextlib.suppress(ValueError):
            self.refused.remove(rid)  # the id is reused: its records are a new request's
        self.keep_conn = bool(flags & fcgi.KEEP_CONN)
        if role != fcgi.RESPONDER:
            self.refuse(rid, fcgi.UNKNOWN_ROLE)
            if not self.keep_conn:
                self.phase = AFTER
            return
        self.request_id, self.phase = rid, PARAMS
        self.params.clear()

    def add_params(self, content: bytes) -> None:
        """More of the params; the empty record ends them and the request is answered at once."""
        if content:
            if len(self.params) + len(content) > self.listener.max_params:
                raise fcgi.ProtocolError(f"request params over the {self.listener.max_params}-byte limit")
            self.params += content
            return
        answer = self.listener.respond(dict(fcgi.parse_pairs(self.params)))
        rid = self.request_id
        self.out += fcgi.encode_stream(fcgi.STDOUT, rid, answer) + fcgi.encode_record(fcgi.STDOUT, rid)
        self.out += fcgi.encode_end_request(rid, 0, fcgi.REQUEST_COMPLETE)
        self.params.clear()
        self.phase = BODY

    def abort(self) -> None:
        """The web server gave up on the current request: ended if not answered yet."""
        if self.phase == PARAMS:
            self.out += fcgi.encode_end_request(self.request_id, 0, fcgi.REQUEST_COMPLETE)
        self.end_request()

    def end_request(self) -> None:
        """The request is over: the next may come (FCGI_KEEP_CONN), with a fresh deadline; else done."""
        if self.keep_conn:
            self.phase = IDLE
            self.deadline = time.monotonic() + self.listener.timeout
        else:
            self.phase = AFTER

    def refuse(self, rid: int, protocol_status: int) -> None:
        """END_REQUEST for a request not served; its records are dropped from here on."""
        self.out += fcgi.encode_end_request(rid, 0, protocol_status)
        with contextlib.suppress(ValueError):
            self.refused.remove(rid)
        self.refused.append(rid)

    # ------------------------------------------------------------------ closing

    def expire(self) -> None:
        """Its deadline passed: closed, and said why unless it was only idle between requests."""
        if not self.received:
            self.warn(f"nothing received within {self.listener.timeout:g}s (idle_timeout)")
        elif self.phase != IDLE or self.inbuf or self.out:
            self.warn(f"the request and its answer did not complete within {self.listener.timeout:g}s "
                      "(idle_timeout)")
        self.close()

    def warn(self, why: str) -> None:
        """Why this connection is being closed, in the pool's error log."""
        self.listener.log.warning(f"{self.listener.label}: closing the connection from {self.peer}: {why}")

    def fail(self, why: str) -> None:
        """The peer broke the protocol: logged and closed."""
        self.warn(why)
        self.close()

    def close_quietly(self, why: str) -> None:
        """The peer went away (a reset, a broken pipe): worth a debug line only."""
        self.listener.log.debug(f"{self.listener.label}: connection from {self.peer}: {why}")
        self.close()

    def close(self) -> None:
        """Stop watching the socket, close it, and give its room back to the listener."""
        if self.closed:
            return
        self.closed = True
        watcher = self.listener.watcher
        watcher.unregister(self.fd, self.read_handler)
        watcher.unregister_writable(self.fd, self.write_handler)
        self.sock.close()
        self.listener.forget(self)

