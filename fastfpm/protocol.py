"""The FastCGI 1.0 codec in pure Python: the reference for csrc/fcgi.c (exposed as fastfpm._core).

Sans-IO: functions turn bytes into records and name/value pairs and back, and never touch a socket.
Both implementations have the same API and behaviour (tests/test_protocol.py runs against both), so
anything here that differs from the C codec is a bug in one of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

__all__ = [
    "ProtocolError", "Record", "parse_record", "check_header", "parse_pairs", "encode_pairs", "encode_record",
    "encode_stream", "encode_begin_request", "parse_begin_request", "encode_end_request",
    "parse_end_request", "encode_unknown_type", "encode_get_values", "encode_get_values_result",
    "head_ready",
]

# Record layout (spec section 3.3): version, type, requestId (2 bytes), contentLength (2 bytes),
# paddingLength, reserved; then the content and the padding. All integers are big-endian.
HEADER_LEN = 8
VERSION_1 = 1
MAX_CONTENT = 65535  # contentLength is 16 bits
NULL_REQUEST_ID = 0  # management records (GET_VALUES, UNKNOWN_TYPE) use request id 0

# Record types (spec section 8).
BEGIN_REQUEST = 1
ABORT_REQUEST = 2
END_REQUEST = 3
PARAMS = 4
STDIN = 5
STDOUT = 6
STDERR = 7
DATA = 8
GET_VALUES = 9
GET_VALUES_RESULT = 10
UNKNOWN_TYPE = 11

# Roles and the BEGIN_REQUEST flag.
RESPONDER = 1
AUTHORIZER = 2
FILTER = 3
KEEP_CONN = 1

# END_REQUEST protocol statuses.
REQUEST_COMPLETE = 0
CANT_MPX_CONN = 1
OVERLOADED = 2
UNKNOWN_ROLE = 3

# The variables a GET_VALUES query may ask about (spec section 4.1).
FCGI_MAX_CONNS = b"FCGI_MAX_CONNS"
FCGI_MAX_REQS = b"FCGI_MAX_REQS"
FCGI_MPXS_CONNS = b"FCGI_MPXS_CONNS"

_MAX_PAIR_LENGTH = 0x7FFFFFFF  # 4-byte lengths carry 31 bits; the top bit marks the long form


class ProtocolError(ValueError):
    """Malformed FastCGI input: a bad version byte, a truncated name/value pair, a bad body length."""


class Record(NamedTuple):
    """One parsed record; size is the bytes it took from the buffer (header + content + padding)."""

    type: int
    request_id: int
    content: bytes
    size: int


def _padding(length: int) -> int:
    """Padding that brings a content length to a multiple of 8, as php-fpm and libfcgi emit."""
    return -length & 7


def parse_record(buf: bytes | bytearray | memoryview, offset: int = 0) -> Record | None:
    """Parse the record at buf[offset:]; None until the whole record, padding included, is there.

    Raises ProtocolError for a version byte other than 1 as soon as the 8 header bytes are present,
    and ValueError for an offset outside the buffer.
    """
    # The views are released on the way out, errors included, so a bytearray buffer stays resizable.
    with memoryview(buf) as raw, raw.cast("B") as view:
        return _parse_record(view, offset)


def _parse_record(view: memoryview, offset: int) -> Record | None:
    end = len(view)
    if offset < 0 or offset > end:
        raise ValueError("offset out of range")
    if end - offset < HEADER_LEN:
        return None
    if view[offset] != VERSION_1:
        raise ProtocolError(f"unsupported FastCGI version {view[offset]}")
    record_type = view[offset + 1]
    request_id = (view[offset + 2] << 8) | view[offset + 3]
    content_length = (view[offset + 4] << 8) | view[offset + 5]
    # The padding length is whatever the sender chose (0..255); it need not be the minimal one.
    # view[offset + 7] is the reserved byte: receivers ignore it.
    size = HEADER_LEN + content_length + view[offset + 6]
    if end - offset < size:
        return None
    start = offset + HEADER_LEN
    return Record(record_type, request_id, bytes(view[start:start + content_length]), size)


def _check_header_fields(record_type: int, request_id: int, content_length: int) -> None:
    # A wrapped value would be checked as another record: -245 as UNKNOWN_TYPE, 65544 as an 8-byte body.
    if not (0 <= record_type <= 0xFF and 0 <= request_id <= 0xFFFF and 0 <= content_length <= MAX_CONTENT):
        raise ValueError(f"header fields out of range: type {record_type}, request id {request_id}, "
                         f"content length {content_length}")


def check_header(record_type: int, request_id: int, content_length: int) -> None:
    """Raise ProtocolError when a record header breaks a rule that needs no connection state.

    Management records (GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE) carry request id 0 (spec
    section 3.3), and BEGIN_REQUEST and END_REQUEST bodies are exactly 8 bytes (sections 5.1,
    5.5). A record with request id 0 is a management record whatever its type: the reply to an
    unknown one is UNKNOWN_TYPE, so it is not an error here. ValueError for a value no header can
    carry (outside 0..255, 0..65535): a caller's bug, not the peer's, and never wrapped into range.
    """
    _check_header_fields(record_type, request_id, content_length)
    if request_id == NULL_REQUEST_ID:
        return
    if record_type in (GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE):
        raise ProtocolError(f"management record type {record_type} with request id {request_id}")
    if record_type in (BEGIN_REQUEST, END_REQUEST) and content_length != 8:
        raise ProtocolError(f"record type {record_type} with a {content_length}-byte body, expected 8")


def _read_length(view: memoryview, pos: int) -> tuple[int, int] | None:
    """A 1- or 4-byte pair length at pos: (length, next position), or None when it is cut short."""
    # Spec section 3.4: a first byte below 0x80 is the whole length (0..127); otherwise the length
    # takes four bytes, big-endian, with the top bit cleared (0..2**31-1).
    if pos >= len(view):
        return None
    first = view[pos]
    if first < 0x80:
        return first, pos + 1
    if len(view) - pos < 4:
        return None
    length = ((first & 0x7F) << 24) | (view[pos + 1] << 16) | (view[pos + 2] << 8) | view[pos + 3]
    return length, pos + 4


def parse_pairs(content: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes]]:
    """Parse name/value pairs (a PARAMS stream, a GET_VALUES body) into (name, value) tuples.

    Raises ProtocolError when a length byte or a name or value runs past the end of the content.
    """
    with memoryview(content) as raw, raw.cast("B") as view:
        return _parse_pairs(view)


def _parse_pairs(view: memoryview) -> list[tuple[bytes, bytes]]:
    end = len(view)
    pairs = []
    pos = 0
    while pos < end:
        # nameLength, valueLength, then the name and value bytes (no terminators, no padding).
        name = _read_length(view, pos)
        value = _read_length(view, name[1]) if name else None
        if value is None or name[0] + value[0] > end - value[1]:
            raise ProtocolError(f"truncated name/value pair at offset {pos}")
        name_start = value[1]
        value_start = name_start + name[0]
        value_end = value_start + value[0]
        pairs.append((bytes(view[name_start:value_start]), bytes(view[value_start:value_end])))
        pos = value_end
    return pairs


def _encode_length(length: int) -> bytes:
    """One pair length: a single byte below 128, else four bytes with the top bit set."""
    if length < 128:
        return bytes((length,))
    return (length | 0x80000000).to_bytes(4, "big")


def encode_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Encode (name, value) pairs, each length in 1 byte below 128 and in 4 bytes from 128 up."""
    items = [(bytes(name), bytes(value)) for name, value in pairs]
    out = bytearray()
    for name, value in items:
        if len(name) > _MAX_PAIR_LENGTH or len(value) > _MAX_PAIR_LENGTH:
            raise ValueError("name/value longer than 2**31 - 1 bytes")
    for name, value in items:
        out += _encode_length(len(name))
        out += _encode_length(len(value))
        out += name
        out += value
    return bytes(out)


