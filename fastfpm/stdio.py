"""The workers' pipes to the master (php-fpm's fpm_stdio): their log lines, stdout and stderr.

Each worker has three: its own log lines (already formatted, written whole), and its stdout and
stderr (logged line by line when catch_workers_output is on, else dropped, as php-fpm does). Only
the master writes the error log, so SIGUSR1 (logrotate) reopens one file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

from fastfpm.log import ErrorLog
from fastfpm.pool import Child
from fastfpm.watcher import Watcher


class WorkerOutput:
    """The read ends of every worker's pipes, watched by the master, and where their lines go."""

    def __init__(self, watcher: Watcher, log: Callable[[], ErrorLog]) -> None:
        self.watcher = watcher
        self.log = log                        # the master's error log (a reload may replace it)
        self.pipes: dict[int, Child] = {}     # read fd -> the worker writing into it

    def add(self, child: Child, pipes: dict[int, str]) -> None:
        """Watch a new worker's pipes (read fd -> "log" | "stdout" | "stderr")."""
        for fd, kind in pipes.items():
            child.pipes[fd] = kind
            self.pipes[fd] = child
            self.watcher.register(fd, partial(self.read, fd))

    def read_last(self, child: Child) -> None:
        """After a worker exited: whatever it wrote last, then its pipes are closed."""
        for fd in list(child.pipes):
            self.read(fd, final=True)

    def read(self, fd: int, final: bool = False) -> None:
        """Pass a worker's log lines through, and its stdout/stderr lines as catch_workers_output says."""
        child = self.pipes.get(fd)
        if child is None:
            return
        kind = child.pipes[fd]
        log = self.log()
        chunks = [child.partial.pop(fd, b"")]
        eof = False
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                eof = True
                break
            chunks.append(data)
            if not final:
                break
        data = b"".join(chunks)
        lines = data.split(b"\n")
        rest = lines.pop()
        # A partial line waits for its end up to log_limit; longer, it is logged in pieces.
        if rest and not (eof or final) and len(rest) < log.limit:
            child.partial[fd] = rest
        elif rest:
            lines.append(rest)
        pool = child.pool
        for line in lines:
            text = line.decode("utf-8", "backslashreplace")
            if kind == "log":
                log.write_line(text)
            elif pool.config.catch_workers_output:
                if pool.config.decorate_workers_output:
                    log.child_said(pool.name, child.pid, kind, text)
                else:
                    log.write_line(text)
        if eof or final:
            self.watcher.unregister(fd)
            del self.pipes[fd]
            del child.pipes[fd]
            os.close(fd)

    def close(self) -> None:
        """Close every pipe (the master is exiting)."""
        for fd in self.pipes:
            self.watcher.unregister(fd)
            try:
                os.close(fd)
            except OSError:
                pass
        self.pipes.clear()
