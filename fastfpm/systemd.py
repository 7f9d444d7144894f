"""systemd integration without libsystemd: readiness and status notification, the watchdog, and
socket activation. php-fpm's counterpart is sapi/fpm/fpm/fpm_systemd.c.

Notification (sd_notify(3)): when systemd starts a Type=notify service it sets NOTIFY_SOCKET to a
unix datagram socket (a path, or an abstract name written with a leading '@'). The service sends
newline-separated KEY=VALUE assignments to it: READY=1 once it serves, STATUS= for
`systemctl status`, WATCHDOG=1 as a keep-alive, STOPPING=1 and RELOADING=1 around stops and
reloads. A failed send never stops fastfpm: the methods return False and keep the error in
`Notifier.last_error` for the caller to log.

The watchdog (sd_watchdog_enabled(3)): with WatchdogSec= systemd sets WATCHDOG_USEC (and
WATCHDOG_PID); the service must send WATCHDOG=1 more often than that, half the timeout is advised.

Status reports: php-fpm's `systemd_interval` sends a STATUS= line with the process and request
counts every interval; `Heartbeat` schedules those reports together with the watchdog pings and
`status_line` formats them exactly as php-fpm does.

Socket activation (sd_listen_fds(3)): systemd passes the sockets of a .socket unit as fds 3, 4, ...
with LISTEN_PID (the pid they are meant for), LISTEN_FDS (how many) and LISTEN_FDNAMES (their
names, colon-separated). `listen_fds` takes them over; `match_socket` finds the one bound to a
pool's listen address, which the master then uses instead of binding its own.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import time
from collections.abc import Iterable, MutableMapping
from types import TracebackType

from fastfpm.address import Address, parse_address

__all__ = [
    "SD_LISTEN_FDS_START",
    "Heartbeat",
    "Notifier",
    "listen_fds",
    "listen_fds_with_names",
    "match_socket",
    "status_line",
    "watchdog_interval",
]

# The first fd systemd passes to an activated service (SD_LISTEN_FDS_START in sd-daemon.h).
SD_LISTEN_FDS_START = 3

# The STATUS= text php-fpm sends once it is ready (fpm_systemd_heartbeat).
READY_STATUS = "Ready to handle connections"

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_WATCHDOG_VARIABLES = ("WATCHDOG_USEC", "WATCHDOG_PID")


def _clean(text: str) -> str:
    """One line: a newline would end the assignment and start a new (bogus) one."""
    return " ".join(text.splitlines())


def _unset(environ: MutableMapping[str, str], names: Iterable[str]) -> None:
    for name in names:
        # Deleting from os.environ also calls unsetenv(), so exec'd programs do not see it either.
        environ.pop(name, None)


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ---------------------------------------------------------------------------------- notification


class Notifier:
    """Sends sd_notify messages to the service manager's datagram socket.

    Build it with `Notifier.from_environ()`, which gives None when systemd did not ask for
    notifications. Every method returns True when the datagram was sent and False otherwise; the
    OSError is kept in `last_error`. A send waits at most `timeout` seconds for room in systemd's
    queue, so a stuck service manager cannot stall the master for long.
    """

    def __init__(self, address: str | bytes, *, timeout: float = 2.0) -> None:
        """address is the socket to send to: a path, or an abstract name starting with NUL."""
        self.address = address
        self.timeout = timeout
        self.last_error: OSError | None = None
        self._socket: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ, *, unset: bool = False,
                     timeout: float = 2.0) -> Notifier | None:
        """A Notifier for NOTIFY_SOCKET, or None when it is unset or not a unix socket address.

        '@name' is the abstract socket "\\0name", as sd_notify reads it. With unset=True the variable
        is removed, so processes started later (workers, the app's subprocesses) do not see it.
        """
        value = environ.get("NOTIFY_SOCKET", "")
        if unset:
            _unset(environ, ("NOTIFY_SOCKET",))
        if value.startswith("/"):
            return cls(value, timeout=timeout)
        if value.startswith("@") and len(value) > 1:
            return cls("\0" + value[1:], timeout=timeout)
        # Empty, relative, or a transport this module does not speak (vsock:...).
        return None

    def __repr__(self) -> str:
        shown = self.address if isinstance(self.address, str) else os.fsdecode(self.address)
        return f"Notifier({shown.replace(chr(0), '@', 1)!r})"

    def notify(self, *assignments: str) -> bool:
        """Send KEY=VALUE assignments as one datagram; True when it was sent."""
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(self.timeout)
                self._socket = sock
            # sendto every time (no connect): the path is looked up again, so a systemd that was
            # re-executed (daemon-reexec) and made its socket anew is still reached.
            self._socket.sendto(message, self.address)
        except OSError as exc:
            self.last_error = exc
            return False
        return True

    def ready(self, status: str = READY_STATUS) -> bool:
        """Start-up (or a reload) is complete: READY=1 with a STATUS= text and MAINPID=."""
        return self.notify("READY=1", f"STATUS={_clean(status)}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        """Replace the free-form status `systemctl status` shows."""
        return self.notify(f"STATUS={_clean(text)}")

    def watchdog(self) -> bool:
        """Keep-alive for WatchdogSec=: the master loop is still turning."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """The service has begun to stop (STOPPING=1)."""
        return self.notify("STOPPING=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun; READY=1 (`ready`) must follow once it is done.

        MONOTONIC_USEC= (CLOCK_MONOTONIC in microseconds) lets systemd tell this reload from an
        earlier one; Type=notify-reload requires it, older systemd versions ignore it.
        """
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}", *self._status(status))

    @staticmethod
    def _status(status: str | None) -> tuple[str, ...]:
        return () if status is None else (f"STATUS={_clean(status)}",)

    def close(self) -> None:
        """Close the sending socket (a later send opens a new one)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---------------------------------------------------------------------------------- watchdog


def watchdog_interval(environ: MutableMapping[str, str] = os.environ, *,
                      unset: bool = False) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when no watchdog is asked for.

    None too when WATCHDOG_PID names another process or the values are not positive integers, as
    sd_watchdog_enabled treats them. With unset=True both variables are removed.
    """
    usec_text = environ.get("WATCHDOG_USEC")
    pid_text = environ.get("WATCHDOG_PID")
    if unset:
        _unset(environ, _WATCHDOG_VARIABLES)
    if usec_text is None:
        return None
    try:
        usec = int(usec_text)
        if pid_text is not None and int(pid_text) != os.getpid():
            return None
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