def _header(record_type: int, request_id: int, content_length: int, padding: int) -> bytes:
    # Out-of-range type and id values wrap as the C codec's byte stores do.
    return bytes((VERSION_1, record_type & 0xFF, (request_id >> 8) & 0xFF, request_id & 0xFF,
                  content_length >> 8, content_length & 0xFF, padding, 0))


def encode_record(record_type: int, request_id: int, content: bytes = b"") -> bytes:
    """Encode one record padded to a multiple of 8 bytes; ValueError for content over 65535 bytes."""
    data = bytes(content)
    length = len(data)
    if length > MAX_CONTENT:
        raise ValueError(f"record content of {length} bytes is over {MAX_CONTENT}")
    padding = _padding(length)
    return _header(record_type, request_id, length, padding) + data + bytes(padding)


def encode_stream(record_type: int, request_id: int, data: bytes) -> bytes:
    """Frame data as stream records (STDOUT, STDERR, STDIN, PARAMS) of at most 65535 bytes each.

    Empty data gives b"": the empty record that ends a stream is the caller's to send, once.
    """
    raw = bytes(data)
    return b"".join(encode_record(record_type, request_id, raw[start:start + MAX_CONTENT])
                    for start in range(0, len(raw), MAX_CONTENT))


def encode_begin_request(request_id: int, role: int = RESPONDER, flags: int = 0) -> bytes:
    """A BEGIN_REQUEST record: role (2 bytes), flags (1 byte), 5 reserved bytes."""
    body = bytes(((role >> 8) & 0xFF, role & 0xFF, flags & 0xFF, 0, 0, 0, 0, 0))
    return encode_record(BEGIN_REQUEST, request_id, body)


