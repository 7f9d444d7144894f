"""The WSGI contract (PEP 3333) and the defaults around it, through real `fastfpm serve` processes.

start_response's exc_info rules, wsgi.file_wrapper, close() of the response iterable on every way
a response can end, wsgiref.validate over more of the interface, the working directory on
sys.path, SIGINT, the scoreboard stages a worker writes, and the default limits. The applications
are tests/apps/contract_wsgi.py and tests/apps/contract_validated.py. Most requests go straight
to the FastCGI socket (so an aborted response can be told from a complete one record by record);
the tests marked nginx repeat the important cases through a real nginx.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fastfpm import protocol as p
from fastfpm.client import FastCGIClient, FastCGIError, FastCGITimeout, Response, build_params
from fastfpm.scoreboard import STAGE_IDLE
from tests.apps import contract_validated, contract_wsgi
from tests.fcgi_helpers import closed_by_peer, get, read_records, request_bytes
from tests.servers import (
    FastFPMServer,
    Launcher,
    Stack,
    forked_slot_worker,
    http_connection,
    http_download,
    http_request,
    wait_until,
)

CONTRACT = "tests.apps.contract_wsgi:app"
VALIDATED = "tests.apps.contract_validated:app"
ECHO = "tests.apps.router:app"
TRANSPORTS = ["unix", "tcp"]
MIB = 1024 * 1024
# What must never appear in the log of a server whose application is wrapped in the validator.
VALIDATOR_COMPLAINTS = ("Traceback", "AssertionError", "WSGIWarning", "Exception ignored",
                        "garbage collected without being closed")


# --- helpers ----------------------------------------------------------------------------------


def request(server: FastFPMServer, path: str, query: str = "", method: str = "GET", body: bytes = b"",
            headers: dict[str, str] | None = None, timeout: float = 10) -> Response:
    """One request through the project's client; FastCGIError if the response does not end properly."""
    params = build_params(method, path, query, headers or {}, len(body) if body else None, {})
    with FastCGIClient(server.address, timeout=timeout) as client:
        return client.request(params, body)


def cut_response(server: FastFPMServer, path: str, query: str = "") -> FastCGIError:
    """A request whose response must be cut off: the server closes without END_REQUEST."""
    try:
        response = request(server, path, query)
    except FastCGITimeout as exc:
        raise AssertionError(f"the server neither ended nor cut the response; got {exc.stdout!r}") from None
    except FastCGIError as exc:
        assert "closed the connection before END_REQUEST" in str(exc), exc
        assert not [r for r in exc.records if r.type == p.END_REQUEST]
        return exc
    raise AssertionError(f"the response was ended as if complete: {response.status} {response.body!r}")


def query_string(**values: Any) -> str:
    """A query string from keyword arguments."""
    return urllib.parse.urlencode({k: str(v) for k, v in values.items()})


def log_up_to_sentinel(server: FastFPMServer, mark: int) -> str:
    """The log after mark, up to a line the (only) worker writes now through wsgi.errors.

    The worker's log lines reach the master through one pipe, in order: once the sentinel is in
    the log, everything the worker logged for earlier requests is too.
    """
    text = f"sentinel-{uuid.uuid4().hex}"
    assert request(server, "/log", query_string(text=text)).status == 200
    log = server.wait_for_log(text, mark)
    return log[:log.index(text)]


def known_bytes(size: int) -> bytes:
    """size bytes of deterministic, non-repeating-looking content."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


# --- servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastFPMServer]:
    """fastfpm serving contract_wsgi with one worker, so 'the worker' is always the same process."""
    with Launcher(tmp_path_factory.mktemp) as launcher:
        yield launcher.fastfpm(CONTRACT, max_children=1)


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastFPMServer]:
    """fastfpm serving contract_validated with the workers' stderr in the log (catch_workers_output)."""
    with Launcher(tmp_path_factory.mktemp) as launcher:
        yield launcher.fastfpm(VALIDATED, max_children=1, extra_args=["--catch-workers-output"])


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """nginx in front of fastfpm serving contract_wsgi (skipped without nginx; failed when CI is set)."""
    with Launcher(tmp_path_factory.mktemp) as launcher:
        yield launcher.stack(CONTRACT, max_children=2)


