#!/usr/bin/env python3
"""The kernel facts the shared kept set (issue 12, design option A) rests on, checked on this machine.

    python benchmarks/shared_epoll_probe.py

1. An epoll instance created before fork and waited on by several processes, holding items with
   EPOLLIN|EPOLLONESHOT: how many processes wake for N ready items, and does a waiter that is busy
   (not in epoll_wait) absorb any? With maxevents 1 and with 64.
2. pidfd_getfd(2) from a sibling: its cost per descriptor taken (with the pidfd kept, and with
   pidfd_open each time).
3. Entries are keyed by (file, descriptor number) of the process that added them: a process that
   took the same socket under another number cannot EPOLL_CTL_MOD the owner's entry (ENOENT) but
   can ADD its own; and the owner's entry survives the owner's close() while the thief holds the
   socket (so the owner must EPOLL_CTL_DEL before it closes).
4. Nesting: the pool's set as an item of each waiter's own set (EPOLLEXCLUSIVE is refused for an
   epoll target): how many of 4 nested waiters return from epoll_wait for one ready ONESHOT item
   in the pool's set, and how many of them then find it (epoll_wait on the pool set, timeout 0).
5. A non-blocking listen socket in each process's own set with EPOLLEXCLUSIVE, nobody in accept():
   with some processes registered but busy (registered first, so first in the socket's queue), are
   new connections still taken at once by the waiting ones, and how many EAGAINs (extra wake-ups)?
6. Three levels (a socket in a slot's kept set, that set in the pool's set, the pool's set in every
   worker's wait set): does readiness reach a sibling's wait set, and is a cycle (a wait set inside
   a set it holds) refused?
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
import tempfile
import time

_SYS_PIDFD_GETFD = 438
_LIBC = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """The target's fd as a new descriptor of ours (OSError when refused)."""
    got = _LIBC.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if got < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd")
    return got


