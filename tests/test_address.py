"""Listen addresses: php-fpm's `listen` forms, their errors, and the sockets made from them."""

import errno
import os
import pwd
import socket
import stat

import pytest

import fastfpm.address as address_module
from fastfpm.address import (
    DEFAULT_BACKLOG,
    Address,
    connect,
    create_listen_socket,
    local_address,
    parse_address,
)


def ipv6_works():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_works(), reason="no IPv6 loopback here")


# ----------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9000", Address(socket.AF_INET, host="127.0.0.1", port=9000)),
    ("0.0.0.0:1", Address(socket.AF_INET, host="0.0.0.0", port=1)),
    ("[::1]:9000", Address(socket.AF_INET6, host="::1", port=9000)),
    ("[::]:65535", Address(socket.AF_INET6, host="::", port=65535)),
    ("[2001:DB8::1]:80", Address(socket.AF_INET6, host="2001:db8::1", port=80)),
    ("9000", Address(socket.AF_UNSPEC, host="", port=9000)),
    ("localhost:9000", Address(socket.AF_UNSPEC, host="localhost", port=9000)),
    ("fpm.example.org:9001", Address(socket.AF_UNSPEC, host="fpm.example.org", port=9001)),
    ("/run/app.sock", Address(socket.AF_UNIX, path="/run/app.sock")),
    ("unix:/run/app.sock", Address(socket.AF_UNIX, path="/run/app.sock")),
    ("/run/odd:name.sock", Address(socket.AF_UNIX, path="/run/odd:name.sock")),
    ("app.sock", Address(socket.AF_UNIX, path="app.sock")),
    ("./run/app.sock", Address(socket.AF_UNIX, path="./run/app.sock")),
    ("  127.0.0.1:9000  ", Address(socket.AF_INET, host="127.0.0.1", port=9000)),
    ("127.0.0.1:0", Address(socket.AF_INET, host="127.0.0.1", port=0)),
])
def test_parse(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "shown"), [
    ("127.0.0.1:9000", "127.0.0.1:9000"),
    ("[::1]:9000", "[::1]:9000"),
    ("[0:0::1]:9000", "[::1]:9000"),
    ("9000", "9000"),
    ("localhost:9000", "localhost:9000"),
    ("/run/app.sock", "/run/app.sock"),
    ("unix:/run/app.sock", "/run/app.sock"),
])
def test_str_gives_the_php_fpm_form(text, shown):
    assert str(parse_address(text)) == shown
    assert parse_address(str(parse_address(text))) == parse_address(text)


def test_address_is_frozen_and_hashable():
    address = parse_address("127.0.0.1:9000")
    with pytest.raises(AttributeError):
        address.port = 1
    assert {address, parse_address("127.0.0.1:9000")} == {address}
    assert address.is_unix is False and address.is_any is False
    assert parse_address("9000").is_any
    assert parse_address("/x.sock").is_unix


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("   ", "empty"),
    ("65536", "out of range"),
    ("127.0.0.1:65536", "out of range"),
    ("127.0.0.1:99999999", "out of range"),
    ("127.0.0.1:", "port is missing"),
    ("127.0.0.1:http", "not a number"),
    ("127.0.0.1:-1", "not a number"),
    (":9000", "host"),
    ("256.1.1.1:9000", "not an IPv4 address"),
    ("1.2.3:9000", "not an IPv4 address"),
    ("::1:9000", "brackets"),
    ("[::1]9000", "':PORT'"),
    ("[::1:9000", "missing ']'"),
    ("[fe80::zz]:9000", "not an IPv6 address"),
    ("[]:9000", "not an IPv6 address"),
    ("bad host:9000", "not a valid host name"),
    ("-bad.example:9000", "not a valid host name"),
    ("unix:", "path is empty"),
    ("/" + "x" * 120, "limited to"),
    ("/run/a\0b", "NUL"),
])
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_address(text)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError):
        parse_address(9000)


def test_default_backlog_is_php_fpms():
    assert DEFAULT_BACKLOG == 511


# ------------------------------------------------------------------------------------- TCP


def echo_once(server):
    """Accept one connection on server, answer its first bytes back, close."""
    conn, _ = server.accept()
    with conn:
        conn.sendall(conn.recv(100))


def round_trip(server, address):
    with connect(address, timeout=5) as client:
        client.sendall(b"ping")
        echo_once(server)
        assert client.recv(100) == b"ping"


def test_tcp_ipv4_ephemeral_port():
    with create_listen_socket("127.0.0.1:0") as server:
        bound = local_address(server)
        assert bound.family == socket.AF_INET and bound.host == "127.0.0.1" and bound.port > 0
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        round_trip(server, bound)
        round_trip(server, str(bound))


