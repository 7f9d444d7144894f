"""What the master sleeps on: file descriptors, each with the handler that reads it (php-fpm's fpm_events).

The wake-up pipe (signals), the workers' output pipes and the ondemand listen sockets register here;
so can anything else the master comes to serve (a status listener, a template process). The master
loop calls wait(), which sleeps until one is readable or the timeout passes, then calls the handlers
of the readable ones. Signals reach it through a SignalPipe (php-fpm's fpm_signals does the same).
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable

Handler = Callable[[], None]


class Watcher:
    """A registry of file descriptors and the handlers to call when they become readable."""

    def __init__(self) -> None:
        self.handlers: dict[int, Handler] = {}
        self.on_interrupt: set[int] = set()

    def register(self, fd: int, handler: Handler, *, on_interrupt: bool = False) -> None:
        """Call handler when fd is readable (and, with on_interrupt, when a signal cut the sleep short)."""
        self.handlers[fd] = handler
        if on_interrupt:
            self.on_interrupt.add(fd)

    def unregister(self, fd: int, handler: Handler | None = None) -> None:
        """Stop watching fd (one that is not watched is no error); with handler, only if fd is
        still registered with that one (the fd may have been closed and its number reused)."""
        if handler is not None and self.handlers.get(fd) is not handler:
            return
        self.handlers.pop(fd, None)
        self.on_interrupt.discard(fd)

    def __contains__(self, fd: int) -> bool:
        return fd in self.handlers

    def wait(self, timeout: float) -> None:
        """Sleep until a registered fd is readable or timeout passes; call the readable fds' handlers.

        Handlers run in the order their fds were registered, and are the ones registered when the
        sleep began: a handler that unregisters another fd (or registers a new one) changes the next
        wait, not this one, so each handler must cope with being called for an fd it has closed.
        """
        handlers = dict(self.handlers)
        try:
            readable, _, _ = select.select(list(handlers), [], [], timeout)
        except InterruptedError:
            readable = [fd for fd in handlers if fd in self.on_interrupt]
        for fd in readable:
            handlers[fd]()


class SignalPipe:
    """Signals as readable bytes (signal.set_wakeup_fd): the handlers do nothing, the loop reads them."""

    def __init__(self) -> None:
        self.fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self, signals: tuple[int, ...]) -> None:
        """Route signals into the pipe; SIGPIPE is ignored (a vanished peer is an error code)."""
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, lambda signum, frame: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def read(self) -> list[int]:
        """The signals that arrived since the last read, each once, in order of arrival."""
        try:
            data = os.read(self.fd, 256)
        except BlockingIOError:
            return []
        return list(dict.fromkeys(data))

    def close(self) -> None:
        """Stop routing signals here and close the pipe."""
        signal.set_wakeup_fd(-1)
        for fd in (self.fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