# ---------------------------------------------------------------------------------- status reports


def status_line(active: int, idle: int, requests: int, slow: int, req_per_sec: float) -> str:
    """The STATUS= text php-fpm sends every systemd_interval, word for word.

    Traffic uses C's %.3g, as php-fpm prints it (0.5, 12.3, 1.23e+03), glued to "req/sec".
    """
    return (f"Processes active: {active}, idle: {idle}, Requests: {requests}, slow: {slow}, "
            f"Traffic: {req_per_sec:.3g}req/sec")


class Heartbeat:
    """When to send status reports and watchdog pings; pure bookkeeping, no I/O.

    Status reports come every `systemd_interval` seconds (0 turns them off, as php-fpm's
    systemd_interval = 0); watchdog pings every `watchdog` seconds when systemd asked for one
    (`watchdog_interval()`). php-fpm ties both to one timer and drops the watchdog when WatchdogSec=
    is 2 seconds or less; here each keeps its own schedule and a beat carries whatever is due.
    Unlike php-fpm, periodic beats do not repeat READY=1, which would end a reload early under
    Type=notify-reload.

    The master loop uses `timeout(now)` for its wait, then `beat(now, ...)` and sends what it gives.
    """

    def __init__(self, systemd_interval: float, watchdog: float | None, now: float) -> None:
        self.status_interval = systemd_interval if systemd_interval > 0 else None
        self.watchdog_interval = watchdog if watchdog is not None and watchdog > 0 else None
        self.next_status = now + self.status_interval if self.status_interval else None
        self.next_watchdog = now + self.watchdog_interval if self.watchdog_interval else None
        self.last_time = now
        self.last_requests = 0

    @property
    def enabled(self) -> bool:
        """False when there is nothing to send, ever."""
        return self.next_status is not None or self.next_watchdog is not None

    def timeout(self, now: float) -> float | None:
        """Seconds until the next beat is due (0 when overdue), None when none ever is."""
        due = [t for t in (self.next_status, self.next_watchdog) if t is not None]
        if not due:
            return None
        return max(0.0, min(due) - now)

    def beat(self, now: float, active: int, idle: int, requests: int, slow: int) -> tuple[str, ...]:
        """The assignments due at `now` (empty when nothing is), for `Notifier.notify(*...)`.

        requests and slow are the counters summed over every pool; Traffic is the rate since the
        previous status report. A counter that went down (new scoreboards after a reload) counts
        from zero again.
        """
        assignments: list[str] = []
        if self.next_watchdog is not None and now >= self.next_watchdog:
            assignments.append("WATCHDOG=1")
            assert self.watchdog_interval is not None
            self.next_watchdog = _next(self.next_watchdog, self.watchdog_interval, now)
        if self.next_status is not None and now >= self.next_status:
            assert self.status_interval is not None
            done = requests - self.last_requests if requests >= self.last_requests else requests
            elapsed = now - self.last_time
            rate = done / elapsed if elapsed > 0 else 0.0
            assignments.append("STATUS=" + status_line(active, idle, requests, slow, rate))
            self.last_time, self.last_requests = now, requests
            self.next_status = _next(self.next_status, self.status_interval, now)
        return tuple(assignments)


