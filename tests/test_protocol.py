"""The FastCGI codec: every test runs against the Python reference and the C codec (fastfpm._core).

The two must agree byte for byte, so besides the shared behaviour tests a seeded differential fuzz
feeds both the same random inputs.
"""

import importlib
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfpm import protocol
from fastfpm.protocol import ProtocolError, Record

IMPLEMENTATIONS = {"python": "fastfpm.protocol", "c": "fastfpm._core"}

ALL_TYPES = range(1, 12)


@pytest.fixture(params=list(IMPLEMENTATIONS))
def codec(request):
    """The codec module under test: the pure-Python reference or the C one."""
    return importlib.import_module(IMPLEMENTATIONS[request.param])


@pytest.fixture(scope="module")
def both():
    """Both codecs, for tests that compare them."""
    return protocol, importlib.import_module(IMPLEMENTATIONS["c"])


def header(version=1, rtype=6, request_id=1, content_length=0, padding=0, reserved=0):
    return struct.pack(">BBHHBB", version, rtype, request_id, content_length, padding, reserved)


def parse_all(codec, buf):
    """Every complete record in buf, in order, and the offset where parsing stopped."""
    records, offset = [], 0
    while (record := codec.parse_record(buf, offset)) is not None:
        records.append(record)
        offset += record.size
    return records, offset


# ------------------------------------------------------------------------------------------- API


def test_constants(codec):
    assert (codec.VERSION_1, codec.HEADER_LEN, codec.MAX_CONTENT) == (1, 8, 65535)
    types = ["BEGIN_REQUEST", "ABORT_REQUEST", "END_REQUEST", "PARAMS", "STDIN", "STDOUT", "STDERR",
             "DATA", "GET_VALUES", "GET_VALUES_RESULT", "UNKNOWN_TYPE"]
    assert [getattr(codec, name) for name in types] == list(ALL_TYPES)
    assert (codec.RESPONDER, codec.AUTHORIZER, codec.FILTER, codec.KEEP_CONN) == (1, 2, 3, 1)
    assert (codec.REQUEST_COMPLETE, codec.CANT_MPX_CONN, codec.OVERLOADED, codec.UNKNOWN_ROLE) == (0, 1, 2, 3)


def test_shared_error_and_record_types(codec):
    assert issubclass(ProtocolError, ValueError)
    assert codec.ProtocolError is ProtocolError
    assert codec.Record is Record
    assert protocol.FCGI_MAX_CONNS == b"FCGI_MAX_CONNS"
    assert protocol.FCGI_MAX_REQS == b"FCGI_MAX_REQS"
    assert protocol.FCGI_MPXS_CONNS == b"FCGI_MPXS_CONNS"


# ------------------------------------------------------------------------------------ records


