"""The FastCGI client against a tiny in-test responder built on fastfpm.protocol, over real sockets."""

import hashlib
import io
import json
import threading
import time

import pytest

from fastfpm import protocol
from fastfpm.address import create_listen_socket, local_address
from fastfpm.client import (
    FastCGIClient,
    FastCGIError,
    FastCGITimeout,
    Response,
    build_params,
    parse_cgi_response,
)

# ---------------------------------------------------------------------------------- responder


class Peer:
    """One accepted connection, seen from the responder: whole records in, bytes out."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def record(self):
        """The next record, or None once the client has closed (ProtocolError on garbage)."""
        while True:
            record = protocol.parse_record(self.buf)
            if record is not None:
                del self.buf[:record.size]
                return record
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data

    def send(self, data):
        self.sock.sendall(data)


class Request:
    """A request as the responder's handlers see it."""

    def __init__(self, peer, request_id, flags, params):
        self.peer, self.id, self.flags, self.params = peer, request_id, flags, params
        self.stdin_sizes = []  # content length of each STDIN record, the empty one excluded
        self.close_after = False

    def param(self, name):
        return self.params.get(name.encode(), b"").decode()

    def body(self):
        """Read STDIN records up to the empty one that ends the stream."""
        chunks = []
        while True:
            record = self.peer.record()
            assert record is not None and record.type == protocol.STDIN, record
            if not record.content:
                return b"".join(chunks)
            self.stdin_sizes.append(len(record.content))
            chunks.append(record.content)

    def stdout(self, data):
        self.peer.send(protocol.encode_stream(protocol.STDOUT, self.id, data))

    def stderr(self, data):
        self.peer.send(protocol.encode_stream(protocol.STDERR, self.id, data))

    def end(self, app_status=0, protocol_status=protocol.REQUEST_COMPLETE):
        self.peer.send(protocol.encode_record(protocol.STDOUT, self.id)
                       + protocol.encode_end_request(self.id, app_status, protocol_status))

    def respond(self, head, body=b"", stderr=b"", app_status=0):
        if stderr:
            self.stderr(stderr)
        self.stdout(head + b"\r\n" + body)
        self.end(app_status)


class Responder:
    """A threaded FastCGI responder: one thread per connection, handler(request) per request."""

    def __init__(self, address, handler):
        self.handler = handler
        self.listener = create_listen_socket(address)
        self.address = local_address(self.listener)
        self.connections = 0
        self.requests = []
        self.closed = threading.Event()  # set each time the responder closes a connection
        self.errors = []
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.serve, args=(sock,), daemon=True).start()

    def serve(self, sock):
        peer = Peer(sock)
        try:
            while self.serve_one(peer):
                pass
        except protocol.ProtocolError:
            pass  # garbage from the client: hang up, as a server must
        except Exception as exc:  # noqa: BLE001 - reported by the fixture
            self.errors.append(exc)
        finally:
            sock.close()
            self.closed.set()

    def serve_one(self, peer):
        record = peer.record()
        if record is None:
            return False
        if record.request_id == 0:
            # Management records: answer GET_VALUES, UNKNOWN_TYPE for anything else.
            if record.type == protocol.GET_VALUES:
                known = {protocol.FCGI_MAX_CONNS: b"4", protocol.FCGI_MAX_REQS: b"4",
                         protocol.FCGI_MPXS_CONNS: b"0"}
                names = [name for name, _ in protocol.parse_pairs(record.content)]
                peer.send(protocol.encode_get_values_result([(n, known[n]) for n in names if n in known]))
            else:
                peer.send(protocol.encode_unknown_type(record.type))
            return True
        assert record.type == protocol.BEGIN_REQUEST, record
        role, flags = protocol.parse_begin_request(record.content)
        assert role == protocol.RESPONDER
        params = bytearray()
        while (part := peer.record()).content:
            assert (part.type, part.request_id) == (protocol.PARAMS, record.request_id)
            params += part.content
        request = Request(peer, record.request_id, flags, dict(protocol.parse_pairs(params)))
        self.requests.append(request)
        self.handler(request)
        return bool(flags & protocol.KEEP_CONN) and not request.close_after

    def close(self):
        self.listener.close()