def _next(previous: float, interval: float, now: float) -> float:
    """The next deadline on the grid, skipping the beats a late loop missed."""
    following = previous + interval
    if following <= now:
        following = now + interval
    return following


# ---------------------------------------------------------------------------------- socket activation


def listen_fds_with_names(environ: MutableMapping[str, str] = os.environ, *,
                          unset: bool = True) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process, with their names (FileDescriptorName=).

    As sd_listen_fds_with_names: nothing unless LISTEN_PID is this process; fds from 3 on, LISTEN_FDS
    of them; names from LISTEN_FDNAMES, "unknown" when it is missing or short. Each fd gets FD_CLOEXEC
    so programs the app runs do not inherit it. A passed fd that is not a socket (ListenFIFO=, ...)
    is left alone and not returned. With unset=True (the default) the three variables are removed
    whatever they held, so workers and the app never see them.

    Raises ValueError when LISTEN_PID is ours but LISTEN_FDS is not a count, OSError when a passed
    fd is not open: both mean the environment cannot be trusted.
    """
    pid_text = environ.get("LISTEN_PID")
    fds_text = environ.get("LISTEN_FDS")
    names_text = environ.get("LISTEN_FDNAMES")
    if unset:
        _unset(environ, _LISTEN_VARIABLES)
    if pid_text is None:
        return []
    try:
        pid = int(pid_text)
    except ValueError:
        return []
    if pid != os.getpid():
        return []
    try:
        count = int(fds_text) if fds_text is not None else 0
    except ValueError:
        raise ValueError(f"LISTEN_FDS={fds_text!r} is not a number of file descriptors") from None
    if count < 0:
        raise ValueError(f"LISTEN_FDS={fds_text!r} is not a number of file descriptors")
    names = names_text.split(":") if names_text else []
    found: list[tuple[str, socket.socket]] = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        try:
            sock = socket.socket(fileno=fd)  # family, type and protocol are read from the fd
        except OSError:
            continue  # not a socket
        name = names[index] if index < len(names) and names[index] else "unknown"
        found.append((name, sock))
    return found


def listen_fds(environ: MutableMapping[str, str] = os.environ, *, unset: bool = True) -> list[socket.socket]:
    """The sockets systemd passed to this process (sd_listen_fds); see `listen_fds_with_names`."""
    return [sock for _, sock in listen_fds_with_names(environ, unset=unset)]


_ANY_HOSTS = ("0.0.0.0", "::")


def _ip(host: str) -> str:
    """Canonical text of an IP address; an IPv4-mapped IPv6 address becomes the IPv4 one."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _bound(sock: socket.socket) -> tuple[int, str | bytes, int | None, bool] | None:
    """(family, host or path, port, v6only) of a listening stream socket; None for anything else."""
    try:
        if sock.type != socket.SOCK_STREAM:
            return None
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
        name = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            return socket.AF_UNIX, name, None, False
        if sock.family == socket.AF_INET:
            return socket.AF_INET, _ip(name[0]), name[1], False
        if sock.family == socket.AF_INET6:
            v6only = bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            return socket.AF_INET6, _ip(name[0]), name[1], v6only
    except OSError:
        pass  # closed, or not a socket any more
    return None