@pytest.mark.parametrize("rtype", ALL_TYPES)
@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 15, 16, 100])
def test_record_round_trip_every_type(codec, rtype, length):
    content = bytes(range(length % 256)) * (length // 256) + bytes(range(length % 256))
    content = content[:length]
    raw = codec.encode_record(rtype, 1, content)
    assert codec.parse_record(raw) == Record(rtype, 1, content, len(raw))


@pytest.mark.parametrize("request_id", [0, 1, 255, 256, 4660, 65535])
def test_request_id_is_big_endian(codec, request_id):
    raw = codec.encode_record(protocol.STDOUT, request_id, b"x")
    assert raw[2:4] == request_id.to_bytes(2, "big")
    assert codec.parse_record(raw).request_id == request_id


@pytest.mark.parametrize("length", range(0, 33))
def test_padding_to_multiple_of_8(codec, length):
    raw = codec.encode_record(protocol.STDOUT, 1, b"a" * length)
    padding = -length & 7
    assert len(raw) == 8 + length + padding
    assert len(raw) % 8 == 0
    assert raw[:8] == header(rtype=protocol.STDOUT, content_length=length, padding=padding)
    assert raw[8 + length:] == bytes(padding)


def test_parse_honours_foreign_padding_and_ignores_reserved(codec):
    # Other encoders may pad more than needed (up to 255 bytes) and the reserved byte is ignored.
    raw = header(rtype=protocol.STDIN, content_length=3, padding=255, reserved=0xAA) + b"abc" + b"\xff" * 255
    assert codec.parse_record(raw) == Record(protocol.STDIN, 1, b"abc", 8 + 3 + 255)
    assert codec.parse_record(raw[:-1]) is None


def test_unknown_types_parse(codec):
    # Types the codec does not know are still records; the caller answers UNKNOWN_TYPE.
    for rtype in (0, 12, 200, 255):
        raw = header(rtype=rtype, request_id=0, content_length=2, padding=6) + b"hi" + bytes(6)
        assert codec.parse_record(raw) == Record(rtype, 0, b"hi", 16)


def test_max_content(codec):
    raw = codec.encode_record(protocol.STDOUT, 1, b"z" * 65535)
    assert len(raw) == 8 + 65535 + 1
    assert codec.parse_record(raw) == Record(protocol.STDOUT, 1, b"z" * 65535, 65544)
    with pytest.raises(ValueError):
        codec.encode_record(protocol.STDOUT, 1, b"z" * 65536)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_accepts_buffers(codec, kind):
    raw = codec.encode_record(protocol.STDERR, 7, b"buffer")
    assert codec.parse_record(kind(raw)) == Record(protocol.STDERR, 7, b"buffer", 16)


def test_parse_at_offset(codec):
    first = codec.encode_record(protocol.STDOUT, 1, b"one")
    second = codec.encode_record(protocol.STDERR, 2, b"second")
    buf = first + second
    assert codec.parse_record(buf, len(first)) == Record(protocol.STDERR, 2, b"second", len(second))
    assert codec.parse_record(buf, len(buf)) is None
    assert codec.parse_record(buf, len(buf) - 3) is None
    for bad in (-1, len(buf) + 1):
        with pytest.raises(ValueError):
            codec.parse_record(buf, bad)


def test_empty_buffer_needs_more(codec):
    assert codec.parse_record(b"") is None


# ------------------------------------------------------------------------------------ streams


def test_stream_empty(codec):
    assert codec.encode_stream(protocol.STDOUT, 1, b"") == b""


@pytest.mark.parametrize(("size", "chunks"), [
    (1, [1]),
    (65534, [65534]),
    (65535, [65535]),
    (65536, [65535, 1]),
    (131070, [65535, 65535]),
    (131071, [65535, 65535, 1]),
    (200000, [65535, 65535, 65535, 3395]),
])
def test_stream_splits_at_65535(codec, size, chunks):
    data = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    raw = codec.encode_stream(protocol.STDOUT, 3, data)
    records, end = parse_all(codec, raw)
    assert end == len(raw)
    assert [len(r.content) for r in records] == chunks
    assert all(r.type == protocol.STDOUT and r.request_id == 3 for r in records)
    assert b"".join(r.content for r in records) == data
    assert raw == b"".join(codec.encode_record(protocol.STDOUT, 3, r.content) for r in records)


# ---------------------------------------------------------------------------------- truncation


def sample_stream(codec):
    """A realistic request as a web server sends it, with records of several sizes."""
    params = codec.encode_pairs([(b"REQUEST_METHOD", b"POST"), (b"SCRIPT_NAME", b"/x" * 100),
                                 (b"HTTP_COOKIE", b"c" * 300)])
    return (codec.encode_begin_request(1, protocol.RESPONDER, protocol.KEEP_CONN)
            + codec.encode_stream(protocol.PARAMS, 1, params)
            + codec.encode_record(protocol.PARAMS, 1)
            + codec.encode_stream(protocol.STDIN, 1, b"body" * 5)
            + codec.encode_record(protocol.STDIN, 1)
            + codec.encode_record(protocol.ABORT_REQUEST, 1))


def test_need_more_at_every_truncation_point(codec):
    stream = sample_stream(codec)
    full, end = parse_all(codec, stream)
    assert end == len(stream) and len(full) == 6
    boundaries = [0]
    for record in full:
        boundaries.append(boundaries[-1] + record.size)
    for cut in range(len(stream)):
        records, stopped = parse_all(codec, stream[:cut])
        complete = sum(1 for b in boundaries[1:] if b <= cut)
        assert records == full[:complete], cut
        assert stopped == boundaries[complete]
        # The same answer when the prefix sits inside a larger buffer at an offset.
        shifted = b"\x00" * 5 + stream[:cut]
        assert codec.parse_record(shifted, 5 + stopped) is None


# --------------------------------------------------------------------------------- bad version


@pytest.mark.parametrize("version", [0, 2, 3, 0x7F, 0xFF])
def test_bad_version(codec, version):
    raw = header(version=version, content_length=4, padding=4) + b"abcd" + bytes(4)
    with pytest.raises(ProtocolError, match="version"):
        codec.parse_record(raw)
    # Reported as soon as the 8 header bytes are there, before the content has arrived...
    with pytest.raises(ProtocolError):
        codec.parse_record(raw[:8])
    # ...but not before.
    assert codec.parse_record(raw[:7]) is None


def test_bad_version_after_a_good_record(codec):
    good = codec.encode_record(protocol.STDOUT, 1, b"ok")
    bad = header(version=9)
    assert codec.parse_record(good + bad) == Record(protocol.STDOUT, 1, b"ok", 16)
    with pytest.raises(ProtocolError):
        codec.parse_record(good + bad, 16)


def test_garbage_never_crashes(codec):
    rng = random.Random(1234)
    for _ in range(2000):
        data = rng.randbytes(rng.randrange(0, 40))
        try:
            record = codec.parse_record(data)
        except ProtocolError:
            assert len(data) >= 8 and data[0] != 1
            continue
        if record is not None:
            assert record.size <= len(data)
        try:
            codec.parse_pairs(data)
        except ProtocolError:
            pass


# ----------------------------------------------------------------------------- name/value pairs


@pytest.mark.parametrize("name_len", [0, 1, 127, 128, 129, 255, 256, 65535, 70000])
@pytest.mark.parametrize("value_len", [0, 127, 128, 1000])
def test_pairs_round_trip(codec, name_len, value_len):
    name, value = b"N" * name_len, b"v" * value_len
    raw = codec.encode_pairs([(name, value)])
    overhead = (1 if name_len < 128 else 4) + (1 if value_len < 128 else 4)
    assert len(raw) == overhead + name_len + value_len
    assert codec.parse_pairs(raw) == [(name, value)]


def test_pair_length_boundary_encoding(codec):
    # 127 fits in one byte; 128 needs four, big-endian with the top bit set.
    assert codec.encode_pairs([(b"a" * 127, b"")])[:2] == b"\x7f\x00"
    assert codec.encode_pairs([(b"a" * 128, b"")])[:5] == b"\x80\x00\x00\x80\x00"
    assert codec.encode_pairs([(b"", b"b" * 128)])[:5] == b"\x00\x80\x00\x00\x80"
    assert codec.encode_pairs([(b"", b"b" * 70000)])[:5] == b"\x00\x80\x01\x11\x70"


def test_pairs_several_and_empty(codec):
    pairs = [(b"REQUEST_METHOD", b"GET"), (b"EMPTY", b""), (b"", b"no name"), (b"Q", b"a=1&b=\x00\xff")]
    raw = codec.encode_pairs(pairs)
    assert codec.parse_pairs(raw) == pairs
    assert codec.encode_pairs([]) == b""
    assert codec.parse_pairs(b"") == []


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_pairs_accepts_buffers(codec, kind):
    assert codec.parse_pairs(kind(b"\x01\x02abc")) == [(b"a", b"bc")]


def test_long_form_of_a_short_length_is_accepted(codec):
    # The spec does not forbid a 4-byte encoding of a length below 128; libfcgi and php accept it.
    assert codec.parse_pairs(b"\x80\x00\x00\x01\x01ab") == [(b"a", b"b")]


def test_four_byte_length_masks_top_bit(codec):
    # 0x80000002 means 2; 0xFFFFFFFF means 2**31 - 1, which then runs past the end.
    assert codec.parse_pairs(b"\x80\x00\x00\x02\x00ab") == [(b"ab", b"")]
    with pytest.raises(ProtocolError):
        codec.parse_pairs(b"\xff\xff\xff\xff\x00ab")
    with pytest.raises(ProtocolError):
        codec.parse_pairs(b"\x01\xff\xff\xff\xffa")


def test_pairs_truncated_at_every_point(codec):
    pairs = [(b"SHORT", b"v"), (b"L" * 130, b"w" * 200), (b"", b""), (b"K", b"x" * 128)]
    raw = codec.encode_pairs(pairs)
    ends, pos = [], 0
    for name, value in pairs:
        pos += len(codec.encode_pairs([(name, value)]))
        ends.append(pos)
    for cut in range(len(raw)):
        if cut in ends or cut == 0:
            assert codec.parse_pairs(raw[:cut]) == pairs[:ends.index(cut) + 1 if cut else 0]
        else:
            with pytest.raises(ProtocolError, match="truncated"):
                codec.parse_pairs(raw[:cut])


@pytest.mark.parametrize("content", [
    b"\x05",                      # name length, no value length
    b"\x05\x00",                  # lengths but no name
    b"\x05\x00abcd",              # name one byte short
    b"\x01\x05a1234",             # value one byte short
    b"\x80",                      # 4-byte name length cut after 1 byte
    b"\x80\x00\x00",              # ... after 3 bytes
    b"\x01\x80\x00\x00",          # 4-byte value length cut short
    b"\x80\x00\x01\x00\x00" + b"a" * 255,
])
def test_truncated_pairs(codec, content):
    with pytest.raises(ProtocolError):
        codec.parse_pairs(content)


# ------------------------------------------------------------------------ fixed-size bodies


@pytest.mark.parametrize("role", [protocol.RESPONDER, protocol.AUTHORIZER, protocol.FILTER, 0x1234])
@pytest.mark.parametrize("flags", [0, protocol.KEEP_CONN, 0xFF])
def test_begin_request(codec, role, flags):
    raw = codec.encode_begin_request(9, role, flags)
    assert len(raw) == 16
    record = codec.parse_record(raw)
    body = role.to_bytes(2, "big") + bytes([flags]) + bytes(5)
    assert record == Record(protocol.BEGIN_REQUEST, 9, body, 16)
    assert codec.parse_begin_request(record.content) == (role, flags)


def test_begin_request_defaults(codec):
    assert codec.encode_begin_request(1) == codec.encode_begin_request(1, protocol.RESPONDER, 0)


@pytest.mark.parametrize("length", [0, 1, 7, 9, 16])
def test_begin_request_wrong_length(codec, length):
    with pytest.raises(ProtocolError):
        codec.parse_begin_request(b"\x00" * length)


# ------------------------------------------------------------------------ header rules


@pytest.mark.parametrize("rtype", ALL_TYPES)
def test_check_header_accepts_any_management_record_with_id_zero(codec, rtype):
    # Request id 0 is a management record whatever its type: an unknown one is answered with
    # UNKNOWN_TYPE by the loop, not refused as malformed.
    codec.check_header(rtype, 0, 3)


@pytest.mark.parametrize("rtype", [protocol.GET_VALUES, protocol.GET_VALUES_RESULT, protocol.UNKNOWN_TYPE])
def test_check_header_refuses_management_records_with_a_request_id(codec, rtype):
    with pytest.raises(ProtocolError, match="management record"):
        codec.check_header(rtype, 1, 0)


@pytest.mark.parametrize("rtype", [protocol.BEGIN_REQUEST, protocol.END_REQUEST])
@pytest.mark.parametrize("length", [0, 7, 9, 65535])
def test_check_header_refuses_fixed_bodies_of_the_wrong_size(codec, rtype, length):
    with pytest.raises(ProtocolError, match="expected 8"):
        codec.check_header(rtype, 1, length)


@pytest.mark.parametrize("rtype", [protocol.BEGIN_REQUEST, protocol.END_REQUEST, protocol.PARAMS,
                                   protocol.STDIN, protocol.STDOUT, protocol.ABORT_REQUEST, 99])
def test_check_header_accepts_application_records(codec, rtype):
    length = 8 if rtype in (protocol.BEGIN_REQUEST, protocol.END_REQUEST) else 100
    codec.check_header(rtype, 65535, length)


@pytest.mark.parametrize("fields", [(-245, 1, 0), (265, 1, 0), (256, 1, 0), (9, 65536, 0), (9, -65536, 0),
                                    (1, 1, 65544), (1, 1, -65528), (6, 1, 65536)])
def test_check_header_refuses_fields_no_header_carries(codec, fields):
    # Found by the hypothesis fuzz below: the C codec cast -245 to UNKNOWN_TYPE (11) and 65544 to an
    # 8-byte body, the Python one compared the raw ints, so they disagreed. Neither guesses now.
    with pytest.raises(ValueError, match="out of range") as raised:
        codec.check_header(*fields)
    assert not isinstance(raised.value, ProtocolError)


def test_check_header_agrees_between_codecs(both):
    py, c = both
    rng = random.Random(99)
    for _ in range(3000):
        args = (rng.randrange(256), rng.choice([0, 1, 2, 65535]), rng.choice([0, 8, rng.randrange(65536)]))
        outcomes = []
        for codec in (py, c):
            try:
                codec.check_header(*args)
                outcomes.append("ok")
            except ProtocolError:
                outcomes.append("error")
        assert outcomes[0] == outcomes[1], args


@pytest.mark.parametrize("app_status", [0, 1, 255, 256, 0x12345678, 0xFFFFFFFF])
@pytest.mark.parametrize("protocol_status", [0, 1, 2, 3])
def test_end_request(codec, app_status, protocol_status):
    raw = codec.encode_end_request(5, app_status, protocol_status)
    assert len(raw) == 16
    record = codec.parse_record(raw)
    assert record.type == protocol.END_REQUEST and record.request_id == 5
    assert record.content == app_status.to_bytes(4, "big") + bytes([protocol_status, 0, 0, 0])
    assert codec.parse_end_request(record.content) == (app_status, protocol_status)


def test_end_request_defaults(codec):
    assert codec.encode_end_request(1) == codec.encode_end_request(1, 0, protocol.REQUEST_COMPLETE)


@pytest.mark.parametrize("app_status", [-1, 2**32])
def test_end_request_app_status_range(codec, app_status):
    with pytest.raises(OverflowError):
        codec.encode_end_request(1, app_status)


@pytest.mark.parametrize("length", [0, 4, 7, 9])
def test_end_request_wrong_length(codec, length):
    with pytest.raises(ProtocolError):
        codec.parse_end_request(b"\x00" * length)


@pytest.mark.parametrize("rtype", [0, 12, 99, 255])
def test_unknown_type(codec, rtype):
    raw = codec.encode_unknown_type(rtype)
    assert codec.parse_record(raw) == Record(protocol.UNKNOWN_TYPE, 0, bytes([rtype]) + bytes(7), 16)


def test_get_values(codec):
    names = [protocol.FCGI_MAX_CONNS, protocol.FCGI_MAX_REQS, protocol.FCGI_MPXS_CONNS]
    record = codec.parse_record(codec.encode_get_values(names))
    assert (record.type, record.request_id) == (protocol.GET_VALUES, 0)
    assert codec.parse_pairs(record.content) == [(name, b"") for name in names]

    answer = [(b"FCGI_MAX_CONNS", b"5"), (b"FCGI_MPXS_CONNS", b"0")]
    record = codec.parse_record(codec.encode_get_values_result(answer))
    assert (record.type, record.request_id) == (protocol.GET_VALUES_RESULT, 0)
    assert codec.parse_pairs(record.content) == answer


# ------------------------------------------------------------------------- differential fuzz


def _random_pairs(rng):
    pairs = []
    for _ in range(rng.randrange(0, 6)):
        lengths = [rng.choice([0, 1, 126, 127, 128, 129, rng.randrange(0, 400)]) for _ in range(2)]
        pairs.append((rng.randbytes(lengths[0]), rng.randbytes(lengths[1])))
    return pairs


def _outcome(function, *args):
    """What a call gives: its value, or the kind of error it raised."""
    try:
        return ("ok", function(*args))
    except ProtocolError:
        return ("protocol-error",)
    except ValueError:
        return ("value-error",)


def test_differential_encoders(both):
    py, c = both
    rng = random.Random(20240601)
    for _ in range(300):
        rtype, request_id = rng.randrange(0, 256), rng.randrange(0, 65536)
        content = rng.randbytes(rng.choice([0, 1, 7, 8, 9, rng.randrange(0, 3000)]))
        assert py.encode_record(rtype, request_id, content) == c.encode_record(rtype, request_id, content)
        big = rng.randbytes(rng.choice([0, 65534, 65535, 65536, rng.randrange(0, 140000)]))
        assert py.encode_stream(rtype, request_id, big) == c.encode_stream(rtype, request_id, big)
        pairs = _random_pairs(rng)
        assert py.encode_pairs(pairs) == c.encode_pairs(pairs)
        role, flags = rng.randrange(0, 65536), rng.randrange(0, 256)
        assert py.encode_begin_request(request_id, role, flags) == c.encode_begin_request(
            request_id, role, flags)
        app_status, status = rng.randrange(0, 2**32), rng.randrange(0, 256)
        assert py.encode_end_request(request_id, app_status, status) == c.encode_end_request(
            request_id, app_status, status)
        assert py.encode_unknown_type(rtype) == c.encode_unknown_type(rtype)
        names = [name for name, _ in pairs]
        assert py.encode_get_values(names) == c.encode_get_values(names)
        assert py.encode_get_values_result(pairs) == c.encode_get_values_result(pairs)


def test_differential_parsers(both):
    py, c = both
    rng = random.Random(7)
    for _ in range(3000):
        # Start from something valid, then damage it: flip, cut, splice or append bytes.
        if rng.random() < 0.5:
            data = bytearray(py.encode_record(rng.randrange(0, 12), rng.randrange(0, 65536),
                                              py.encode_pairs(_random_pairs(rng))))
        else:
            data = bytearray(py.encode_pairs(_random_pairs(rng)))
        for _ in range(rng.randrange(0, 4)):
            action = rng.randrange(4)
            if action == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif action == 1:
                data = data[:rng.randrange(len(data) + 1)]
            elif action == 2:
                data[rng.randrange(len(data) + 1):0] = rng.randbytes(rng.randrange(1, 9))
            else:
                data += rng.randbytes(rng.randrange(1, 20))
        raw = bytes(data)
        offset = rng.randrange(len(raw) + 1)
        assert _outcome(py.parse_record, raw, offset) == _outcome(c.parse_record, raw, offset)
        assert _outcome(py.parse_pairs, raw) == _outcome(c.parse_pairs, raw)
        body = raw[:rng.choice([7, 8, 9])]
        assert _outcome(py.parse_begin_request, body) == _outcome(c.parse_begin_request, body)
        assert _outcome(py.parse_end_request, body) == _outcome(c.parse_end_request, body)


# --- head_ready: is a request's whole head buffered? (a worker reads a head only once it is) -------


def _head(request_id=1, role=1, params=b"\x01\x01AB"):
    """BEGIN_REQUEST, one PARAMS record with content, the empty PARAMS record, then STDIN."""
    p = protocol
    return (p.encode_begin_request(request_id, role) + p.encode_record(p.PARAMS, request_id, params)
            + p.encode_record(p.PARAMS, request_id) + p.encode_record(p.STDIN, request_id))


def test_head_ready_only_once_the_empty_params_record_is_in(codec):
    whole = _head()
    end_of_head = len(whole) - 8  # everything but the empty STDIN record
    assert [n for n in range(len(whole) + 1) if codec.head_ready(whole[:n])] == list(
        range(end_of_head, len(whole) + 1))


def test_head_ready_at_an_offset(codec):
    buf = b"\xff" * 5 + _head()
    assert codec.head_ready(buf, 5) and not codec.head_ready(buf[:-20], 5)
    with pytest.raises(ValueError):
        codec.head_ready(buf, len(buf) + 1)


@pytest.mark.parametrize("first", [
    protocol.encode_get_values([b"FCGI_MAX_CONNS"]),                 # management: answered at once
    protocol.encode_begin_request(1, protocol.AUTHORIZER),           # a role to refuse at once
    protocol.encode_record(protocol.PARAMS, 1, b"\x01\x01AB"),       # params before any begin
    protocol.encode_record(protocol.BEGIN_REQUEST, 1, b"\x00\x01"),  # a malformed begin
    b"\x02" + protocol.encode_begin_request(1)[1:],                  # a bad version
], ids=["get values", "authorizer", "params first", "short begin", "bad version"])
def test_head_ready_when_the_first_record_is_no_request_start(codec, first):
    assert codec.head_ready(first) and codec.head_ready(first + b"\x01")
    assert not codec.head_ready(first[:7])


@pytest.mark.parametrize("intruder", [
    protocol.encode_begin_request(1),                               # a second begin for the request
    protocol.encode_begin_request(2),                               # another request (multiplexing)
    protocol.encode_record(protocol.PARAMS, 7, b"x"),               # another request's params
    protocol.encode_record(protocol.ABORT_REQUEST, 1),               # aborted before the params ended
    protocol.encode_record(protocol.STDIN, 1, b"body"),              # a body before the params ended
], ids=["second begin", "other request", "other params", "abort", "stdin"])
def test_head_ready_when_a_record_out_of_order_completes(codec, intruder):
    begun = protocol.encode_begin_request(1) + protocol.encode_record(protocol.PARAMS, 1, b"\x01\x01AB")
    assert not codec.head_ready(begun)
    assert not codec.head_ready(begun + intruder[:-1])
    assert codec.head_ready(begun + intruder)


def test_head_ready_agrees_between_codecs(both):
    py, c = both
    rng = random.Random(11)
    for _ in range(400):
        params = rng.randbytes(rng.randrange(0, 40))
        buf = bytearray(_head(rng.randrange(1, 4), rng.choice([1, 1, 1, 2]), params))
        for _ in range(rng.randrange(0, 3)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        cut = bytes(buf[:rng.randrange(len(buf) + 1)])
        assert py.head_ready(cut) == c.head_ready(cut), cut


# ------------------------------------------------------------- differential fuzz (hypothesis)
# The seeded fuzz above damages valid input at random; hypothesis searches the same ground with
# shrinking, so a disagreement comes back as the smallest input that shows it. Integers stay in C
# int range: beyond it the C codec's argument conversion raises OverflowError, a TypeError-like
# misuse of the API rather than a FastCGI input.

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
C_INT = st.integers(-2**31, 2**31 - 1)
# Around the 1-byte/4-byte pair length switch (127/128) and short enough to stay fast.
PAIRS = st.lists(st.tuples(st.binary(max_size=140), st.binary(max_size=140)), max_size=5)


def _damaged(draw, data: bytes) -> bytes:
    """data cut short, a byte overwritten with a length-like value, or left alone."""
    action = draw(st.sampled_from(["keep", "cut", "poke"]))
    if action == "cut":
        return data[:draw(st.integers(0, len(data)))]
    if action == "poke" and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([draw(st.sampled_from([0, 1, 0x7F, 0x80, 0x81, 0xFF]))]) + data[at + 1:]
    return data


@st.composite
def pair_contents(draw) -> bytes:
    """A PARAMS-like body: encoded pairs, sometimes damaged, sometimes followed by raw bytes."""
    return _damaged(draw, protocol.encode_pairs(draw(PAIRS))) + draw(st.binary(max_size=6))


@st.composite
def records(draw) -> bytes:
    """One record as any sender might write it: mostly well-formed, any field possibly a lie."""
    version = draw(st.sampled_from([1, 1, 1, 1, 0, 2, 255]))
    rtype = draw(st.one_of(st.integers(1, 11), st.integers(0, 255)))
    request_id = draw(st.one_of(st.sampled_from([0, 1, 65535]), st.integers(0, 65535)))
    content = draw(st.one_of(pair_contents(), st.binary(min_size=8, max_size=8), st.binary(max_size=64)))
    length = draw(st.one_of(st.just(len(content)), st.integers(0, 65535)))
    padding = draw(st.one_of(st.just(-len(content) & 7), st.integers(0, 255)))
    return header(version, rtype, request_id, length, padding) + content + b"\xaa" * padding


@st.composite
def record_streams(draw) -> bytes:
    """A few records back to back, cut short or not, as one receive buffer might hold them."""
    return _damaged(draw, b"".join(draw(st.lists(records(), max_size=4))))


def _walk(codec, buf: bytes) -> list:
    """parse_record from the start of buf until it needs more or refuses; what each call gave."""
    outcomes, offset = [], 0
    while True:
        outcome = _outcome(codec.parse_record, buf, offset)
        outcomes.append(outcome)
        if outcome[0] != "ok" or outcome[1] is None:
            return outcomes
        offset += outcome[1].size


@FUZZ
@given(data=st.one_of(st.binary(max_size=400), record_streams()), offset=st.integers(-2, 420))
def test_hypothesis_parse_record_agrees(both, data, offset):
    py, c = both
    assert _walk(py, data) == _walk(c, data)
    assert _outcome(py.parse_record, data, offset) == _outcome(c.parse_record, data, offset)


@FUZZ
@given(stream=record_streams())
def test_hypothesis_record_bodies_agree(both, stream):
    # Every body a record stream carries, through each parser of bodies and the header rules.
    py, c = both
    for outcome in _walk(py, stream):
        if outcome[0] != "ok" or outcome[1] is None:
            break
        record = outcome[1]
        args = (record.type, record.request_id, len(record.content))
        assert _outcome(py.check_header, *args) == _outcome(c.check_header, *args)
        for name in ("parse_pairs", "parse_begin_request", "parse_end_request"):
            assert _outcome(getattr(py, name), record.content) == _outcome(getattr(c, name), record.content)


@FUZZ
@given(content=st.one_of(st.binary(max_size=400), pair_contents()))
def test_hypothesis_body_parsers_agree(both, content):
    py, c = both
    for name in ("parse_pairs", "parse_begin_request", "parse_end_request"):
        assert _outcome(getattr(py, name), content) == _outcome(getattr(c, name), content), name


def header_field(bits: int) -> st.SearchStrategy[int]:
    """A value for a header field of this width, often shifted out of it by a multiple of 2**bits
    (where a C cast and a Python comparison part ways), sometimes anywhere in C int range."""
    shifted = st.builds(lambda value, wraps: value + (wraps << bits), st.integers(0, 2**bits - 1),
                        st.sampled_from([0, 0, 0, -1, 1, 2]))
    return st.one_of(shifted, C_INT)


@FUZZ
@given(rtype=header_field(8), request_id=header_field(16), content_length=header_field(16))
def test_hypothesis_check_header_agrees(both, rtype, request_id, content_length):
    py, c = both
    args = (rtype, request_id, content_length)
    assert _outcome(py.check_header, *args) == _outcome(c.check_header, *args)


@FUZZ
@given(pairs=PAIRS, rtype=st.integers(0, 255), request_id=st.integers(0, 65535))
def test_hypothesis_pairs_and_records_round_trip(both, pairs, rtype, request_id):
    py, c = both
    encoded = py.encode_pairs(pairs)
    assert c.encode_pairs(pairs) == encoded
    for codec in (py, c):
        assert codec.parse_pairs(encoded) == pairs
        raw = codec.encode_record(rtype, request_id, encoded)
        assert codec.parse_record(raw) == Record(rtype, request_id, encoded, len(raw))
    names = [name for name, _ in pairs]
    assert py.encode_get_values(names) == c.encode_get_values(names)
    assert py.encode_get_values_result(pairs) == c.encode_get_values_result(pairs)
    assert c.parse_pairs(c.parse_record(c.encode_get_values_result(pairs)).content) == pairs


@FUZZ
@given(length=st.one_of(st.sampled_from([0, 1, 65534, 65535, 65536, 131070, 131071]), st.integers(0, 140000)),
       pattern=st.binary(min_size=1, max_size=16), rtype=C_INT, request_id=C_INT)
def test_hypothesis_stream_round_trip(both, length, pattern, rtype, request_id):
    py, c = both
    data = (pattern * (length // len(pattern) + 1))[:length]
    raw = py.encode_stream(rtype, request_id, data)
    assert c.encode_stream(rtype, request_id, data) == raw
    records_, end = parse_all(c, raw)
    assert end == len(raw)
    assert b"".join(r.content for r in records_) == data
    assert all((r.type, r.request_id) == (rtype & 0xFF, request_id & 0xFFFF) for r in records_)


@FUZZ
@given(request_id=st.integers(0, 65535), role=st.integers(0, 65535), flags=st.integers(0, 255),
       app_status=st.integers(0, 2**32 - 1), status=st.integers(0, 255), rtype=st.integers(0, 255))
def test_hypothesis_fixed_bodies_round_trip(both, request_id, role, flags, app_status, status, rtype):
    py, c = both
    for codec in (py, c):
        begin = codec.parse_record(codec.encode_begin_request(request_id, role, flags))
        assert (begin.type, begin.request_id) == (protocol.BEGIN_REQUEST, request_id)
        assert codec.parse_begin_request(begin.content) == (role, flags)
        end = codec.parse_record(codec.encode_end_request(request_id, app_status, status))
        assert (end.type, end.request_id) == (protocol.END_REQUEST, request_id)
        assert codec.parse_end_request(end.content) == (app_status, status)
        assert codec.parse_record(codec.encode_unknown_type(rtype)).content[0] == rtype
    assert py.encode_begin_request(request_id, role, flags) == c.encode_begin_request(request_id, role, flags)
    assert py.encode_end_request(request_id, app_status, status) == c.encode_end_request(
        request_id, app_status, status)
    assert py.encode_unknown_type(rtype) == c.encode_unknown_type(rtype)
