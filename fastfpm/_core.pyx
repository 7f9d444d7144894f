# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The worker's hot loop: accept, read, parse, build environ, call the app, write, end request.

Everything between accept and close lives here and in the C codec (csrc/fcgi.c); policy (what to
log, when to stop, what the configuration says) comes in from fastfpm/worker.py as plain values and
callables that are only called on error paths. The module also exposes the C codec with the same
API as fastfpm/protocol.py, so the codec tests run against both.
"""

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
    int _PyBytes_Resize(PyObject **bytes, Py_ssize_t newsize) except -1
    bint PyUnicode_IS_ASCII(object o)
    int PyUnicode_KIND(object o)
    void *PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    int PyUnicode_1BYTE_KIND


# ---------------------------------------------------------------------------------------------------
# The codec, with fastfpm.protocol's API (thin trampolines over csrc/fcgi.c).

VERSION_1 = FCGI_VERSION_1
HEADER_LEN = FCGI_HEADER_LEN
MAX_CONTENT = FCGI_MAX_CONTENT
BEGIN_REQUEST = FCGI_BEGIN_REQUEST
ABORT_REQUEST = FCGI_ABORT_REQUEST
END_REQUEST = FCGI_END_REQUEST
PARAMS = FCGI_PARAMS
STDIN = FCGI_STDIN
STDOUT = FCGI_STDOUT
STDERR = FCGI_STDERR
DATA = FCGI_DATA
GET_VALUES = FCGI_GET_VALUES
GET_VALUES_RESULT = FCGI_GET_VALUES_RESULT
UNKNOWN_TYPE = FCGI_UNKNOWN_TYPE
RESPONDER = FCGI_RESPONDER
AUTHORIZER = FCGI_AUTHORIZER
FILTER = FCGI_FILTER
KEEP_CONN = FCGI_KEEP_CONN
REQUEST_COMPLETE = FCGI_REQUEST_COMPLETE
CANT_MPX_CONN = FCGI_CANT_MPX_CONN
OVERLOADED = FCGI_OVERLOADED
UNKNOWN_ROLE = FCGI_UNKNOWN_ROLE


def parse_record(buf, Py_ssize_t offset=0):
    """Parse one record at buf[offset:]: a Record, or None when more bytes are needed."""
    cdef Py_buffer view
    cdef fcgi_header hdr
    cdef long rc
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if offset < 0 or offset > view.len:
            raise ValueError("offset out of range")
        rc = fcgi_parse_record(<const uint8_t *>view.buf + offset, view.len - offset, &hdr)
        if rc == FCGI_NEED_MORE:
            return None
        if rc == FCGI_ERR_VERSION:
            raise ProtocolError(f"unsupported FastCGI version {(<const uint8_t *>view.buf)[offset]}")
        content = PyBytes_FromStringAndSize(<char *>view.buf + offset + FCGI_HEADER_LEN, hdr.content_length)
        return Record(hdr.type, hdr.request_id, content, rc)
    finally:
        PyBuffer_Release(&view)


def parse_pairs(content):
    """Parse FastCGI name/value pairs into a list of (name, value) bytes tuples."""
    cdef Py_buffer view
    cdef size_t pos = 0, noff, nlen, voff, vlen
    cdef long rc
    cdef const uint8_t *base
    pairs = []
    PyObject_GetBuffer(content, &view, PyBUF_SIMPLE)
    try:
        base = <const uint8_t *>view.buf
        while pos < <size_t>view.len:
            rc = fcgi_parse_pair(base + pos, view.len - pos, &noff, &nlen, &voff, &vlen)
            if rc < 0:
                raise ProtocolError(f"truncated name/value pair at offset {pos}")
            pairs.append((PyBytes_FromStringAndSize(<char *>base + pos + noff, nlen),
                          PyBytes_FromStringAndSize(<char *>base + pos + voff, vlen)))
            pos += rc
        return pairs
    finally:
        PyBuffer_Release(&view)


def encode_pairs(pairs):
    """Encode (name, value) bytes pairs, 1-byte lengths below 128 and 4-byte lengths above."""
    cdef bytes name, value
    cdef size_t size = 0
    items = [(bytes(n), bytes(v)) for n, v in pairs]
    for name, value in items:
        if len(name) > 0x7FFFFFFF or len(value) > 0x7FFFFFFF:
            raise ValueError("name/value longer than 2**31 - 1 bytes")
        size += fcgi_pair_size(len(name), len(value))
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t *dst = <uint8_t *>PyBytes_AS_STRING(out)
    for name, value in items:
        dst += fcgi_write_pair(dst, <const uint8_t *>PyBytes_AS_STRING(name), len(name),
                               <const uint8_t *>PyBytes_AS_STRING(value), len(value))
    return out


def encode_record(int record_type, int request_id, content=b""):
    """Encode one record, padded to a multiple of 8 bytes."""
    cdef bytes data = bytes(content)
    cdef size_t n = len(data)
    if n > FCGI_MAX_CONTENT:
        raise ValueError(f"record content of {n} bytes is over {FCGI_MAX_CONTENT}")
    out = PyBytes_FromStringAndSize(NULL, FCGI_HEADER_LEN + n + fcgi_padding(n))
    fcgi_write_record(<uint8_t *>PyBytes_AS_STRING(out), record_type, request_id,
                      <const uint8_t *>PyBytes_AS_STRING(data), n)
    return out


def encode_stream(int record_type, int request_id, data):
    """Frame data as stream records of at most 65535 bytes each; b"" for empty data."""
    cdef bytes raw = bytes(data)
    cdef size_t n = len(raw)
    out = PyBytes_FromStringAndSize(NULL, fcgi_stream_size(n))
    fcgi_write_stream(<uint8_t *>PyBytes_AS_STRING(out), record_type, request_id,
                      <const uint8_t *>PyBytes_AS_STRING(raw), n)
    return out


def check_header(int record_type, int request_id, int content_length):
    """Raise ProtocolError when a record header breaks a rule that needs no connection state."""
    cdef fcgi_header hdr
    cdef int rc
    hdr.version = FCGI_VERSION_1
    hdr.type = <uint8_t>record_type
    hdr.request_id = <uint16_t>request_id
    hdr.content_length = <uint16_t>content_length
    hdr.padding_length = 0
    rc = fcgi_check_header(&hdr)
    if rc == FCGI_ERR_REQUEST_ID:
        raise ProtocolError(f"management record type {record_type} with request id {request_id}")
    if rc == FCGI_ERR_LENGTH:
        raise ProtocolError(f"record type {record_type} with a {content_length}-byte body, expected 8")


def encode_begin_request(int request_id, int role=FCGI_RESPONDER, int flags=0):
    """A BEGIN_REQUEST record."""
    out = PyBytes_FromStringAndSize(NULL, 16)
    fcgi_write_begin_request(<uint8_t *>PyBytes_AS_STRING(out), request_id, role, flags)
    return out


def parse_begin_request(content):
    """(role, flags) from a BEGIN_REQUEST body."""
    cdef bytes body = bytes(content)
    cdef int role, flags
    if fcgi_parse_begin_request(<const uint8_t *>PyBytes_AS_STRING(body), len(body), &role, &flags) < 0:
        raise ProtocolError(f"BEGIN_REQUEST body of {len(body)} bytes, expected 8")
    return role, flags


def encode_end_request(int request_id, uint32_t app_status=0, int protocol_status=FCGI_REQUEST_COMPLETE):
    """An END_REQUEST record."""
    out = PyBytes_FromStringAndSize(NULL, 16)
    fcgi_write_end_request(<uint8_t *>PyBytes_AS_STRING(out), request_id, app_status, protocol_status)
    return out


def parse_end_request(content):
    """(app_status, protocol_status) from an END_REQUEST body."""
    cdef bytes body = bytes(content)
    if len(body) != 8:
        raise ProtocolError(f"END_REQUEST body of {len(body)} bytes, expected 8")
    return int.from_bytes(body[:4], "big"), body[4]


def encode_unknown_type(int record_type):
    """An UNKNOWN_TYPE reply to a management record we do not know."""
    out = PyBytes_FromStringAndSize(NULL, 16)
    fcgi_write_unknown_type(<uint8_t *>PyBytes_AS_STRING(out), record_type)
    return out


def encode_get_values(names):
    """A GET_VALUES query for the given variable names."""
    return encode_record(FCGI_GET_VALUES, 0, encode_pairs([(bytes(n), b"") for n in names]))


def encode_get_values_result(pairs):
    """A GET_VALUES_RESULT record."""
    return encode_record(FCGI_GET_VALUES_RESULT, 0, encode_pairs(pairs))


# ---------------------------------------------------------------------------------------------------
# Errors raised inside a request. Both end the request without a 500: the peer is gone or said stop.

class RequestAborted(OSError):
    """The web server aborted the request (FCGI_ABORT_REQUEST) or closed the connection mid-request."""


class ConnectionLost(OSError):
    """Writing the response failed: the web server went away (EPIPE, ECONNRESET)."""


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


# ---------------------------------------------------------------------------------------------------
# Small C helpers.

cdef inline int64_t mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t wall_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000 + ts.tv_nsec // 1000


cdef inline int hexval(uint8_t c) noexcept nogil:
    if c >= c'0' and c <= c'9':
        return c - c'0'
    if c >= c'a' and c <= c'f':
        return c - c'a' + 10
    if c >= c'A' and c <= c'F':
        return c - c'A' + 10
    return -1


cdef size_t percent_decode(const uint8_t *src, size_t n, uint8_t *dst) noexcept nogil:
    """%XX-decode src into dst (room for n bytes); malformed escapes are kept as they are."""
    cdef size_t i = 0, j = 0
    cdef int hi, lo
    while i < n:
        if src[i] == c'%' and i + 2 < n:
            hi = hexval(src[i + 1])
            lo = hexval(src[i + 2])
            if hi >= 0 and lo >= 0:
                dst[j] = <uint8_t>(hi * 16 + lo)
                j += 1
                i += 3
                continue
        dst[j] = src[i]
        j += 1
        i += 1
    return j


# Environ keys seen on the wire are decoded once and kept: a request from nginx repeats the same
# twenty-odd names, so most requests create no key strings at all. Bounded, so a client sending
# random header names cannot grow it.
cdef enum:
    KEY_CACHE_SIZE = 512
    KEY_MAX_LEN = 48

# What a param means to the loop beyond being copied into environ.
cdef enum:
    K_PLAIN = 0
    K_CONTENT_TYPE
    K_CONTENT_LENGTH
    K_REQUEST_URI
    K_SCRIPT_NAME
    K_PATH_INFO
    K_HTTPS
    K_REQUEST_SCHEME
    K_REQUEST_METHOD
    K_QUERY_STRING
    K_SCRIPT_FILENAME
    K_DROP
    K_COUNT

cdef enum:
    VALUE_MAX_LEN = 80       # values up to this long are remembered per key (Host, User-Agent ...)

cdef struct KeyEntry:
    uint64_t hash
    size_t length
    char name[KEY_MAX_LEN]
    PyObject *key
    int kind
    # The value this key had last time, as bytes and as the str handed to the app: most params
    # (SERVER_NAME, DOCUMENT_ROOT, HTTP_HOST, HTTP_USER_AGENT ...) repeat from request to request,
    # and an immutable str can be shared instead of decoded again.
    size_t value_length
    char value[VALUE_MAX_LEN]
    PyObject *value_str

_SPECIAL_KEYS = {
    b"CONTENT_TYPE": K_CONTENT_TYPE, b"CONTENT_LENGTH": K_CONTENT_LENGTH, b"REQUEST_URI": K_REQUEST_URI,
    b"SCRIPT_NAME": K_SCRIPT_NAME, b"PATH_INFO": K_PATH_INFO, b"HTTPS": K_HTTPS,
    b"REQUEST_SCHEME": K_REQUEST_SCHEME, b"REQUEST_METHOD": K_REQUEST_METHOD,
    b"QUERY_STRING": K_QUERY_STRING, b"SCRIPT_FILENAME": K_SCRIPT_FILENAME,
    # nginx passes every request header as HTTP_*, Content-Type and Content-Length included, but
    # CGI (RFC 3875 4.1.18) and PEP 3333 carry those two only as CONTENT_TYPE/CONTENT_LENGTH.
    b"HTTP_CONTENT_TYPE": K_DROP, b"HTTP_CONTENT_LENGTH": K_DROP,
}


cdef inline uint64_t key_hash(const uint8_t *p, size_t n) noexcept nogil:
    """A cheap hash of a param name: its length and its first and last 8 bytes, mixed.

    Names are short and a hit is confirmed with memcmp, so this only has to spread the few dozen
    names a web server sends; hashing every byte cost more than the rest of the lookup.
    """
    cdef uint64_t head = 0, tail = 0
    if n >= 8:
        memcpy(&head, p, 8)
        memcpy(&tail, p + n - 8, 8)
    else:
        memcpy(&head, p, n)
    cdef uint64_t h = (head * 0x9E3779B97F4A7C15ULL) ^ (tail + n) * 0xC2B2AE3D27D4EB4FULL
    h ^= h >> 29
    return h | 1  # never 0: 0 marks an empty entry


cdef enum:
    REFUSED_KEPT = 8        # refused request ids a connection remembers
    MAX_KEPT = 64           # idle kept-alive connections one worker holds at most
    PREDICTED_PARAMS = 64
    ENVIRON_ROOM = 64       # entries an environ holds without growing (nginx sends about 30 params)
    RBUF_SIZE = 131072      # holds the largest record (8 + 65535 + 255 bytes) twice over
    WBUF_INITIAL = 65536
    FLUSH_AT = 262144       # send once this much response is buffered
cdef size_t NO_RECORD = <size_t>-1

cdef bytes STATUS_500 = (b"Status: 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Length: 22\r\n\r\nInternal Server Error\n")


cdef class Connection:
    """One accepted FastCGI connection: its receive buffer and the state of its current request."""
    cdef int fd
    cdef uint8_t *rbuf
    cdef size_t rstart, rend
    cdef int request_id
    cdef bint keep_conn
    cdef bint broken          # malformed input or I/O error: close without further ado
    cdef bint logged          # the reason for closing is already in the log
    cdef bint fresh           # accepted just now (counted in the slot's accepted_conn)
    cdef bint watched         # in the worker's epoll set
    cdef int64_t idle_deadline_ns  # while kept idle: when it is closed
    # request body (FCGI_STDIN) streaming state
    cdef size_t stdin_left    # content bytes left in the current STDIN record
    cdef size_t stdin_pad     # padding bytes left after it
    cdef bint stdin_done      # the empty STDIN record has been read
    cdef int64_t stdin_total
    cdef int64_t content_length
    # Requests refused on this connection (CANT_MPX_CONN, UNKNOWN_ROLE) whose PARAMS and STDIN
    # may still be on their way: dropped unread rather than taken for a protocol error. A ring of
    # the last few; 0 is a free entry (request id 0 is for management records, never refused).
    cdef uint16_t refused[REFUSED_KEPT]
    cdef unsigned refused_next

    def __cinit__(self):
        self.rbuf = <uint8_t *>malloc(RBUF_SIZE)
        if self.rbuf == NULL:
            raise MemoryError()
        self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
        free(self.rbuf)

    cdef void reset(self, int fd) noexcept:
        self.fd = fd
        self.rstart = self.rend = 0
        self.request_id = 0
        self.keep_conn = False
        self.broken = False
        self.watched = False
        self.logged = False
        memset(self.refused, 0, sizeof(self.refused))
        self.refused_next = 0

    cdef inline bint is_refused(self, int request_id) noexcept:
        cdef int i
        for i in range(REFUSED_KEPT):
            if self.refused[i] == request_id:
                return True
        return False

    cdef void forget_refused(self, int request_id) noexcept:
        """A new BEGIN_REQUEST reuses the id: its records are a new request's from here on."""
        cdef int i
        for i in range(REFUSED_KEPT):
            if self.refused[i] == request_id:
                self.refused[i] = 0