def _wanted_hosts(address: Address) -> set[str] | None:
    """The IP texts that may serve a TCP address; None means any unspecified address will do."""
    if address.is_any or address.host in _ANY_HOSTS:
        return None
    assert address.host is not None
    if address.family != socket.AF_UNSPEC:
        return {_ip(address.host)}
    try:  # a host name: whatever it resolves to (as create_listen_socket would bind)
        infos = socket.getaddrinfo(address.host, address.port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {_ip(str(info[4][0])) for info in infos}


def _unix_path(path: str | bytes) -> str | None:
    if isinstance(path, bytes):
        if path.startswith(b"\0") or not path:
            return None  # abstract or unnamed: fastfpm cannot listen there, so nothing matches
        path = os.fsdecode(path)
    elif not path or path.startswith("\0"):
        return None
    return os.path.normpath(os.path.abspath(path))


def match_socket(sockets: Iterable[socket.socket], address: Address | str) -> socket.socket | None:
    """The inherited listening socket bound to a pool's listen address, or None.

    The socket's own address (getsockname) is compared, not its name: unix sockets by path (made
    absolute and normalised, so "unix:/run/a.sock" and "/run//a.sock" are the same place), TCP
    sockets by port and IP (an IPv4-mapped IPv6 address counts as the IPv4 one; a host name matches
    what it resolves to). The wildcard forms ("9000", "0.0.0.0:9000", "[::]:9000") match a socket
    bound to 0.0.0.0 or :: on that port, preferring what fastfpm would bind itself: for "9000" and
    "[::]:9000" a dual-stack ::, then 0.0.0.0, then an IPv6-only ::; for "0.0.0.0:9000" 0.0.0.0,
    then a dual-stack :: (never an IPv6-only one). Only listening SOCK_STREAM sockets count.
    """
    if isinstance(address, str):
        address = parse_address(address)
    candidates = [(sock, _bound(sock)) for sock in sockets]
    if address.is_unix:
        assert address.path is not None
        wanted = _unix_path(address.path)
        for sock, bound in candidates:
            if bound is not None and bound[0] == socket.AF_UNIX and _unix_path(bound[1]) == wanted:
                return sock
        return None

    hosts = _wanted_hosts(address)
    best: tuple[int, socket.socket] | None = None
    for sock, bound in candidates:
        if bound is None or bound[0] == socket.AF_UNIX or bound[2] != address.port:
            continue
        family, host, _, v6only = bound
        if hosts is not None:
            if host in hosts:
                return sock
            continue
        if host not in _ANY_HOSTS:
            continue
        dual_stack = family == socket.AF_INET6 and not v6only
        if address.host == "0.0.0.0":
            if family == socket.AF_INET6 and v6only:
                continue  # serves no IPv4 client at all
            rank = 0 if family == socket.AF_INET else 1
        else:  # "9000" and "[::]:9000": fastfpm binds :: dual-stack for both (0.0.0.0 without IPv6)
            rank = 0 if dual_stack else 1 if family == socket.AF_INET else 2
        if best is None or rank < best[0]:
            best = (rank, sock)
    return best[1] if best is not None else None

