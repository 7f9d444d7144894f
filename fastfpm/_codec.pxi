# The C codec with fastfpm.protocol's API: thin trampolines over csrc/fcgi.c, so the codec tests run
# against both. Included by _core.pyx; no I/O, no state.

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
    # Casting would check another record (-245 as UNKNOWN_TYPE): out of range is the caller's error.
    if not (0 <= record_type <= 0xFF and 0 <= request_id <= 0xFFFF and 0 <= content_length <= FCGI_MAX_CONTENT):
        raise ValueError(f"header fields out of range: type {record_type}, request id {request_id}, "
                         f"content length {content_length}")
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


def head_ready(buf, Py_ssize_t offset=0):
    """Whether buf[offset:] holds a whole request head, or a record out of a head's order."""
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if offset < 0 or offset > view.len:
            raise ValueError("offset out of range")
        return fcgi_head_ready(<const uint8_t *>view.buf + offset, view.len - offset) == 1
    finally:
        PyBuffer_Release(&view)


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

