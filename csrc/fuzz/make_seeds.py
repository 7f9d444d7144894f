"""Write the libFuzzer seed corpus (csrc/fuzz/seeds/): a few valid and malformed record streams.

The seeds start libFuzzer deep in the codec (whole requests, long-form pair lengths, padding)
instead of at "bad version"; the corpus a run grows stays outside the repository (a few KB here, not
the megabytes a long run leaves).
Run from the repository root: python csrc/fuzz/make_seeds.py
"""

from __future__ import annotations

import struct
from pathlib import Path

from fastfpm import protocol as p

SEEDS = Path(__file__).resolve().parent / "seeds"


def header(rtype: int, request_id: int, length: int, padding: int = 0, version: int = 1) -> bytes:
    """A raw record header, so a seed can say what the encoders never would."""
    return struct.pack(">BBHHBB", version, rtype, request_id, length, padding, 0)


def request(params: list[tuple[bytes, bytes]], body: bytes = b"", flags: int = 0) -> bytes:
    """A whole request as nginx sends it: BEGIN, PARAMS, empty PARAMS, STDIN, empty STDIN."""
    return (p.encode_begin_request(1, p.RESPONDER, flags)
            + p.encode_stream(p.PARAMS, 1, p.encode_pairs(params)) + p.encode_record(p.PARAMS, 1)
            + p.encode_stream(p.STDIN, 1, body) + p.encode_record(p.STDIN, 1))


def seeds() -> dict[str, bytes]:
    """Seed name -> bytes."""
    get = [(b"REQUEST_METHOD", b"GET"), (b"SCRIPT_NAME", b"/index"), (b"QUERY_STRING", b"a=1&b=2"),
           (b"HTTP_HOST", b"localhost")]
    return {
        "get_request": request(get),
        "post_keep_conn": request(get + [(b"CONTENT_LENGTH", b"5")], b"hello", p.KEEP_CONN),
        "long_pair_lengths": request([(b"HTTP_COOKIE", b"c" * 300), (b"N" * 130, b"")]),
        "get_values": p.encode_get_values([p.FCGI_MAX_CONNS, p.FCGI_MAX_REQS, p.FCGI_MPXS_CONNS]),
        "abort_unknown_type": p.encode_record(p.ABORT_REQUEST, 1) + header(42, 0, 2, 6) + b"hi" + bytes(6),
        "end_request_reply": p.encode_record(p.STDOUT, 1, b"Status: 200\r\n\r\nok") + p.encode_end_request(1),
        "bad_version": header(p.STDIN, 1, 4, 4, version=2) + b"body" + bytes(4),
        "truncated_record": request(get)[:37],
        "pair_length_2g": p.encode_record(p.PARAMS, 1, b"\xff\xff\xff\xff\x00ab"),
        "short_form_in_long_form": p.encode_record(p.PARAMS, 1, b"\x80\x00\x00\x01\x01ab"),
        "begin_wrong_length": header(p.BEGIN_REQUEST, 1, 9, 7) + bytes(16),
        "management_with_id": header(p.GET_VALUES, 7, 16) + p.encode_pairs([(p.FCGI_MAX_CONNS, b"")]),
        "padding_255": header(p.STDIN, 1, 3, 255) + b"abc" + b"\xff" * 255,
    }


if __name__ == "__main__":
    SEEDS.mkdir(exist_ok=True)
    for name, data in seeds().items():
        (SEEDS / name).write_bytes(data)
