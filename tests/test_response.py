"""The response rules of the worker loop, through Worker.response_for (the loop's own code, no I/O)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from fastfpm import protocol
from fastfpm._core import Worker


@pytest.fixture
def worker() -> Iterator[Worker]:
    sock = socket.socket(socket.AF_UNIX)
    yield Worker(sock.fileno(), None, environ_template={}, log=print, log_exception=print)
    sock.close()


def records_of(raw: bytes) -> list[protocol.Record]:
    records, offset = [], 0
    while (record := protocol.parse_record(raw, offset)) is not None:
        records.append(record)
        offset += record.size
    assert offset == len(raw), "trailing bytes after the last record"
    return records


def test_head_body_and_end_request_in_one_buffer(worker: Worker) -> None:
    records = records_of(worker.response_for("404 Not Found", [("Content-Type", "text/plain")],
                                             [b"", b"missing"], request_id=7))
    assert [r.type for r in records] == [protocol.STDOUT, protocol.STDOUT, protocol.END_REQUEST]
    assert all(r.request_id == 7 for r in records)
    assert records[0].content == b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nmissing"
    assert records[0].size % 8 == 0  # padded, as php-fpm and libfcgi pad
    assert records[1].content == b"" and protocol.parse_end_request(records[2].content) == (0, 0)


def test_an_empty_body_still_sends_the_head(worker: Worker) -> None:
    records = records_of(worker.response_for("204 No Content", [], []))
    assert records[0].content == b"Status: 204 No Content\r\n\r\n"


def test_a_body_over_one_record_is_split_at_65535_bytes(worker: Worker) -> None:
    body = bytes(range(256)) * 400  # 102,400 bytes
    records = records_of(worker.response_for("200 OK", [], [body]))
    stdout = [r for r in records if r.type == protocol.STDOUT and r.content]
    assert [len(r.content) for r in stdout][0] == 65535
    assert b"".join(r.content for r in stdout) == b"Status: 200 OK\r\n\r\n" + body


@pytest.mark.parametrize("headers, error", [
    ([("X-Split", "a\r\nSet-Cookie: evil=1")], "forbidden character"),   # response splitting
    ([("X-Bad\nName", "v")], "forbidden character"),
    ([("X-Colon:", "v")], "forbidden character"),
    ([("X-Euro", "\u20ac")], "not latin-1"),
    ([("X-Bytes", b"v")], "must be str"),
])
def test_bad_response_headers_are_refused(worker: Worker, headers, error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        worker.response_for("200 OK", headers, [b"body"])


@pytest.mark.parametrize("status", ["200", "OK 200", "2000 Weird", b"200 OK"])
def test_bad_status_lines_are_refused(worker: Worker, status) -> None:
    with pytest.raises(ValueError, match="invalid WSGI status"):
        worker.response_for(status, [], [b"body"])


def test_body_chunks_must_be_bytes(worker: Worker) -> None:
    with pytest.raises(TypeError, match="must be bytes"):
        worker.response_for("200 OK", [], ["text"])
    # bytearray and memoryview are accepted (PEP 3333 says bytes; being lenient costs nothing).
    records = records_of(worker.response_for("200 OK", [], [bytearray(b"ab"), memoryview(b"cd")]))
    assert records[0].content.endswith(b"\r\n\r\nabcd")
