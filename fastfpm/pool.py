"""One pool, as php-fpm's fpm_worker_pool: its config, listen socket, scoreboard, pm state and workers.

The master keeps one Pool per [pool] section of each generation it runs (fastfpm.generation); a
Child is what it knows of one worker it started in the pool.
"""

from __future__ import annotations

import errno
import os
import select
import time
from dataclasses import dataclass, field
from typing import Any

from fastfpm import accesslog, handover, pm
from fastfpm.address import (
    accept_queue_length,
    create_listen_socket,
    defer_accept,
    local_address,
    parse_address,
    tcp_keepalive,
)
from fastfpm.log import ErrorLog
from fastfpm.scoreboard import STAGE_STARTING, Scoreboard
from fastfpm.slowlog import SLOWLOG_MODE
from fastfpm.wake import WakePipe


@dataclass
class Child:
    """What the master knows of one worker it forked."""

    pid: int
    slot: int
    pool: Pool
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False          # asked to exit (pm kill, reload, timeout): not replaced
    killed_by_pm: bool = False
    pipes: dict[int, str] = field(default_factory=dict)    # read fd -> "log" | "stdout" | "stderr"
    partial: dict[int, bytes] = field(default_factory=dict)

    def signal(self, sig: int) -> None:
        """kill() the worker; one that is already gone is no error."""
        try:
            os.kill(self.pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise


class Pool:
    """One pool: its config, listen socket, scoreboard, pm state and live workers."""

    def __init__(self, config: Any, log: ErrorLog, generation: int, sock: Any = None,
                 identity: Any = None, inherited: bool = False) -> None:
        self.config = config
        # A socket systemd passed in (socket activation) is systemd's: never unlink its file.
        self.inherited = inherited
        self.identity = identity         # the user/group workers switch to (fastfpm.process)
        self.name: str = config.name
        self.log = log
        self.generation = generation
        self.address = parse_address(config.listen)
        # Opened by the master, as php-fpm's fpm_log_open: workers inherit it (-1: no access log).
        self.access_log_fd = accesslog.open_log(config.access_log) if config.access_log else -1
        try:
            self.socket = sock if sock is not None else create_listen_socket(
                self.address, backlog=config.listen_backlog, mode=config.listen_mode,
                owner=config.listen_owner, group=config.listen_group, reuseport=config.listen_reuseport)
        except BaseException:
            self.close_access_log()
            raise
        self.take_over_if_needed(sock is None)
        # A silent TCP client is kept from the workers by the kernel (systemd's sockets get it too).
        defer_accept(self.socket)
        # Accepted connections inherit it: a web server gone without a FIN is found and dropped.
        tcp_keepalive(self.socket, config.listen_keepalive, int(config.listen_keepalive_idle),
                      int(config.listen_keepalive_interval), config.listen_keepalive_count)
        # Room for two full generations: during a reload the old workers finish while new ones start.
        self.scoreboard = Scoreboard(2 * config.pm_max_children, config.name)
        # pm counts max_children_reached and slow_requests straight into the scoreboard header.
        self.state = pm.PmState(counters=self.scoreboard.header)
        # dynamic and ondemand grow at once when the last idle worker turns busy (static never grows).
        self.wake = WakePipe(self.scoreboard.header) if config.pm != "static" else None
        self.children: dict[int, Child] = {}
        self.initial = pm.initial_spawn(config)
        self.prepare_slowlog()

    def take_over_if_needed(self, created: bool) -> None:
        """listen.reuseport (fastfpm.handover): note where the socket was bound, and, for a TCP one
        this master made, keep new connections with the master already listening until this one is
        ready (handover.publish, when the generation serves)."""
        self.beside_path: str | None = None   # unix: bound beside a live master's socket
        self.steered = False                  # TCP: the group steered to the old master
        bound = local_address(self.socket).path if self.address.is_unix else None
        self.socket_file = handover.socket_file(bound) if bound else None
        if not (created and self.config.listen_reuseport):
            return
        if bound is not None and bound != self.address.path:
            self.beside_path = bound
            self.log.notice(f"[pool {self.name}] another master listens on {self.address}: listening "
                            f"beside it on {bound} until ready")
        elif bound is None:
            self.steered = handover.steer(self.socket, 0)

    def prepare_slowlog(self) -> None:
        """Create the slowlog file for the workers, which append to it as the pool's user."""
        if not (self.config.slowlog and self.config.request_slowlog_timeout):
            return
        fd = os.open(self.config.slowlog, os.O_WRONLY | os.O_APPEND | os.O_CREAT, SLOWLOG_MODE)
        try:
            if self.identity is not None:
                os.fchown(fd, self.identity.uid, self.identity.gid)
        finally:
            os.close(fd)

    def reopen_access_log(self) -> bool:
        """SIGUSR1: open access.log again onto the same descriptor (False: there is none).

        OSError when it cannot be opened; the old file then stays the log.
        """
        if self.access_log_fd < 0:
            return False
        accesslog.reopen_log(self.config.access_log, self.access_log_fd)
        return True

    def close_access_log(self) -> None:
        if self.access_log_fd >= 0:
            os.close(self.access_log_fd)
            self.access_log_fd = -1

    def snapshot(self) -> pm.PoolSnapshot:
        """The pool's workers as pm's decisions see them."""
        workers = []
        for child in self.children.values():
            slot = self.scoreboard.read(child.slot)
            workers.append(pm.worker_from_slot(slot, started=child.started, stopping=child.stopping))
        return pm.PoolSnapshot(tuple(workers))

    def all_started(self) -> bool:
        """True once the initial workers have imported the app and wait for connections."""
        live = [c for c in self.children.values() if not c.stopping]
        if len(live) < self.initial:
            return False
        return all(self.scoreboard.read(c.slot).stage != STAGE_STARTING for c in live)

    def close(self, keep_socket: bool = False) -> None:
        """Release the scoreboard and (unless reused by a reload) the socket and its file."""
        if self.wake is not None:
            self.wake.close()
        self.scoreboard.close()
        self.close_access_log()
        if keep_socket:
            return
        if self.inherited:
            self.socket.close()
            return
        self.socket.close()
        # Never the file a successor renamed over the path (a hand-over): only the one bound here.
        path = self.beside_path or (self.address.path if handover.owns_path(self) else None)
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass


def pending_connections(sock: Any) -> int:
    """Connections waiting on a listen socket: the accept queue's length (TCP_INFO, sock_diag), or,
    where the kernel does not say, 1 when the socket is readable."""
    pending = accept_queue_length(sock)
    if pending is None:
        pending = 1 if select.select([sock.fileno()], [], [], 0)[0] else 0
    return pending
