"""Listen addresses written the way php-fpm's `listen` directive writes them, and their sockets.

    127.0.0.1:9000     one IPv4 address            [::1]:9000      one IPv6 address
    9000               every address, IPv4 and IPv6 (php-fpm binds "::" dual-stack, else 0.0.0.0)
    localhost:9000     a host name, resolved when the socket is made
    /run/app.sock      a unix socket (also unix:/run/app.sock, as nginx writes it, or a relative path)

Parsing never touches the network; create_listen_socket and connect do. AllowedClients is
listen.allowed_clients (php-fpm's fcgi_is_allowed): which peers of a TCP listen socket may stay.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import ipaddress
import os
import pwd
import re
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["Address", "parse_address", "create_listen_socket", "connect", "local_address", "DEFAULT_BACKLOG",
           "AllowedClients", "REFUSED_MESSAGE", "defer_accept", "tcp_keepalive", "MAX_KEEPALIVE_SECONDS",
           "MAX_KEEPALIVE_COUNT", "handover_path"]

# php-fpm's listen.backlog default on Linux (FPM_BACKLOG_DEFAULT in sapi/fpm/fpm/fpm_sockets.h).
DEFAULT_BACKLOG = 511

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_UNIX_PATH_MAX = 107

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


@dataclass(frozen=True)
class Address:
    """A parsed listen address.

    family is AF_UNIX, AF_INET or AF_INET6 for a unix path or an IP literal, and AF_UNSPEC when the
    family is only known once the socket is made: a bare port (host "", every address) or a host name.
    """

    family: socket.AddressFamily
    host: str | None = None  # an IP literal or host name; "" for every address; None for unix
    port: int | None = None
    path: str | None = None  # unix socket path, as written (relative paths stay relative)

    @property
    def is_unix(self) -> bool:
        """True for a unix socket path."""
        return self.family == socket.AF_UNIX

    @property
    def is_any(self) -> bool:
        """True for the bare-port form that listens on every address."""
        return self.host == ""

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return str(self.path)
        if self.host == "":
            return str(self.port)
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _parse_port(text: str, original: str) -> int:
    if not text:
        raise ValueError(f"invalid listen address {original!r}: the port is missing")
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"invalid listen address {original!r}: port {text!r} is not a number")
    port = int(text)
    # Port 0 asks the kernel for a free port (tests, benchmarks); php-fpm itself wants 1..65535.
    if port > 65535:
        raise ValueError(f"invalid listen address {original!r}: port {port} is out of range (0-65535)")
    return port


def _unix(path: str, original: str) -> Address:
    if not path:
        raise ValueError(f"invalid listen address {original!r}: the unix socket path is empty")
    if "\0" in path:
        raise ValueError(f"invalid listen address {original!r}: the path contains a NUL byte")
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise ValueError(f"invalid listen address {original!r}: unix socket paths are limited to "
                         f"{_UNIX_PATH_MAX} bytes")
    return Address(socket.AF_UNIX, path=path)


def parse_address(text: str) -> Address:
    """Parse a php-fpm style listen address; ValueError says what is wrong with a bad one."""
    if not isinstance(text, str):
        raise TypeError(f"listen address must be a str, not {type(text).__name__}")
    original = text
    text = text.strip()
    if not text:
        raise ValueError("invalid listen address '': it is empty")
    if text.startswith("unix:"):
        return _unix(text[5:], original)
    if text.startswith(("/", "./", "../")):
        return _unix(text, original)
    if text.isascii() and text.isdigit():
        return Address(socket.AF_UNSPEC, host="", port=_parse_port(text, original))
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"invalid listen address {original!r}: missing ']' after the IPv6 address")
        host, rest = text[1:close], text[close + 1:]
        if not rest.startswith(":"):
            raise ValueError(f"invalid listen address {original!r}: expected ':PORT' after ']'")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid listen address {original!r}: {host!r} is not an IPv6 address"
                             ) from None
        return Address(socket.AF_INET6, host=str(ip), port=_parse_port(rest[1:], original))
    if ":" not in text:
        # php-fpm's rule: no colon and not all digits means a unix socket path, relative ones included.
        return _unix(text, original)
    host, _, port_text = text.rpartition(":")
    if ":" in host:
        raise ValueError(f"invalid listen address {original!r}: write IPv6 addresses in brackets, "
                         f"as in [::1]:9000")
    if not host:
        raise ValueError(f"invalid listen address {original!r}: the host before ':' is empty")
    port = _parse_port(port_text, original)
    try:
        return Address(socket.AF_INET, host=str(ipaddress.IPv4Address(host)), port=port)
    except ValueError:
        pass
    if host.replace(".", "").isdigit():
        raise ValueError(f"invalid listen address {original!r}: {host!r} is not an IPv4 address")
    if not _HOSTNAME.match(host):
        raise ValueError(f"invalid listen address {original!r}: {host!r} is not a valid host name")
    return Address(socket.AF_UNSPEC, host=host, port=port)


def _as_address(address: Address | str) -> Address:
    return address if isinstance(address, Address) else parse_address(address)


def _resolve(address: Address, passive: bool) -> list[tuple[int, tuple]]:
    """(family, sockaddr) candidates for a TCP address, in the order to try them."""
    host = address.host or None
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(host, address.port, address.family, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve {address.host!r} for '{address}': {exc.strerror}") from None
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def _bind_tcp(family: int, sockaddr: tuple, backlog: int, dual_stack: bool,
              reuseport: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Rebinding right after a restart must not wait for old connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            # listen.reuseport: a second master (of the same user, also with SO_REUSEPORT) may bind
            # the same address; the kernel then spreads new connections over the group (see
            # fastfpm.handover for how a hand-over steers them to the new master).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and dual_stack:
            # "::" also accepts IPv4 (as ::ffff:a.b.c.d) whatever net.ipv6.bindv6only says.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _create_tcp(address: Address, backlog: int, reuseport: bool = False) -> socket.socket:
    if address.is_any:
        # As php-fpm: every address means "::" with IPv4 mapped in, or 0.0.0.0 without IPv6.
        try:
            return _bind_tcp(socket.AF_INET6, ("::", address.port, 0, 0), backlog, True, reuseport)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise OSError(exc.errno, f"unable to bind listening socket for address '{address}': "
                                         f"{exc.strerror}") from None
        candidates = [(socket.AF_INET, ("0.0.0.0", address.port))]
    else:
        candidates = _resolve(address, passive=True)
    error: OSError | None = None
    for family, sockaddr in candidates:
        # A host name may resolve to several addresses; like php-fpm, listen on the first that binds.
        try:
            return _bind_tcp(family, sockaddr, backlog, dual_stack=sockaddr[0] == "::",
                             reuseport=reuseport)
        except OSError as exc:
            error = exc
    assert error is not None
    hint = ""
    if error.errno == errno.EADDRINUSE:
        hint = (" (another process listens there; to replace a running fastfpm master without "
                "stopping it first, both need listen.reuseport = yes)")
    raise OSError(error.errno, f"unable to bind listening socket for address '{address}': "
                               f"{error.strerror}{hint}") from None


def _someone_listens(path: str) -> bool:
    """Whether a process accepts connections on the unix socket at path (php-fpm's test connect)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (BlockingIOError, TimeoutError):
        return True  # the backlog is full: somebody is listening, just busy
    except OSError as exc:
        raise OSError(exc.errno, f"cannot tell whether something listens on '{path}': "
                                 f"{exc.strerror}") from None
    finally:
        probe.close()
    return True


def _uid(owner: int | str | None) -> int:
    if owner is None:
        return -1
    if isinstance(owner, int) or owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ValueError(f"unknown user {owner!r} for the socket owner") from None


def _gid(group: int | str | None) -> int:
    if group is None:
        return -1
    if isinstance(group, int) or group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r} for the socket group") from None