# --- 1. start_response and exc_info -----------------------------------------------------------


def test_exc_info_before_the_body_replaces_status_and_headers(contract: FastFPMServer) -> None:
    marker = uuid.uuid4().hex
    mark = contract.log_size()
    response = request(contract, "/exc-info-before", query_string(marker=marker))
    assert (response.status, response.reason) == (502, "Bad Gateway")
    assert response.header("X-Second") == "yes"
    assert response.header("X-First") is None, "the first call's headers must be discarded"
    assert response.body == b"replaced by the error page"
    assert response.protocol_status == p.REQUEST_COMPLETE
    # The application handled its exception: nothing for the server to log.
    logged = log_up_to_sentinel(contract, mark)
    assert marker not in logged and "Traceback" not in logged, logged


def test_exc_info_after_the_headers_reraises_and_cuts_the_response(contract: FastFPMServer) -> None:
    workers = contract.worker_pids()
    marker = uuid.uuid4().hex
    mark = contract.log_size()
    cut = cut_response(contract, "/exc-info-after", query_string(marker=marker))
    assert cut.stdout.startswith(b"Status: 200 OK\r\n")
    assert cut.stdout.endswith(contract_wsgi.FIRST_CHUNK)
    assert b"did not re-raise" not in cut.stdout
    log = contract.wait_for_log(f"ContractError: failed after the headers {marker}", mark)
    assert "Traceback" in log and "aborting the response" in log
    # The exception re-raised is the application's own: its traceback shows the raise in body().
    assert 'raise ContractError(f"failed after the headers {marker}")' in log
    assert request(contract, "/log", query_string(text="still serving")).status == 200
    assert contract.worker_pids() == workers


def test_second_start_response_without_exc_info_is_a_500(contract: FastFPMServer) -> None:
    mark = contract.log_size()
    response = request(contract, "/second-call")
    assert response.status == 500
    assert b"accepted" not in response.body and b"Traceback" not in response.body
    log = contract.wait_for_log("AssertionError", mark)
    assert "Traceback" in log and "in second_call" in log
    assert "start_response" in log[log.index("AssertionError"):].splitlines()[0]


@pytest.mark.nginx
def test_exc_info_before_the_body_through_nginx(web: Stack) -> None:
    replaced = http_request(web.port, "GET", "/exc-info-before")
    assert replaced.status == 502
    assert replaced.header("X-Second") == "yes" and replaced.header("X-First") is None
    assert replaced.body == b"replaced by the error page"


@pytest.mark.nginx
@pytest.mark.parametrize("length", ["chunked", "content-length"])
def test_exc_info_after_the_headers_through_nginx(web: Stack, length: str) -> None:
    """nginx relays the status and the first chunk, then the HTTP client sees the body cut off.

    Through the kept-alive upstream (fastcgi_keep_conn on), where nginx counts on END_REQUEST.
    Without keep_conn nginx (1.22) takes the upstream's close for the end of the response, so a
    chunked body gets its last chunk as if complete and a Content-Length one hangs the client:
    nothing fastfpm can change, as FastCGI has no other way to say "cut".
    """
    marker = uuid.uuid4().hex
    query = f"marker={marker}" + ("&length=1000" if length == "content-length" else "")
    mark = web.fpm.log_size()
    conn = http_connection(web.nginx.keepalive_port, timeout=10)
    try:
        conn.request("GET", f"/exc-info-after?{query}")
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead) as cut:
            resp.read()
        assert cut.value.partial == contract_wsgi.FIRST_CHUNK
    finally:
        conn.close()
    web.fpm.wait_for_log(f"failed after the headers {marker}", mark)
    errors = wait_until(lambda: [line for line in web.nginx.error_log_text().splitlines()
                                 if marker in line and "upstream prematurely closed" in line], 5,
                        message="nginx to log the cut response")
    assert len(errors) == 1


