# The access log's line: access.format as compiled by fastfpm/accesslog.py (an array of operations),
# filled from the request's params, the response's status and headers, the slot's figures for the
# request just ended (duration, CPU, memory) and the environ, then written with one write() after
# the response is complete. Included by _core.pyx.
# Every value taken from a request or a response has its control characters (below space, DEL)
# written as '.', the slow log's rule, so no request can start a line of its own.

from libc.string cimport strlen


cdef extern from "<strings.h>" nogil:
    int strncasecmp(const char *a, const char *b, size_t n)


cdef extern from "<time.h>" nogil:
    struct tm:
        pass
    tm *localtime_r(const time_t *timep, tm *result)
    size_t strftime(char *s, size_t maximum, const char *fmt, const tm *t)


cdef extern from "<unistd.h>" nogil:
    ssize_t write(int fd, const void *buf, size_t count)


# The same numbers as fastfpm/accesslog.py's OP_* (tests/test_accesslog.py holds them together).
cdef enum:
    OP_LITERAL = 0
    OP_DURATION
    OP_ENV
    OP_SCRIPT
    OP_CONTENT_LENGTH
    OP_METHOD
    OP_HEADER
    OP_QUERY
    OP_QUERY_MARK
    OP_URI
    OP_REMOTE
    OP_STATUS
    OP_TIME_START
    OP_TIME_NOW
    OP_USER
    OP_CPU
    OP_MEMORY
    OP_COUNT

cdef enum:
    LOG_LINE_MAX = 1024      # php-fpm's FPM_LOG_BUFFER: a longer line is cut there
    TIME_TEXT_MAX = 128
    USER_MAX = 256


cdef struct LogOp:
    int code
    int number
    const char *text         # a literal or a strftime format (bytes kept by AccessLog.keep)
    size_t length
    PyObject *name           # %e's environ key, %o's header name (str, kept by AccessLog.keep)
    int64_t time_cached      # %t/%T: the second last formatted, and its text
    size_t time_length
    char time_text[TIME_TEXT_MAX]


# 1 for the bytes a value may carry into the log as they are; the others become '.'.
cdef uint8_t LOG_SAFE[256]
for _i in range(256):
    LOG_SAFE[_i] = 0 if _i < 0x20 or _i == 0x7F else 1

cdef signed char B64[256]
for _i in range(256):
    B64[_i] = -1
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
for _i in range(64):
    B64[<int>_B64_ALPHABET[_i]] = _i


cdef size_t basic_auth_user(const uint8_t *p, size_t n, uint8_t *out) noexcept nogil:
    """The user of an `Authorization: Basic` value (as PHP takes PHP_AUTH_USER), into out
    (USER_MAX bytes); 0 when it is not Basic, not base64, or has no ':'."""
    cdef size_t i, j = 0
    cdef uint32_t acc = 0
    cdef int bits = 0, v
    if n < 6 or strncasecmp(<const char *>p, "Basic ", 6) != 0:
        return 0
    for i in range(6, n):
        if p[i] == c'=':
            break
        v = B64[p[i]]
        if v < 0:
            return 0
        acc = (acc << 6) | <uint32_t>v
        bits += 6
        if bits >= 8:
            bits -= 8
            if j >= USER_MAX:
                return 0
            out[j] = <uint8_t>((acc >> bits) & 0xFF)
            if out[j] == c':':
                return j
            j += 1
    return 0


