"""The master's workers, across its generations (php-fpm's fpm_children): starting one in a pool's
scoreboard slot through the spawner, reading its pipes, learning of its exit and saying how it ended.

What follows an exit (a replacement, a roll back, an emergency restart) is the master's decision.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from fastfpm.log import ErrorLog
from fastfpm.pool import Child, Pool
from fastfpm.stdio import WorkerOutput
from fastfpm.template import PreloadSpawner
from fastfpm.watcher import Watcher

if TYPE_CHECKING:
    from fastfpm.generation import Generation


def signal_name(signum: int) -> str:
    """SIGSEGV for 11; SIGRTMIN+N for real-time signals, which have no name of their own."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN < signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"signal {signum}"


def describe_exit(status: int) -> str:
    """How a worker ended, from its waitpid() status, in php-fpm's words (fpm_children_bury)."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        core = " - core dumped" if os.WCOREDUMP(status) else ""
        return f"exited on signal {signum} ({signal_name(signum)}{core})"
    return f"exited with code {os.WEXITSTATUS(status)}"


class Children:
    """Every worker of every generation the master runs: start, signal, and bury them."""

    def __init__(self, watcher: Watcher, log: Callable[[], ErrorLog],
                 generations: Callable[[], list[Generation]], master_fds: tuple[int, ...]) -> None:
        self.log = log                   # the master's error log (a reload may replace it)
        self.generations = generations   # the master's generations, the current one first
        self.master_fds = master_fds     # the master's own descriptors no worker may hold
        self.output = WorkerOutput(watcher, log)
        # Direct forks, or from a pool's template with preload (fastfpm.template).
        self.spawner = PreloadSpawner(self.close_in_child, self.output, generations)

    def spawn_worker(self, pool: Pool) -> bool:
        """Start one worker in a free scoreboard slot, with its log and output pipes."""
        log = self.log()
        slot = pool.scoreboard.free_index()
        if slot is None:
            log.error(f"[pool {pool.name}] no free scoreboard slot; not spawning")
            return False
        # The slot is claimed before the worker starts: a quick one may write "Idle" before the
        # master runs again, and claiming afterwards would overwrite that with "Starting" for good.
        pool.scoreboard.claim(slot, 0, pool.generation)
        pid, pipes = self.spawner.start(pool, slot, log)
        pool.scoreboard.set_pid(slot, pid)
        child = Child(pid, slot, pool)
        self.output.add(child, pipes)
        pool.children[pid] = child
        log.notice(f"[pool {pool.name}] child {pid} started")
        return True

    def close_in_child(self, keep: set[int]) -> None:
        """In a new child: close the master's descriptors the worker must not hold."""
        for fd in (*self.master_fds, *self.output.pipes):
            os.close(fd)
        for generation in self.generations():
            for pool in generation.pools:
                if pool.socket.fileno() not in keep:
                    pool.socket.close()
                if pool.access_log_fd not in keep:
                    pool.close_access_log()  # another pool's access log (php-fpm's fpm_log_init_child)

    def exited(self) -> Iterator[tuple[Generation, Child, int]]:
        """Each worker the spawner reports exited, its generation and waitpid() status, one at a
        time; its last output is read and its scoreboard slot free by then."""
        for pid, status in self.spawner.exited(self.log()):
            for generation in self.generations():
                child = generation.pop_child(pid)
                if child is not None:
                    self.output.read_last(child)
                    child.pool.scoreboard.release(child.slot)
                    yield generation, child, status
                    break

    def log_exit(self, child: Child, status: int, stopping: bool) -> None:
        """One line per ended worker, as php-fpm's fpm_children_bury writes it."""
        uptime = time.monotonic() - child.started
        if os.WIFSIGNALED(status):
            expected = (stopping or child.stopping) and os.WTERMSIG(status) in (signal.SIGTERM,
                                                                                signal.SIGKILL)
        else:
            expected = os.WEXITSTATUS(status) == 0
        self.log().log("notice" if expected else "warning",
                       f"[pool {child.pool.name}] child {child.pid} {describe_exit(status)} "
                       f"after {uptime:.6f} seconds from start")

    def kill_all(self, sig: int) -> None:
        """Send sig to every live worker of every pool and generation."""
        for generation in self.generations():
            generation.signal_all(sig)

    def close(self) -> None:
        """End the templates; close every worker's pipes (the master is exiting)."""
        self.spawner.close()
        self.output.close()