@pytest.fixture(params=["unix", "tcp"])
def serve(request, tmp_path):
    """serve(handler) starts a responder on a unix socket or 127.0.0.1 and returns it."""
    started = []

    def start(handler):
        address = str(tmp_path / "fcgi.sock") if request.param == "unix" else "127.0.0.1:0"
        responder = Responder(address, handler)
        started.append(responder)
        return responder

    yield start
    for responder in started:
        responder.close()
        assert not responder.errors, responder.errors


def echo(request):
    """Echo the body with the method, the request id and a digest, plus a line on stderr."""
    body = request.body()
    head = (b"Status: 201 Created\r\nContent-Type: text/plain\r\nX-Method: "
            + request.param("REQUEST_METHOD").encode()
            + b"\r\nX-Request-Id: " + str(request.id).encode()
            + b"\r\nX-Sha256: " + hashlib.sha256(body).hexdigest().encode()
            + b"\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n")
    request.respond(head, body, stderr=b"a warning\n", app_status=7)


def dump_params(request):
    request.body()
    params = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.params.items()}
    request.respond(b"Content-Type: application/json\r\n", json.dumps(params).encode())


# --------------------------------------------------------------------------------- requests


def test_simple_request(serve):
    server = serve(echo)
    with FastCGIClient(server.address) as client:
        response = client.request(build_params("POST", "/echo", body_len=5), b"hello")
    assert isinstance(response, Response)
    assert response.status == 201
    assert response.reason == "Created"
    assert response.body == b"hello"
    assert response.stderr == b"a warning\n"
    assert (response.app_status, response.protocol_status) == (7, protocol.REQUEST_COMPLETE)
    assert response.header("content-type") == "text/plain"
    assert response.header("X-METHOD") == "POST"
    assert response.header("missing") is None
    assert response.header_list("Set-Cookie") == ["a=1", "b=2"]
    assert response.headers[0] == ("Content-Type", "text/plain")  # Status is reported apart
    assert response.stdout.endswith(b"\r\n\r\nhello")
    assert response.text == "hello"


def test_client_sends_one_request_per_connection_without_keep_conn(serve):
    server = serve(echo)
    client = FastCGIClient(str(server.address))
    for _ in range(3):
        assert client.request(build_params()).status == 201
        assert not client.connected
    assert server.connections == 3
    assert all(not r.flags & protocol.KEEP_CONN for r in server.requests)


def test_keep_conn_reuses_the_connection(serve):
    server = serve(echo)
    with FastCGIClient(server.address, keep_conn=True) as client:
        for i in range(5):
            response = client.request(build_params("PUT"), b"x" * i, request_id=i + 1)
            assert (response.body, response.header("X-Request-Id")) == (b"x" * i, str(i + 1))
            assert client.connected
    assert not client.connected
    assert server.connections == 1
    assert all(r.flags & protocol.KEEP_CONN for r in server.requests)


def test_keep_conn_reconnects_when_the_server_closed_an_idle_connection(serve):
    def close_after_answer(request):
        echo(request)
        request.close_after = True

    server = serve(close_after_answer)
    with FastCGIClient(server.address, keep_conn=True) as client:
        assert client.request(build_params()).status == 201
        assert server.closed.wait(5)
        time.sleep(0.05)
        assert client.request(build_params()).status == 201
    assert server.connections == 2


def test_params_as_byte_pairs_are_sent_as_they_are(serve):
    server = serve(dump_params)
    pairs = [(b"REQUEST_METHOD", b"GET"), (b"X_RAW", b"\xff\x00bytes"), (b"LONG", b"v" * 70000)]
    response = FastCGIClient(server.address).request(pairs)
    assert server.requests[0].params == dict(pairs)
    assert response.status == 200 and response.reason == "OK"