@cython.final
cdef class AccessLog:
    """One pool's access log in a worker: the compiled format, the descriptor, access.suppress_path.

    ops come from fastfpm.accesslog.worker_ops (constants folded); fd is the master's, inherited.
    """
    cdef int fd
    cdef LogOp *ops
    cdef Py_ssize_t nops
    cdef list keep                   # the bytes and str the ops point into
    cdef frozenset suppress          # access.suppress_path as bytes; empty: none
    cdef int remote_family           # %R: the last peer address formatted, and its text
    cdef uint8_t remote_addr[16]
    cdef char remote_text[48]
    cdef size_t used
    cdef char line[LOG_LINE_MAX + 1]

    def __cinit__(self):
        self.ops = NULL

    def __dealloc__(self):
        free(self.ops)

    def __init__(self, int fd, list ops, suppress=()):
        cdef Py_ssize_t i
        cdef LogOp *op
        self.fd = fd
        self.keep = []
        self.suppress = frozenset(p.encode("utf-8", "surrogateescape") for p in suppress)  # as in the file
        self.nops = len(ops)
        self.ops = <LogOp *>malloc(sizeof(LogOp) * (self.nops or 1))
        if self.ops == NULL:
            raise MemoryError()
        memset(self.ops, 0, sizeof(LogOp) * (self.nops or 1))
        for i in range(self.nops):
            code, number, arg = ops[i]
            if not 0 <= code < OP_COUNT:
                raise ValueError(f"unknown access log operation {code}")
            op = &self.ops[i]
            op.code = code
            op.number = number
            op.time_cached = -1
            self.keep.append(arg)
            if code == OP_ENV or code == OP_HEADER:
                arg = sys.intern(arg) if type(arg) is str else arg
                self.keep[i] = arg
                op.name = <PyObject *>arg
            else:
                op.text = PyBytes_AS_STRING(arg)
                op.length = PyBytes_GET_SIZE(arg)

    # ------------------------------------------------------------------ building the line

    cdef inline void put(self, const char *p, size_t n) noexcept:
        """Append a value, control characters as '.', cut at the line's limit."""
        cdef size_t i, room = LOG_LINE_MAX - self.used
        cdef uint8_t ch
        if n > room:
            n = room
        for i in range(n):
            ch = <uint8_t>p[i]
            self.line[self.used + i] = <char>ch if LOG_SAFE[ch] else c'.'
        self.used += n

    cdef inline void put_raw(self, const char *p, size_t n) noexcept:
        """Append text of the format itself (a literal), as it is."""
        cdef size_t room = LOG_LINE_MAX - self.used
        if n > room:
            n = room
        memcpy(self.line + self.used, p, n)
        self.used += n

    cdef inline void put_param(self, EnvironBuilder req, int kind, bint dash) noexcept:
        """A well-known param's value; "-" when absent or empty and dash (php-fpm's "-" codes)."""
        if req.vseen[kind] and req.vlen[kind]:
            self.put(<char *>req.pbuf + req.voff[kind], req.vlen[kind])
        elif dash:
            self.put_raw("-", 1)

    cdef void put_text(self, object value, bint dash) noexcept:
        """A str value (an environ entry, a header value): latin-1 as its bytes, other text as
        UTF-8; "-" when empty and dash."""
        cdef bytes encoded
        if type(value) is str and PyUnicode_KIND(value) == PyUnicode_1BYTE_KIND:
            if PyUnicode_GET_LENGTH(value) == 0 and dash:
                self.put_raw("-", 1)
            else:
                self.put(<char *>PyUnicode_DATA(value), PyUnicode_GET_LENGTH(value))
            return
        try:
            encoded = (value if type(value) is str else str(value)).encode("utf-8", "backslashreplace")
        except Exception:
            self.put_raw("-", 1)
            return
        self.put(PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded))

    cdef void put_int(self, int64_t value) noexcept:
        """A number in decimal, written by hand rather than with snprintf."""
        cdef char tmp[24]
        cdef int i = 24
        cdef bint negative = value < 0
        cdef uint64_t v = <uint64_t>(-value if negative else value)
        while True:
            i -= 1
            tmp[i] = <char>(c'0' + v % 10)
            v //= 10
            if v == 0:
                break
        if negative:
            i -= 1
            tmp[i] = c'-'
        self.put_raw(tmp + i, 24 - i)

    cdef void put_thousandths(self, int64_t value) noexcept:
        """value / 1000 with three decimals, as printf's %.3f writes it."""
        cdef char frac[4]
        self.put_int(value // 1000)
        frac[0] = c'.'
        frac[1] = <char>(c'0' + value // 100 % 10)
        frac[2] = <char>(c'0' + value // 10 % 10)
        frac[3] = <char>(c'0' + value % 10)
        self.put_raw(frac, 4)

    cdef void put_cpu(self, ffpm_slot *s, int which) noexcept:
        """%C: the request's CPU time (0 total, 1 user, 2 system) in percent of its duration, two
        decimals: the hundredths of ffpm_cpu_hundredths, which the status page shows too."""
        cdef char frac[3]
        cdef int64_t cpu_us = (s.last_request_utime_us if which != 2 else 0) + \
            (s.last_request_stime_us if which != 1 else 0)
        cdef int64_t hundredths = ffpm_cpu_hundredths(cpu_us, s.last_request_ns)
        self.put_int(hundredths // 100)
        frac[0] = c'.'
        frac[1] = <char>(c'0' + hundredths // 10 % 10)
        frac[2] = <char>(c'0' + hundredths % 10)
        self.put_raw(frac, 3)

    cdef void put_time(self, LogOp *op, int64_t seconds) noexcept:
        """strftime of a second in local time, formatted once per second and op."""
        cdef tm parts
        cdef time_t t = <time_t>seconds
        if op.time_cached != seconds:
            if localtime_r(&t, &parts) == NULL:
                op.time_length = 0
            else:
                op.time_length = strftime(op.time_text, TIME_TEXT_MAX - 1, op.text, &parts)
            op.time_cached = seconds
        self.put(op.time_text, op.time_length)

    cdef void put_uri(self, EnvironBuilder req) noexcept:
        """%r: REQUEST_URI without its query string."""
        cdef const char *p
        cdef const char *q
        cdef size_t n
        if not (req.vseen[K_REQUEST_URI] and req.vlen[K_REQUEST_URI]):
            return
        p = <char *>req.pbuf + req.voff[K_REQUEST_URI]
        n = req.vlen[K_REQUEST_URI]
        q = <const char *>memchr(p, c'?', n)
        self.put(p, <size_t>(q - p) if q != NULL else n)

    cdef void put_header(self, Response resp, object name) noexcept:
        """%o: the first response header of that name (as php-fpm: exact, case-sensitive), else "-"."""
        if resp.headers is not None and resp.status_code != 0:
            for item in resp.headers:
                if type(item) is tuple and len(<tuple>item) == 2 and (<tuple>item)[0] == name:
                    self.put_text((<tuple>item)[1], True)
                    return
        self.put_raw("-", 1)

    cdef void put_user(self, dict env) noexcept:
        """%u: the user of a Basic Authorization header (PHP's PHP_AUTH_USER); empty without one."""
        cdef uint8_t user[USER_MAX]
        cdef size_t n
        value = env.get("HTTP_AUTHORIZATION")
        if type(value) is not str or PyUnicode_KIND(value) != PyUnicode_1BYTE_KIND:
            return
        n = basic_auth_user(<const uint8_t *>PyUnicode_DATA(value), PyUnicode_GET_LENGTH(value), user)
        self.put(<char *>user, n)

    cdef void put_remote(self, Connection c) noexcept:
        """%R: the web server's address (php-fpm's fcgi_get_last_client_ip), from what accept4 gave
        the connection; formatted again only when it differs from the last one (nginx: always the same)."""
        cdef const uint8_t *a
        cdef int family
        cdef size_t n = c.peer_ip(&a, &family)
        if n == 0:
            self.put_raw("-", 1)
            return
        if family != self.remote_family or memcmp(a, self.remote_addr, n) != 0:
            if inet_ntop(family, a, self.remote_text, sizeof(self.remote_text)) == NULL:
                self.remote_text[0] = 0
            memcpy(self.remote_addr, a, n)
            self.remote_family = family
        if self.remote_text[0]:
            self.put(self.remote_text, strlen(self.remote_text))
        else:
            self.put_raw("-", 1)

    cdef bint suppressed(self, EnvironBuilder req, Response resp, int64_t content_length) noexcept:
        """access.suppress_path: only a 2xx GET or HEAD without body or query (php-fpm's rules)."""
        cdef const char *p
        cdef const char *q
        cdef size_t n
        if resp.status_code < 200 or resp.status_code > 299 or content_length > 0:
            return False
        if req.vseen[K_QUERY_STRING] and req.vlen[K_QUERY_STRING]:
            return False
        if not req.vseen[K_REQUEST_METHOD]:
            return False
        p = <char *>req.pbuf + req.voff[K_REQUEST_METHOD]
        n = req.vlen[K_REQUEST_METHOD]
        if not (n == 3 and memcmp(p, b"GET", 3) == 0 or n == 4 and memcmp(p, b"HEAD", 4) == 0):
            return False
        if not (req.vseen[K_REQUEST_URI] and req.vlen[K_REQUEST_URI]):
            return b"" in self.suppress
        p = <char *>req.pbuf + req.voff[K_REQUEST_URI]
        n = req.vlen[K_REQUEST_URI]
        q = <const char *>memchr(p, c'?', n)
        if q != NULL:
            n = q - p
        return PyBytes_FromStringAndSize(p, n) in self.suppress

    cdef int format_line(self, EnvironBuilder req, Response resp, SlotWriter slot, Connection c,
                         dict env) except -1:
        """The line for the request just served into self.line (self.used bytes, no newline); the
        slot holds its figures (SlotWriter.request_done ran first, as php-fpm's fpm_request_end)."""
        cdef Py_ssize_t i
        cdef LogOp *op
        cdef int64_t elapsed_ns = slot.slot.last_request_ns
        cdef int64_t content_length = c.content_length if c.content_length > 0 else 0
        self.used = 0
        for i in range(self.nops):
            op = &self.ops[i]
            if op.code == OP_LITERAL:
                self.put_raw(op.text, op.length)
            elif op.code == OP_DURATION:
                # php-fpm's duration is a timeval: whole microseconds; seconds are rounded to
                # the millisecond as %.3f rounds them.
                if op.number == 0:
                    self.put_thousandths((elapsed_ns // 1000 + 500) // 1000)
                elif op.number == 1:
                    self.put_thousandths(elapsed_ns // 1000)
                else:
                    self.put_int(elapsed_ns // 1000)
            elif op.code == OP_ENV:
                value = env.get(<object>op.name)
                if value is None:
                    self.put_raw("-", 1)
                else:
                    self.put_text(value, False)
            elif op.code == OP_SCRIPT:
                self.put_param(req, K_SCRIPT_FILENAME, True)
            elif op.code == OP_CONTENT_LENGTH:
                self.put_int(content_length)
            elif op.code == OP_METHOD:
                self.put_param(req, K_REQUEST_METHOD, True)
            elif op.code == OP_HEADER:
                self.put_header(resp, <object>op.name)
            elif op.code == OP_QUERY:
                self.put_param(req, K_QUERY_STRING, False)
            elif op.code == OP_QUERY_MARK:
                if req.vseen[K_QUERY_STRING] and req.vlen[K_QUERY_STRING]:
                    self.put_raw("?", 1)
            elif op.code == OP_URI:
                self.put_uri(req)
            elif op.code == OP_REMOTE:
                self.put_remote(c)
            elif op.code == OP_STATUS:
                self.put_int(resp.status_code)
            elif op.code == OP_TIME_START:
                self.put_time(op, slot.slot.request_start_wall_us // 1000000)
            elif op.code == OP_TIME_NOW:
                self.put_time(op, wall_us() // 1000000)
            elif op.code == OP_USER:
                self.put_user(env)
            elif op.code == OP_CPU:
                self.put_cpu(slot.slot, op.number)
            elif op.code == OP_MEMORY:
                # php-fpm's integer divisions of the byte count: 1024 per step
                self.put_int(<int64_t>(slot.slot.last_request_memory >> (10 * op.number)))
        return 0

    cdef int write_line(self, EnvironBuilder req, Response resp, SlotWriter slot, Connection c,
                        dict env) except -1:
        """Format and write the line of the request just served (after END_REQUEST went out).

        One write(); a failure (disk full, say) loses the line and nothing else, as in php-fpm.
        """
        cdef ssize_t rc
        if self.suppress and self.suppressed(req, resp, c.content_length):
            return 0
        self.format_line(req, resp, slot, c, env)
        self.line[self.used] = c'\n'
        with nogil:
            rc = write(self.fd, self.line, self.used + 1)
        return 0

    def line_for(self, params, status, headers, dict env=None, double elapsed=0.0,
                 int64_t utime_us=0, int64_t stime_us=0, uint64_t memory=0):
        """The line (without its newline) the worker writes for a request with these params, a
        response with this status and headers, that took elapsed seconds, utime_us and stime_us of
        CPU and left the worker's peak at memory bytes; no I/O: for tests and the micro-benchmark."""
        cdef EnvironBuilder req = EnvironBuilder({}, PathPolicy(""), 65536)
        cdef Response resp = Response()
        cdef SlotWriter slot = SlotWriter()
        cdef Connection c = Connection()
        cdef Py_buffer view
        PyObject_GetBuffer(params, &view, PyBUF_SIMPLE)
        try:
            req.add_params(<const uint8_t *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        if env is None:
            env = req.build(None)
        else:
            req.build(None)
        c.reset(-1)
        c.content_length = req.content_length
        resp.start_response(status, headers)
        slot.slot.request_start_ns = mono_ns() - <int64_t>(elapsed * 1e9)
        slot.slot.request_start_wall_us = wall_us()
        slot.slot.last_request_ns = <int64_t>(elapsed * 1e9)
        slot.slot.last_request_utime_us = utime_us
        slot.slot.last_request_stime_us = stime_us
        slot.slot.last_request_memory = memory
        return self.format(req, resp, slot, c, env)

    cdef bytes format(self, EnvironBuilder req, Response resp, SlotWriter slot, Connection c, dict env):
        self.format_line(req, resp, slot, c, env)
        return PyBytes_FromStringAndSize(self.line, self.used)

    def bench(self, params, status, headers, Py_ssize_t rounds):
        """Format the same request rounds times (the micro-benchmark's loop, without Python between)."""
        cdef EnvironBuilder req = EnvironBuilder({}, PathPolicy(""), 65536)
        cdef Response resp = Response()
        cdef SlotWriter slot = SlotWriter()
        cdef Connection c = Connection()
        cdef Py_buffer view
        cdef Py_ssize_t i
        PyObject_GetBuffer(params, &view, PyBUF_SIMPLE)
        try:
            req.add_params(<const uint8_t *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        env = req.build(None)
        c.reset(-1)
        c.content_length = req.content_length
        resp.start_response(status, headers)
        slot.slot.request_start_ns = mono_ns()
        slot.slot.request_start_wall_us = wall_us()
        slot.slot.last_request_ns = 1234567    # figures for %d, %C and %M, as after a request
        slot.slot.last_request_utime_us = 456
        slot.slot.last_request_stime_us = 78
        slot.slot.last_request_memory = 23 << 20
        for i in range(rounds):
            if not (self.suppress and self.suppressed(req, resp, c.content_length)):
                self.format_line(req, resp, slot, c, env)
        return self.used