# --- 2. wsgi.file_wrapper ---------------------------------------------------------------------


def test_file_wrapper_body_is_byte_exact_and_the_file_is_closed(contract: FastFPMServer,
                                                                 tmp_path: Path) -> None:
    data = known_bytes(MIB)
    source = tmp_path / "served.bin"
    source.write_bytes(data)
    closed = tmp_path / "closed.txt"
    response = request(contract, "/file-wrapper", query_string(path=source, closed=closed), timeout=30)
    assert response.status == 200
    assert response.header("Content-Length") == str(MIB)
    assert len(response.body) == MIB
    assert response.body == data
    wait_until(closed.exists, 5, message="close() of the wrapped file")
    assert closed.read_text() == "file closed\n"


@pytest.mark.nginx
def test_file_wrapper_through_nginx(web: Stack, tmp_path: Path) -> None:
    data = known_bytes(3 * MIB + 123)
    source = tmp_path / "served.bin"
    source.write_bytes(data)
    closed = tmp_path / "closed.txt"
    got = http_download(web.port, "/file-wrapper?" + query_string(path=source, closed=closed))
    assert got.status == 200
    assert got.size == len(data)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    wait_until(closed.exists, 5, message="close() of the wrapped file")
    assert closed.read_text() == "file closed\n"


# --- 3. close() of the response iterable --------------------------------------------------------


def test_iterable_is_closed_after_it_raises_mid_body(contract: FastFPMServer, tmp_path: Path) -> None:
    closed = tmp_path / "closed.txt"
    marker = uuid.uuid4().hex
    mark = contract.log_size()
    cut = cut_response(contract, "/raise-mid", query_string(closed=closed, marker=marker))
    assert cut.stdout.endswith(contract_wsgi.FIRST_CHUNK)
    wait_until(closed.exists, 5, message="close() of the failed iterable")
    assert closed.read_text() == "iterable closed\n"
    log = contract.wait_for_log(f"failed in the middle of the body {marker}", mark)
    assert "Traceback" in log


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_iterable_is_closed_when_the_client_disconnects(launcher: Launcher, tmp_path: Path,
                                                        transport: str) -> None:
    server = launcher.fastfpm(CONTRACT, transport, max_children=1)
    workers = server.worker_pids()
    closed = tmp_path / "closed.txt"
    # 100000 chunks 10 ms apart: over 15 minutes, unless the server notices the client has gone.
    params = build_params("GET", "/stream", query_string(chunks=100000, pause=0.01, closed=closed))
    mark = server.log_size()
    with server.connect() as sock:
        sock.sendall(request_bytes(1, params))
        first = read_records(sock, until_type=p.STDOUT)
        assert contract_wsgi.FIRST_CHUNK in b"".join(r.content for r in first if r.type == p.STDOUT)
    wait_until(closed.exists, 10, message="close() of the iterable after the client went away")
    assert closed.read_text() == "iterable closed\n"
    assert "ended early" in server.wait_for_log("ended early", mark)
    assert request(server, "/log", query_string(text="still serving")).status == 200
    assert server.worker_pids() == workers


@pytest.mark.nginx
def test_iterable_is_closed_when_the_http_client_disconnects_through_nginx(web: Stack,
                                                                           tmp_path: Path) -> None:
    closed = tmp_path / "closed.txt"
    conn = http_connection(web.port, timeout=10)
    try:
        conn.request("GET", "/stream?" + query_string(chunks=100000, pause=0.01, closed=closed))
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read(len(contract_wsgi.FIRST_CHUNK)) == contract_wsgi.FIRST_CHUNK
    finally:
        conn.close()
    wait_until(closed.exists, 15, message="close() of the iterable after the HTTP client went away")
    assert closed.read_text() == "iterable closed\n"


# --- 4. wsgiref.validate over more of the contract ------------------------------------------------