def wake_ups(waiters: int, items: int, maxevents: int, busy_s: float = 0.2) -> tuple[int, int]:
    """(events delivered, distinct processes that got them) for `items` ready ONESHOT items."""
    ep = select.epoll()
    report_r, report_w = os.pipe()
    pairs = [socket.socketpair() for _ in range(items)]
    for a, _ in pairs:
        ep.register(a.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
    kids = []
    for _ in range(waiters):
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            while events := ep.poll(1.5, maxevents):
                for fd, _ in events:
                    os.write(report_w, f"{os.getpid()} {fd}\n".encode())
                time.sleep(busy_s)  # busy serving: not waiting, so it must take nothing meanwhile
            os._exit(0)
        kids.append(pid)
    os.close(report_w)
    time.sleep(0.3)  # every waiter is in epoll_wait
    for _, b in pairs:
        b.send(b"x")
    for pid in kids:
        os.waitpid(pid, 0)
    words = os.read(report_r, 1 << 16).decode().split()
    os.close(report_r)
    ep.close()
    for a, b in pairs:
        a.close()
        b.close()
    return len(words) // 2, len(set(words[0::2]))


def getfd_cost(n: int = 20000) -> tuple[float, float]:
    """(µs per pidfd_getfd + close with a kept pidfd, µs with pidfd_open + close each time), taken
    from a forked sibling as a thief would."""
    a, b = socket.socketpair()
    owner = os.fork()
    if owner == 0:
        time.sleep(30)
        os._exit(0)
    try:
        pidfd = os.pidfd_open(owner)
        start = time.perf_counter_ns()
        for _ in range(n):
            os.close(pidfd_getfd(pidfd, a.fileno()))
        kept = (time.perf_counter_ns() - start) / n / 1000
        start = time.perf_counter_ns()
        for _ in range(n):
            fresh = os.pidfd_open(owner)
            os.close(pidfd_getfd(fresh, a.fileno()))
            os.close(fresh)
        each = (time.perf_counter_ns() - start) / n / 1000
        os.close(pidfd)
        return kept, each
    finally:
        os.kill(owner, 9)
        os.waitpid(owner, 0)
        a.close()
        b.close()


def keyed_entries() -> list[str]:
    """What a thief can do to the owner's epoll entry, and what the owner's close() leaves behind."""
    ep = select.epoll()
    a, b = socket.socketpair()
    ep.register(a.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
    stolen = os.dup(a.fileno())  # another number for the same file, as pidfd_getfd gives
    notes = []
    try:
        ep.modify(stolen, select.EPOLLIN | select.EPOLLONESHOT)
        notes.append("MOD of the owner's entry under the thief's number: allowed")
    except OSError as exc:
        notes.append(f"MOD of the owner's entry under the thief's number: {errno.errorcode[exc.errno]}")
    ep.register(stolen, select.EPOLLIN | select.EPOLLONESHOT)
    notes.append("ADD under the thief's number: allowed (two entries for one socket)")
    owner_fd = a.detach()
    os.close(owner_fd)  # the owner closes without DEL; the thief still holds the socket
    b.send(b"x")
    fds = sorted(fd for fd, _ in ep.poll(0.2))
    notes.append(f"after the owner's close() without DEL, a byte wakes entries {fds} "
                 f"(owner's number {owner_fd}, thief's {stolen})")
    os.close(stolen)
    b.close()
    ep.close()
    return notes


def nested(waiters: int = 4) -> tuple[str, list[tuple[bool, int]]]:
    """(what EPOLLEXCLUSIVE on an epoll target gives, [(returned from its own set, items got)])."""
    pool = select.epoll()
    a, b = socket.socketpair()
    pool.register(a.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
    probe = select.epoll()
    try:
        probe.register(pool.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        exclusive = "allowed"
    except OSError as exc:
        exclusive = errno.errorcode[exc.errno]
    probe.close()
    report_r, report_w = os.pipe()
    kids = []
    for _ in range(waiters):
        pid = os.fork()
        if pid == 0:
            own = select.epoll()
            own.register(pool.fileno(), select.EPOLLIN)
            woke = bool(own.poll(1.5, 1))
            got = len(pool.poll(0, 1)) if woke else 0
            os.write(report_w, f"{int(woke)}{got} ".encode())
            os._exit(0)
        kids.append(pid)
    time.sleep(0.3)
    b.send(b"x")
    for pid in kids:
        os.waitpid(pid, 0)
    os.close(report_w)
    results = [(w[0] == "1", int(w[1])) for w in os.read(report_r, 1024).decode().split()]
    os.close(report_r)
    return exclusive, results


def exclusive_listen(busy: int, waiting: int, connections: int = 20) -> tuple[int, int, float]:
    """(accepted, EAGAIN, slowest ms from connect to the close by the accepter)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "l.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(128)
        listener.setblocking(False)
        report_r, report_w = os.pipe()
        kids = []
        for i in range(busy + waiting):
            pid = os.fork()
            if pid == 0:
                ep = select.epoll()
                ep.register(listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
                if i < busy:
                    time.sleep(3)  # registered, never waiting: busy serving
                    os._exit(0)
                deadline = time.monotonic() + 2.5
                while time.monotonic() < deadline:
                    if ep.poll(0.5, 1):
                        try:
                            listener.accept()[0].close()
                            os.write(report_w, b"A")
                        except BlockingIOError:
                            os.write(report_w, b"E")
                os._exit(0)
            kids.append(pid)
            time.sleep(0.05)  # registration order: the busy ones first
        time.sleep(0.3)
        slowest = 0.0
        for _ in range(connections):
            client = socket.socket(socket.AF_UNIX)
            start = time.monotonic()
            client.connect(path)
            client.settimeout(1.0)
            with contextlib.suppress(OSError):
                client.recv(1)  # b"" once the accepter closed it; a timeout if nobody did
            slowest = max(slowest, (time.monotonic() - start) * 1000)
            client.close()
            time.sleep(0.02)
        for pid in kids:
            os.waitpid(pid, 0)
        os.close(report_w)
        words = os.read(report_r, 4096).decode()
        os.close(report_r)
        listener.close()
        return words.count("A"), words.count("E"), slowest


def three_levels() -> list[str]:
    """What a sibling and the owner see when a socket in the owner's kept set turns readable."""
    pool, kept, owner_wait, sibling_wait = (select.epoll() for _ in range(4))
    a, b = socket.socketpair()
    kept.register(a.fileno(), select.EPOLLIN | select.EPOLLET)
    owner_wait.register(kept.fileno(), select.EPOLLIN)
    owner_wait.register(pool.fileno(), select.EPOLLIN)
    sibling_wait.register(pool.fileno(), select.EPOLLIN)
    notes = []
    try:
        kept.register(owner_wait.fileno(), select.EPOLLIN)
        notes.append("a cycle of sets: allowed")
    except OSError as exc:
        notes.append(f"a cycle of sets (wait set inside the kept set it holds): {errno.errorcode[exc.errno]}")
    pool.register(kept.fileno(), select.EPOLLIN | select.EPOLLONESHOT)  # armed: the owner is busy
    b.send(b"x")
    names = {pool.fileno(): "pool set", kept.fileno(): "kept set"}
    seen = [names.get(fd, fd) for fd, _ in owner_wait.poll(0.1)]
    notes.append(f"owner's wait set reports {seen}; sibling's wait set reports "
                 f"{[names.get(fd, fd) for fd, _ in sibling_wait.poll(0.1)]}")
    first, second = pool.poll(0, 1), pool.poll(0, 1)
    notes.append(f"the pool set gives the kept set {len(first)} time(s), then {len(second)} (ONESHOT); "
                 f"the kept set gives the socket {len(kept.poll(0, 1))} time(s), then "
                 f"{len(kept.poll(0, 1))} (EPOLLET)")
    for ep in (pool, kept, owner_wait, sibling_wait):
        ep.close()
    a.close()
    b.close()
    return notes


def main() -> None:
    """Print the three facts."""
    for maxevents in (1, 64):
        delivered, distinct = wake_ups(4, 8, maxevents)
        print(f"4 waiters, 8 ready ONESHOT items, maxevents {maxevents}: {delivered} events, "
              f"taken by {distinct} distinct waiter(s)")
    kept, each = getfd_cost()
    print(f"pidfd_getfd + close: {kept:.2f} µs with the pidfd kept, {each:.2f} µs with pidfd_open each time")
    for note in keyed_entries():
        print(note)
    exclusive, results = nested()
    print(f"EPOLLEXCLUSIVE on an epoll target: {exclusive}; 4 nested waiters, one ready item: "
          f"{sum(w for w, _ in results)} returned from epoll_wait, {sum(g for _, g in results)} got it")
    for busy, waiting in ((3, 1), (2, 2), (0, 4)):
        accepted, again, slowest = exclusive_listen(busy, waiting)
        print(f"listen socket EPOLLEXCLUSIVE, {busy} busy + {waiting} waiting, 20 connections one at a "
              f"time: {accepted} accepted, {again} EAGAIN, slowest {slowest:.1f} ms")
    for note in three_levels():
        print(note)


if __name__ == "__main__":
    main()
