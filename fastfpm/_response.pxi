# The response: PEP 3333's side (start_response, write, the body chunks' rules) in Response, and the
# FastCGI framing (STDOUT records, END_REQUEST, one send per flush) in FcgiResponse. A second
# protocol subclasses Response with its own framing. Included by _core.pyx.


cdef enum:
    WBUF_INITIAL = 65536
    FLUSH_AT = 262144       # send once this much response is buffered
cdef size_t NO_RECORD = <size_t>-1

# fastfpm's own answers, each declared once as (status line, headers, CGI head plus body): the
# status and headers Response.answer_own records (what the access log's %s and %o read) and the
# bytes FcgiResponse sends are made from the same text.
cdef tuple own_answer(str status_line, bytes body):
    cdef list headers = [("Content-Type", "text/plain; charset=utf-8"),
                         ("Content-Length", str(len(body)))]
    head = "".join([f"Status: {status_line}\r\n", *[f"{name}: {value}\r\n" for name, value in headers],
                    "\r\n"])
    return status_line, headers, head.encode("latin-1") + body


cdef tuple ANSWER_500 = own_answer("500 Internal Server Error", b"Internal Server Error\n")
# A body over client_max_body_size, in nginx's wording (RFC 9110 calls 413 Content Too Large).
cdef tuple ANSWER_413 = own_answer("413 Request Entity Too Large", b"Request Entity Too Large\n")