def parse_begin_request(content: bytes) -> tuple[int, int]:
    """(role, flags) from a BEGIN_REQUEST body, which must be exactly 8 bytes."""
    body = bytes(content)
    if len(body) != 8:
        raise ProtocolError(f"BEGIN_REQUEST body of {len(body)} bytes, expected 8")
    return (body[0] << 8) | body[1], body[2]


def head_ready(buf: bytes | bytearray | memoryview, offset: int = 0) -> bool:
    """Whether buf[offset:] holds a whole request head: BEGIN_REQUEST (RESPONDER), then its PARAMS
    through the empty one; also True once the first record out of that order is complete (its
    handling cannot wait), False while the bytes end inside a head. A worker reads a head only once
    it is all there, so a client sending it slowly never holds the worker."""
    try:
        record = parse_record(buf, offset)
    except ProtocolError:
        return True
    if record is None:
        return False
    if record.type != BEGIN_REQUEST or record.request_id == NULL_REQUEST_ID or len(record.content) != 8:
        return True
    if parse_begin_request(record.content)[0] != RESPONDER:
        return True
    request_id, offset = record.request_id, offset + record.size
    while True:
        try:
            record = parse_record(buf, offset)
        except ProtocolError:
            return True
        if record is None:
            return False
        if record.type != PARAMS or record.request_id != request_id or not record.content:
            return True
        offset += record.size


def encode_end_request(request_id: int, app_status: int = 0,
                       protocol_status: int = REQUEST_COMPLETE) -> bytes:
    """An END_REQUEST record: app status (4 bytes), protocol status (1 byte), 3 reserved bytes."""
    if not 0 <= app_status <= 0xFFFFFFFF:
        # The same error the C codec's uint32_t conversion raises.
        raise OverflowError(f"app_status {app_status} does not fit in 32 unsigned bits")
    body = app_status.to_bytes(4, "big") + bytes((protocol_status & 0xFF, 0, 0, 0))
    return encode_record(END_REQUEST, request_id, body)


def parse_end_request(content: bytes) -> tuple[int, int]:
    """(app_status, protocol_status) from an END_REQUEST body, which must be exactly 8 bytes."""
    body = bytes(content)
    if len(body) != 8:
        raise ProtocolError(f"END_REQUEST body of {len(body)} bytes, expected 8")
    return int.from_bytes(body[:4], "big"), body[4]


def encode_unknown_type(record_type: int) -> bytes:
    """The UNKNOWN_TYPE reply (request id 0) to a management record the application does not know."""
    return encode_record(UNKNOWN_TYPE, NULL_REQUEST_ID, bytes((record_type & 0xFF, 0, 0, 0, 0, 0, 0, 0)))


def encode_get_values(names: Iterable[bytes]) -> bytes:
    """A GET_VALUES query (request id 0): the names as pairs with empty values."""
    return encode_record(GET_VALUES, NULL_REQUEST_ID, encode_pairs([(bytes(name), b"") for name in names]))


def encode_get_values_result(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A GET_VALUES_RESULT record (request id 0) carrying the answered variables."""
    return encode_record(GET_VALUES_RESULT, NULL_REQUEST_ID, encode_pairs(pairs))
