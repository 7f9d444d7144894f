# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The worker's hot loop: accept, read, parse, build environ, call the app, write, end request.

Everything between accept and close lives here and in the C codec (csrc/fcgi.c); policy (what to
log, when to stop, what the configuration says) comes in from fastfpm/worker.py as plain values and
callables that are only called on error paths. The module also exposes the C codec with the same
API as fastfpm/protocol.py, so the codec tests run against both.

One compiled module made of parts, each in its own file (docs/architecture.md draws them):

    _codec.pxi     the C codec's Python API (trampolines)
    _environ.pxi   EnvironBuilder and its PathPolicy: params to environ
    _slot.pxi      SlotWriter: the scoreboard stage writes
    _conn.pxi      Connection (socket, buffer, deadlines) and FcgiConnection (the record rules)
    _response.pxi  Response (PEP 3333) and FcgiResponse (STDOUT/END_REQUEST framing)
    _loop.pxi      ConnectionLoop: accept, epoll, kept-alive connections
    _accesslog.pxi AccessLog: access.format compiled, one line written per request
    _core.pyx      Worker: a request's stages in order, over those parts

Included rather than split into modules: the parts are final classes of one module, so calls
between them are direct C calls the compiler can inline.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Copy, PyDict_SetItem
from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, memset

import sys

from fastfpm.protocol import ProtocolError, Record

cdef extern from "Python.h":
    dict _PyDict_NewPresized(Py_ssize_t minused)
    bint PyUnicode_IS_ASCII(object o)
    int PyUnicode_KIND(object o)
    void *PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    int PyUnicode_1BYTE_KIND


include "_codec.pxi"


# ---------------------------------------------------------------------------------------------------
# Errors raised inside a request. Both end the request without a 500: the peer is gone or said stop.

class RequestAborted(OSError):
    """The web server aborted the request (FCGI_ABORT_REQUEST) or closed the connection mid-request."""


class ConnectionLost(OSError):
    """Writing the response failed: the web server went away (EPIPE, ECONNRESET)."""


class RequestBodyTooLarge(OSError):
    """wsgi.input: the body ran past the pool's client_max_body_size (no CONTENT_LENGTH announced
    it). An app that lets it propagate gets a 413 answered for it, if no headers went out yet."""


class FileWrapper:
    """wsgi.file_wrapper: iterate a file-like object in blocks, close it when the response ends."""

    def __init__(self, filelike, blksize=65536):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        read = self.filelike.read
        size = self.blksize
        while True:
            block = read(size)
            if not block:
                return
            yield block


cdef inline int64_t mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t wall_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000 + ts.tv_nsec // 1000


include "_environ.pxi"
include "_slot.pxi"
include "_conn.pxi"
include "_response.pxi"
include "_loop.pxi"
include "_accesslog.pxi"


# A lingering worker (Worker.serve_waiting) closes a kept connection nginx left idle this long.
cdef enum:
    LINGER_QUIET_MS = 200