def assert_validator_silent(server: FastFPMServer, mark: int) -> None:
    """Nothing the validator raises or prints reached the log since mark.

    The probe goes through the workers' stderr, the very channel the validator prints on, so
    once it is in the log everything printed before it is too.
    """
    text = f"probe-{uuid.uuid4().hex}"
    assert request(server, "/probe", query_string(text=text)).status == 200
    log = server.wait_for_log(text, mark)
    for complaint in VALIDATOR_COMPLAINTS:
        assert complaint not in log, log


def test_validator_write_callable(validated: FastFPMServer) -> None:
    mark = validated.log_size()
    response = request(validated, "/write")
    assert response.status == 200, response.body
    assert response.body == b"written first; written second; then returned"
    assert_validator_silent(validated, mark)


def test_validator_file_wrapper(validated: FastFPMServer, tmp_path: Path) -> None:
    data = known_bytes(300 * 1024 + 7)
    source = tmp_path / "served.bin"
    source.write_bytes(data)
    mark = validated.log_size()
    response = request(validated, "/file", query_string(path=source))
    assert response.status == 200, response.body
    assert response.body == data
    assert_validator_silent(validated, mark)


def test_validator_streaming_generator(validated: FastFPMServer) -> None:
    mark = validated.log_size()
    response = request(validated, "/stream", "chunks=50")
    assert response.status == 200, response.body
    assert response.body == b"".join(f"chunk {n}\n".encode() for n in range(50))
    assert_validator_silent(validated, mark)


@pytest.mark.parametrize("route", ["/lines", "/readlines"])
def test_validator_input_by_lines(validated: FastFPMServer, route: str) -> None:
    lines = [b"first line\n", b"\n", b"x" * 100000 + b"\n", b"last, no newline"]
    body = b"".join(lines)
    mark = validated.log_size()
    response = request(validated, route, method="POST", body=body,
                       headers={"Content-Type": "text/plain"})
    assert response.status == 200, response.body
    seen = json.loads(response.body)
    assert seen["lengths"] == [len(line) for line in lines]
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["all_end_in_newline"]
    assert_validator_silent(validated, mark)


def test_validator_head(validated: FastFPMServer) -> None:
    mark = validated.log_size()
    got = request(validated, "/head")
    head = request(validated, "/head", method="HEAD")
    assert got.status == head.status == 200, (got.body, head.body)
    assert got.body == contract_validated.HEAD_BODY
    assert head.body == b""
    assert head.header("Content-Length") == str(len(contract_validated.HEAD_BODY))
    assert head.header("Content-Type") == "text/plain"
    assert_validator_silent(validated, mark)


def test_validator_no_content(validated: FastFPMServer) -> None:
    mark = validated.log_size()
    response = request(validated, "/no-content")
    assert (response.status, response.reason) == (204, "No Content"), response.body
    assert response.body == b""
    assert response.header("X-Done") == "yes"
    assert response.header("Content-Type") is None, "the server must not add a Content-Type to a 204"
    assert response.protocol_status == p.REQUEST_COMPLETE
    assert_validator_silent(validated, mark)


def test_validator_output_would_be_seen(validated: FastFPMServer) -> None:
    """The check above means something: what a worker prints on stderr does reach the log."""
    text = f"visible-{uuid.uuid4().hex}"
    mark = validated.log_size()
    assert request(validated, "/probe", query_string(text=text)).status == 200
    assert text in validated.wait_for_log(text, mark)


# --- 5. the working directory is importable ----------------------------------------------------


def write_app_module(directory: Path) -> str:
    """A module that exists only in directory; returns its name."""
    name = f"contract_only_here_{uuid.uuid4().hex[:12]}"
    (directory / f"{name}.py").write_text(
        "import json, os\n\n"
        "def app(environ, start_response):\n"
        "    body = json.dumps({'cwd': os.getcwd(), 'file': __file__}).encode()\n"
        "    start_response('200 OK', [('Content-Type', 'application/json')])\n"
        "    return [body]\n")
    return name


