"""Replacing the master itself (listen.reuseport): a new master listens beside the old one, then the
old one stops gracefully, and no connection queued to either is lost (docs/operations.md).

Kernel facts this rests on (measured in tests/test_handover.py and benchmarks/handover.py):
- TCP: sockets bound with SO_REUSEPORT form a group; each new connection is queued to one listener of
  it, by a hash of its addresses unless a program attached to the group picks the listener. Closing a
  listener resets what waits in its accept queue, unless net.ipv4.tcp_migrate_req = 1 (Linux 5.14)
  moves it to another listener of the group. So the new master steers the group: a classic BPF
  program (SO_ATTACH_REUSEPORT_CBPF, no privilege needed) returning a listener's index in the group,
  the order in which the listeners joined it. Joining, the new master sends everything to index 0 (the
  old master) so nothing waits on a master whose workers may still fail to start; ready, it sends
  everything to index 1 (itself). The old master's queue then only shrinks: once its workers emptied
  it, SIGQUIT stops them and the close resets nothing. An index past the group's end (the old master
  gone, the new one moved to 0) makes the kernel fall back to the hash, so the program left behind is
  harmless. This assumes one hand-over at a time (two listeners in the group).
- unix: a connect(2) finds the socket by its path when it is made, so a socket renamed over the live
  path takes every later connection, and the old socket, unlinked, keeps only what already waits in
  its queue; closing a unix listener resets that, so the old master empties it first too.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

from fastfpm.address import accept_queue_length

__all__ = ["steer", "publish", "owns_path", "socket_file", "drain_queues", "migrate_req",
           "DRAIN_SECONDS", "linger_seconds", "LINGER_SECONDS"]

# asm-generic/socket.h; Python's socket module does not name it.
SO_ATTACH_REUSEPORT_CBPF = 51
# linux/filter.h: BPF_RET | BPF_K, "return the constant k".
_BPF_RET_K = 0x06 | 0x00

# How long a graceful stop waits for a hand-over pool's accept queue to empty before it stops the
# workers anyway (the queue is then reset, or migrated with tcp_migrate_req = 1).
DRAIN_SECONDS = 5.0
# The queue must read empty this many times in a row, _DRAIN_POLL apart: a connection completing its
# handshake as the steering changed reaches the queue a round trip later.
_DRAIN_EMPTY_READS = 3
_DRAIN_POLL = 0.02


def steer(sock: socket.socket, index: int) -> bool:
    """Send every new connection of sock's SO_REUSEPORT group to the listener at index (the order in
    which they joined); False where this is not a TCP socket. OSError from the kernel otherwise."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}, one instruction: return index.
    program = ctypes.create_string_buffer(struct.pack("=HBBI", _BPF_RET_K, 0, 0, index))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter}; the kernel copies it.
    fprog = struct.pack("HP", 1, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    return True


def socket_file(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the socket file at path, or None when there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def owns_path(pool: Any) -> bool:
    """Whether the file at the pool's unix path is still the one this master bound (a successor
    renames its own over it: then the old master must leave it alone when it closes)."""
    return pool.socket_file is not None and socket_file(pool.address.path) == pool.socket_file


def publish(pool: Any) -> str | None:
    """The pool's workers are ready: take over its address from the master listening there. unix:
    rename the socket bound beside the live path over it; TCP: steer the group to this listener.
    Returns what was done, for the log, or None (nothing to do)."""
    if pool.beside_path is not None:
        live = pool.address.path
        os.rename(pool.beside_path, live)
        pool.beside_path = None
        pool.socket_file = socket_file(live)
        return f"took over {live} from the master listening there"
    if pool.steered:
        steer(pool.socket, 1)
        pool.steered = False
        return f"new connections to {pool.address} now come to this master"
    return None


# How long a stopping worker of a listen.reuseport pool waits for the next request on each of its
# kept connections (Worker.serve_waiting), to close it right after that request's END_REQUEST, which
# nginx sees, instead of while idle, which races a request nginx is sending. Connections nginx sends
# nothing on for this long are at the far end of its LIFO cache and closed then.
LINGER_SECONDS = 2.0


def linger_seconds(pool_config: Any) -> float:
    """The stopping worker's wait for requests on its kept connections: LINGER_SECONDS (or the pool's
    idle_timeout, if shorter) with listen.reuseport, else 0 (close them at once, as before)."""
    if not pool_config.listen_reuseport:
        return 0.0
    return min(LINGER_SECONDS, float(pool_config.idle_timeout))


def migrate_req() -> bool | None:
    """net.ipv4.tcp_migrate_req (Linux 5.14): whether closing a listener moves its queue to another
    listener of its SO_REUSEPORT group; None where the kernel has no such setting."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def drain_queues(pools: Iterable[Any], log: Any, timeout: float = DRAIN_SECONDS) -> int:
    """A graceful stop of listen.reuseport pools: wait, while the workers still accept, until their
    accept queues stay empty, so that closing them resets nothing. Returns the connections still
    queued at the deadline (logged as a warning), 0 when all drained.

    Blocks the master for at most timeout; the workers do not need it meanwhile.
    """
    watched = [p for p in pools if p.config.listen_reuseport and not p.inherited]
    if not watched:
        return 0
    deadline = time.monotonic() + timeout
    empty_reads = 0
    waiting = 0
    while True:
        waiting = sum(accept_queue_length(p.socket) or 0 for p in watched)
        empty_reads = empty_reads + 1 if waiting == 0 else 0
        if empty_reads >= _DRAIN_EMPTY_READS or time.monotonic() >= deadline:
            break
        time.sleep(_DRAIN_POLL)
    if waiting:
        moved = any(p.socket.family != socket.AF_UNIX for p in watched) and migrate_req()
        fate = "moved to the other listener (tcp_migrate_req)" if moved else "reset"
        log.warning(f"{waiting} connection(s) still queued after {timeout:g}s of draining: they will be "
                    f"{fate}; is another master serving this address?")
    return waiting