@needs_ipv6
def test_tcp_ipv6():
    with create_listen_socket("[::1]:0") as server:
        bound = local_address(server)
        assert bound.family == socket.AF_INET6 and bound.host == "::1"
        round_trip(server, bound)


def test_tcp_all_addresses():
    with create_listen_socket(parse_address("0")) as server:
        bound = local_address(server)
        assert bound.port > 0
        if server.family == socket.AF_INET6:
            # As php-fpm: "::" with IPv4 mapped in, so one socket serves both families.
            assert server.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
            assert bound.is_any and str(bound) == str(bound.port)
            round_trip(server, Address(socket.AF_INET6, host="::1", port=bound.port))
        else:
            assert server.getsockname()[0] == "0.0.0.0"
        round_trip(server, Address(socket.AF_INET, host="127.0.0.1", port=bound.port))
        round_trip(server, bound)  # the client side of "every address" is the loopback


def test_tcp_all_addresses_without_ipv6(monkeypatch):
    real_bind = address_module._bind_tcp

    def no_ipv6(family, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_bind(family, *args, **kwargs)

    monkeypatch.setattr(address_module, "_bind_tcp", no_ipv6)
    with create_listen_socket("0") as server:
        assert server.family == socket.AF_INET and server.getsockname()[0] == "0.0.0.0"
        round_trip(server, local_address(server))


def test_tcp_host_name_is_resolved():
    with create_listen_socket("localhost:0") as server:
        assert server.family in (socket.AF_INET, socket.AF_INET6)
        round_trip(server, local_address(server))


def test_tcp_port_in_use():
    with create_listen_socket("127.0.0.1:0") as server:
        port = server.getsockname()[1]
        with pytest.raises(OSError, match="127.0.0.1") as info:
            create_listen_socket(f"127.0.0.1:{port}")
        assert info.value.errno == errno.EADDRINUSE


def test_tcp_unresolvable_host():
    with pytest.raises(OSError, match="cannot resolve"):
        create_listen_socket("no-such-host.invalid:9000")


def test_connect_refused():
    with create_listen_socket("127.0.0.1:0") as server:
        port = server.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        connect(f"127.0.0.1:{port}", timeout=5)


@pytest.mark.parametrize("backlog", [3, -1])
def test_backlog(tmp_path, backlog):
    # A unix listener refuses connections (EAGAIN) once its backlog is full: count how many fit.
    path = str(tmp_path / "b.sock")
    clients = []
    with create_listen_socket(path, backlog=backlog):
        try:
            for _ in range(64):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(client)
                client.setblocking(False)
                client.connect(path)
        except BlockingIOError:
            pass
        finally:
            for client in clients:
                client.close()
    accepted = len(clients) - 1 if len(clients) < 64 else 64
    if backlog == 3:
        assert accepted == backlog + 1  # Linux queues backlog + 1
    else:
        assert accepted == 64  # the system maximum, not 0


# ------------------------------------------------------------------------------------ unix


def test_unix_socket(tmp_path):
    path = tmp_path / "app.sock"
    with create_listen_socket(str(path)) as server:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert local_address(server) == Address(socket.AF_UNIX, path=str(path))
        round_trip(server, str(path))
        round_trip(server, f"unix:{path}")


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666, 0o777])
def test_unix_socket_mode(tmp_path, mode):
    path = tmp_path / "m.sock"
    old_umask = os.umask(0o022)
    try:
        with create_listen_socket(str(path), mode=mode):
            assert stat.S_IMODE(os.stat(path).st_mode) == mode
        assert os.umask(0o022) == 0o022  # restored
    finally:
        os.umask(old_umask)


def test_unix_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a socket file nobody listens on, as a killed server leaves behind
    assert path.exists()
    with create_listen_socket(str(path)) as server:
        round_trip(server, str(path))


def test_unix_live_socket_is_refused(tmp_path):
    path = tmp_path / "live.sock"
    with create_listen_socket(str(path)) as server:
        with pytest.raises(OSError, match="already listening") as info:
            create_listen_socket(str(path))
        assert info.value.errno == errno.EADDRINUSE
        probe, _ = server.accept()  # the test connection that found it alive, as php-fpm makes
        assert probe.recv(1) == b""
        probe.close()
        round_trip(server, str(path))  # the running server was left alone