cdef class Worker:
    """One worker process's request loop: a request's stages in order, over the parts above.

    Created by fastfpm.worker, which owns all policy; what the parts need of it comes in as plain
    values and the log callables.
    """
    cdef object app
    cdef list routes                 # [(request path as bytes, WSGI app)]: served instead of app
    cdef object log                  # log(level: str, message: str), error paths only
    cdef object log_exception        # log_exception(message: str) with the current traceback
    cdef Limits limits
    cdef ConnectionLoop loop
    cdef SlotWriter slot
    cdef EnvironBuilder request
    cdef FcgiResponse response
    cdef AccessLog access_log        # None when the pool has no access.log
    cdef public bint stopping
    cdef public uint64_t max_requests
    cdef public uint64_t max_memory  # pm.max_memory in bytes, against the peak resident set; 0: off
    cdef public bint over_memory     # a request's end found the peak over max_memory: it was the last
    cdef public uint64_t served
    cdef public uint32_t linger_ms   # a graceful stop waits this long for kept connections' requests
    cdef bint lingering              # meanwhile: kept connections stay open until nginx closes them

    def __init__(self, int listen_fd, app, *, dict environ_template, log, log_exception,
                 scoreboard=None, Py_ssize_t slot_index=0, double idle_timeout=5.0,
                 double header_timeout=10.0, double body_timeout=60.0, double read_timeout=60.0,
                 double first_byte_grace=0.05,
                 Py_ssize_t max_params_size=65536, str mount="",
                 int max_conns=1, uint64_t max_requests=0, uint64_t max_memory=0,
                 client_filter=None, int parent_pid=0,
                 dict routes=None, AccessLog access_log=None, protocol_log=None,
                 bint keep_http_proxy=False, int64_t max_body_size=0, bint script_paths=False):
        """Bind the loop to a listen socket, an app and (optionally) a scoreboard slot.

        client_filter(fd) -> bool, when given, is asked about every accepted connection
        (listen.allowed_clients); a refused one is closed before anything is read. With
        parent_pid, the loop stops once that process is no longer its parent (the master died).
        routes maps request paths to WSGI apps served instead of app (the status page, ping): the
        path is the whole request path (REQUEST_URI's, percent-decoded), before --mount is cut.
        protocol_log (default: log) takes the line of a connection closed on malformed input.
        keep_http_proxy: leave HTTP_PROXY (the Proxy header, httpoxy) in the environ.
        max_memory: after a request that leaves the worker's peak resident set above this many
        bytes, the worker serves no more (serve() returns "max_memory"); 0: no limit.
        max_body_size: the largest request body the app is given, in bytes (0: no limit).
        script_paths: SCRIPT_NAME and PATH_INFO as the web server sent them (script mode,
        ScriptPathPolicy) instead of mount's split of the request path.
        A new connection with nothing to read yet is waited for first_byte_grace seconds, then
        waits among the loop's other connections (see fastfpm.worker.first_byte_grace).
        """
        self.app = app
        self.routes = [(path.encode("latin-1"), route_app) for path, route_app in (routes or {}).items()]
        self.log = log
        self.log_exception = log_exception
        self.max_requests = max_requests
        self.max_memory = max_memory
        self.limits = Limits()
        self.limits.idle_timeout_ms = <int>(idle_timeout * 1000)
        self.limits.first_byte_grace_ms = <int>(first_byte_grace * 1000)
        self.limits.header_timeout_ms = <int>(header_timeout * 1000)
        self.limits.body_timeout_ms = <int>(body_timeout * 1000)
        self.limits.read_timeout_ms = <int>(read_timeout * 1000)
        self.limits.max_body_size = max_body_size
        self.limits.log = log
        self.limits.protocol_log = protocol_log if protocol_log is not None else log
        limit = str(max_conns).encode()
        self.limits.get_values = {b"FCGI_MAX_CONNS": limit, b"FCGI_MAX_REQS": limit, b"FCGI_MPXS_CONNS": b"0"}
        self.slot = SlotWriter()
        if scoreboard is not None:
            self.slot.attach(scoreboard, slot_index)
        self.limits.header = self.slot.header
        self.request = EnvironBuilder(environ_template,
                                      ScriptPathPolicy() if script_paths else PathPolicy(mount),
                                      max_params_size, keep_http_proxy)
        self.response = FcgiResponse()
        self.loop = ConnectionLoop()
        self.loop.listen_fd = listen_fd
        self.loop.connection_type = FcgiConnection
        self.loop.limits = self.limits
        self.loop.header = self.slot.header
        self.loop.client_filter = client_filter
        self.loop.parent_pid = parent_pid
        self.access_log = access_log

    def mark_ending(self):
        """Tell the master this worker is on its way out."""
        self.slot.ending()

    @property
    def peak_memory(self):
        """The worker's peak resident set in bytes, as the last request's end measured it."""
        return self.slot.peak_memory

    cdef inline bint may_serve_more(self) noexcept:
        return not self.over_memory and (self.max_requests == 0 or self.served < self.max_requests)

    cdef inline bint last_request(self) noexcept:
        """Whether the request being served is this worker's last (stopping, max_requests, or its
        end found the peak over max_memory)."""
        return (self.stopping or self.over_memory
                or (self.max_requests != 0 and self.served + 1 >= self.max_requests))

    cdef inline void check_memory(self) noexcept:
        """Past pm.max_memory, the request being served is the last. The figure is the peak the
        slot measured at the request's end (ru_maxrss): no system call of its own."""
        if self.max_memory != 0 and self.slot.peak_memory > self.max_memory:
            self.over_memory = True

    def serve(self):
        """Accept and serve connections until stopping is set or max_requests or max_memory is reached.

        A connection whose web server asked to keep it (FCGI_KEEP_CONN) goes back to the loop's
        idle set after its request, and so does one whose request has not (all) arrived yet: neither
        pins this worker (see ConnectionLoop).
        """
        cdef Connection conn
        cdef bint wait
        try:
            while not self.stopping and self.may_serve_more():
                self.slot.idle()
                conn = self.loop.next_ready()
                if self.loop.orphaned:
                    self.stopping = True
                if conn is None:
                    continue
                try:
                    wait = self.serve_connection(<FcgiConnection>conn)
                except BaseException:
                    self.loop.discard(conn)
                    raise
                if wait and not conn.broken and not self.stopping and self.may_serve_more():
                    self.loop.keep(conn)
                else:
                    self.loop.discard(conn)
            self.serve_waiting()
        finally:
            self.loop.discard_kept()
        if self.stopping:
            return "stopping"
        return "max_memory" if self.over_memory else "max_requests"

    cdef int serve_waiting(self) except -1:
        """On the way out (a graceful stop, a reload, max_requests, max_memory): serve the requests
        already sent on kept connections before they are closed.

        nginx sends a request on whichever idle kept connection it holds, and the connection
        belongs to the worker that accepted it: while that worker serves another request, the new
        one waits in the connection's buffer. Closed unread, the connection is reset, and nginx
        fails a POST sent on it rather than send it twice (a GET it retries). One request per
        connection, each connection then closed; what arrives after this look is the keep-alive
        race every server has, which nginx's keepalive_timeout below idle_timeout keeps rare.
        """
        cdef Connection conn
        cdef int64_t until = 0
        cdef bint wait
        if self.stopping and self.linger_ms:
            # listen.reuseport (a hand-over): nginx keeps sending on the kept connections it holds,
            # and a server's close races its next request on one (on a unix socket even right after
            # an answer: the end cannot leave with it, as TCP_CORK makes it on TCP). So for
            # linger_ms the connections are served and kept, for nginx to close them itself
            # (keepalive_requests, keepalive_timeout: its closes race nothing), and only one quiet
            # for LINGER_QUIET_MS is closed here. Then each is served once more and closed.
            until = mono_ns() + <int64_t>self.linger_ms * 1000000
            self.lingering = True
        while True:
            if self.lingering and mono_ns() >= until:
                self.lingering = False
            conn = self.loop.pending_kept()
            if conn is None:
                if not self.lingering or not self.loop.kept:
                    self.lingering = False
                    return 0
                self.loop.close_idle_since(mono_ns() + <int64_t>self.limits.idle_timeout_ms * 1000000
                                           - <int64_t>LINGER_QUIET_MS * 1000000)
                poll(NULL, 0, 1)
                continue
            try:
                wait = self.serve_connection(<FcgiConnection>conn)
            except BaseException:
                self.loop.discard(conn)
                raise
            if wait and self.lingering and not conn.broken:
                self.loop.keep(conn)
            else:
                self.loop.discard(conn)

    cdef int serve_connection(self, FcgiConnection c) except -1:
        """Serve the requests that have arrived on c: 1 wait for more on it in the loop (kept alive,
        or its next request not all here yet), 0 close it."""
        cdef int got
        while True:
            got = c.read_request_head(self.request, self.slot)
            if got == HEAD_WAIT:
                return 1
            if got <= 0:
                c.keep_conn = False
                return 0
            self.handle_request(c)
            self.served += 1
            if c.broken:
                return 0
            if not c.keep_conn or (self.stopping and not self.lingering):
                if c.rend > c.rstart:
                    c.refuse_queued()
                if c.keep_conn:
                    c.end_output()  # see finish_request
                return 0
            if not self.may_serve_more():
                c.end_output()
                return 0
            if c.rend == c.rstart:
                return 1  # nothing more buffered: back to the idle set until the next request
            # The web server already sent the next request (pipelined): serve it now.

    # ------------------------------------------------------------------ a request's stages

    cdef int handle_request(self, FcgiConnection c) except -1:
        """One request whose params are in: environ, run the app, finish the response, end it."""
        cdef bint failed
        env = self.start_request(c)
        if env is None:
            self.slot.request_done()
            return 0
        try:
            self.slot.running(self.request, c.content_length, c.keep_conn)
            if self.limits.max_body_size and c.content_length > self.limits.max_body_size:
                failed = self.refuse_body(c, env)
            else:
                failed = self.run_app(c, env, self.app_for_request() if self.routes else self.app)
            c.request_serial += 1  # the app's wsgi.input reads nothing more from here on
            if not c.broken:
                self.finish_request(c, env, failed)
        finally:
            self.response.end()
        # The request's end, then its line, as php-fpm's fpm_request_end() then fpm_log_write():
        # the line's %d, %C and %M are the figures the slot keeps for the status page.
        self.slot.request_done()
        self.check_memory()  # also after a request that had no "Finishing" (finish_request's check)
        if self.access_log is not None:
            self.access_log.write_line(self.request, self.response, self.slot, c, env)
        return 0

    cdef object start_request(self, Connection c):
        """Reset the per-request state and build the environ: None when the params are malformed."""
        cdef InputStream stream = InputStream.__new__(InputStream)
        c.request_serial += 1
        stream.conn = c
        stream.serial = c.request_serial
        c.begin_body()
        self.response.begin(c)
        env = self.request.build(stream)
        if env is None:
            c.malformed(self.request.error)
            self.response.end()
            return None
        c.content_length = self.request.content_length
        return env

    cdef object app_for_request(self):
        """A route's app when the request path is one of the routes, else the pool's app."""
        cdef size_t n
        cdef const uint8_t *path = self.request.request_path(&n)
        cdef bytes route_path
        for route_path, route_app in self.routes:
            if <size_t>PyBytes_GET_SIZE(route_path) == n and memcmp(path, PyBytes_AS_STRING(route_path), n) == 0:
                return route_app
        return self.app

    cdef bint refuse_body(self, Connection c, dict env) except? False:
        """CONTENT_LENGTH is over client_max_body_size: the app is not called, a 413 answers
        (finish_request); True, as for a failed app."""
        c.over_limit = True
        self.log("warning", f"request {describe(env)}: CONTENT_LENGTH {c.content_length} is over the "
                            f"{self.limits.max_body_size}-byte limit (client_max_body_size); answered 413")
        return True

    cdef bint run_app(self, Connection c, dict env, object app) except? True:
        """Call the app and send its body: True when it failed (a 500 follows if nothing was sent)."""
        cdef bint failed = False
        result = None
        try:
            result = app(env, self.response.start_response_cb)
            self.response.send_iterable(result)
        except (RequestAborted, ConnectionLost) as exc:
            failed = True
            if not c.aborted:
                if not c.logged:
                    self.log("warning", f"request {describe(env)} ended early: {exc}")
                c.broken = True
        except (Exception, SystemExit) as exc:
            # SystemExit too: an app that calls sys.exit() in a request fails that request, as
            # any other exception does; it does not take the worker (and its kept connections)
            # down with it.
            failed = True
            if c.over_limit and isinstance(exc, RequestBodyTooLarge):
                # The client's fault, not the app's: one line, no traceback; a 413 if it can be.
                self.log("warning", f"request {describe(env)}: {exc}; " + (
                    "aborting the response" if self.response.headers_sent else "answered 413"))
                c.broken = self.response.headers_sent
            elif self.response.headers_sent:
                self.log_exception(f"the application failed after sending headers for "
                                   f"{describe(env)}; aborting the response")
                c.broken = True
            else:
                self.log_exception(f"the application failed for {describe(env)}")
        finally:
            if result is not None and type(result) is not list and hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    self.log_exception(f"close() of the response iterable failed for {describe(env)}")
        return failed

    cdef int finish_request(self, Connection c, dict env, bint failed) except -1:
        """The 500 (413 for a body over the limit) or the empty head if due, "Finishing",
        END_REQUEST, then the unread body dropped."""
        if failed and not c.aborted:
            self.response.replace_with_error(413 if c.over_limit else 500)
        elif not failed:
            self.response.ensure_head()
        if c.aborted:
            # Unread body and the ABORT record may still sit in the buffer; the connection has
            # no clean next-request boundary, so it ends after END_REQUEST.
            c.keep_conn = False
        self.slot.finishing(self.response.status_code)
        self.check_memory()  # before END_REQUEST, so that its FIN can go with it (below)
        if c.keep_conn and self.last_request():
            # The connection closes after this answer although the web server asked to keep it:
            # END_REQUEST and the FIN leave together (serve_connection sends the FIN), so nginx
            # sees the end with the answer and does not put the connection back in its pool.
            # Closed a moment after the answer instead, nginx has often sent its next request
            # on it already (it reuses the connection it freed last), and fails that request
            # if it is a POST (it does not send a non-idempotent request twice).
            c.hold_output()
        try:
            self.response.finish()
        except ConnectionLost as exc:
            self.log("warning", f"request {describe(env)} ended early: {exc}")
            return 0
        if not c.aborted:
            c.drain_body()
        return 0

    # ------------------------------------------------------------------ the stages without I/O

    def environ_for(self, params):
        """The environ the loop builds for an encoded PARAMS block, without any I/O.

        For tests of the environ rules (paths, PEP 3333's empty-value rules) and for the
        environ micro-benchmark; the serving loop does not use it.
        """
        cdef Py_buffer view
        cdef Connection c
        PyObject_GetBuffer(params, &view, PyBUF_SIMPLE)
        try:
            self.request.clear_params()
            if not self.request.add_params(<const uint8_t *>view.buf, view.len):
                raise ValueError(f"params over the {self.request.max_params_size}-byte limit")
        finally:
            PyBuffer_Release(&view)
        c = self.loop.connection()
        c.reset(-1)
        try:
            env = self.start_request(c)
        finally:
            self.response.end()
            self.loop.discard(c)
        if env is None:
            raise ProtocolError("malformed params")
        return env

    def response_for(self, status, headers, body, int request_id=1):
        """The bytes the loop sends for a list-of-chunks response (head, body, END_REQUEST), no I/O.

        The same start_response, header checks and record framing as a served request, for tests
        and the response-path micro-benchmark. The body must stay under the 256 KiB at which the
        loop would flush to a socket.
        """
        cdef FcgiConnection c = <FcgiConnection>self.loop.connection()
        c.reset(-1)
        c.request_id = request_id
        self.response.begin(c)
        try:
            self.response.start_response(status, headers)
            for chunk in body:
                self.response.body_chunk(chunk)
            self.response.ensure_head()
            self.response.frame_end()
            return PyBytes_FromStringAndSize(<char *>self.response.wbuf, self.response.wlen)
        finally:
            self.response.end()
            self.loop.discard(c)


cdef str describe(dict env):
    """A request as log lines name it: method and URI."""
    return f"{env.get('REQUEST_METHOD', '?')} {env.get('REQUEST_URI', env.get('PATH_INFO', '?'))}"