def test_chdir_directory_is_on_sys_path(launcher: Launcher, tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("app-home")
    name = write_app_module(home)
    assert str(home) not in os.environ.get("PYTHONPATH", "")
    # Without --chdir the module cannot be found (the server starts in the repository root)...
    with pytest.raises(RuntimeError, match="did not become ready"):
        launcher.fastfpm(f"{name}:app", max_children=1)
    # ...with it, the directory is on sys.path.
    server = launcher.fastfpm(f"{name}:app", max_children=1, extra_args=["--chdir", str(home)])
    response = request(server, "/")
    assert response.status == 200
    seen = json.loads(response.body)
    assert seen == {"cwd": str(home), "file": str(home / f"{name}.py")}


class ServerStartedIn(FastFPMServer):
    """`python -P -m fastfpm serve` started with another working directory.

    -P (PYTHONSAFEPATH) keeps `python -m` from putting the directory on sys.path itself, so only
    fastfpm can have put it there.
    """

    def __init__(self, app: str, workdir: Path, cwd: Path) -> None:
        super().__init__(app, workdir, max_children=1)
        self.cwd = cwd

    def command(self) -> list[str]:
        python, *rest = super().command()
        return ["env", "-C", str(self.cwd), python, "-P", *rest]


def test_current_directory_is_on_sys_path(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("app-cwd")
    name = write_app_module(home)
    server = ServerStartedIn(f"{name}:app", tmp_path_factory.mktemp("fpm"), home)
    try:
        server.start()
        response = request(server, "/")
    finally:
        server.stop()
    assert response.status == 200
    assert json.loads(response.body) == {"cwd": str(home), "file": str(home / f"{name}.py")}


# --- 6. SIGINT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["master", "process group"])
def test_sigint_stops_the_master_fast(launcher: Launcher, tmp_path: Path, target: str) -> None:
    """SIGINT is a fast stop, as SIGTERM (docs/operations.md): the request in flight is cut, the
    workers are gone, and the master exits with status 0. Ctrl-C in a terminal signals the whole
    process group; workers ignore it and the master decides."""
    server = launcher.fastfpm(CONTRACT, max_children=2)
    workers = server.settled_workers()
    started = tmp_path / "started.txt"
    outcome: list[Any] = []

    def slow() -> None:
        try:
            outcome.append(request(server, "/slow", query_string(seconds=60, started=started), timeout=30))
        except Exception as exc:  # the cut request is the point
            outcome.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    wait_until(started.exists, 10, message="the slow request to start")
    sent = time.monotonic()
    if target == "master":
        server.signal(signal.SIGINT)
    else:
        os.killpg(server.pid, signal.SIGINT)
    assert server.proc is not None
    assert server.proc.wait(10) == 0
    assert time.monotonic() - sent < 5, "SIGINT must not wait for the request in flight (60 s)"
    thread.join(10)
    assert outcome and isinstance(outcome[0], FastCGIError), outcome
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    log = server.log_text()
    assert "Terminating ..." in log and "exiting, bye-bye!" in log
    assert server.socket_path is not None and not server.socket_path.exists()


# --- 9. scoreboard stages ----------------------------------------------------------------------
# A `fastfpm serve` master keeps its scoreboard in an anonymous shared mapping that only it and
# its workers can see (there is no status page yet), so these tests read the slot of a real
# worker forked from the test, as tests/test_scoreboard.py does.


@pytest.fixture
def slot_worker(tmp_path: Path):
    """A real fastfpm worker serving contract_wsgi from slot 1 of a fresh scoreboard."""
    with forked_slot_worker(tmp_path / "slot.sock", contract_wsgi.app, SimpleNamespace(),
                            "contract") as (board, address, pid):
        wait_until(lambda: board.read(1).stage == STAGE_IDLE, 10, message="the worker to reach accept()")
        yield board, address, pid


def test_slot_reads_running_with_method_and_uri(slot_worker, tmp_path: Path) -> None:
    board, address, pid = slot_worker
    started = tmp_path / "started.txt"
    query = query_string(seconds=1.5, started=started)
    params = build_params("GET", "/slow", query, {"Host": "h"}, None, {})
    result: list[Response] = []
    thread = threading.Thread(target=lambda: result.append(
        FastCGIClient(address, timeout=10).request(params)))
    thread.start()
    try:
        wait_until(started.exists, 5, message="the slow request to start")
        slot = board.read(1)
        assert slot.stage_name == "Running" and slot.busy
        assert slot.pid == pid
        assert slot.method == "GET"
        assert slot.request_uri == "/slow?" + query
        assert slot.query_string == query
    finally:
        thread.join(10)
    assert result and result[0].status == 200
    done = wait_until(lambda: (s := board.read(1)).stage_name == "Idle" and s.requests == 1 and s, 5,
                      message="the worker back to Idle")
    assert done.status == 200


def test_a_half_sent_head_leaves_the_worker_idle_and_free_to_serve(slot_worker) -> None:
    # php-fpm's worker shows "Reading headers" while it waits for the rest of a head; fastfpm's waits
    # for it among its other connections, so the slot stays Idle and another request is served.
    board, address, _ = slot_worker
    params = build_params("GET", "/log", "text=half", {"Host": "h"}, None, {})
    whole = request_bytes(1, params)
    half = len(p.encode_begin_request(1)) + 40  # BEGIN_REQUEST and the first bytes of the PARAMS record
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(10)
        slow.connect(address)
        slow.sendall(whole[:half])
        assert get(address, "/log", "text=meanwhile").status == 200
        slot = wait_until(lambda: (s := board.read(1)).stage_name == "Idle" and s.requests == 1 and s, 5,
                          message="the other request served, the worker Idle")
        assert not slot.busy
        slow.sendall(whole[half:])
        records = read_records(slow)
    assert records and records[-1].type == p.END_REQUEST
    assert b"Status: 200 OK" in b"".join(r.content for r in records if r.type == p.STDOUT)
    done = wait_until(lambda: (s := board.read(1)).stage_name == "Idle" and s.requests == 2 and s, 5,
                      message="the worker back to Idle after the slow request")
    assert done.request_uri.startswith("/log")


# --- 10. the default limits --------------------------------------------------------------------


@pytest.fixture
def defaults(launcher: Launcher) -> FastFPMServer:
    """fastfpm with nothing but the listen address and one worker: every limit at its default."""
    return launcher.fastfpm(ECHO, max_children=1)


def test_default_idle_timeout_closes_a_silent_connection(defaults: FastFPMServer) -> None:
    with defaults.connect() as sock:
        started = time.monotonic()
        assert closed_by_peer(sock, timeout=10), "a silent connection was kept open for 10 s"
        waited = time.monotonic() - started
    assert 4 <= waited <= 8, f"closed after {waited:.1f} s; the default idle timeout is 5 s"


def test_default_params_limit_is_64_kib(defaults: FastFPMServer) -> None:
    params = build_params("GET", "/env", "", {"Host": "h", "X-Big": "y" * (60 * 1024)}, None, {})
    assert len(p.encode_pairs([(k.encode(), v.encode()) for k, v in params.items()])) < 65536
    with FastCGIClient(defaults.address, timeout=10) as client:
        served = client.request(params)
    assert served.status == 200
    assert json.loads(served.body)["environ"]["HTTP_X_BIG"] == "y" * (60 * 1024)

    params["HTTP_X_BIG"] = "y" * (65 * 1024)
    mark = defaults.log_size()
    with defaults.connect() as sock:
        sock.sendall(request_bytes(1, params))
        records = read_records(sock)
        assert not [r for r in records if r.type in (p.STDOUT, p.END_REQUEST)], records
        assert closed_by_peer(sock, timeout=5)
    assert "65536-byte limit" in defaults.wait_for_log("limit", mark)
    with FastCGIClient(defaults.address, timeout=10) as client:
        params["HTTP_X_BIG"] = "small again"
        assert client.request(params).status == 200
