"""FastCGI as the tests speak it to a server: whole requests as bytes, records read back, one GET.

The raw helpers build and read records with fastfpm.protocol, so a test can send what a web
server sends (or something malformed) and see the answer record by record; `get` goes through
the project's client when only the response matters.
"""

from __future__ import annotations

import socket

from fastfpm import protocol as p
from fastfpm.client import FastCGIClient, Response, build_params


def request_bytes(request_id: int, params: dict[str, str], body: bytes = b"", flags: int = 0,
                  role: int = p.RESPONDER) -> bytes:
    """A whole request as a web server sends it: BEGIN, PARAMS, empty PARAMS, STDIN, empty STDIN."""
    pairs = p.encode_pairs([(k.encode(), v.encode()) for k, v in params.items()])
    return (p.encode_begin_request(request_id, role, flags) + p.encode_stream(p.PARAMS, request_id, pairs)
            + p.encode_record(p.PARAMS, request_id) + p.encode_stream(p.STDIN, request_id, body)
            + p.encode_record(p.STDIN, request_id))


def truncated_params_request(request_id: int = 1) -> bytes:
    """A request whose PARAMS hold a pair cut short (a 5-byte name, a 127-byte value, 2 bytes of
    them): malformed params, which close the connection before the application is called."""
    return (p.encode_begin_request(request_id) + p.encode_record(p.PARAMS, request_id, b"\x05\x7fAB")
            + p.encode_record(p.PARAMS, request_id) + p.encode_record(p.STDIN, request_id))


def read_records(sock: socket.socket, until_type: int = p.END_REQUEST,
                 timeout: float = 10.0, count: int = 1) -> list[p.Record]:
    """Records from sock until `count` of until_type have arrived (the answers to that many
    pipelined requests) or the peer closes (or resets)."""
    sock.settimeout(timeout)
    buf, offset, records = b"", 0, []
    while True:
        while (record := p.parse_record(buf, offset)) is not None:
            records.append(record)
            offset += record.size
            if record.type == until_type:
                count -= 1
                if count <= 0:
                    return records
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return records
        if not data:
            return records
        buf += data


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the server closes the connection (EOF or reset) within timeout."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def get(address: str, path: str, query: str = "", timeout: float = 20) -> Response:
    """One GET through the project's client."""
    with FastCGIClient(address, timeout=timeout) as client:
        return client.request(build_params("GET", path, query, {}, None, {}))