cdef class InputStream:
    """wsgi.input: streams FCGI_STDIN records as the app reads, never holding the body whole."""
    cdef Worker worker
    cdef Connection conn
    cdef uint64_t serial

    def read(self, size=-1):
        """Read up to size bytes (all that is left when size is negative or None)."""
        cdef Py_ssize_t want, got = 0, n
        cdef const uint8_t *ptr
        cdef PyObject *raw
        if self.serial != self.worker.request_serial:
            return b""
        if size is None or size < 0:
            chunks = []
            while True:
                n = self.worker.stdin_next(self.conn, 65536, &ptr, False)
                if n == 0:
                    break
                chunks.append(PyBytes_FromStringAndSize(<char *>ptr, n))
            return b"".join(chunks)
        want = size
        if want <= 65536:
            out = PyBytes_FromStringAndSize(NULL, want)
            while got < want:
                n = self.worker.stdin_next(self.conn, want - got, &ptr, False)
                if n == 0:
                    break
                memcpy(PyBytes_AS_STRING(out) + got, ptr, n)
                got += n
            return out if got == want else out[:got]
        # A large n (read(2**31) meaning "everything") must not allocate n bytes up front.
        chunks = []
        while got < want:
            n = self.worker.stdin_next(self.conn, min(want - got, 65536), &ptr, False)
            if n == 0:
                break
            chunks.append(PyBytes_FromStringAndSize(<char *>ptr, n))
            got += n
        return b"".join(chunks)

    def readline(self, size=-1):
        """Read one line, up to size bytes."""
        cdef Py_ssize_t n, limit
        cdef const uint8_t *ptr
        if self.serial != self.worker.request_serial:
            return b""
        chunks = []
        limit = -1 if size is None or size < 0 else size
        while limit != 0:
            n = self.worker.stdin_next(self.conn, 65536 if limit < 0 else limit, &ptr, True)
            if n == 0:
                break
            chunks.append(PyBytes_FromStringAndSize(<char *>ptr, n))
            if limit > 0:
                limit -= n
            if ptr[n - 1] == c'\n':
                break
        return b"".join(chunks)

    def readlines(self, hint=-1):
        """Read lines until EOF, or until about hint bytes were read."""
        lines = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line