def test_str_params_go_out_as_utf8(serve):
    server = serve(dump_params)
    FastCGIClient(server.address).request({"PATH_INFO": "/caf\u00e9", "RAW": "\udcff"})
    assert server.requests[0].params[b"PATH_INFO"] == "/caf\u00e9".encode()
    assert server.requests[0].params[b"RAW"] == b"\xff"


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 300_000])
def test_bytes_body_in_records_of_65535(serve, size):
    server = serve(echo)
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    response = FastCGIClient(server.address).request(build_params("POST", body_len=size), body)
    assert response.body == body
    sizes = server.requests[0].stdin_sizes
    assert sizes == [65535] * (size // 65535) + ([size % 65535] if size % 65535 else [])


def test_file_body_is_streamed(serve, tmp_path):
    server = serve(echo)
    path = tmp_path / "upload.bin"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    with path.open("rb") as upload:
        response = FastCGIClient(server.address).request(build_params("POST", body_len=len(data)), upload)
    assert response.header("X-Sha256") == hashlib.sha256(data).hexdigest()
    assert server.requests[0].stdin_sizes == [65535] * 3 + [len(data) - 3 * 65535]
    response = FastCGIClient(server.address).request(build_params("POST"), io.BytesIO(b"memory"))
    assert response.body == b"memory"


def test_iterable_body_goes_out_chunk_by_chunk(serve):
    server = serve(echo)
    produced = []

    def chunks():
        # Empty chunks must not end the stream early (an empty STDIN record means end of body).
        for part in (b"first ", b"", b"second ", b"x" * 70000, b"", b"last"):
            produced.append(part)
            yield part

    response = FastCGIClient(server.address).request(build_params("POST"), chunks())
    assert response.body == b"".join(produced)
    assert server.requests[0].stdin_sizes == [6, 7, 65535, 70000 - 65535, 4]


def test_str_body_is_refused(serve):
    seen = []
    server = serve(lambda request: seen.append(request.peer.record()))
    with pytest.raises(TypeError):
        FastCGIClient(server.address).request(build_params(), "text")  # before anything is sent
    assert server.connections == 0
    with pytest.raises(TypeError):
        FastCGIClient(server.address).request(build_params(), iter(["text"]))
    assert server.closed.wait(5)
    assert seen == [None]  # the client hung up mid-request


def test_server_that_answers_before_reading_the_body_does_not_deadlock(serve):
    # Both directions carry far more than the socket buffers hold: a client that only wrote
    # until it was done would block against a server blocked writing its answer.
    answer = b"y" * 3_000_000

    def answer_first(request):
        request.stdout(b"Content-Type: application/octet-stream\r\n\r\n" + answer)
        body = request.body()
        request.end(app_status=len(body) % 251)

    server = serve(answer_first)
    body = b"b" * 3_000_000
    response = FastCGIClient(server.address, timeout=30).request(build_params("POST"), body)
    assert response.body == answer
    assert response.app_status == len(body) % 251


def test_server_closing_without_end_request(serve):
    def hang_up(request):
        request.body()
        request.stderr(b"dying")
        request.stdout(b"Status: 200 OK\r\n\r\npartial")
        request.close_after = True

    server = serve(hang_up)
    client = FastCGIClient(server.address, keep_conn=True)
    with pytest.raises(FastCGIError, match="before END_REQUEST") as info:
        client.request(build_params())
    assert info.value.stdout == b"Status: 200 OK\r\n\r\npartial"
    assert info.value.stderr == b"dying"
    assert [r.type for r in info.value.records] == [protocol.STDERR, protocol.STDOUT]
    assert not client.connected


def test_server_closing_mid_record(serve):
    def cut(request):
        request.body()
        request.peer.send(protocol.encode_record(protocol.STDOUT, request.id, b"abcdef")[:11])
        request.close_after = True

    server = serve(cut)
    with pytest.raises(FastCGIError) as info:
        FastCGIClient(server.address).request(build_params())
    assert info.value.unparsed == protocol.encode_record(protocol.STDOUT, 1, b"abcdef")[:11]


def test_malformed_answer(serve):
    def bad_version(request):
        request.body()
        request.peer.send(b"\x02" + bytes(15))

    server = serve(bad_version)
    with pytest.raises(FastCGIError, match="version"):
        FastCGIClient(server.address).request(build_params())


def test_malformed_cgi_head(serve):
    def bad_head(request):
        request.body()
        request.stdout(b"no colon here\r\n\r\nbody")
        request.end()

    server = serve(bad_head)
    with pytest.raises(FastCGIError, match="malformed") as info:
        FastCGIClient(server.address).request(build_params())
    assert info.value.stdout == b"no colon here\r\n\r\nbody"


def test_timeout(serve):
    release = threading.Event()

    def stall(request):
        request.body()
        request.stdout(b"Status: 200 OK\r\n\r\nslow")
        release.wait(10)

    server = serve(stall)
    started = time.monotonic()
    with pytest.raises(FastCGITimeout) as info:
        FastCGIClient(server.address, timeout=0.3).request(build_params())
    release.set()
    assert 0.25 < time.monotonic() - started < 3
    assert isinstance(info.value, TimeoutError)
    assert info.value.stdout == b"Status: 200 OK\r\n\r\nslow"


@pytest.mark.parametrize("protocol_status", [protocol.CANT_MPX_CONN, protocol.OVERLOADED,
                                             protocol.UNKNOWN_ROLE])
def test_request_refused_by_the_server(serve, protocol_status):
    server = serve(lambda request: request.peer.send(
        protocol.encode_end_request(request.id, 0, protocol_status)))
    response = FastCGIClient(server.address).request(build_params())
    assert response.protocol_status == protocol_status
    assert (response.status, response.body) == (502, b"")  # what nginx would answer


def test_records_for_other_requests_are_ignored(serve):
    def noisy(request):
        request.body()
        request.peer.send(protocol.encode_record(protocol.STDOUT, request.id + 1, b"not yours")
                          + protocol.encode_unknown_type(99))
        request.respond(b"Content-Type: text/plain\r\n", b"mine")

    server = serve(noisy)
    response = FastCGIClient(server.address).request(build_params(), request_id=3)
    assert response.body == b"mine"


@pytest.mark.parametrize("request_id", [0, -1, 65536])
def test_request_id_range(request_id):
    with pytest.raises(ValueError, match="request id"):
        FastCGIClient("/nonexistent.sock").request(build_params(), request_id=request_id)


def test_connection_refused(tmp_path):
    with pytest.raises(OSError):
        FastCGIClient(str(tmp_path / "nobody.sock")).request(build_params())


# ------------------------------------------------------------------------- management, raw


def test_get_values(serve):
    server = serve(echo)
    values = FastCGIClient(server.address).get_values()
    assert values == {b"FCGI_MAX_CONNS": b"4", b"FCGI_MAX_REQS": b"4", b"FCGI_MPXS_CONNS": b"0"}
    assert FastCGIClient(server.address).get_values(["FCGI_MPXS_CONNS", b"UNKNOWN"]) == {
        b"FCGI_MPXS_CONNS": b"0"}


def test_get_values_then_request_on_a_kept_connection(serve):
    server = serve(echo)
    with FastCGIClient(server.address, keep_conn=True) as client:
        assert client.get_values([protocol.FCGI_MAX_CONNS]) == {b"FCGI_MAX_CONNS": b"4"}
        assert client.request(build_params(), b"after").body == b"after"
    assert server.connections == 1


def test_send_raw_and_recv(serve):
    server = serve(echo)
    client = FastCGIClient(server.address)
    assert client.send_raw(protocol.encode_record(42, 0, b"mgmt"))
    assert client.recv_record() == protocol.Record(protocol.UNKNOWN_TYPE, 0, bytes([42]) + bytes(7), 16)
    client.send_raw(b"\x07garbage!")  # a bad version: the responder hangs up without a word
    assert client.recv_until_closed() == b""
    assert not client.connected


def test_recv_until_closed_returns_everything(serve):
    def answer_and_close(request):
        request.body()
        request.respond(b"Content-Type: text/plain\r\n", b"bye")

    server = serve(answer_and_close)
    client = FastCGIClient(server.address)
    client.send_raw(protocol.encode_begin_request(1) + protocol.encode_record(protocol.PARAMS, 1)
                    + protocol.encode_record(protocol.STDIN, 1))
    data = client.recv_until_closed()
    records = []
    offset = 0
    while (record := protocol.parse_record(data, offset)) is not None:
        records.append(record)
        offset += record.size
    assert offset == len(data)
    assert [r.type for r in records] == [protocol.STDOUT, protocol.STDOUT, protocol.END_REQUEST]


# ----------------------------------------------------------------------------- build_params


NGINX_FASTCGI_PARAMS = {
    "QUERY_STRING", "REQUEST_METHOD", "CONTENT_TYPE", "CONTENT_LENGTH", "SCRIPT_NAME", "REQUEST_URI",
    "DOCUMENT_URI", "DOCUMENT_ROOT", "SERVER_PROTOCOL", "REQUEST_SCHEME", "GATEWAY_INTERFACE",
    "SERVER_SOFTWARE", "REMOTE_ADDR", "REMOTE_PORT", "REMOTE_USER", "SERVER_ADDR", "SERVER_PORT",
    "SERVER_NAME", "REDIRECT_STATUS", "HTTP_HOST",
}


def test_build_params_defaults():
    params = build_params()
    assert set(params) == NGINX_FASTCGI_PARAMS | {"SCRIPT_FILENAME"}
    assert params["REQUEST_METHOD"] == "GET"
    assert params["SCRIPT_NAME"] == params["DOCUMENT_URI"] == params["REQUEST_URI"] == "/"
    assert params["SCRIPT_FILENAME"] == params["DOCUMENT_ROOT"] + "/"
    assert params["CONTENT_LENGTH"] == params["CONTENT_TYPE"] == params["QUERY_STRING"] == ""
    assert params["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert params["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert params["REQUEST_SCHEME"] == "http"
    assert params["REDIRECT_STATUS"] == "200"
    assert params["HTTP_HOST"] == params["SERVER_NAME"] == "localhost"
    assert all(isinstance(v, str) for v in params.values())


def test_build_params_request():
    params = build_params("post", "/app/caf%C3%A9/x", "a=1&b=%20",
                          [("Content-Type", "application/json"), ("Host", "Example.COM:8080"),
                           ("X-Forwarded-For", "10.0.0.1"), ("Accept", "text/html"), ("accept", "*/*"),
                           ("Cookie", "a=1"), ("Cookie", "b=2")],
                          body_len=12, extra={"SERVER_PORT": "8080", "PATH_INFO": "/x"})
    assert params["REQUEST_METHOD"] == "POST"
    assert params["REQUEST_URI"] == "/app/caf%C3%A9/x?a=1&b=%20"
    assert params["SCRIPT_NAME"] == params["DOCUMENT_URI"] == "/app/caf\u00e9/x"
    assert params["SCRIPT_FILENAME"] == "/var/www/html/app/caf\u00e9/x"
    assert params["QUERY_STRING"] == "a=1&b=%20"
    assert params["CONTENT_TYPE"] == params["HTTP_CONTENT_TYPE"] == "application/json"
    assert params["CONTENT_LENGTH"] == params["HTTP_CONTENT_LENGTH"] == "12"
    assert params["HTTP_HOST"] == "example.com"  # nginx's $host: lowercased, no port
    assert params["HTTP_X_FORWARDED_FOR"] == "10.0.0.1"
    assert params["HTTP_ACCEPT"] == "text/html, */*"
    assert params["HTTP_COOKIE"] == "a=1; b=2"
    assert params["SERVER_PORT"] == "8080"
    assert params["PATH_INFO"] == "/x"


def test_build_params_splits_the_query_off_the_path_and_takes_a_dict():
    params = build_params("GET", "/search?q=fastcgi", headers={"Content-Length": "0"})
    assert (params["SCRIPT_NAME"], params["QUERY_STRING"]) == ("/search", "q=fastcgi")
    assert params["REQUEST_URI"] == "/search?q=fastcgi"
    assert params["CONTENT_LENGTH"] == "0"


def test_build_params_https():
    params = build_params(scheme="https", server_port=443)
    assert (params["REQUEST_SCHEME"], params["HTTPS"], params["SERVER_PORT"]) == ("https", "on", "443")
    assert "HTTPS" not in build_params()


def test_build_params_raw_bytes_in_the_path_survive(serve):
    server = serve(dump_params)
    FastCGIClient(server.address).request(build_params("GET", "/%FF%00x"))
    assert server.requests[0].params[b"SCRIPT_NAME"] == b"/\xff\x00x"
    assert server.requests[0].params[b"REQUEST_URI"] == b"/%FF%00x"


# ------------------------------------------------------------------------ parse_cgi_response


@pytest.mark.parametrize(("stdout", "expected"), [
    (b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope",
     (404, "Not Found", [("Content-Type", "text/plain")], b"nope")),
    (b"Content-Type: text/plain\n\nlf only\r\n\r\n", (200, "OK", [("Content-Type", "text/plain")],
                                                       b"lf only\r\n\r\n")),
    (b"Status: 204\r\n\r\n", (204, "", [], b"")),
    (b"X-Empty:\r\n\r\n", (200, "OK", [("X-Empty", "")], b"")),
    (b"", (502, "Bad Gateway", [], b"")),
])
def test_parse_cgi_response(stdout, expected):
    assert parse_cgi_response(stdout) == expected


@pytest.mark.parametrize("stdout", [b"Status: abc\r\n\r\n", b"Status: 20\r\n\r\n", b"junk\r\n\r\n",
                                    b"Content-Type: text/plain\r\n", b"no head at all"])
def test_parse_cgi_response_errors(stdout):
    with pytest.raises(ValueError):
        parse_cgi_response(stdout)