def test_unix_refuses_to_replace_other_files(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        create_listen_socket(str(path))
    assert path.read_text() == "precious"


def test_unix_missing_directory(tmp_path):
    with pytest.raises(OSError, match="unable to listen"):
        create_listen_socket(str(tmp_path / "missing" / "app.sock"))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_unix_owner_and_group(tmp_path):
    path = tmp_path / "owned.sock"
    with create_listen_socket(str(path), owner=65534, group="0"):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (65534, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_unix_owner_alone_brings_its_primary_group(tmp_path):
    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "o.sock"
    with create_listen_socket(str(path), owner="nobody"):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)


def test_unix_unknown_owner(tmp_path):
    with pytest.raises(ValueError, match="unknown user"):
        create_listen_socket(str(tmp_path / "u.sock"), owner="no-such-user-fastfpm")
    with pytest.raises(ValueError, match="unknown group"):
        create_listen_socket(str(tmp_path / "g.sock"), group="no-such-group-fastfpm")
    assert not (tmp_path / "u.sock").exists()


def test_connect_unix_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        connect(str(tmp_path / "nobody.sock"), timeout=5)


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_accept_queue_length_counts_waiting_connections(tmp_path, where):
    listen = str(tmp_path / "q.sock") if where == "unix" else "127.0.0.1:0"
    with create_listen_socket(listen) as server:
        target = server.getsockname()
        assert address_module.accept_queue_length(server) == 0
        family = socket.AF_UNIX if where == "unix" else socket.AF_INET
        clients = [socket.socket(family) for _ in range(3)]
        try:
            for client in clients:
                client.connect(target)
            assert address_module.accept_queue_length(server) == 3
            server.accept()[0].close()
            assert address_module.accept_queue_length(server) == 2
        finally:
            for client in clients:
                client.close()


# ---------------------------------------------------------------------------------------------------
# TCP keepalive (listen.keepalive*): set on the listen socket, carried by the kernel to accepted ones


def keepalive_of(sock: socket.socket) -> tuple[int, int, int, int]:
    """(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) of a socket."""
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


def accept_one(server: socket.socket) -> socket.socket:
    """A connection to server, accepted: the server's end (the client's end is closed)."""
    host, port = server.getsockname()[:2]
    with socket.create_connection((host, port), timeout=5):
        accepted, _ = server.accept()
    return accepted


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("[::1]", marks=needs_ipv6)])
def test_keepalive_set_on_the_listen_socket_is_what_accepted_sockets_get(host):
    with create_listen_socket(f"{host}:0") as server:
        assert address_module.tcp_keepalive(server, True, 45, 7, 5) is True
        assert keepalive_of(server) == (1, 45, 7, 5)
        with accept_one(server) as accepted:
            # Nothing was set on accepted: Linux copied all four at accept time.
            assert keepalive_of(accepted) == (1, 45, 7, 5)


def test_keepalive_turned_off_on_a_reused_listen_socket_reaches_new_connections():
    """A reload hands the pool's socket over and sets the options again: `no` must undo `yes`."""
    with create_listen_socket("127.0.0.1:0") as server:
        address_module.tcp_keepalive(server, True, 45, 7, 5)
        with accept_one(server) as before:
            address_module.tcp_keepalive(server, False, 45, 7, 5)
            with accept_one(server) as after:
                assert keepalive_of(after)[0] == 0
            # A connection accepted earlier keeps what it was accepted with.
            assert keepalive_of(before) == (1, 45, 7, 5)


def test_without_keepalive_accepted_sockets_have_none():
    """What the option changes: a plain listen socket's connections are never probed (php-fpm's)."""
    with create_listen_socket("127.0.0.1:0") as server, accept_one(server) as accepted:
        assert keepalive_of(accepted)[0] == 0


def test_keepalive_is_not_set_on_unix_sockets(tmp_path):
    with create_listen_socket(str(tmp_path / "k.sock")) as server:
        assert address_module.tcp_keepalive(server, True, 45, 7, 5) is False
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_keepalive_limits_are_the_kernels():
    """The config's bounds (fastfpm.config) are exactly what setsockopt takes."""
    limits = (address_module.MAX_KEEPALIVE_SECONDS, address_module.MAX_KEEPALIVE_SECONDS,
              address_module.MAX_KEEPALIVE_COUNT)
    with create_listen_socket("127.0.0.1:0") as server:
        address_module.tcp_keepalive(server, True, *limits)
        assert keepalive_of(server)[1:] == limits
        with pytest.raises(OSError) as info:
            address_module.tcp_keepalive(server, True, limits[0] + 1, 1, 1)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            address_module.tcp_keepalive(server, True, 1, 1, limits[2] + 1)
        assert info.value.errno == errno.EINVAL