cdef class Worker:
    """One worker process's request loop. Created by fastfpm.worker, which owns all policy."""
    cdef int listen_fd
    cdef object app
    cdef ffpm_slot *slot
    cdef object scoreboard_view      # keeps the shared mapping alive
    cdef ffpm_slot dummy_slot        # written when no scoreboard is given (tests, tools)
    cdef ffpm_pool_header *header    # the pool's scoreboard header (the accept lock)
    cdef ffpm_pool_header dummy_header
    cdef dict template
    cdef object log                  # log(level: str, message: str), error paths only
    cdef object log_exception        # log_exception(message: str) with the current traceback
    cdef object client_filter        # None, or client_filter(fd) -> bool (listen.allowed_clients)
    cdef int idle_timeout_ms         # waiting for the start of a request
    cdef int read_timeout_ms         # waiting for the rest of a request
    cdef size_t max_params_size
    cdef bytes mount_bytes
    cdef str mount
    cdef dict get_values          # FCGI_GET_VALUES answers
    cdef bint aborted             # the current request got FCGI_ABORT_REQUEST
    cdef public bint stopping
    cdef public uint64_t max_requests
    cdef public uint64_t served
    cdef int parent_pid              # the master; 0: not checked
    cdef uint64_t request_serial
    cdef object start_response_cb, write_cb
    cdef KeyEntry keys[KEY_CACHE_SIZE]
    # The cache entry of the i-th param of the previous request. A web server sends its params in
    # the same order every time, so checking the predicted entry first skips the hash lookup.
    cdef KeyEntry *key_order[PREDICTED_PARAMS]
    # params of the current request
    cdef uint8_t *pbuf
    cdef size_t plen, pcap
    cdef uint8_t *scratch            # percent-decoding room, as large as pbuf
    cdef size_t voff[K_COUNT]
    cdef size_t vlen[K_COUNT]
    cdef bint vseen[K_COUNT]
    # response
    cdef uint8_t *wbuf
    cdef size_t wlen, wcap, rec_start
    cdef object status
    cdef object headers
    cdef bint headers_sent
    cdef int status_code
    cdef Connection conn
    cdef Connection spare
    cdef list kept                   # idle kept-alive connections, oldest first
    cdef int epfd                    # epoll set: the listen socket and the kept connections
    cdef bint listen_pending         # accepted after an edge: the accept queue may hold more
    cdef int listen_flags            # the listen socket's file status flags, blocking (-1: not read yet)

    def __cinit__(self):
        self.wbuf = <uint8_t *>malloc(WBUF_INITIAL)
        self.wcap = WBUF_INITIAL
        self.pbuf = NULL
        self.scratch = NULL
        self.epfd = -1
        self.listen_flags = -1
        if self.wbuf == NULL:
            raise MemoryError()
        memset(self.keys, 0, sizeof(self.keys))
        memset(self.key_order, 0, sizeof(self.key_order))
        memset(&self.dummy_slot, 0, sizeof(self.dummy_slot))
        self.slot = &self.dummy_slot
        memset(&self.dummy_header, 0, sizeof(self.dummy_header))
        self.header = &self.dummy_header

    def __dealloc__(self):
        cdef size_t i
        for i in range(KEY_CACHE_SIZE):
            if self.keys[i].key != NULL:
                Py_DECREF(<object>self.keys[i].key)
            if self.keys[i].value_str != NULL:
                Py_DECREF(<object>self.keys[i].value_str)
        if self.epfd >= 0:
            close(self.epfd)
        free(self.wbuf)
        free(self.pbuf)
        free(self.scratch)

    def __init__(self, int listen_fd, app, *, dict environ_template, log, log_exception,
                 scoreboard=None, Py_ssize_t slot_index=0, double idle_timeout=5.0,
                 double read_timeout=60.0, Py_ssize_t max_params_size=65536, str mount="",
                 int max_conns=1, uint64_t max_requests=0, client_filter=None, int parent_pid=0):
        """Bind the loop to a listen socket, an app and (optionally) a scoreboard slot.

        client_filter(fd) -> bool, when given, is asked about every accepted connection
        (listen.allowed_clients); a refused one is closed before anything is read. With
        parent_pid, the loop stops once that process is no longer its parent (the master died).
        """
        cdef Py_buffer view
        self.listen_fd = listen_fd
        self.app = app
        # The template is copied for every request. Copying a dict clones its hash table, so a
        # template built with room for a full request's params spares each environ two resizes.
        self.template = _PyDict_NewPresized(ENVIRON_ROOM)
        for name, value in environ_template.items():
            # One by one: dict.update() into an empty dict would adopt the source's small table.
            self.template[name] = value
        self.log = log
        self.log_exception = log_exception
        self.idle_timeout_ms = <int>(idle_timeout * 1000)
        self.read_timeout_ms = <int>(read_timeout * 1000)
        self.max_params_size = max_params_size
        self.pcap = max_params_size + 1024
        self.pbuf = <uint8_t *>malloc(self.pcap)
        self.scratch = <uint8_t *>malloc(self.pcap)
        if self.pbuf == NULL or self.scratch == NULL:
            raise MemoryError()
        self.mount = mount.rstrip("/")
        self.mount_bytes = self.mount.encode("latin-1")
        self.max_requests = max_requests
        self.client_filter = client_filter
        self.parent_pid = parent_pid
        self.rec_start = NO_RECORD
        self.kept = []
        self.start_response_cb = self.start_response
        self.write_cb = self.write
        limit = str(max_conns).encode()
        self.get_values = {b"FCGI_MAX_CONNS": limit, b"FCGI_MAX_REQS": limit, b"FCGI_MPXS_CONNS": b"0"}
        if scoreboard is not None:
            self.scoreboard_view = memoryview(scoreboard)
            PyObject_GetBuffer(scoreboard, &view, PyBUF_SIMPLE)
            try:
                self.slot = ffpm_slots(view.buf) + slot_index
                self.header = <ffpm_pool_header *>view.buf
            finally:
                PyBuffer_Release(&view)


    # ------------------------------------------------------------------ scoreboard (plain stores)

    cdef inline void sb_idle(self) noexcept:
        cdef ffpm_slot *s = self.slot
        if s.stage == FFPM_STAGE_IDLE:
            return  # still idle (a wait timed out): idle_since stays when it began
        ffpm_slot_write_begin(s)
        s.stage = FFPM_STAGE_IDLE
        s.idle_since_ns = mono_ns()
        ffpm_slot_write_end(s)

    cdef inline void sb_reading(self, bint new_connection) noexcept:
        cdef ffpm_slot *s = self.slot
        ffpm_slot_write_begin(s)
        s.stage = FFPM_STAGE_READING_HEADERS
        if new_connection:
            # Counted when the connection brings its first bytes: php-fpm's "accepted conn"
            # counts requests taken in, and a connect-then-close is not one.
            s.accepted_conn += 1
        s.request_start_ns = mono_ns()
        s.request_start_wall_us = wall_us()
        s.status = 0
        s.content_length = -1
        s.method[0] = 0
        s.request_uri[0] = 0
        s.query_string[0] = 0
        s.script_filename[0] = 0
        ffpm_slot_write_end(s)

    cdef inline void sb_info(self) noexcept:
        """php-fpm's "Getting request informations": the params are in, the environ is being built."""
        cdef ffpm_slot *s = self.slot
        ffpm_slot_write_begin(s)
        s.stage = FFPM_STAGE_INFO
        ffpm_slot_write_end(s)

    cdef inline void sb_running(self, int64_t content_length, bint keepalive) noexcept:
        cdef ffpm_slot *s = self.slot
        ffpm_slot_write_begin(s)
        s.stage = FFPM_STAGE_RUNNING
        s.content_length = content_length
        s.keepalive = keepalive
        if self.vseen[K_REQUEST_METHOD]:
            ffpm_copy_field(s.method, FFPM_METHOD_LEN, <char *>self.pbuf + self.voff[K_REQUEST_METHOD],
                            self.vlen[K_REQUEST_METHOD])
        if self.vseen[K_REQUEST_URI]:
            ffpm_copy_field(s.request_uri, FFPM_URI_LEN, <char *>self.pbuf + self.voff[K_REQUEST_URI],
                            self.vlen[K_REQUEST_URI])
        if self.vseen[K_QUERY_STRING]:
            ffpm_copy_field(s.query_string, FFPM_QUERY_LEN, <char *>self.pbuf + self.voff[K_QUERY_STRING],
                            self.vlen[K_QUERY_STRING])
        if self.vseen[K_SCRIPT_FILENAME]:
            ffpm_copy_field(s.script_filename, FFPM_SCRIPT_LEN,
                            <char *>self.pbuf + self.voff[K_SCRIPT_FILENAME], self.vlen[K_SCRIPT_FILENAME])
        ffpm_slot_write_end(s)

    cdef inline void sb_finishing(self) noexcept:
        cdef ffpm_slot *s = self.slot
        ffpm_slot_write_begin(s)
        s.stage = FFPM_STAGE_FINISHING
        s.status = self.status_code
        ffpm_slot_write_end(s)

    cdef inline void sb_request_done(self) noexcept:
        cdef ffpm_slot *s = self.slot
        cdef int64_t now = mono_ns()
        ffpm_slot_write_begin(s)
        s.requests += 1
        s.last_request_ns = now - s.request_start_ns
        ffpm_slot_write_end(s)

    def mark_ending(self):
        """Tell the master this worker is on its way out."""
        ffpm_slot_write_begin(self.slot)
        self.slot.stage = FFPM_STAGE_ENDING
        ffpm_slot_write_end(self.slot)

    # ------------------------------------------------------------------ the loop

    def serve(self):
        """Accept and serve connections until stopping is set or max_requests is reached.

        A worker waits on the listen socket and the kept-alive connections it holds idle
        together (see next_ready): a kept connection with no
        request on it does not pin the worker while others wait (php-fpm's workers stay stuck on
        theirs until the web server sends something or closes).
        """
        cdef Connection conn
        try:
            while not self.stopping and (self.max_requests == 0 or self.served < self.max_requests):
                self.sb_idle()
                conn = self.next_ready()
                if conn is None:
                    continue
                self.conn = conn
                try:
                    self.serve_connection(conn)
                except BaseException:
                    self.discard(conn)
                    raise
                finally:
                    self.conn = None
                if (conn.keep_conn and not conn.broken and not self.stopping
                        and (self.max_requests == 0 or self.served < self.max_requests)):
                    self.keep(conn)
                else:
                    self.discard(conn)
        finally:
            while self.kept:
                self.discard(self.kept.pop())
        return "stopping" if self.stopping else "max_requests"

    cdef void discard(self, Connection conn) noexcept:
        """Close a connection and keep its buffers for the next one."""
        if conn.fd >= 0:
            close(conn.fd)
            conn.fd = -1
        self.spare = conn

    cdef int keep(self, Connection conn) except -1:
        """Hold a kept-alive connection idle until its next request or its idle timeout."""
        cdef Connection oldest
        if not conn.watched:
            self.watch(conn.fd, EPOLLIN)
            conn.watched = True
        conn.idle_deadline_ns = mono_ns() + <int64_t>self.idle_timeout_ms * 1000000
        if len(self.kept) >= MAX_KEPT:
            # The web server's pool is larger than we hold: let go of the longest idle one.
            oldest = self.kept.pop(0)
            self.discard(oldest)
        self.kept.append(conn)
        return 0

    cdef Connection accept_one(self):
        """accept() once: a new connection, or None.

        The listen socket is blocking, with a receive timeout (SO_RCVTIMEO, set by
        fastfpm.worker) that bounds the wait: a blocking accept() wakes exactly one waiting
        worker per connection, where a readiness wait would wake several to race for it.
        """
        cdef int fd, err
        cdef Connection conn
        with nogil:
            fd = accept4(self.listen_fd, NULL, NULL, SOCK_CLOEXEC)
        if fd >= 0 and self.client_filter is not None and not self.client_filter(fd):
            close(fd)
            return None
        if fd >= 0:
            conn = self.spare if self.spare is not None else Connection()
            self.spare = None
            conn.reset(fd)
            conn.fresh = True
            return conn
        err = errno
        if err == EINTR:
            PyErr_CheckSignals()
        elif err == EAGAIN or err == ECONNABORTED:
            # The receive timeout ran out, another worker was quicker, or the peer left. A signal
            # that landed just before accept() did not interrupt it: run its handler now.
            PyErr_CheckSignals()
        elif err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
            # Out of descriptors or memory: say so and back off, as nginx does, rather than
            # spinning on a listen socket that stays readable.
            self.log("error", f"accept() failed: {OSError(err, '').strerror}; pausing 100 ms")
            with nogil:
                poll(NULL, 0, 100)
        else:
            raise OSError(err, "accept() failed")
        return None

    cdef inline void check_parent(self) noexcept:
        """Stop when the master is gone (reparented), as gunicorn's workers do.

        A master killed with SIGKILL cannot stop its workers; without this they would go on
        accepting on the inherited socket with nobody to respawn, time out or reap them. Called
        only when a wait times out, never per request.
        """
        if self.parent_pid and getppid() != self.parent_pid:
            self.stopping = True

    cdef int watch(self, int fd, uint32_t events) except -1:
        """Add fd to this worker's epoll set (a closed fd leaves the set by itself)."""
        cdef epoll_event ev
        ev.events = events
        ev.data.fd = fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl() failed")
        return 0

    cdef Connection next_ready(self):
        """The next connection with something to read: a new one, or a kept one whose next request
        has arrived. None when a signal, a timeout or a lost accept() race woke us up instead.

        A worker holding kept connections waits in its own epoll set with them and the listen
        socket; after a wake-up it accepts without blocking (accept_now), so losing the race for
        a new connection costs an EAGAIN, not a wait.
        """
        cdef Connection conn
        cdef epoll_event events[MAX_KEPT + 1]
        cdef Py_ssize_t i, j, n = len(self.kept)
        cdef int rc, timeout_ms = -1
        cdef int64_t now, wait_ns
        cdef bint listen_ready = False
        if self.epfd < 0:
            self.epfd = epoll_create1(EPOLL_CLOEXEC)
            if self.epfd < 0:
                raise OSError(errno, "epoll_create1() failed")
            # Not EPOLLEXCLUSIVE: an exclusive wake-up is spent on the first exclusive waiter
            # in the socket's queue, and an epoll registration stays there while its worker is
            # busy serving, so an idle worker blocked in accept() was left asleep for its whole
            # receive timeout (100 ms tails in the keep-alive benchmark). Workers holding kept
            # connections all wake for a new one; those that lose the race get EAGAIN.
            # Edge-triggered: a worker that lost the race or the accept lock is not woken again
            # and again for the same queued connection; the one that accepted keeps accepting
            # (listen_pending) until the queue is empty.
            self.watch(self.listen_fd, EPOLLIN | EPOLLET)
        if n == 0:
            # Nothing kept: wait in accept() itself (see accept_one).
            conn = self.accept_one()
            if conn is None:
                self.check_parent()  # the wait ran out (or a race was lost): is the master still there?
            return conn
        if self.listen_pending:
            conn = self.accept_now()
            if conn is not None:
                return conn
            self.listen_pending = False
        else:
            now = mono_ns()
            for i in range(n):
                conn = self.kept[i]
                wait_ns = conn.idle_deadline_ns - now
                if wait_ns < 0:
                    wait_ns = 0
                if timeout_ms < 0 or wait_ns // 1000000 + 1 < timeout_ms:
                    timeout_ms = <int>(wait_ns // 1000000 + 1)
        with nogil:
            rc = epoll_wait(self.epfd, events, MAX_KEPT + 1, timeout_ms)
        if rc < 0:
            if errno != EINTR:
                raise OSError(errno, "epoll_wait() failed")
            PyErr_CheckSignals()
            return None
        # A new connection first: its request has usually waited in the accept queue longer than
        # any on a kept connection, and a worker that always finds a kept request ready would
        # otherwise leave new connections queued (the benchmark saw 80 ms tails from that).
        for j in range(rc):
            if events[j].data.fd == self.listen_fd:
                listen_ready = True
        if listen_ready:
            conn = self.accept_now()
            if conn is not None:
                self.listen_pending = True  # more may be queued behind it
                return conn
        for j in range(rc):
            for i in range(len(self.kept)):
                conn = self.kept[i]
                if conn.fd == events[j].data.fd:
                    del self.kept[i]
                    conn.fresh = False
                    return conn
        PyErr_CheckSignals()  # as in accept_one: a signal may have come between two waits
        if rc == 0:
            self.check_parent()
        # Idle ones past their deadline are closed.
        if n:
            now = mono_ns()
            for i in range(len(self.kept) - 1, -1, -1):
                conn = self.kept[i]
                if conn.idle_deadline_ns <= now:
                    del self.kept[i]
                    self.discard(conn)
        return None

    cdef Connection accept_now(self):
        """accept() without waiting, for a worker whose kept connections must not wait on it.

        epoll may wake several workers for one connection; the ones that lose the race must get
        EAGAIN, not sleep in accept() while their kept connections' requests queue up. The listen
        socket's O_NONBLOCK is shared with every worker, so it is set just around this call: a
        worker that enters accept() in that instant gets EAGAIN and simply waits again.
        """
        cdef int flags
        cdef Connection conn
        # One worker at a time (see ffpm_accept_lock): otherwise a second one could accept()
        # after the first had made the socket blocking again, and sleep there. Whoever is busy
        # with the lock, or an idle worker in accept(), takes the connection instead.
        if not ffpm_accept_lock(self.header, mono_ns(), 50000000):
            return None  # the holder accepts, and keeps accepting while more are queued
        try:
            if self.listen_flags < 0:
                # Read once: only this toggle changes the flags, and it always puts them back.
                flags = fcntl(self.listen_fd, F_GETFL)
                if flags < 0:
                    raise OSError(errno, "fcntl() on the listen socket failed")
                self.listen_flags = flags & ~O_NONBLOCK
            flags = self.listen_flags
            if fcntl(self.listen_fd, F_SETFL, flags | O_NONBLOCK) < 0:
                raise OSError(errno, "fcntl() on the listen socket failed")
            try:
                conn = self.accept_one()
            finally:
                fcntl(self.listen_fd, F_SETFL, flags)
        finally:
            ffpm_accept_unlock(self.header)
        return conn

    cdef int wait_readable(self, int fd, int timeout_ms) except -2:
        """poll() one fd for input: 1 readable, 0 timed out."""
        return self.wait_fd(fd, POLLIN, timeout_ms)

    cdef int wait_fd(self, int fd, short events, int timeout_ms) except -2:
        """poll() one fd: 1 ready, 0 timed out. Signal handlers run on EINTR."""
        cdef pollfd p
        cdef int rc
        p.fd = fd
        p.events = events
        p.revents = 0
        while True:
            with nogil:
                rc = poll(&p, 1, timeout_ms)
            if rc >= 0:
                return rc
            if errno != EINTR:
                raise OSError(errno, "poll() failed")
            PyErr_CheckSignals()

    cdef int fill(self, Connection c, int timeout_ms) except -2:
        """Receive more bytes into c's buffer: >0 read, 0 the peer closed, -1 timed out or failed."""
        cdef ssize_t n
        cdef int err
        if c.rstart == c.rend:
            c.rstart = c.rend = 0
        elif c.rstart > 0 and RBUF_SIZE - c.rend < 8192 + FCGI_HEADER_LEN + 65535 + 255:
            memmove(c.rbuf, c.rbuf + c.rstart, c.rend - c.rstart)
            c.rend -= c.rstart
            c.rstart = 0
        if c.rend >= RBUF_SIZE:
            return -1
        while True:
            # MSG_DONTWAIT never blocks, so the GIL stays held: releasing and retaking it costs
            # more than the call. Waiting happens in poll(), without the GIL.
            n = recv(c.fd, c.rbuf + c.rend, RBUF_SIZE - c.rend, MSG_DONTWAIT)
            if n > 0:
                c.rend += n
                return <int>n
            if n == 0:
                return 0
            err = errno
            if err == EINTR:
                PyErr_CheckSignals()
            elif err == EAGAIN:  # EWOULDBLOCK is the same value on Linux
                if self.wait_readable(c.fd, timeout_ms) == 0:
                    return -1
            else:
                return -1

    cdef int send_all(self, Connection c, const uint8_t *data, size_t n) except -1:
        """Send every byte or raise ConnectionLost. MSG_NOSIGNAL: a vanished peer is an error code."""
        cdef ssize_t sent
        cdef int err
        while n:
            sent = send(c.fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT)
            if sent >= 0:
                data += sent
                n -= sent
                continue
            err = errno
            if err == EINTR:
                PyErr_CheckSignals()
                continue
            if err == EAGAIN:
                # The web server reads slower than we write: wait, but not forever, so a peer that
                # stopped reading cannot hold the worker.
                if self.wait_fd(c.fd, POLLOUT, self.read_timeout_ms) == 0:
                    c.broken = True
                    raise ConnectionLost(ETIMEDOUT, "timed out sending the response")
                continue
            c.broken = True
            raise ConnectionLost(err, f"sending the response failed: {OSError(err, '').strerror}")
        return 0

    cdef int send_small(self, Connection c, bytes data) except -1:
        return self.send_all(c, <const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef void malformed(self, Connection c, str why) noexcept:
        c.broken = True
        c.logged = True
        try:
            self.log("warning", f"closing a FastCGI connection: {why}")
        except BaseException:
            pass

    cdef int serve_connection(self, Connection c) except -1:
        """Serve the requests that have arrived on c; c.keep_conn says whether to keep it after."""
        cdef int rc
        cdef bint first = c.fresh
        while True:
            rc = self.read_request_head(c, first)
            if rc <= 0:
                c.keep_conn = False
                return 0
            first = False
            self.handle_request(c)
            self.served += 1
            self.sb_request_done()
            if c.broken:
                return 0
            if not c.keep_conn or self.stopping:
                if c.rend > c.rstart:
                    self.refuse_queued(c)
                return 0
            if self.max_requests and self.served >= self.max_requests:
                return 0
            if c.rend == c.rstart:
                return 0  # nothing more buffered: back to the idle set until the next request
            # The web server already sent the next request (pipelined): serve it now.

    cdef int refuse(self, Connection c, int request_id, int protocol_status) except -1:
        """End a request we will not serve (END_REQUEST with protocol_status) and drop its records."""
        cdef uint8_t reply[16]
        fcgi_write_end_request(reply, request_id, 0, protocol_status)
        self.send_all(c, reply, 16)
        c.refused[c.refused_next % REFUSED_KEPT] = <uint16_t>request_id
        c.refused_next += 1
        return 0

    cdef int refuse_queued(self, Connection c) except -1:
        """Before closing a connection: refuse the requests queued behind the one just served.

        A client that multiplexes sends the next BEGIN_REQUEST without waiting; without
        FCGI_KEEP_CONN the connection closes after this request, and those requests must hear
        FCGI_CANT_MPX_CONN rather than see the connection vanish.
        """
        cdef fcgi_header hdr
        cdef long rc
        while c.rend > c.rstart and not c.broken:
            rc = fcgi_parse_record(c.rbuf + c.rstart, c.rend - c.rstart, &hdr)
            if rc <= 0:
                return 0
            c.rstart += rc
            if (hdr.type == FCGI_BEGIN_REQUEST and hdr.request_id != 0 and hdr.request_id != c.request_id
                    and not c.is_refused(hdr.request_id)):
                self.refuse(c, hdr.request_id, FCGI_CANT_MPX_CONN)
        return 0

    cdef int management_record(self, Connection c, fcgi_header *hdr, const uint8_t *content) except -2:
        """Answer a record with request id 0: GET_VALUES, or UNKNOWN_TYPE for anything else."""
        cdef size_t pos = 0, noff, nlen, voff, vlen
        cdef long rc
        if hdr.type != FCGI_GET_VALUES:
            out = PyBytes_FromStringAndSize(NULL, 16)
            fcgi_write_unknown_type(<uint8_t *>PyBytes_AS_STRING(out), hdr.type)
            self.send_small(c, out)
            return 0
        answer = []
        while pos < hdr.content_length:
            rc = fcgi_parse_pair(content + pos, hdr.content_length - pos, &noff, &nlen, &voff, &vlen)
            if rc < 0:
                self.malformed(c, "truncated name/value pair in GET_VALUES")
                return -1
            name = PyBytes_FromStringAndSize(<char *>content + pos + noff, nlen)
            value = self.get_values.get(name)
            if value is not None:
                answer.append((name, value))
            pos += rc
        self.send_small(c, encode_get_values_result(answer))
        return 0

    cdef int read_request_head(self, Connection c, bint first) except -2:
        """Read records up to the end of PARAMS: 1 a request is ready, 0 close quietly, -1 close."""
        cdef fcgi_header hdr
        cdef long rc
        cdef int got
        cdef bint begun = False, started = False
        cdef const uint8_t *content
        cdef uint8_t reply[16]
        cdef int role, flags, check
        self.plen = 0
        while True:
            rc = fcgi_parse_record(c.rbuf + c.rstart, c.rend - c.rstart, &hdr)
            if rc == FCGI_NEED_MORE:
                got = self.fill(c, self.read_timeout_ms if started else self.idle_timeout_ms)
                if got > 0:
                    if not started:
                        started = True
                        self.sb_reading(first)
                    continue
                if begun or c.rend > c.rstart:
                    self.malformed(c, "the web server closed or stalled mid-request" if got == 0
                                   else "timed out waiting for the rest of the request")
                    return -1
                return 0  # closed or idle between requests: nothing lost
            if rc == FCGI_ERR_VERSION:
                self.malformed(c, f"bad FastCGI version {c.rbuf[c.rstart]}")
                return -1
            if not started:
                started = True
                self.sb_reading(first)
            content = c.rbuf + c.rstart + FCGI_HEADER_LEN
            c.rstart += rc
            if hdr.request_id == 0:
                if self.management_record(c, &hdr, content) < 0:
                    return -1
                continue
            check = fcgi_check_header(&hdr)
            if check < 0:
                self.malformed(c, f"record type {hdr.type} for request id {hdr.request_id} with a "
                               f"{hdr.content_length}-byte body" if check == FCGI_ERR_LENGTH else
                               f"management record type {hdr.type} with request id {hdr.request_id}")
                return -1
            if hdr.type == FCGI_BEGIN_REQUEST:
                c.forget_refused(hdr.request_id)
                if begun:
                    if hdr.request_id == c.request_id:
                        self.malformed(c, f"a second BEGIN_REQUEST for request id {hdr.request_id}")
                        return -1
                    # One request per connection at a time (FCGI_MPXS_CONNS=0): refuse the second.
                    self.refuse(c, hdr.request_id, FCGI_CANT_MPX_CONN)
                    continue
                fcgi_parse_begin_request(content, hdr.content_length, &role, &flags)
                c.keep_conn = (flags & FCGI_KEEP_CONN) != 0
                if role != FCGI_RESPONDER:
                    self.refuse(c, hdr.request_id, FCGI_UNKNOWN_ROLE)
                    if not c.keep_conn:
                        return 0
                    continue
                begun = True
                c.request_id = hdr.request_id
                continue
            if (not begun or hdr.request_id != c.request_id) and c.is_refused(hdr.request_id):
                continue  # the PARAMS, STDIN or DATA of a request we refused
            if hdr.type == FCGI_ABORT_REQUEST and not begun:
                # The web server gave up on a request we had already finished: the two crossed on
                # the wire, which is no protocol error. Nothing is left to end.
                continue
            if not begun or hdr.request_id != c.request_id:
                self.malformed(c, f"record type {hdr.type} for unknown request id {hdr.request_id}")
                return -1
            if hdr.type == FCGI_PARAMS:
                if hdr.content_length == 0:
                    self.sb_info()
                    return 1
                if self.plen + hdr.content_length > self.max_params_size:
                    self.malformed(c, f"request params over the {self.max_params_size}-byte limit")
                    return -1
                memcpy(self.pbuf + self.plen, content, hdr.content_length)
                self.plen += hdr.content_length
                continue
            if hdr.type == FCGI_ABORT_REQUEST:
                # Aborted before it started: end it, as the spec asks, and carry on.
                fcgi_write_end_request(reply, hdr.request_id, 0, FCGI_REQUEST_COMPLETE)
                self.send_all(c, reply, 16)
                if not c.keep_conn:
                    return 0
                begun = False
                self.plen = 0
                continue
            self.malformed(c, f"record type {hdr.type} before the end of PARAMS")
            return -1

    # ------------------------------------------------------------------ environ

    def environ_for(self, params):
        """The environ the loop builds for an encoded PARAMS block, without any I/O.

        For tests of the environ rules (paths, PEP 3333's empty-value rules) and for the
        environ micro-benchmark; the serving loop does not use it.
        """
        cdef Py_buffer view
        cdef Connection c
        cdef InputStream stream = InputStream.__new__(InputStream)
        PyObject_GetBuffer(params, &view, PyBUF_SIMPLE)
        try:
            if <size_t>view.len > self.max_params_size:
                raise ValueError(f"params over the {self.max_params_size}-byte limit")
            memcpy(self.pbuf, view.buf, view.len)
            self.plen = view.len
        finally:
            PyBuffer_Release(&view)
        if self.spare is None:
            self.spare = Connection()
        c = self.spare
        c.reset(-1)
        stream.worker = self
        stream.conn = c
        stream.serial = self.request_serial
        env = self.build_environ(c, stream)
        if env is None:
            raise ProtocolError("malformed params")
        return env

    cdef KeyEntry *entry_for(self, const uint8_t *name, size_t n) except? NULL:
        """The cache entry for a param name (made on first sight), or NULL when it does not fit."""
        cdef uint64_t h
        cdef size_t i, probe
        cdef KeyEntry *e
        if n >= KEY_MAX_LEN:
            return NULL
        h = key_hash(name, n)
        i = h & (KEY_CACHE_SIZE - 1)
        for probe in range(8):
            e = &self.keys[(i + probe) & (KEY_CACHE_SIZE - 1)]
            if e.hash == h and e.length == n and memcmp(e.name, name, n) == 0:
                return e
            if e.hash == 0:
                # Interned, so it is the very object the environ template and the app's own string
                # literals use: dict lookups then match on identity without comparing text.
                key = sys.intern(PyUnicode_DecodeLatin1(<char *>name, n, NULL))
                e.kind = _SPECIAL_KEYS.get(PyBytes_FromStringAndSize(<char *>name, n), K_PLAIN)
                e.hash = h
                e.length = n
                memcpy(e.name, name, n)
                Py_INCREF(key)
                e.key = <PyObject *>key
                return e
        return NULL

    cdef inline object value_for(self, KeyEntry *e, const uint8_t *value, size_t n):
        """The str for a param value, shared with the last request when the bytes are the same."""
        if e.value_str != NULL and e.value_length == n and memcmp(e.value, value, n) == 0:
            return <object>e.value_str
        text = PyUnicode_DecodeLatin1(<char *>value, n, NULL)
        if n <= VALUE_MAX_LEN:
            if e.value_str != NULL:
                Py_DECREF(<object>e.value_str)
            Py_INCREF(text)
            e.value_str = <PyObject *>text
            e.value_length = n
            memcpy(e.value, value, n)
        return text

    cdef object build_environ(self, Connection c, InputStream stream):
        """The WSGI environ from the PARAMS bytes: None (connection marked broken) when malformed."""
        cdef size_t pos = 0, noff, nlen, voff, vlen, plen = self.plen
        cdef long rc
        cdef int kind
        cdef const uint8_t *base = self.pbuf
        cdef dict env = PyDict_Copy(self.template)
        cdef KeyEntry *e
        cdef size_t index = 0
        cdef int64_t content_length = -1
        cdef size_t i
        memset(self.vseen, 0, sizeof(self.vseen))
        while pos < plen:
            rc = fcgi_parse_pair(base + pos, plen - pos, &noff, &nlen, &voff, &vlen)
            if rc < 0:
                self.malformed(c, "truncated name/value pair in PARAMS")
                return None
            e = self.key_order[index] if index < PREDICTED_PARAMS else NULL
            if e == NULL or e.length != nlen or memcmp(e.name, base + pos + noff, nlen) != 0:
                e = self.entry_for(base + pos + noff, nlen)
                if index < PREDICTED_PARAMS:
                    self.key_order[index] = e
            index += 1
            if e != NULL:
                key = <object>e.key
                kind = e.kind
            else:
                key = PyUnicode_DecodeLatin1(<char *>base + pos + noff, nlen, NULL)
                kind = _SPECIAL_KEYS.get(PyBytes_FromStringAndSize(<char *>base + pos + noff, nlen), K_PLAIN)
            if kind == K_DROP:
                pos += rc
                continue
            if kind != K_PLAIN:
                self.vseen[kind] = True
                self.voff[kind] = pos + voff
                self.vlen[kind] = vlen
                if kind == K_SCRIPT_NAME or kind == K_PATH_INFO:
                    pos += rc
                    continue  # derived below, from the full request path
                if (kind == K_CONTENT_TYPE or kind == K_CONTENT_LENGTH) and vlen == 0:
                    pos += rc
                    continue  # PEP 3333: absent rather than empty
            if e != NULL:
                PyDict_SetItem(env, key, self.value_for(e, base + pos + voff, vlen))
            else:
                PyDict_SetItem(env, key, PyUnicode_DecodeLatin1(<char *>base + pos + voff, vlen, NULL))
            pos += rc
        if self.vseen[K_CONTENT_LENGTH] and self.vlen[K_CONTENT_LENGTH]:
            content_length = 0
            for i in range(self.vlen[K_CONTENT_LENGTH]):
                rc = base[self.voff[K_CONTENT_LENGTH] + i] - 48
                if rc < 0 or rc > 9 or content_length > 100000000000000:
                    self.malformed(c, "CONTENT_LENGTH is not a number")
                    return None
                content_length = content_length * 10 + rc
        c.content_length = content_length
        self.set_paths(env)
        if (self.vseen[K_HTTPS] and self.vlen[K_HTTPS] and not (
                self.vlen[K_HTTPS] == 3 and memcmp(base + self.voff[K_HTTPS], b"off", 3) == 0)) or (
                self.vseen[K_REQUEST_SCHEME] and self.vlen[K_REQUEST_SCHEME] == 5
                and memcmp(base + self.voff[K_REQUEST_SCHEME], b"https", 5) == 0):
            env["wsgi.url_scheme"] = "https"
        env["wsgi.input"] = stream
        return env

    cdef void set_paths(self, dict env) except *:
        """SCRIPT_NAME and PATH_INFO for an app mounted at self.mount, the same from every server.

        nginx's stock fastcgi_params send SCRIPT_NAME as the whole path and no PATH_INFO (the PHP
        mapping); other servers split differently. The full request path is what they agree on, so
        it comes from REQUEST_URI (percent-decoded, latin-1 as PEP 3333 asks), or from SCRIPT_NAME +
        PATH_INFO when REQUEST_URI is missing, and the mount prefix is cut from it.
        """
        cdef const uint8_t *src
        cdef const uint8_t *q
        cdef size_t n, m, mlen = len(self.mount_bytes)
        cdef uint8_t *dst = self.scratch
        if self.vseen[K_REQUEST_URI] and self.vlen[K_REQUEST_URI]:
            src = self.pbuf + self.voff[K_REQUEST_URI]
            n = self.vlen[K_REQUEST_URI]
            q = <const uint8_t *>memchr(src, c'?', n)
            if q != NULL:
                n = q - src
            if n and src[0] != c'/':
                # absolute-form request target (http://host/path): keep the path only
                q = <const uint8_t *>memchr(src, c'/', n)
                if q != NULL and q + 1 < src + n and q[1] == c'/':
                    q = <const uint8_t *>memchr(q + 2, c'/', n - (q + 2 - src))
                    if q == NULL:
                        n = 0
                    else:
                        n -= q - src
                        src = q
            n = percent_decode(src, n, dst)
        else:
            n = 0
            if self.vseen[K_SCRIPT_NAME]:
                memcpy(dst, self.pbuf + self.voff[K_SCRIPT_NAME], self.vlen[K_SCRIPT_NAME])
                n = self.vlen[K_SCRIPT_NAME]
            if self.vseen[K_PATH_INFO]:
                memcpy(dst + n, self.pbuf + self.voff[K_PATH_INFO], self.vlen[K_PATH_INFO])
                n += self.vlen[K_PATH_INFO]
        if mlen and n >= mlen and memcmp(dst, PyBytes_AS_STRING(self.mount_bytes), mlen) == 0 and (
                n == mlen or dst[mlen] == c'/'):
            env["SCRIPT_NAME"] = self.mount
            env["PATH_INFO"] = PyUnicode_DecodeLatin1(<char *>dst + mlen, n - mlen, NULL)
        else:
            env["SCRIPT_NAME"] = ""
            env["PATH_INFO"] = PyUnicode_DecodeLatin1(<char *>dst, n, NULL)

    # ------------------------------------------------------------------ request body

    cdef Py_ssize_t stdin_next(self, Connection c, Py_ssize_t want, const uint8_t **ptr,
                               bint to_newline) except -1:
        """Consume up to want body bytes already received (reading more when none are): returns how
        many, pointing *ptr at them inside c's buffer; 0 at the end of the body."""
        cdef fcgi_header hdr
        cdef long rc
        cdef size_t avail, n
        cdef const uint8_t *nl
        cdef uint8_t reply[16]
        while True:
            if c.broken:
                raise RequestAborted("the connection to the web server is closed")
            avail = c.rend - c.rstart
            if c.stdin_left or c.stdin_pad or not c.stdin_done:
                if avail == 0 or (not c.stdin_left and not c.stdin_pad and avail < FCGI_HEADER_LEN):
                    rc = self.fill(c, self.read_timeout_ms)
                    if rc <= 0:
                        self.malformed(c, "the web server closed or stalled while sending the body"
                                       if rc == 0 else "timed out reading the request body")
                        raise RequestAborted("the request body did not arrive")
                    continue
            if c.stdin_left:
                n = c.stdin_left if c.stdin_left < avail else avail
                if <size_t>want < n:
                    n = want
                ptr[0] = c.rbuf + c.rstart
                if to_newline:
                    nl = <const uint8_t *>memchr(ptr[0], c'\n', n)
                    if nl != NULL:
                        n = nl - ptr[0] + 1
                c.rstart += n
                c.stdin_left -= n
                return n
            if c.stdin_pad:
                n = c.stdin_pad if c.stdin_pad < avail else avail
                c.rstart += n
                c.stdin_pad -= n
                continue
            if c.stdin_done:
                return 0
            rc = fcgi_parse_header(c.rbuf + c.rstart, avail, &hdr)
            if rc == FCGI_ERR_VERSION:
                self.malformed(c, f"bad FastCGI version {c.rbuf[c.rstart]}")
                raise RequestAborted("malformed record from the web server")
            if hdr.type == FCGI_STDIN and hdr.request_id == c.request_id:
                c.rstart += FCGI_HEADER_LEN
                c.stdin_left = hdr.content_length
                c.stdin_pad = hdr.padding_length
                if hdr.content_length == 0:
                    c.stdin_done = True
                    continue
                c.stdin_total += hdr.content_length
                if c.content_length >= 0 and c.stdin_total > c.content_length:
                    self.malformed(c, f"request body longer than CONTENT_LENGTH ({c.content_length})")
                    raise RequestAborted("request body longer than CONTENT_LENGTH")
                continue
            # Any other record must be complete before it can be handled.
            rc = fcgi_parse_record(c.rbuf + c.rstart, avail, &hdr)
            if rc == FCGI_NEED_MORE:
                if self.fill(c, self.read_timeout_ms) <= 0:
                    self.malformed(c, "the web server closed or stalled mid-record")
                    raise RequestAborted("the request body did not arrive")
                continue
            c.rstart += rc
            if hdr.request_id == 0:
                self.management_record(c, &hdr, c.rbuf + c.rstart - rc + FCGI_HEADER_LEN)
                continue
            if hdr.type == FCGI_ABORT_REQUEST and hdr.request_id == c.request_id:
                c.stdin_done = True
                self.aborted = True
                raise RequestAborted("the web server aborted the request")
            if hdr.type == FCGI_BEGIN_REQUEST and hdr.request_id != c.request_id:
                c.forget_refused(hdr.request_id)
                self.refuse(c, hdr.request_id, FCGI_CANT_MPX_CONN)
                continue
            if hdr.request_id != c.request_id and c.is_refused(hdr.request_id):
                continue  # the PARAMS, STDIN or DATA of a request we refused
            self.malformed(c, f"record type {hdr.type} for request id {hdr.request_id} in the body")
            raise RequestAborted("malformed record from the web server")


    cdef int check_abort(self, Connection c) except -1:
        """Between streamed chunks: notice an ABORT_REQUEST or a closed connection without waiting.

        Records after the body the app has not read yet are scanned without being consumed, so
        an app that streams its response without reading the body can still be stopped.
        """
        cdef ssize_t n
        cdef fcgi_header hdr
        cdef long rc
        cdef size_t pos
        if c.rstart > 0 and c.rend - c.rstart < RBUF_SIZE // 2:
            memmove(c.rbuf, c.rbuf + c.rstart, c.rend - c.rstart)
            c.rend -= c.rstart
            c.rstart = 0
        if c.rend < RBUF_SIZE:
            n = recv(c.fd, c.rbuf + c.rend, RBUF_SIZE - c.rend, MSG_DONTWAIT)
            if n == 0:
                c.broken = True
                raise RequestAborted("the web server closed the connection")
            if n > 0:
                c.rend += n
        pos = c.rstart + c.stdin_left + c.stdin_pad
        while pos < c.rend:
            rc = fcgi_parse_record(c.rbuf + pos, c.rend - pos, &hdr)
            if rc <= 0:
                break
            if hdr.type == FCGI_ABORT_REQUEST and hdr.request_id == c.request_id:
                self.aborted = True
                raise RequestAborted("the web server aborted the request")
            pos += rc
        return 0

    # ------------------------------------------------------------------ response

    def start_response(self, status, headers, exc_info=None):
        """PEP 3333 start_response: remember status and headers; they go out with the first body byte."""
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called a second time without exc_info")
        cdef const uint8_t *p
        if (type(status) is not str or PyUnicode_KIND(status) != PyUnicode_1BYTE_KIND
                or PyUnicode_GET_LENGTH(status) < 4):
            raise ValueError(f"invalid WSGI status {status!r}")
        p = <const uint8_t *>PyUnicode_DATA(status)
        if not (c'1' <= p[0] <= c'9' and c'0' <= p[1] <= c'9' and c'0' <= p[2] <= c'9' and p[3] == c' '):
            raise ValueError(f"invalid WSGI status {status!r}: expected three digits and a space first")
        if type(headers) is not list:
            raise TypeError(f"response headers must be a list, not {type(headers).__name__}")
        self.status = status
        self.headers = headers
        self.status_code = (p[0] - c'0') * 100 + (p[1] - c'0') * 10 + (p[2] - c'0')
        return self.write_cb

    def write(self, data):
        """The legacy write() callable: the data goes out before it returns."""
        if self.conn is None:
            raise RuntimeError("write() called outside a request")
        self.body_chunk(self.conn, data)
        self.flush(self.conn)

    cdef int out_reserve(self, size_t n) except -1:
        cdef size_t cap = self.wcap
        cdef uint8_t *grown
        if self.wlen + n <= cap:
            return 0
        while self.wlen + n > cap:
            cap *= 2
        grown = <uint8_t *>realloc(self.wbuf, cap)
        if grown == NULL:
            raise MemoryError()
        self.wbuf = grown
        self.wcap = cap
        return 0

    cdef inline void out_close_record(self) noexcept:
        cdef size_t clen, pad
        if self.rec_start == NO_RECORD:
            return
        clen = self.wlen - self.rec_start - FCGI_HEADER_LEN
        if clen == 0:
            self.wlen = self.rec_start
        else:
            pad = fcgi_padding(clen)
            fcgi_write_header(self.wbuf + self.rec_start, FCGI_STDOUT, self.conn.request_id, clen, pad)
            memset(self.wbuf + self.wlen, 0, pad)  # room was reserved with the content
            self.wlen += pad
        self.rec_start = NO_RECORD

    cdef int out_stdout(self, const uint8_t *data, size_t n) except -1:
        """Append stdout bytes, opening and closing STDOUT records of at most 65535 bytes."""
        cdef size_t room, take
        while n:
            if self.rec_start == NO_RECORD:
                if self.wlen >= FLUSH_AT:
                    self.flush(self.conn)
                self.out_reserve(FCGI_HEADER_LEN)
                self.rec_start = self.wlen
                self.wlen += FCGI_HEADER_LEN
            room = FCGI_MAX_CONTENT - (self.wlen - self.rec_start - FCGI_HEADER_LEN)
            take = room if room < n else n
            self.out_reserve(take + 8)
            memcpy(self.wbuf + self.wlen, data, take)
            self.wlen += take
            data += take
            n -= take
            if take == room:
                self.out_close_record()
        return 0

    cdef int out_text(self, object text, bint is_value) except -1:
        """Append a header name or value: latin-1 only, and no CR or LF (response splitting)."""
        cdef const uint8_t *p
        cdef Py_ssize_t n
        if type(text) is not str:
            raise TypeError(f"response header {'value' if is_value else 'name'} must be str, "
                            f"not {type(text).__name__}")
        if PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND:
            raise ValueError(f"response header {text!r} is not latin-1")
        p = <const uint8_t *>PyUnicode_DATA(text)
        n = PyUnicode_GET_LENGTH(text)
        if memchr(p, c'\r', n) != NULL or memchr(p, c'\n', n) != NULL or (
                not is_value and memchr(p, c':', n) != NULL):
            raise ValueError(f"response header {text!r} contains a forbidden character")
        return self.out_stdout(p, n)

    cdef int emit_head(self) except -1:
        if self.status is None:
            raise RuntimeError("the application returned a body without calling start_response()")
        self.out_stdout(<const uint8_t *>b"Status: ", 8)
        self.out_text(self.status, True)
        self.out_stdout(<const uint8_t *>b"\r\n", 2)
        for item in self.headers:
            name, value = item
            self.out_text(name, False)
            self.out_stdout(<const uint8_t *>b": ", 2)
            self.out_text(value, True)
            self.out_stdout(<const uint8_t *>b"\r\n", 2)
        self.out_stdout(<const uint8_t *>b"\r\n", 2)
        self.headers_sent = True
        return 0

    cdef int body_chunk(self, Connection c, object data) except -1:
        cdef Py_buffer view
        if type(data) is not bytes:
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            else:
                raise TypeError(f"WSGI body chunks must be bytes, not {type(data).__name__}")
        if not self.headers_sent:
            if PyBytes_GET_SIZE(data) == 0:
                return 0  # PEP 3333: headers wait for the first non-empty chunk
            self.emit_head()
        return self.out_stdout(<const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef int flush(self, Connection c) except -1:
        self.out_close_record()
        if self.wlen:
            try:
                self.send_all(c, self.wbuf, self.wlen)
            finally:
                self.wlen = 0
        return 0

    cdef int out_end(self, int request_id, uint32_t app_status) except -1:
        """Close the stdout stream and append the empty STDOUT record and END_REQUEST."""
        self.out_close_record()
        self.out_reserve(2 * FCGI_HEADER_LEN + 8)
        self.wlen += fcgi_write_header(self.wbuf + self.wlen, FCGI_STDOUT, request_id, 0, 0)
        self.wlen += fcgi_write_end_request(self.wbuf + self.wlen, request_id, app_status,
                                            FCGI_REQUEST_COMPLETE)
        return 0

    cdef int end_request(self, Connection c, uint32_t app_status) except -1:
        """Close the stdout stream, add END_REQUEST and send what is buffered in one call."""
        self.out_end(c.request_id, app_status)
        return self.flush(c)

    def response_for(self, status, headers, body, int request_id=1):
        """The bytes the loop sends for a list-of-chunks response (head, body, END_REQUEST), no I/O.

        The same start_response, header checks and record framing as a served request, for tests
        and the response-path micro-benchmark. The body must stay under the 256 KiB at which the
        loop would flush to a socket.
        """
        cdef Connection c
        if self.spare is None:
            self.spare = Connection()
        c = self.spare
        c.reset(-1)
        c.request_id = request_id
        self.conn = c
        self.status = None
        self.headers = None
        self.headers_sent = False
        self.wlen = 0
        self.rec_start = NO_RECORD
        try:
            self.start_response(status, headers)
            for chunk in body:
                self.body_chunk(c, chunk)
            if not self.headers_sent:
                self.emit_head()
            self.out_end(request_id, 0)
            return PyBytes_FromStringAndSize(<char *>self.wbuf, self.wlen)
        finally:
            self.wlen = 0
            self.rec_start = NO_RECORD
            self.conn = None

    cdef int send_iterable(self, Connection c, object result) except -1:
        cdef Py_ssize_t count = 0
        if type(result) is list or type(result) is tuple:
            # Known length: batch everything (and END_REQUEST) into as few sends as possible.
            for chunk in result:
                self.body_chunk(c, chunk)
            return 0
        for chunk in result:
            self.body_chunk(c, chunk)
            if self.headers_sent and self.wlen:
                # PEP 3333: no block may wait for the next one to be produced.
                if count:
                    self.check_abort(c)
                self.flush(c)
                count += 1
        return 0

    cdef int handle_request(self, Connection c) except -1:
        cdef InputStream stream = InputStream.__new__(InputStream)
        cdef bint failed = False
        self.request_serial += 1
        stream.worker = self
        stream.conn = c
        stream.serial = self.request_serial
        c.stdin_left = c.stdin_pad = 0
        c.stdin_done = False
        c.stdin_total = 0
        self.aborted = False
        self.status = None
        self.headers = None
        self.headers_sent = False
        self.status_code = 0
        self.wlen = 0
        self.rec_start = NO_RECORD
        env = self.build_environ(c, stream)
        if env is None:
            return 0
        self.sb_running(c.content_length, c.keep_conn)
        result = None
        try:
            result = self.app(env, self.start_response_cb)
            self.send_iterable(c, result)
        except (RequestAborted, ConnectionLost) as exc:
            failed = True
            if not self.aborted:
                if not c.logged:
                    self.log("warning", f"request {self.describe(env)} ended early: {exc}")
                c.broken = True
        except (Exception, SystemExit):
            # SystemExit too: an app that calls sys.exit() in a request fails that request, as
            # any other exception does; it does not take the worker (and its kept connections)
            # down with it.
            failed = True
            if self.headers_sent:
                self.log_exception(f"the application failed after sending headers for "
                                   f"{self.describe(env)}; aborting the response")
                c.broken = True
            else:
                self.log_exception(f"the application failed for {self.describe(env)}")
        finally:
            if result is not None and type(result) is not list and hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    self.log_exception(f"close() of the response iterable failed for {self.describe(env)}")
        self.request_serial += 1  # the app's wsgi.input reads nothing more from here on
        if c.broken:
            return 0
        if failed and not self.aborted:
            self.wlen = 0
            self.rec_start = NO_RECORD
            self.status_code = 500
            self.out_stdout(<const uint8_t *>PyBytes_AS_STRING(STATUS_500), PyBytes_GET_SIZE(STATUS_500))
        elif not failed and not self.headers_sent:
            self.emit_head()  # an empty body
        if self.aborted:
            # Unread body and the ABORT record may still sit in the buffer; the connection has
            # no clean next-request boundary, so it ends after END_REQUEST.
            c.keep_conn = False
        self.sb_finishing()
        try:
            self.end_request(c, 0)
        except ConnectionLost as exc:
            self.log("warning", f"request {self.describe(env)} ended early: {exc}")
            return 0
        if not self.aborted:
            self.drain_body(c)
        return 0

    cdef int drain_body(self, Connection c) except -1:
        """Read and drop what is left of the body the app did not read, so the next request on a kept
        connection starts at a record boundary and closing does not reset the peer."""
        cdef const uint8_t *ptr
        try:
            while self.stdin_next(c, 1 << 30, &ptr, False):
                pass
        except RequestAborted:
            c.broken = True
        return 0

    cdef str describe(self, dict env):
        return f"{env.get('REQUEST_METHOD', '?')} {env.get('REQUEST_URI', env.get('PATH_INFO', '?'))}"
