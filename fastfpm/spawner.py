"""How the master starts workers and learns that they ended (php-fpm's fpm_children, the fork part).

The master decides when a worker starts, in which pool and scoreboard slot; a spawner makes the
process and later reports its exit. DirectSpawner forks the master itself; fastfpm.template's
PreloadSpawner asks a pool's template process (one that imported the application once) to fork,
and falls back on DirectSpawner for pools without preload. Reaping goes through the spawner too, as
the templates' own exits are not workers'.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

from fastfpm.log import ErrorLog
from fastfpm.pool import Pool
from fastfpm.worker import run_worker

# A worker's pipes to the master, in the order run_worker takes them.
PIPE_KINDS = ("log", "stdout", "stderr")


class DirectSpawner:
    """Start each worker by forking the master; reap them with waitpid()."""

    def __init__(self, close_in_child: Callable[[set[int]], None]) -> None:
        # In the new child, before the worker runs: close the master's descriptors but these.
        self.close_in_child = close_in_child

    def start(self, pool: Pool, slot: int, log: ErrorLog) -> tuple[int, dict[int, str]]:
        """Fork a worker for pool's scoreboard slot; its pid and the read ends of its pipes (fd -> kind).

        The read ends are non-blocking; the write ends are the worker's alone.
        """
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in PIPE_KINDS]
        keep_in_child = {pool.socket.fileno(), pool.access_log_fd, *(w for _, w in pipes)}
        if pool.wake is not None:
            keep_in_child.add(pool.wake.write_fd)  # the header names it: the worker writes it as is
        # Block signals across fork so none reaches the child before it has reset its handlers.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
        master_pid = os.getpid()  # the child's getppid() would already be init's if we died meanwhile
        try:
            pid = os.fork()
            if pid == 0:
                self.close_in_child(keep_in_child)
                run_worker(pool.config, pool.socket.fileno(), pool.scoreboard.mapping, slot,
                           log, log_fd=pipes[0][1], stdout_fd=pipes[1][1], stderr_fd=pipes[2][1],
                           identity=pool.identity, access_log_fd=pool.access_log_fd,
                           master_pid=master_pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        read_ends = {}
        for (read_fd, write_fd), kind in zip(pipes, PIPE_KINDS, strict=True):
            os.close(write_fd)
            os.set_blocking(read_fd, False)
            read_ends[read_fd] = kind
        return pid, read_ends

    def exited(self) -> Iterator[tuple[int, int]]:
        """(pid, waitpid status) of each worker that has exited, one at a time, without blocking.

        The workers are the master's own children (a template's too: it forks them with
        CLONE_PARENT), so waitpid(-1) reaps them; its only other children are the templates, whose
        exits PreloadSpawner.exited takes out. Each exit is reported before the next is reaped, as
        the master acts on one (a replacement, a reload) before it looks for more.
        """
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            yield pid, status