def handover_path(path: str) -> str:
    """Where a new master binds while another one listens on path (listen.reuseport): a hidden name in
    the same directory, so that rename(2) can move it over path in one step."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{os.getpid()}.new")


def _create_unix(address: Address, backlog: int, mode: int, owner: int | str | None,
                 group: int | str | None, reuseport: bool = False) -> socket.socket:
    path = address.path
    assert path is not None
    uid, gid = _uid(owner), _gid(group)
    if group is None and uid != -1:
        # listen.owner alone gives the socket the owner's primary group too, as php-fpm does
        # (so `listen.owner = www-data` is enough for nginx running as www-data).
        with contextlib.suppress(KeyError):
            gid = pwd.getpwuid(uid).pw_gid
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"cannot listen on '{path}': it exists and is not a socket")
        if _someone_listens(path):
            if not reuseport:
                raise OSError(errno.EADDRINUSE, f"cannot listen on '{path}': another process is already "
                                                f"listening there")
            # A hand-over: the live socket stays untouched; this master listens beside it and
            # fastfpm.handover.publish renames the new socket over it once the workers are ready.
            path = handover_path(path)
            if len(os.fsencode(path)) > _UNIX_PATH_MAX:
                raise OSError(errno.ENAMETOOLONG, f"cannot listen beside '{address.path}': '{path}' is "
                                                  f"longer than {_UNIX_PATH_MAX} bytes")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left by a master of the same pid that died before publishing
        else:
            # A socket file left behind by a process that died: nobody answers, so it is safe to
            # replace.
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        # Create the file with the final permissions already (php-fpm does the same with umask), so it
        # is never reachable by users that mode leaves out; chmod afterwards makes the mode exact.
        saved_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(saved_umask)
        bound = True
        os.chmod(path, mode)
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise OSError(exc.errno, f"unable to listen on '{path}': {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _system_max_backlog() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def create_listen_socket(address: Address | str, *, backlog: int = DEFAULT_BACKLOG, mode: int = 0o660,
                         owner: int | str | None = None, group: int | str | None = None,
                         reuseport: bool = False) -> socket.socket:
    """Bind and listen on address; mode, owner and group apply to unix sockets only.

    A unix socket file nobody answers on is replaced; a live one (another server) is an error, and so
    is a path that exists but is not a socket. A negative backlog means the system's maximum. Errors
    are OSError with the address in the message. reuseport (listen.reuseport) allows a second
    master: SO_REUSEPORT on TCP; on a live unix socket, the socket is bound at handover_path(path)
    instead (local_address tells), for the caller to rename over path once it serves.
    """
    address = _as_address(address)
    if backlog < 0:
        # php-fpm's listen.backlog = -1: as many as the system allows (Python would take it as 0).
        backlog = _system_max_backlog()
    if address.is_unix:
        return _create_unix(address, backlog, mode, owner, group, reuseport)
    return _create_tcp(address, backlog, reuseport)


# How long the kernel keeps a silent TCP connection from accept() (TCP_DEFER_ACCEPT). One second is
# a single SYN-ACK retransmission: a connection still silent then is handed over and waits among the
# worker's others for idle_timeout, so it lives about idle_timeout + 1 s in all (a longer deferral
# would stretch that along the retransmission schedule, 1, 3, 7, 15 s: 12 s with idle_timeout 5 s).
DEFER_ACCEPT_SECONDS = 1


def defer_accept(sock: socket.socket) -> bool:
    """On a TCP listen socket, have the kernel hand a connection to accept() only once it has data
    (TCP_DEFER_ACCEPT, nginx's `listen ... deferred`), or once DEFER_ACCEPT_SECONDS passed: a client
    that connects and stays silent wakes no worker and counts in no listen queue meanwhile. True
    when set; unix sockets have no such option (their silent connections wait among the worker's
    others, see fastfpm._core's ConnectionLoop).
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
    return True


# The kernel's limits (include/net/tcp.h): TCP_KEEPIDLE and TCP_KEEPINTVL take 1..MAX_TCP_KEEPIDLE
# (32767) seconds, TCP_KEEPCNT 1..MAX_TCP_KEEPCNT (127) probes; setsockopt refuses others with EINVAL.
MAX_KEEPALIVE_SECONDS = 32767
MAX_KEEPALIVE_COUNT = 127


def tcp_keepalive(sock: socket.socket, enabled: bool, idle: int, interval: int, count: int) -> bool:
    """On a TCP listen socket, turn TCP keepalive on (probes after idle seconds of silence, every
    interval seconds, the connection dropped after count unanswered ones) or off; True when set.

    Linux copies SO_KEEPALIVE and the three TCP_KEEP* values from a listening socket to every socket
    accept() returns (and starts the keepalive timer on it), so setting them here once costs the
    workers' accept path nothing. Set again on a socket a reload or systemd hands over, so the pool's
    values win; connections accepted before keep the values they were accepted with. Unix sockets
    have no keepalive: False, nothing set.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    if enabled:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if enabled else 0)
    return True


def connect(address: Address | str, timeout: float | None = 10.0) -> socket.socket:
    """Open a client connection to address (the wildcard forms connect to the loopback address)."""
    address = _as_address(address)
    if address.is_unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    host = address.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"  # reaches both "::" (dual-stack) and 0.0.0.0 listeners
    elif host == "::":
        host = "::1"
    sock = socket.create_connection((host, address.port), timeout=timeout)
    # Requests are a few small records written back to back: do not let Nagle hold them.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def local_address(sock: socket.socket) -> Address:
    """The Address a listening socket is bound to: gives the real port after binding port 0."""
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        return Address(socket.AF_UNIX, path=os.fsdecode(name))
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        if host == "::" and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
            return Address(socket.AF_UNSPEC, host="", port=port)
        return Address(socket.AF_INET6, host=host, port=port)
    return Address(socket.AF_INET, host=host, port=port)


# ---------------------------------------------------------------------------------------------------
# How many connections wait in a listening socket's accept queue (php-fpm's "listen queue").

# struct tcp_info: for a listening socket Linux reports the accept queue's length in tcpi_unacked
# and its limit (the backlog) in tcpi_sacked, at bytes 24 and 28: eight u8 fields, then u32 rto,
# ato, snd_mss, rcv_mss, unacked, sacked.
_TCPI_UNACKED = 24
_TCPI_SACKED = 28
# sock_diag for unix sockets (linux/unix_diag.h): SOCK_DIAG_BY_FAMILY, UDIAG_SHOW_RQLEN, and the
# UNIX_DIAG_RQLEN attribute, whose two u32 are, for a listening socket, the accept queue's length
# and its limit.
_SOCK_DIAG_BY_FAMILY = 20
_UDIAG_SHOW_RQLEN = 0x10
_UNIX_DIAG_RQLEN = 4
_NLMSG_ERROR = 2


def accept_queue_length(sock: socket.socket) -> int | None:
    """Connections waiting to be accepted on a listening socket; None when the kernel will not say.

    TCP sockets answer through TCP_INFO, unix sockets through the sock_diag netlink interface
    (what `ss -l` shows as Recv-Q). The master uses it to fork one ondemand worker per waiting
    connection instead of one per wake-up.
    """
    queue = listen_queue(sock)
    return None if queue is None else queue[0]


def listen_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(waiting, limit) of a listening socket's accept queue: php-fpm's "listen queue" and "listen
    queue len" (`ss -l`'s Recv-Q and Send-Q); None when the kernel will not say."""
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            return (int.from_bytes(info[_TCPI_UNACKED:_TCPI_UNACKED + 4], "little"),
                    int.from_bytes(info[_TCPI_SACKED:_TCPI_SACKED + 4], "little"))
        if sock.family == socket.AF_UNIX:
            return _unix_accept_queue(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return None
    return None


def _unix_accept_queue(inode: int) -> tuple[int, int] | None:
    """The accept queue (waiting, limit) of the listening unix socket with this inode, from sock_diag."""
    import struct

    request = struct.pack("=BBHIII2I", socket.AF_UNIX, 0, 0, 1 << 10,  # states: TCP_LISTEN (10)
                          inode, _UDIAG_SHOW_RQLEN, 0xFFFFFFFF, 0xFFFFFFFF)  # any cookie
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, 1, 1, 0)  # NLM_F_REQUEST
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.settimeout(1.0)
        nl.send(header + request)
        reply = nl.recv(8192)
    length, kind = struct.unpack_from("=IH", reply, 0)
    if kind == _NLMSG_ERROR or kind != _SOCK_DIAG_BY_FAMILY:
        return None
    pos = 16 + 16  # nlmsghdr, then struct unix_diag_msg
    while pos + 4 <= min(length, len(reply)):
        attr_len, attr_type = struct.unpack_from("=HH", reply, pos)
        if attr_len < 4:
            return None
        if attr_type == _UNIX_DIAG_RQLEN and attr_len >= 12:
            return struct.unpack_from("=II", reply, pos + 4)
        pos += (attr_len + 3) & ~3  # attributes are 4-byte aligned
    return None


# ---------------------------------------------------------------------------------------------------
# listen.allowed_clients

# php-fpm's log line for a connection listen.allowed_clients refuses (fastcgi.c), for the caller to use.
REFUSED_MESSAGE = "Connection disallowed: IP address '{peer}' has been dropped."

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class AllowedClients:
    """The client addresses a TCP listen socket accepts (listen.allowed_clients); empty: everyone.

    Entries are IPv4 or IPv6 addresses, as in php-fpm, or networks (10.0.0.0/8, fd00::/8), which
    php-fpm does not take. A peer written as an IPv4-mapped IPv6 address (::ffff:192.0.2.1, what a
    dual-stack socket reports for an IPv4 client) matches IPv4 entries, and an IPv4 peer matches
    IPv4-mapped entries. Where php-fpm differs: it compares only the first 12 bytes of IPv6 addresses
    (so ::1 lets in all of ::/96) and does not match an IPv4 peer against an IPv4-mapped entry.
    Unix socket clients are not subject to the list (allows_fd lets them in), as in php-fpm.
    """

    networks: tuple[_Network, ...] = ()

    @classmethod
    def parse(cls, entries: str | Iterable[str]) -> AllowedClients:
        """From a comma-separated string (as written in a file) or a list of entries.

        Raises ValueError naming the first entry that is not an address or network (php-fpm skips such
        entries with an error; fastfpm.config refuses them before this is reached).
        """
        if isinstance(entries, str):
            entries = entries.split(",")
        networks = []
        for entry in entries:
            text = entry.strip()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"listen.allowed_clients: {text!r} is not an IP address or "
                                 f"network") from None
        return cls(tuple(networks))

    @property
    def restricted(self) -> bool:
        """Whether any entry is set (when not, every client is allowed and no check is needed)."""
        return bool(self.networks)

    def allows(self, peer_ip: str) -> bool:
        """Whether a TCP client at peer_ip (as getpeername()[0] gives it; a %scope is ignored) may stay.

        True for every peer when no entry is set; False for text that is not an IP address.
        """
        if not self.networks:
            return True
        try:
            address: _Address = ipaddress.ip_address(peer_ip.partition("%")[0])
        except ValueError:
            return False
        other: _Address | None
        if isinstance(address, ipaddress.IPv6Address):
            other = address.ipv4_mapped
        else:
            other = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
        return any(address in network or (other is not None and other in network)
                   for network in self.networks)

    def allows_fd(self, fd: int) -> bool:
        """allows() for the peer of the connected socket fd (a unix socket peer is always allowed).

        The signature the worker loop's client_filter takes; a socket whose peer is already gone is
        refused. fd is left open either way.
        """
        return self._check_fd(fd)[0]

    def client_filter(self, on_refused: Callable[[str], None] | None = None) -> Callable[[int], bool] | None:
        """A client_filter(fd) -> bool for the worker loop, or None when every client is allowed.

        on_refused(peer_ip) is called for each refused client, to log it (for example
        log.error(REFUSED_MESSAGE.format(peer=peer_ip)), php-fpm's line).
        """
        if not self.networks:
            return None
        check = self._check_fd

        def client_filter(fd: int) -> bool:
            allowed, peer = check(fd)
            if not allowed and on_refused is not None:
                on_refused(peer)
            return allowed

        return client_filter

    def _check_fd(self, fd: int) -> tuple[bool, str]:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return False, "?"
        try:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return True, ""
            peer = sock.getpeername()[0]
        except OSError:
            return False, "?"
        finally:
            sock.detach()
        return self.allows(peer), peer