cdef class Response:
    """One request's WSGI response: status and headers as start_response gave them, and the bytes
    buffered to send. The framing methods (emit_head, out_body, flush, finish, replace_with_error)
    are the protocol's."""
    cdef uint8_t *wbuf
    cdef size_t wlen, wcap
    cdef object status
    cdef object headers
    cdef bint headers_sent
    cdef int status_code
    cdef Connection conn             # the connection being answered; None between requests
    cdef object start_response_cb    # the bound methods handed to the app, made once
    cdef object write_cb

    def __cinit__(self):
        self.wbuf = <uint8_t *>malloc(WBUF_INITIAL)
        if self.wbuf == NULL:
            raise MemoryError()
        self.wcap = WBUF_INITIAL
        self.start_response_cb = self.start_response
        self.write_cb = self.write

    def __dealloc__(self):
        free(self.wbuf)

    cdef void begin(self, Connection conn) noexcept:
        """A new request on conn: nothing started, nothing buffered."""
        self.conn = conn
        self.status = None
        self.headers = None
        self.headers_sent = False
        self.status_code = 0
        self.wlen = 0

    cdef void end(self) noexcept:
        self.conn = None
        self.wlen = 0

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
        self.body_chunk(data)
        self.flush()

    cdef int out_reserve(self, size_t n) except -1:
        """Room for n more bytes in the buffer."""
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
        return self.out_body(p, n)

    cdef int body_chunk(self, object data) except -1:
        """One chunk of the app's body; the head goes first, with the first non-empty chunk."""
        if type(data) is not bytes:
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            else:
                raise TypeError(f"WSGI body chunks must be bytes, not {type(data).__name__}")
        if not self.headers_sent:
            if PyBytes_GET_SIZE(data) == 0:
                return 0  # PEP 3333: headers wait for the first non-empty chunk
            self.emit_head()
        return self.out_body(<const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef int send_iterable(self, object result) except -1:
        """The app's iterable, chunk by chunk: a list or tuple batched, anything else sent as it comes."""
        cdef Py_ssize_t count = 0
        if type(result) is list or type(result) is tuple:
            # Known length: batch everything (and the end of the request) into as few sends as possible.
            for chunk in result:
                self.body_chunk(chunk)
            return 0
        for chunk in result:
            self.body_chunk(chunk)
            if self.headers_sent and self.wlen:
                # PEP 3333: no block may wait for the next one to be produced.
                if count:
                    self.conn.check_abort()
                self.flush()
                count += 1
        return 0

    cdef void answer_own(self, int code, tuple answer) noexcept:
        """The response is now fastfpm's own (ANSWER_500, ANSWER_413): its status and headers
        replace what the app had started (never sent), so the access log shows what went out."""
        self.status = answer[0]
        self.headers = answer[1]
        self.status_code = code

    cdef int ensure_head(self) except -1:
        """An empty body: the head still goes out."""
        if not self.headers_sent:
            self.emit_head()
        return 0

    # The protocol's framing.
    cdef int emit_head(self) except -1:
        raise NotImplementedError

    cdef int out_body(self, const uint8_t *data, size_t n) except -1:
        raise NotImplementedError

    cdef int flush(self) except -1:
        raise NotImplementedError

    cdef int finish(self) except -1:
        """End the response and send what is buffered."""
        raise NotImplementedError

    cdef int replace_with_error(self, int code) except -1:
        """Drop what is buffered (nothing was sent) and answer code (500 or 413) instead."""
        raise NotImplementedError


@cython.final
cdef class FcgiResponse(Response):
    """The response as FastCGI records: a CGI head and the body in STDOUT records of at most 65535
    bytes, then the empty STDOUT and END_REQUEST, all in one buffer sent with one call."""
    cdef size_t rec_start            # where the open STDOUT record's header is, or NO_RECORD
    cdef int request_id

    cdef void begin(self, Connection conn) noexcept:
        Response.begin(self, conn)
        self.rec_start = NO_RECORD
        self.request_id = (<FcgiConnection>conn).request_id

    cdef void end(self) noexcept:
        Response.end(self)
        self.rec_start = NO_RECORD

    cdef inline void close_record(self) noexcept:
        cdef size_t clen, pad
        if self.rec_start == NO_RECORD:
            return
        clen = self.wlen - self.rec_start - FCGI_HEADER_LEN
        if clen == 0:
            self.wlen = self.rec_start
        else:
            pad = fcgi_padding(clen)
            fcgi_write_header(self.wbuf + self.rec_start, FCGI_STDOUT, self.request_id, clen, pad)
            memset(self.wbuf + self.wlen, 0, pad)  # room was reserved with the content
            self.wlen += pad
        self.rec_start = NO_RECORD

    cdef int out_body(self, const uint8_t *data, size_t n) except -1:
        """Append stdout bytes, opening and closing STDOUT records of at most 65535 bytes."""
        cdef size_t room, take
        while n:
            if self.rec_start == NO_RECORD:
                if self.wlen >= FLUSH_AT:
                    self.flush()
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
                self.close_record()
        return 0

    cdef int emit_head(self) except -1:
        """The CGI-style head a FastCGI responder sends: "Status: ...", the headers, a blank line."""
        if self.status is None:
            raise RuntimeError("the application returned a body without calling start_response()")
        self.out_body(<const uint8_t *>b"Status: ", 8)
        self.out_text(self.status, True)
        self.out_body(<const uint8_t *>b"\r\n", 2)
        for item in self.headers:
            name, value = item
            self.out_text(name, False)
            self.out_body(<const uint8_t *>b": ", 2)
            self.out_text(value, True)
            self.out_body(<const uint8_t *>b"\r\n", 2)
        self.out_body(<const uint8_t *>b"\r\n", 2)
        self.headers_sent = True
        return 0

    cdef int flush(self) except -1:
        self.close_record()
        if self.wlen:
            try:
                self.conn.send_all(self.wbuf, self.wlen)
            finally:
                self.wlen = 0
        return 0

    cdef int frame_end(self) except -1:
        """Close the stdout stream and append the empty STDOUT record and END_REQUEST."""
        self.close_record()
        self.out_reserve(2 * FCGI_HEADER_LEN + 8)
        self.wlen += fcgi_write_header(self.wbuf + self.wlen, FCGI_STDOUT, self.request_id, 0, 0)
        self.wlen += fcgi_write_end_request(self.wbuf + self.wlen, self.request_id, 0,
                                            FCGI_REQUEST_COMPLETE)
        return 0

    cdef int finish(self) except -1:
        self.frame_end()
        return self.flush()

    cdef int replace_with_error(self, int code) except -1:
        cdef tuple answer = ANSWER_413 if code == 413 else ANSWER_500
        cdef bytes wire = answer[2]
        self.wlen = 0
        self.rec_start = NO_RECORD
        self.answer_own(code, answer)
        return self.out_body(<const uint8_t *>PyBytes_AS_STRING(wire), PyBytes_GET_SIZE(wire))
