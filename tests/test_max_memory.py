"""pm.max_memory: a worker whose peak resident set is over the limit after a request answers that
request in full, then exits and is replaced (issue 12, memory-based recycling). Real masters and
workers; the leaking app keeps 20 MB more per request (tests/apps/leak.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import groupby

from fastfpm import protocol as p
from tests.apps.leak import PADDING
from tests.fcgi_helpers import get, read_records, request_bytes
from tests.servers import ConfiguredServer, Launcher, http_connection, http_get

POOL = """\
[www]
listen = {{listen}}
app = tests.apps.leak:{app}
pm = static
pm.max_children = 1
pm.max_memory = {limit}
"""
REQUESTS = 12
# The worker's line: "[pool www] child PID: peak memory 105.3M (110411776 bytes) is over ...".
OVER_LINE = re.compile(r"NOTICE: \[pool www\] child (\d+): peak memory [0-9.]+M \((\d+) bytes\) "
                       r"is over pm\.max_memory (\S+): exiting to be replaced")


def parse_reply(body: bytes) -> tuple[int, int]:
    """(pid, requests that worker served) from the app's first line; the padding must be whole."""
    head, _, rest = body.partition(b"\n")
    assert rest == PADDING, f"a cut response: {len(rest)} of {len(PADDING)} padding bytes"
    pid, served = head.split()
    return int(pid), int(served)


def runs_of(replies: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """Consecutive replies of one worker: (pid, the request counts it reported)."""
    return [(pid, [served for _, served in group]) for pid, group in groupby(replies, key=lambda r: r[0])]


def assert_recycled_by_memory(replies: list[tuple[int, int]], log: Callable[[str], str]) -> None:
    """Workers took turns, each fresh (counting from 1) and ended within 100M / 20M requests,
    and each that ended said why, with a figure over the limit, before the master's exit line."""
    runs = runs_of(replies)
    assert len(runs) >= 2, f"never recycled: {runs}"
    assert len({pid for pid, _ in runs}) == len(runs)   # a replacement is a new process
    for _, counts in runs:
        assert counts == list(range(1, len(counts) + 1))
        assert 1 <= len(counts) <= 5                    # 5 x 20 MB reach 100M with nothing else
    for pid, _ in runs[:-1]:
        text = log(f"child {pid} exited with code 0")
        (figure, limit), = [(int(m[2]), m[3]) for m in OVER_LINE.finditer(text) if int(m[1]) == pid]
        assert limit == "100M" and figure > 100 << 20
        assert text.index(f"child {pid}: peak memory") < text.index(f"child {pid} exited with code 0")
        assert f"NOTICE: [pool www] child {pid} exited with code 0" in text  # php-fpm's max_requests line


def test_a_leaking_worker_is_replaced_after_answering_in_full(configured) -> None:
    server = configured(POOL.format(app="app", limit="100M"))
    replies = []
    for _ in range(REQUESTS):
        response = get(server.address, "/")
        assert response.status == 200 and response.protocol_status == p.REQUEST_COMPLETE
        replies.append(parse_reply(response.body))
    assert_recycled_by_memory(replies, lambda needle: server.wait_for_log(needle))


def test_a_worker_that_frees_its_memory_is_never_replaced(configured) -> None:
    server = configured(POOL.format(app="steady", limit="100M"))
    replies = [parse_reply(get(server.address, "/").body) for _ in range(3 * REQUESTS)]
    assert runs_of(replies) == [(replies[0][0], list(range(1, 3 * REQUESTS + 1)))]
    assert "pm.max_memory" not in server.log_text()
    assert "exited" not in server.log_text()


def test_through_nginx_kept_connections_every_request_gets_its_whole_answer(launcher: Launcher) -> None:
    # TCP: END_REQUEST and the FIN of the last answer leave in one segment, so nginx never sends a
    # request on a connection that is closing. (On a unix socket the FIN follows in a second step,
    # and nginx can lose that race and retry a GET: docs/operations.md, Keep-alive.)
    workdir = launcher.directory("fpm")
    server = ConfiguredServer(workdir, workdir / "fastfpm.conf", transport="tcp")
    server.rewrite(POOL.format(app="app", limit="100M"))
    launcher.start(server)
    web = launcher.nginx(server)
    conn = http_connection(web.keepalive_port)  # fastcgi_keep_conn on, keepalive 8
    replies = []
    try:
        for _ in range(REQUESTS):
            result = http_get(conn, "/")
            assert result.status == 200
            replies.append(parse_reply(result.body))
    finally:
        conn.close()
    assert_recycled_by_memory(replies, lambda needle: server.wait_for_log(needle))
    assert "[error]" not in web.error_log_text()


def test_a_kept_connection_ends_with_the_answer_that_passed_the_limit(launcher: Launcher) -> None:
    # 1K: every request leaves the worker over the limit. The limit is checked before END_REQUEST,
    # so on TCP the FIN leaves in the same segment (TCP_CORK until shutdown): once END_REQUEST is
    # here, so is the end of the connection, and a web server never sends the next request on it.
    workdir = launcher.directory("fpm")
    server = ConfiguredServer(workdir, workdir / "fastfpm.conf", transport="tcp")
    server.rewrite(POOL.format(app="steady", limit="1K"))
    launcher.start(server)
    params = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/", "QUERY_STRING": "",
              "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "t", "SERVER_PORT": "80"}
    replies = []
    for _ in range(3):
        with server.connect() as sock:
            sock.sendall(request_bytes(1, params, flags=p.KEEP_CONN))
            records = read_records(sock)
            assert p.parse_end_request(records[-1].content) == (0, p.REQUEST_COMPLETE)
            sock.setblocking(False)
            assert sock.recv(1) == b"", "END_REQUEST came without the FIN"
        stdout = b"".join(r.content for r in records if r.type == p.STDOUT)
        replies.append(parse_reply(stdout.split(b"\r\n\r\n", 1)[1]))
    assert [served for _, served in replies] == [1, 1, 1]
    assert len({pid for pid, _ in replies}) == 3  # a fresh worker each time
    assert "is over pm.max_memory 1K: exiting to be replaced" in server.wait_for_log("exited with code 0")
